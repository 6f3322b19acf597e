"""One spec per exported stage: names, dynamic axes, shapes per (scale, rows), tolerance.

Export (the module a graph is made from), verification, TensorRT profiles, the runtime's buffer
plan and the engines' row splitting all read these specs, so a stage's interface is written
down once.

Rows: the AR and the per-scale head preparation see R = 2B rows with guidance (B without); the
velocity stage sees B or 2B rows depending on the step. ``max_rows`` is therefore 2 x max batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from flowar.config import FlowARConfig

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str                                          # graph file stem: ar, head_prep, velocity, decode
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]                 # input -> {axis: symbolic dim name}
    tolerance: float                                   # max abs diff vs eager PyTorch (fp32)
    templates: dict[str, tuple]                        # every input and output: its dims, ints or "rows", "L", "n"
    dtypes: dict[str, torch.dtype]                     # every input and output (float32 unless the stage says)
    module: Callable[..., nn.Module]                   # (model, vae) -> the reference module the graph is made from
    row_tensors: frozenset[str]                        # inputs and outputs whose first axis is rows (samples)
    rows_per_sample: int = 2                           # 2: conditional + unconditional rows (guidance); 1: decode
    from_stage: tuple[str, ...] = ()                   # inputs that are an earlier stage's outputs, passed as they are
    per_scale: bool = True                             # False: one shape family (decode)
    seq_end: tuple[int, ...] = ()                      # "L" at scale k: the AR prefix length (config.scale_end)
    tokens: tuple[int, ...] = ()                       # "n" at scale k: the tokens of the scale (config.tokens_per_scale)
    scales: range = range(1)                           # the scales with a shape family of their own (a TensorRT
                                                       # profile each): every scale, or one (decode)

    def shapes(self, k: int, rows: int) -> dict[str, Shape]:
        """Every input and output shape at (scale k, rows)."""
        at = {"rows": rows, "L": self.seq_end[k], "n": self.tokens[k]}
        return {name: tuple(at.get(d, d) for d in dims) for name, dims in self.templates.items()}

    def input_shapes(self, k: int, rows: int) -> dict[str, Shape]:
        s = self.shapes(k, rows)
        return {n: s[n] for n in self.inputs}

    def max_rows(self, max_batch: int) -> int:
        return self.rows_per_sample * max_batch



def stage_specs(c: FlowARConfig, vae_factor: int | None = None) -> dict[str, StageSpec]:
    """The stages of a model; ``vae_factor`` (pixels per latent cell) adds the decode stage."""
    from flowar.export import wrappers as w
    C, D, W, H, hd, depth = (c.latent_channels, c.ar_width, c.head_width, c.head_heads, c.head_head_dim,
                             c.head_depth)
    v2 = c.head_block == "v2"

    R, L, n = "rows", "L", "n"
    ar = {"labels": (R,), "tokens": (R, L, C), "semantics": (R, L, D)}
    cross = {"cross_kv": (R, depth, 2, H, n, hd), "cross_rope": (depth, 2, n, hd)} if v2 else {}
    prep = {"cond": (R, n, D), "pos": (n, 2), "c": (R, n, W), "rope": (depth, 2, n, hd)} | cross
    vel = {"x": (R, n, C), "t": (R,), "c": (R, n, W), "rope": (depth, 2, n, hd), "v": (R, n, C)} | cross
    at = {"seq_end": c.scale_end, "tokens": c.tokens_per_scale}

    head_out = ("c", "rope") + (("cross_kv", "cross_rope") if v2 else ())
    head_rows = frozenset({"c"} | ({"cross_kv"} if v2 else set()))
    specs = {
        "ar": StageSpec("ar", ("labels", "tokens"), ("semantics",),
                        {"labels": {0: "rows"}, "tokens": {0: "rows", 1: "seq"}}, 1e-4, ar, {"labels": torch.int64},
                        lambda model, vae=None: w.ARGraph(model).eval(), frozenset({"labels", "tokens", "semantics"}),
                        **at),
        "head_prep": StageSpec("head_prep", ("cond", "pos"), head_out,
                               {"cond": {0: "rows", 1: "tokens"}, "pos": {0: "tokens"}}, 1e-4, prep, {},
                               lambda model, vae=None: w.HeadPrepGraph(model.flownet).eval(), head_rows | {"cond"},
                               **at),
        "velocity": StageSpec("velocity", ("x", "t") + head_out, ("v",),
                              {"x": {0: "rows", 1: "tokens"}, "t": {0: "rows"}, "c": {0: "rows", 1: "tokens"},
                               "rope": {2: "tokens"}} | ({"cross_kv": {0: "rows", 4: "tokens"},
                                                          "cross_rope": {2: "tokens"}} if v2 else {}),
                              1e-4, vel, {}, lambda model, vae=None: w.VelocityGraph(model.flownet).eval(),
                              head_rows | {"x", "t", "v"}, from_stage=head_out, **at),
    }
    if vae_factor is not None:
        S, f = c.latent_size, vae_factor
        dec = {"latent": (R, C, S, S), "image": (R, 3, S * f, S * f)}
        specs["decode"] = StageSpec("decode", ("latent",), ("image",), {"latent": {0: "rows"}}, 1e-4, dec, {},
                                    lambda model, vae: w.DecodeGraph(vae).eval(), frozenset({"latent", "image"}),
                                    rows_per_sample=1, per_scale=False, **at)
    # every tensor's dtype (float32 unless named), and the scales with shapes of their own
    return {n: replace(s, dtypes=dict.fromkeys(s.templates, torch.float32) | s.dtypes,
                       scales=range(c.n_scales) if s.per_scale else range(1)) for n, s in specs.items()}


def sample_inputs(spec: StageSpec, c: FlowARConfig, k: int, rows: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Representative inputs of a stage at (scale k, rows): what the sampler would feed."""
    from flowar.model.layers import grid_positions
    out = {}
    for name, shape in spec.input_shapes(k, rows).items():
        if name == "labels":
            out[name] = torch.randint(0, c.num_classes + 1, shape, generator=gen)
        elif name == "pos":
            out[name] = grid_positions(c.scales[k])
        elif name == "t":
            out[name] = torch.rand(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out
