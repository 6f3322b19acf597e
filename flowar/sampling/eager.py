"""Eager PyTorch stages for the sampler: the reference every engine is compared with.

The AR runs one scale at a time against preallocated KV caches, as the official sampler does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from flowar.model.head import HeadContext
from flowar.model.ar import FlowAR


class EagerStages:
    def __init__(self, model: FlowAR, vae_decode: Callable[[Tensor], Tensor] | None = None):
        self.model = model
        self.vae_decode = vae_decode
        self._caches = None
        self._cls = None

    @torch.no_grad()
    def start(self, labels_R: Tensor) -> None:
        R = labels_R.shape[0]
        if self._caches is None or self._caches[0].k.shape[0] != R:
            self._caches = self.model.new_caches(R)
        self._cls = self.model.class_emb(labels_R)

    @torch.no_grad()
    def ar(self, k: int, x_in_RNC: Tensor | None) -> Tensor:
        return self.model.ar_step(k, self._cls, x_in_RNC, self._caches)

    @torch.no_grad()
    def prepare(self, k: int, cond_RND: Tensor) -> HeadContext:
        return self.model.flownet.prepare(cond_RND, self.model.config.scales[k])

    @torch.no_grad()
    def velocity(self, ctx: Any, x_rNC: Tensor, t_r: Tensor) -> Tensor:
        return self.model.flownet.velocity(x_rNC, t_r, ctx)

    @torch.no_grad()
    def decode(self, latent_BCHW: Tensor) -> Tensor:
        assert self.vae_decode is not None, "decode without a decoder (Runtime.require_decoder refuses it before)"
        return self.vae_decode(latent_BCHW)


class OfficialStyleStages(EagerStages):
    """Eager stages that work the way the official sampler does, for the benchmark baseline:
    the head recomputes its per-scale constants (condition embedding, RoPE, cross keys/values)
    on every ODE step. Use with ``sample(..., official_rows=True)``.
    """

    @torch.no_grad()
    def prepare(self, k: int, cond_RND: Tensor) -> Tensor:
        return cond_RND

    @torch.no_grad()
    def velocity(self, ctx: Any, x_rNC: Tensor, t_r: Tensor) -> Tensor:
        return self.model.flownet(x_rNC, t_r, ctx[: x_rNC.shape[0]])
