"""CUDA graphs as a runner of the one sampler loop: one graph per (scale, batch, rows, schedule)
holding the AR step, the head's per-scale constants, the scale's whole ODE plan (velocity calls,
guidance, the solver's updates) and the hand-off to the next scale.

FlowAR at batch 1 is hundreds of small kernel launches per scale; replaying a captured graph
removes the launch cost. Everything captured reads and writes static buffers: the sampler's
:class:`~flowar.sampling.sampler.Workspace` and the runtime's :class:`~flowar.runtime.stages.BufferPlan`.
Before each replay the sampler copies in only that scale's noise (the labels go in at start).
All graphs share one memory pool. A TensorRT enqueue on the capture stream is captured like any
other kernel; the VAE decode runs right after the last scale, uncaptured.

Without ``capture`` (CPU, tests) the same plan runs the same function eagerly, so the planning,
the static buffers and the results are checked without a GPU.
"""

from __future__ import annotations

import torch

from flowar.config import FlowARConfig
from flowar.sampling.sampler import Stages, Workspace, _finite, run_scale
from flowar.sampling.schedule import Schedule


class GraphRunner:
    """A :class:`~flowar.sampling.sampler.ScaleRunner` that captures each scale once and replays it.

    One workspace and one graph per (scale, batch, rows, schedule), all graphs in one memory
    pool. The first call of a scale runs it eagerly (on a side stream: the warm-up TensorRT and
    cuBLAS want, and the result of that call), then captures the same call; later calls replay.
    The stages must keep their buffers static (the runtime's EngineStages do). Without
    ``capture`` (CPU, tests) the same plan runs eagerly on the same persistent workspace.
    """

    def __init__(self, device: torch.device | str, capture: bool | None = None):
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.workspaces: dict[tuple, tuple[Schedule, Workspace]] = {}   # the schedule kept alive: ids stay unique
        self.graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}
        self.pool = None

    def _key(self, ws: Workspace, schedule: Schedule, k: int | None = None) -> tuple:
        return (ws.B, ws.R, ws.X, id(schedule), k)

    def workspace(self, config: FlowARConfig, schedule: Schedule, B: int, R: int, official_rows: bool,
                  device) -> Workspace:
        key = (B, R, R if official_rows else B, id(schedule), None)
        if key not in self.workspaces:
            self.workspaces[key] = (schedule, Workspace(config, schedule, B, R, official_rows, device))
        return self.workspaces[key][1]

    def run(self, stages: Stages, ws: Workspace, schedule: Schedule, k: int, check: str,
            rows_trace: list[int] | None) -> None:
        key = self._key(ws, schedule, k)
        if not self.capture:
            run_scale(stages, ws, schedule, k, check, rows_trace)
            return
        g = self.graphs.get(key)
        if g is None:
            self._warm_up(lambda: run_scale(stages, ws, schedule, k, check, rows_trace))   # this call's result
            self.graphs[key] = self._capture(lambda: run_scale(stages, ws, schedule, k, "none"))
            return
        g.replay()
        if rows_trace is not None:
            rows_trace.extend(ws.R if e.guided else ws.X for e in schedule.plan[k])
        if check != "none":
            _finite(ws.view("z", k), "velocity", k, ws.config.scales[k])      # one sync per scale

    # The two CUDA steps, apart so that the logic above runs on a CPU against a stand-in (tests).
    def _warm_up(self, fn) -> None:
        """Run ``fn`` on a side stream (the warm-up TensorRT and cuBLAS want before capture)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, fn):
        """A CUDA graph of ``fn`` (recorded, not run), in the runner's one memory pool."""
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            fn()
        return g
