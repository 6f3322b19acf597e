"""CUDA graphs over the one sampler: one graph per (scale, batch) holding the AR step, the head's
per-scale constants, the whole Euler ODE of the scale (velocity calls, guidance, updates) and
the hand-off to the next scale.

FlowAR at batch 1 is hundreds of small kernel launches per scale; replaying a captured graph
removes the launch cost. Everything captured reads and writes static buffers: the sampler's
:class:`~flowar.sampler.Workspace` and the runtime's :class:`~flowar.runtime.pipeline.BufferPlan`.
Before each replay only the labels and that scale's noise are copied in. All graphs share one
memory pool. A TensorRT enqueue on the capture stream is captured like any other kernel.

Without ``capture`` (CPU, tests) the same plan runs the same function eagerly, so the planning,
the static buffers and the results are checked without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.sampler import NoiseFn, Stages, Workspace, run_scale
from flowar.schedule import Schedule


class GraphedSampler:
    def __init__(self, stages: Stages, config: FlowARConfig, schedule: Schedule, batch: int,
                 device: torch.device | str, capture: bool | None = None):
        self.stages, self.config, self.schedule, self.B = stages, config, schedule, batch
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.R = schedule.rows(batch)
        self.ws = Workspace(config, schedule, batch, self.R, False, self.device)
        self.labels = torch.zeros(self.R, dtype=torch.int64, device=self.device)
        self.labels[batch:] = config.null_class
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def plan(self) -> list[dict]:
        """One entry per graph: scale, rows, and the static buffers it reads and writes."""
        out = []
        for k, side in enumerate(self.config.scales):
            out.append({"scale": k, "side": side, "batch": self.B, "rows": self.R,
                        "reads": {"draw": tuple(self.ws.view("draw", k).shape)} |
                                 ({"next_in": tuple(self.ws.view("next_in", k).shape)} if k else {}),
                        "writes": {"z": tuple(self.ws.view("z", k).shape)} |
                                  ({"next_in": tuple(self.ws.view("next_in", k + 1).shape)}
                                   if k + 1 < self.config.n_scales else {}),
                        "evaluations": len(self.schedule.plan[k])})
        return out

    def _start(self, labels_B: Tensor) -> None:
        self.labels[: self.B].copy_(labels_B)
        self.stages.start(self.labels)

    def build(self) -> "GraphedSampler":
        """Warm up every scale once, then capture each scale into its graph (CUDA only)."""
        self._start(torch.zeros(self.B, dtype=torch.int64, device=self.device))
        if not self.capture:
            return self
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for k in range(self.config.n_scales):
                run_scale(self.stages, self.ws, self.schedule, k, "none")
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pool = torch.cuda.graph_pool_handle()
        for k in range(self.config.n_scales):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                run_scale(self.stages, self.ws, self.schedule, k, "none")
            self.graphs[k] = g
        return self

    def sample(self, labels_B: Tensor, noise: NoiseFn) -> Tensor:
        """Tokens (B, C, S, S): copy labels and each scale's noise in, replay, read the result."""
        c = self.config
        self._start(labels_B.to(self.device))
        for k in range(c.n_scales):
            self.ws.view("draw", k).copy_(noise(k, (self.R, c.tokens_per_scale[k], c.latent_channels)))
            if self.capture:
                self.graphs[k].replay()
            else:
                run_scale(self.stages, self.ws, self.schedule, k, "none")
        return self.ws.tokens()

