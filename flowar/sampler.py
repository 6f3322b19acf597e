"""The one sampling loop of FlowAR, shared by eager PyTorch and every engine.

It owns the scale loop, the Euler ODE of each scale, classifier-free guidance and the hand-off
between scales, and calls a :class:`Stages` object for everything a network computes. Eager
sampling passes :class:`flowar.stages.TorchStages`; the runtime passes engines. Parity between
paths is then a property of the stages alone.

Rows. With guidance (cfg != 1) the AR runs on 2B rows, ``[labels; null]``, and each scale
draws noise of shape (2B, s^2, C), as the official sampler does. Only the conditional half of
the ODE state can reach the output: on a guided step the official solver feeds the
conditional states twice (``[x_B; x_B]`` with conditions ``[cond; null]``) and copies the
result to both halves; on an unguided step every row moves on its own. So this loop keeps the
B conditional states only and evaluates the head on B rows for unguided steps (all of scale 0,
whose weight is 1, and steps above the guidance interval) and on 2B rows for guided ones. The
tokens are unchanged (tests compare against the official outputs and a full-2B reference).

Precision: the state is float64, the head runs in float32 and its velocity is up-cast, the
guidance combination is float64: ``v = v_null + cfg_k * (v_cond - v_null)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.schedule import Schedule


class Stages(Protocol):
    """What a backend computes. ``R`` is the AR row count (2B with guidance, else B)."""

    def start(self, labels_R: Tensor) -> None:
        """Begin a new batch: labels (R,) int64 including the null rows; reset any cache."""

    def ar(self, k: int, x_in_RNC: Tensor | None) -> Tensor:
        """Semantics (R, n_k, D) of scale k from its input tokens (None at k = 0)."""

    def prepare(self, k: int, cond_RND: Tensor) -> Any:
        """Per-scale head constants (a context passed back to :meth:`velocity`)."""

    def velocity(self, ctx: Any, x_rNC: Tensor, t_r: Tensor) -> Tensor:
        """Velocity (r, n, C) float32 for r <= R rows of the context."""

    def decode(self, latent_BCHW: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] from VAE latents (tokens / latent_scale)."""


NoiseFn = Callable[[int, tuple[int, ...]], Tensor]


def seeded_noise(seed: int) -> NoiseFn:
    """One float32 normal draw per scale from a CPU generator, in the official order."""
    gen = torch.Generator().manual_seed(int(seed))
    return lambda k, shape: torch.randn(shape, generator=gen, dtype=torch.float32)


def injected_noise(draws: list[Tensor]) -> NoiseFn:
    """Replays recorded draws (``noise0..noise{n-1}``), checking their shapes."""
    def take(k: int, shape: tuple[int, ...]) -> Tensor:
        if k >= len(draws):
            raise FlowARError(f"a noise tensor noise{k}", f"only {len(draws)} draws", "record one draw per scale")
        if tuple(draws[k].shape) != tuple(shape):
            raise FlowARError(f"noise{k} of shape {list(shape)} (2B rows with guidance, B without; s^2 tokens; C)",
                              f"{list(draws[k].shape)}", "record the noise with the same labels count, cfg and config")
        return draws[k].to(torch.float32)
    return take


@dataclass(slots=True)
class ScaleTrace:
    """What one scale did (for tests and progress): AR rows and head rows per step."""
    k: int
    ar_rows: int
    head_rows: list[int]


def hand_off(z_BNC: Tensor, side: int, final: int, next_side: int) -> Tensor:
    """Next scale's AR input: bicubic up to the final size, then area down to the next size."""
    B, N, C = z_BNC.shape
    z = z_BNC.transpose(1, 2).reshape(B, C, side, side)
    z = F.interpolate(F.interpolate(z, size=(final, final), mode="bicubic"), size=(next_side, next_side), mode="area")
    return z.reshape(B, C, next_side * next_side).transpose(1, 2)


def sample(stages: Stages, config: FlowARConfig, schedule: Schedule, labels_B: Tensor, noise: NoiseFn,
           decode: bool = False, device: torch.device | str = "cpu",
           on_scale: Callable[[ScaleTrace], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Sample tokens (B, C, S, S) in the scaled latent space and, if ``decode``, images.

    labels_B: (B,) int64 class ids.
    """
    c = config
    B = labels_B.shape[0]
    guided_any = schedule.cfg != 1.0
    R = 2 * B if guided_any else B
    null = torch.full((B,), c.null_class, dtype=torch.int64, device=labels_B.device)
    labels_R = torch.cat([labels_B, null]) if guided_any else labels_B
    stages.start(labels_R.to(device))
    t_table = schedule.t32.to(device)[:, None].expand(-1, R).contiguous()     # (S, R); rows are views, no per-step tensors
    x_in = None
    z_BNC = None
    for k, side in enumerate(c.scales):
        n = c.tokens_per_scale[k]
        cond_RND = stages.ar(k, x_in)
        draw = noise(k, (R, n, c.latent_channels)).to(device)                  # after the AR, before the ODE
        ctx = stages.prepare(k, cond_RND)
        x64 = draw[:B].to(torch.float64)                                      # (B, n, C) state
        xin = torch.empty(R, n, c.latent_channels, dtype=torch.float32, device=device)
        v64 = torch.empty_like(x64)
        vnull64 = torch.empty_like(x64)
        cfg_k = schedule.cfg_k[k]
        rows_trace = []
        for i, dt in enumerate(schedule.dt64):
            if schedule.guided[k][i]:
                xin[:B].copy_(x64)
                xin[B:].copy_(x64)
                v = stages.velocity(ctx, xin, t_table[i])
                v64.copy_(v[:B])
                vnull64.copy_(v[B:])
                v64.sub_(vnull64).mul_(cfg_k).add_(vnull64)
                rows_trace.append(R)
            else:
                xin[:B].copy_(x64)
                v64.copy_(stages.velocity(ctx, xin[:B], t_table[i, :B]))
                rows_trace.append(B)
            x64.add_(v64 * dt)
        z_BNC = x64.to(torch.float32)
        if on_scale is not None:
            on_scale(ScaleTrace(k, R, rows_trace))
        if k + 1 < c.n_scales:
            z_RNC = torch.cat([z_BNC] * (R // B))
            x_in = hand_off(z_RNC, side, c.latent_size, c.scales[k + 1])
    S = c.latent_size
    tokens = z_BNC.transpose(1, 2).reshape(B, c.latent_channels, S, S).contiguous()
    images = stages.decode(tokens / c.latent_scale) if decode else None
    return tokens, images
