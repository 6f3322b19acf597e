"""CUDA graphs as a runner of the one sampler loop: one graph per (scale, batch bucket, rows,
schedule) holding the AR step, the head's per-scale constants, the scale's whole ODE plan
(velocity calls, guidance, the solver's updates) and the hand-off to the next scale.

FlowAR at batch 1 is hundreds of small kernel launches per scale; replaying a captured graph
removes the launch cost. Everything captured reads and writes static buffers: the sampler's
:class:`~flowar.sampling.sampler.Workspace` and the static storage of :class:`~flowar.runtime.stages.EngineStages`.
Before each replay the sampler copies in only that scale's noise (the labels go in at start).
All graphs share one memory pool. A TensorRT enqueue on the capture stream is captured like any
other kernel; the VAE decode runs right after the last scale, uncaptured.

Graphs are keyed by value: a schedule is a frozen record (its plan a tuple of frozen records),
so the same settings meet the same graphs however the schedule was built. Batch sizes are
bucketed (nano-vllm's scheme): a batch runs at the smallest bucket that holds it, padded with
copies of its last sample, so a replica captures a few sizes, not every size up to its maximum.

Without ``capture`` (CPU, tests) the same plan runs the same function eagerly on the same
persistent workspaces, so the planning, the static buffers and the results are checked without
a GPU; nothing is padded there (padding only saves captures).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from flowar.config import FlowARConfig
from flowar.sampling.sampler import Stages, Workspace, check_finite, run_scale
from flowar.sampling.schedule import Schedule


class GraphRunner:
    """A :class:`~flowar.sampling.sampler.ScaleRunner` that captures each scale once and replays it.

    One workspace per (batch, rows, schedule) and one graph per (batch, rows, schedule, scale),
    all graphs in one memory pool; at most ``max_workspaces`` workspaces are kept (the least
    recently used goes, with its graphs), so a server meeting ever new settings does not grow.
    The first call of a scale runs it eagerly (on a side stream: the warm-up TensorRT and cuBLAS
    want, and the result of that call), then captures the same call; later calls replay. The
    stages must keep their buffers static (the runtime's EngineStages do).
    """

    def __init__(self, device: torch.device | str, capture: bool | None = None, buckets: tuple[int, ...] = (),
                 max_workspaces: int = 16):
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buckets = tuple(sorted(set(buckets)))
        self.max_workspaces = max_workspaces
        self.workspaces: OrderedDict[tuple, Workspace] = OrderedDict()     # (B, R, X, schedule) -> workspace
        self.graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}              # (B, R, X, schedule, k) -> graph
        self.pool = None

    def bucket(self, B: int) -> int:
        if not self.capture:
            return B
        return next((b for b in self.buckets if b >= B), B)

    def workspace(self, config: FlowARConfig, schedule: Schedule, B: int, R: int, official_rows: bool,
                  device) -> Workspace:
        key = (B, R, R if official_rows else B, schedule)
        ws = self.workspaces.pop(key, None) or Workspace(config, schedule, B, R, official_rows, device)
        self.workspaces[key] = ws                                           # most recently used last
        while len(self.workspaces) > self.max_workspaces:
            old, _ = self.workspaces.popitem(last=False)
            for g in [g for g in self.graphs if g[:4] == old]:
                del self.graphs[g]
        return ws

    def run(self, stages: Stages, ws: Workspace, schedule: Schedule, k: int, check: str,
            rows_trace: list[int] | None) -> None:
        if not self.capture:
            run_scale(stages, ws, schedule, k, check, rows_trace)
            return
        key = (ws.B, ws.R, ws.X, schedule, k)
        g = self.graphs.get(key)
        if g is None:
            self._warm_up(lambda: run_scale(stages, ws, schedule, k, check, rows_trace))   # this call's result
            self.graphs[key] = self._capture(lambda: run_scale(stages, ws, schedule, k, "none"))
            return
        g.replay()
        if rows_trace is not None:
            rows_trace.extend(ws.R if e.guided else ws.X for e in schedule.plan[k])
        if check != "none":
            check_finite(ws.view("z", k), "velocity", k, ws.config.scales[k])      # one sync per scale

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
