"""A runtime's stages: engines bound to static buffers, fed to the one sampler.

:class:`EngineStages` allocates every tensor a stage touches once, at its largest size over all
(scale, rows), and binds each (stage, scale, rows) call to views of that storage with the exact
shape, once; nothing is allocated while sampling. It implements the sampler's ``Stages`` protocol
on top of the engines, so ``flowar.sampling.sampler.sample`` runs unchanged: there is no second
sampling loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.specs import StageSpec, stage_specs
from flowar.model.layers import grid_positions
from flowar.runtime.engines import Engine


def blocks(rows: int, best: int, sizes: list[int]) -> list[int]:
    """``rows`` as consecutive blocks of a call plan: ``best`` as often as it fits, then the largest
    measured sizes that fit what is left. (The engines a directory's ``--precision auto`` measured; an
    ONNX Runtime session on a CPU splits its calls itself: :func:`flowar.engines.ort.plan_call`.)"""
    out, left = [best] * (rows // best), rows % best
    for s in sorted(sizes, reverse=True):
        while s <= left:
            out.append(s)
            left -= s
    return out


class EngineStages:
    """The sampler's stages on engines and static buffers.

    ``storage``: one flat tensor per ``"<stage>.<tensor>"`` (its largest numel over every scale and
    row count); an input that is an earlier stage's output (the velocity's head constants) is that
    stage's storage itself. ``plan``: the directory's call plan (:mod:`flowar.commands.plan`): a call
    of more rows than a stage's block at that scale runs as consecutive blocks (row slices of the
    same static buffers).
    """

    def __init__(self, engines: dict[str, Engine], config: FlowARConfig, max_batch: int, device: torch.device,
                 specs: dict[str, StageSpec], plan: dict | None = None):
        self.engines, self.config, self.device, self.specs = engines, config, device, specs
        self.max_batch = max_batch
        self.max_rows = max(s.rows_per_sample for s in specs.values()) * max_batch
        self.plan = (plan or {}).get("stages", {})
        producer = {n: s for s, spec in specs.items() for n in spec.outputs}
        self.owner = {(s, n): (producer[n] if n in spec.from_stage else s)
                      for s, spec in specs.items() for n in spec.templates}
        sizes: dict[str, tuple[int, torch.dtype]] = {}
        for stage, spec in specs.items():
            for k in spec.scales:
                for name, shape in spec.shapes(k, spec.rows_per_sample * max_batch).items():
                    key = f"{self.owner[stage, name]}.{name}"
                    if math.prod(shape) > sizes.get(key, (0, None))[0]:
                        sizes[key] = (math.prod(shape), spec.dtypes[name])
        self.storage = {k: torch.zeros(n, dtype=dt, device=device) for k, (n, dt) in sizes.items()}
        self.calls: dict[tuple[str, int, int], tuple] = {}    # (stage, k, rows) -> (inputs, outputs, blocks)
        c = config
        self.prefix = torch.zeros(self.max_rows, c.seq_len, c.latent_channels, device=device)
        self.pos = [grid_positions(s).to(device) for s in c.scales]
        self.R = 0

    def addresses(self) -> dict[str, int]:
        return {k: v.data_ptr() for k, v in self.storage.items()}

    def _call(self, stage: str, k: int, rows: int, **given: Tensor) -> dict[str, Tensor]:
        """Copy ``given`` into the stage's static inputs at (scale k, rows), run it (in the call
        plan's row blocks) and return its static outputs. The views and blocks of a (stage, k, rows)
        are made once: every later call hands the engine the same addresses, so its bindings are
        made once too."""
        call = self.calls.get((stage, k, rows))
        if call is None:
            spec = self.specs[stage]
            views = {n: self.storage[f"{self.owner[stage, n]}.{n}"][: math.prod(s)].view(s)
                     for n, s in spec.shapes(k, rows).items()}
            ins, outs = {n: views[n] for n in spec.inputs}, {n: views[n] for n in spec.outputs}
            st = self.plan.get(stage)
            best = st["block"].get(str(k)) if st else None
            parts, begin = [], 0
            for b in (blocks(rows, best, st["sizes"]) if best is not None and best < rows else [rows]):
                cut = {n: t[begin:begin + b] if n in spec.row_tensors and b < rows else t for n, t in views.items()}
                parts.append(({n: cut[n] for n in ins}, {n: cut[n] for n in outs}))
                begin += b
            call = self.calls[stage, k, rows] = (ins, outs, parts)
        ins, outs, parts = call
        for n, t in given.items():
            ins[n].copy_(t)
        for i, o in parts:
            self.engines[stage].infer(i, o, profile=k)
        return outs

    def warm_up(self, batch_sizes=None, every_engine: bool | None = False) -> int:
        """Run engines once at each shape sampling will give them (``batch_sizes``: those batches;
        default every size up to the limit), on zeros, so that whatever a shape sets up the first
        time (eager PyTorch's oneDNN primitives and weight reorders; a compiled engine's, smaller)
        happens here and not in an image. By default only the engines that set up a lot per shape
        (``warm``: what the export measured, see :func:`flowar.runtime.directory.directory_engines`,
        else the engine kind's own: eager PyTorch's True, ONNX Runtime's False); ``every_engine``
        None: those and the engines whose set-up nothing says (``warm`` None: none of those kinds);
        True: all. The others open what those shapes need without computing (ONNX Runtime's sessions
        for row blocks: :meth:`~flowar.runtime.engines.OrtEngine.open_sessions`), all at once, and
        this returns once they are open. Returns the calls made."""
        n, opening = 0, []
        sizes = sorted(set(batch_sizes or range(1, self.max_batch + 1)))
        for stage, eng in self.engines.items():
            warm = getattr(eng, "warm", None)
            computes = every_engine or warm is True or every_engine is None and warm is None
            if not (computes or hasattr(eng, "open_sessions")):
                continue
            spec, st = self.specs[stage], self.plan.get(stage)
            for k in spec.scales:
                calls = {b * m for b in sizes for m in (spec.rows_per_sample, 1)}          # B and 2B rows
                best = st["block"].get(str(k)) if st else None
                # (the blocks _call cuts: none below the block size, where a call of 3 rows runs as one)
                shapes = {b for r in calls for b in (blocks(r, best, st["sizes"]) if best is not None and best < r
                                                     else [r])}
                for r in sorted(shapes):
                    dims = spec.shapes(k, r)
                    if not computes:
                        opening += eng.open_sessions(dims[spec.inputs[0]])
                        continue
                    eng.infer({n_: torch.zeros(dims[n_], dtype=spec.dtypes[n_], device=self.device) for n_ in spec.inputs},
                              {n_: torch.empty(dims[n_], dtype=spec.dtypes[n_], device=self.device) for n_ in spec.outputs},
                              profile=k)
                    n += 1
        for f in opening:
            f.result()
        for eng in self.engines.values():
            getattr(eng, "settle", lambda: None)()      # (the graphs' bytes, read to open them, dropped)
        if opening:         # (what opening them freed, kept by the C allocator: 0.25 GB more at FlowAR-S's peak)
            from flowar.io.memory import release_free_memory
            release_free_memory()
        return n

    def start(self, labels_R: Tensor) -> None:
        if "ar" not in self.engines:
            raise FlowARError("a source opened with its sampling stages", f"one opened with {', '.join(self.engines)} "
                              "alone (only=)", "open it again without only=")
        R = labels_R.shape[0]
        if R > self.max_rows:
            raise FlowARError(f"at most {self.max_rows} AR rows per batch ({self.max_batch} samples, the engines' "
                              "--max-batch; guidance takes 2 rows a sample)", f"{R} rows",
                              "sample in smaller batches or re-export with a larger --max-batch")
        self.R = R
        self.prefix.zero_()
        # into the AR's static labels here, outside any captured scale (a graph would read the address
        # it was captured with)
        self.storage["ar.labels"][:R].copy_(labels_R)

    def ar(self, k: int, x_in: Tensor | None) -> Tensor:
        c, R = self.config, self.R
        b, e = c.scale_begin[k], c.scale_end[k]
        if x_in is not None:
            self.prefix[:R, b:e].copy_(x_in)
        return self._call("ar", k, R, tokens=self.prefix[:R, :e])["semantics"][:, b:e]

    def prepare(self, k: int, cond: Tensor) -> int:
        """The head's per-scale constants, into head_prep's static outputs (which the velocity reads
        in place); the context is the scale."""
        self._call("head_prep", k, self.R, cond=cond, pos=self.pos[k])
        return k

    def velocity(self, k: int, x: Tensor, t: Tensor) -> Tensor:
        # x and t into this runtime's own static buffers: the engines then see the same addresses
        # at every step and every sample, so their bindings are made once.
        return self._call("velocity", k, x.shape[0], x=x, t=t)["v"]

    def decode(self, latent: Tensor) -> Tensor:
        assert "decode" in self.engines, "decode without a decoder (Runtime.require_decoder refuses it before)"
        return self._call("decode", 0, latent.shape[0], latent=latent)["image"].clone()


def torch_engines(model, specs: dict[str, StageSpec], vae=None) -> dict[str, Engine]:
    """The reference modules behind the engine interface, one per stage (already entered)."""
    from flowar.runtime.engines import TorchEngine
    return {n: TorchEngine(n, s.module(model, vae), s.inputs, s.outputs).__enter__() for n, s in specs.items()}


def torch_engine_stages(model, max_batch: int, device: torch.device | str, vae=None) -> EngineStages:
    """EngineStages over the reference modules: static buffers, capturable (the graphed PyTorch path)."""
    c = model.config
    specs = stage_specs(c, vae.downsample if vae else None)
    return EngineStages(torch_engines(model, specs, vae), c, max_batch, torch.device(device), specs)
