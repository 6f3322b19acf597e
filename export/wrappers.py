"""Thin flat-tensor wrappers: exactly one sampler stage per exported graph.

Each wrapper takes and returns plain tensors (no lists, no dataclasses, no Python ints that vary
by scale), so one graph with dynamic dimensions serves every scale and batch:

* :class:`ARGraph` ``(labels (R,), tokens (R, L, C)) -> semantics (R, L, D)``: the AR over a
  whole prefix under the block-causal mask (the prefix is recomputed instead of carrying a KV
  cache, DESIGN decision 4). Position 0 of ``tokens`` is ignored (the class token goes there).
* :class:`HeadPrepGraph` ``(cond (R, N, D), pos (N, 2)) -> c (R, N, W), rope (depth, 2, N, d)
  [, cross_kv (R, depth, 2, H, N, d), cross_rope (depth, 2, N, d)]``: once per scale.
* :class:`VelocityGraph` ``(x (r, N, C), t (r,), c, rope[, cross_kv, cross_rope]) -> v``: once per
  ODE step, for any r <= R rows.
* :class:`DecodeGraph` ``latent (B, C, S, S) -> image (B, 3, H, W)``.

The wrappers call the reference modules' own methods; nothing is monkeypatched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowar.model.head import FlowHead, HeadContext
from flowar.model.ar import FlowAR


class ARGraph(nn.Module):
    def __init__(self, model: FlowAR):
        super().__init__()
        self.model = model
        rope = model.rope(0, model.config.n_scales - 1)          # full-sequence tables, sliced by L
        self.register_buffer("rope_cos", torch.stack([c for c, _ in rope]), persistent=False)   # (blocks, Lmax, d)
        self.register_buffer("rope_sin", torch.stack([s for _, s in rope]), persistent=False)
        c = model.config                                         # the scale of each sequence position
        self.register_buffer("scale_of", torch.tensor([k for k, n in enumerate(c.tokens_per_scale) for _ in range(n)],
                                                      device=self.rope_cos.device), persistent=False)   # a model on a GPU

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        m = self.model
        L = tokens.shape[1]
        cls = m.class_emb(labels)                                              # (R, D)
        first = torch.arange(L, device=tokens.device)[None, :, None] == 0
        h = torch.where(first, cls[:, None, :], m.z_proj(tokens))              # (R, L, D)
        rope = [(self.rope_cos[i].narrow(0, 0, L), self.rope_sin[i].narrow(0, 0, L)) for i in range(self.rope_cos.shape[0])]
        # the block-causal mask of the first L positions, built rather than cut from the (Lmax, Lmax) table:
        # the same 0 / -inf, and a graph with a symbolic L gets no view that is contiguous only at L = Lmax
        s = self.scale_of.narrow(0, 0, L)
        mask = torch.where(s[None, :] <= s[:, None], 0.0, float("-inf"))[None, None].to(tokens.dtype)
        return m.transformer(h, cls, 0, L, rope, mask)


class HeadPrepGraph(nn.Module):
    def __init__(self, head: FlowHead):
        super().__init__()
        self.head = head

    def forward(self, cond: Tensor, pos: Tensor):
        ctx = self.head.prepare_at(cond, pos)
        rope = torch.stack([torch.stack(cs) for cs in ctx.rope])                # (depth, 2, N, d)
        if self.head.config.head_block != "v2":
            return ctx.c, rope
        kv = torch.stack([torch.stack([k, v], dim=1) for k, v in zip(ctx.cross_k, ctx.cross_v)], dim=1)
        cross_rope = torch.stack([torch.stack(cs) for cs in ctx.cross_rope])
        return ctx.c, rope, kv, cross_rope                                      # kv: (R, depth, 2, H, N, d)


def context_from_flat(c: Tensor, rope: Tensor, cross_kv: Tensor | None = None,
                      cross_rope: Tensor | None = None) -> HeadContext:
    """The head's per-scale context from the flat tensors :class:`HeadPrepGraph` returns."""
    ctx = HeadContext(c, [(rope[i, 0], rope[i, 1]) for i in range(rope.shape[0])], [], [], [])
    if cross_kv is not None:
        for i in range(cross_kv.shape[1]):
            ctx.cross_k.append(cross_kv[:, i, 0])
            ctx.cross_v.append(cross_kv[:, i, 1])
            ctx.cross_rope.append((cross_rope[i, 0], cross_rope[i, 1]))
    return ctx


class VelocityGraph(nn.Module):
    def __init__(self, head: FlowHead):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor, t: Tensor, c: Tensor, rope: Tensor, cross_kv: Tensor | None = None,
                cross_rope: Tensor | None = None) -> Tensor:
        return self.head.velocity(x, t, context_from_flat(c, rope, cross_kv, cross_rope))


class DecodeGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent)
