"""The lean runtime: engines bound to static buffers, fed to the one sampler.

:class:`BufferPlan` allocates every tensor a stage touches once, at its largest size over all
(scale, rows), and hands out views with the exact per-scale shape; nothing is allocated while
sampling. :class:`EngineStages` implements the sampler's ``Stages`` protocol on top of the
engines, so ``flowar.sampling.sampler.sample`` runs unchanged: there is no second sampling loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.specs import StageSpec, stage_specs
from flowar.model.layers import grid_positions
from flowar.runtime.engines import Engine


def blocks(rows: int, best: int, sizes: list[int]) -> list[int]:
    """``rows`` as consecutive blocks of a call plan: ``best`` as often as it fits, then the largest
    measured sizes that fit what is left."""
    out, left = [best] * (rows // best), rows % best
    for s in sorted(sizes, reverse=True):
        while s <= left:
            out.append(s)
            left -= s
    return out


class BufferPlan:
    """Static storage per tensor name (max numel over every scale and row count), viewed per use."""

    def __init__(self, specs: dict[str, StageSpec], config: FlowARConfig, max_batch: int, device: torch.device):
        self.device = device
        sizes: dict[str, tuple[int, torch.dtype]] = {}
        for spec in specs.values():
            rows_max = spec.max_rows(max_batch)
            for k in spec.scales(config):
                for name, shape in spec.shapes(k, rows_max).items():
                    if name in spec.from_stage:
                        continue              # an earlier stage's output, passed as it is
                    key = f"{spec.name}.{name}"
                    n = math.prod(shape)
                    if n > sizes.get(key, (0, None))[0]:
                        sizes[key] = (n, spec.dtype(name))
        self.storage = {k: torch.zeros(n, dtype=dt, device=device) for k, (n, dt) in sizes.items()}

    def view(self, stage: str, name: str, shape: tuple[int, ...]) -> Tensor:
        return self.storage[f"{stage}.{name}"][: math.prod(shape)].view(shape)

    def addresses(self) -> dict[str, int]:
        return {k: v.data_ptr() for k, v in self.storage.items()}


@dataclass(slots=True)
class ScaleContext:
    k: int
    inputs: dict[str, Tensor]            # head_prep outputs feeding the velocity calls, at R rows
    calls: dict = field(default_factory=dict)   # rows -> (inputs, outputs, blocks) of a velocity call, built once


class EngineStages:
    """The sampler's stages on engines and static buffers.

    ``plan``: the directory's call plan (:mod:`flowar.commands.plan`): a call of more rows than a
    stage's block at that scale runs as consecutive blocks (row slices of the same static buffers).
    """

    def __init__(self, engines: dict[str, Engine], config: FlowARConfig, max_batch: int, device: torch.device,
                 specs: dict[str, StageSpec], plan: dict | None = None):
        self.engines, self.config, self.device = engines, config, device
        self.max_batch = max_batch
        self.max_rows = specs["ar"].max_rows(max_batch)
        self.specs = specs
        self.plan = (plan or {}).get("stages", {})
        self.buffers = BufferPlan(specs, config, max_batch, device)
        c = config
        self.prefix = torch.zeros(self.max_rows, c.seq_len, c.latent_channels, device=device)
        self.pos = [grid_positions(s).to(device) for s in c.scales]
        self.R = 0

    def _io(self, stage: str, k: int, rows: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        spec = self.specs[stage]
        shapes = spec.shapes(k, rows)
        ins = {n: self.buffers.view(stage, n, shapes[n]) for n in spec.inputs}
        outs = {n: self.buffers.view(stage, n, shapes[n]) for n in spec.outputs}
        return ins, outs

    def _blocks(self, stage: str, k: int, ins: dict[str, Tensor], outs: dict[str, Tensor], rows: int) -> list:
        """[(inputs, outputs)] of the plan's row blocks of one call (the call itself without a plan)."""
        st = self.plan.get(stage)
        best = st["block"].get(str(k)) if st else None
        if best is None or best >= rows:
            return [(ins, outs)]
        spec, out, begin = self.specs[stage], [], 0
        for b in blocks(rows, best, st["sizes"]):
            part = {n: t[begin:begin + b] if n in spec.row_tensors else t for n, t in (ins | outs).items()}
            out.append(({n: part[n] for n in ins}, {n: part[n] for n in outs}))
            begin += b
        return out

    def _run(self, stage: str, k: int, ins: dict[str, Tensor], outs: dict[str, Tensor], rows: int) -> None:
        for i, o in self._blocks(stage, k, ins, outs, rows):
            self.engines[stage].infer(i, o, profile=k)

    def warm_up(self, batch_sizes=None, every_engine: bool = False) -> int:
        """Run engines once at each shape sampling will give them (``batch_sizes``: those batches;
        default every size up to the limit), on zeros, so that whatever a shape sets up the first
        time (eager PyTorch's oneDNN primitives and weight reorders; a compiled engine's, smaller)
        happens here and not in an image. By default only the engines that set up a lot per shape
        (``warm``); ``every_engine``: all (a served replica, before it takes requests). Returns the
        calls made."""
        n = 0
        sizes = sorted(set(batch_sizes or range(1, self.max_batch + 1)))
        for stage, eng in self.engines.items():
            if not (every_engine or getattr(eng, "warm", False)):
                continue
            spec, st = self.specs[stage], self.plan.get(stage)
            for k in spec.scales(self.config):
                calls = {b * m for b in sizes for m in (spec.rows_per_sample, 1)}          # B and 2B rows
                best = st["block"].get(str(k)) if st else None
                shapes = {b for r in calls for b in (blocks(r, best, st["sizes"]) if best else [r])}
                for r in sorted(shapes):
                    dims = spec.shapes(k, r)
                    eng.infer({n_: torch.zeros(dims[n_], dtype=spec.dtype(n_), device=self.device) for n_ in spec.inputs},
                              {n_: torch.empty(dims[n_], dtype=spec.dtype(n_), device=self.device) for n_ in spec.outputs},
                              profile=k)
                    n += 1
        return n

    def start(self, labels_R: Tensor) -> None:
        R = labels_R.shape[0]
        if R > self.max_rows:
            raise FlowARError(f"at most {self.max_batch} samples per batch (the engines' --max-batch)",
                              f"{R // 2 if R > 1 else R}", "sample in smaller batches or re-export with a larger --max-batch")
        self.R = R
        self.prefix.zero_()
        ins, _ = self._io("ar", 0, R)
        ins["labels"].copy_(labels_R)

    def ar(self, k: int, x_in: Tensor | None) -> Tensor:
        c, R = self.config, self.R
        b, e = c.scale_begin[k], c.scale_end[k]
        if x_in is not None:
            self.prefix[:R, b:e].copy_(x_in)
        ins, outs = self._io("ar", k, R)
        ins["tokens"].copy_(self.prefix[:R, :e])
        self._run("ar", k, ins, outs, R)
        return outs["semantics"][:, b:e]

    def prepare(self, k: int, cond: Tensor) -> ScaleContext:
        ins, outs = self._io("head_prep", k, self.R)
        ins["cond"].copy_(cond)
        ins["pos"].copy_(self.pos[k])
        self._run("head_prep", k, ins, outs, self.R)
        return ScaleContext(k, outs)

    def velocity(self, ctx: ScaleContext, x: Tensor, t: Tensor) -> Tensor:
        r = x.shape[0]
        call = ctx.calls.get(r)
        if call is None:                      # once per (scale, rows); every later step reuses it
            spec = self.specs["velocity"]
            shapes = spec.shapes(ctx.k, r)
            ins = {n: self.buffers.view("velocity", n, shapes[n]) for n in spec.inputs if n not in spec.from_stage}
            for n in spec.from_stage:
                src = ctx.inputs[n]
                ins[n] = src[:r] if n in spec.row_tensors else src
            outs = {"v": self.buffers.view("velocity", "v", shapes["v"])}
            call = ctx.calls[r] = (ins, outs, self._blocks("velocity", ctx.k, ins, outs, r))
        ins, outs, parts = call
        # x and t into this runtime's own static buffers: the engines then see the same addresses
        # at every step and every sample, so their bindings are made once.
        ins["x"].copy_(x)
        ins["t"].copy_(t)
        for i, o in parts:
            self.engines["velocity"].infer(i, o, profile=ctx.k)
        return outs["v"]

    def decode(self, latent: Tensor) -> Tensor:
        assert "decode" in self.engines, "decode without a decoder (Runtime.require_decoder refuses it before)"
        B = latent.shape[0]
        ins, outs = self._io("decode", 0, B)
        ins["latent"].copy_(latent)
        self._run("decode", 0, ins, outs, B)
        return outs["image"].clone()


def torch_engines(model, specs: dict[str, StageSpec], vae=None) -> dict[str, Engine]:
    """The reference modules behind the engine interface, one per stage (already entered)."""
    from flowar.runtime.engines import TorchEngine
    return {n: TorchEngine(n, s.module(model, vae), s.inputs, s.outputs).__enter__() for n, s in specs.items()}


def torch_engine_stages(model, max_batch: int, device: torch.device | str, vae=None) -> EngineStages:
    """EngineStages over the reference modules: static buffers, capturable (the graphed PyTorch path)."""
    c = model.config
    specs = stage_specs(c, vae.downsample if vae else None)
    return EngineStages(torch_engines(model, specs, vae), c, max_batch, torch.device(device), specs)
