"""The one sampling loop of FlowAR, shared by eager PyTorch and every engine.

It owns the scale loop, the ODE of each scale (the schedule's solver plan), classifier-free guidance and the hand-off
between scales, and calls a :class:`Stages` object for everything a network computes. Eager
sampling passes :class:`flowar.sampling.eager.EagerStages`; the runtime passes engines. Parity between
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

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowar.config import FlowARConfig, check_seed
from flowar.errors import FlowARError
from flowar.sampling.schedule import Schedule


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


def per_sample_noise(seed: int | Sequence[int], indices: Sequence[int]) -> NoiseFn:
    """Noise named by (seed, sample index): a seed names an image.

    Row b of the batch is sample ``indices[b]`` of the request. Its scale-k noise comes from a CPU
    generator seeded with a hash of (seed, indices[b], k) (63 bits of blake2b, the same on every
    machine and in every process): first its conditional row (n, C), then, when the batch carries
    null rows, its null row. So the noise of a sample does
    not depend on the batch it lands in, its place there, the batch size, the backend, the shard
    or the worker, and its conditional noise not even on cfg. (The official sampler draws one
    (2B, n, C) tensor per scale instead: recorded official noise is replayed with
    :func:`injected_noise`.) ``seed`` may also give one seed per row (requests of a served batch).
    """
    idx = [int(i) for i in indices]
    one = isinstance(seed, numbers.Integral)                    # (a NumPy integer too)
    seeds = [check_seed(int(seed))] * len(idx) if one else [check_seed(int(s)) for s in seed]
    if len(seeds) != len(idx):
        raise FlowARError(f"one seed per sample ({len(idx)})", f"{len(seeds)} seeds", "pass a seed or one per sample")

    def draw(k: int, shape: tuple[int, ...]) -> Tensor:
        R, n, C = shape
        B = len(idx)
        if R not in (B, 2 * B):
            raise FlowARError(f"{B} or {2 * B} noise rows for {B} samples", f"{R}", "pass one index per sample")
        out = torch.empty(shape, dtype=torch.float32)
        for b, (s, i) in enumerate(zip(seeds, idx)):
            digest = hashlib.blake2b(f"flowar-noise:{s}:{i}:{int(k)}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            out[b] = torch.randn((n, C), generator=gen)
            if R > B:
                out[B + b] = torch.randn((n, C), generator=gen)
        return out
    return draw


def noise_rows(draws: list[Tensor], start: int, end: int, total: int) -> list[Tensor]:
    """Samples start..end-1 of draws recorded for ``total`` samples, in batch layout: their
    conditional rows, then their null rows where the draws carry a null half (2 * total rows)."""
    return [torch.cat([d[start:end], d[total + start: total + end]]) if d.shape[0] == 2 * total else d[start:end]
            for d in draws]


def injected_noise(draws: list[Tensor]) -> NoiseFn:
    """Replays recorded draws (``noise0..noise{n-1}``, the official (R, n, C) per scale), checking their shapes."""
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
    """What one scale did (for tests, progress and callbacks): AR rows, head rows per step, and
    the scale's sample ``z`` (B, n, C): a view of the loop's workspace, valid until the next scale;
    ``first``: where the batch's first sample stands among a call's (set by the call's batching)."""
    k: int
    ar_rows: int
    head_rows: list[int]
    z: Tensor | None = None
    first: int = 0


class Hooked:
    """Any stages, every call made through ``around(kind, fn, *args)`` (kind: start, ar, prepare,
    velocity or decode). The one wrapper for what goes around the stages: timing (the pipeline,
    the bench), autocast (the bench) and the official mixed precision (:mod:`flowar.eval.mixed`)."""

    def __init__(self, inner: Stages, around: Callable[..., Any]):
        self.inner, self.around = inner, around

    def start(self, labels_R: Tensor) -> None:
        return self.around("start", self.inner.start, labels_R)

    def ar(self, k: int, x_in_RNC: Tensor | None) -> Tensor:
        return self.around("ar", self.inner.ar, k, x_in_RNC)

    def prepare(self, k: int, cond_RND: Tensor) -> Any:
        return self.around("prepare", self.inner.prepare, k, cond_RND)

    def velocity(self, ctx: Any, x_rNC: Tensor, t_r: Tensor) -> Tensor:
        return self.around("velocity", self.inner.velocity, ctx, x_rNC, t_r)

    def decode(self, latent_BCHW: Tensor) -> Tensor:
        return self.around("decode", self.inner.decode, latent_BCHW)


def hand_off(z_BNC: Tensor, side: int, final: int, next_side: int) -> Tensor:
    """Next scale's AR input: bicubic up to the final size, then area down to the next size."""
    B, N, C = z_BNC.shape
    z = z_BNC.transpose(1, 2).reshape(B, C, side, side)
    z = F.interpolate(F.interpolate(z, size=(final, final), mode="bicubic"), size=(next_side, next_side), mode="area")
    return z.reshape(B, C, next_side * next_side).transpose(1, 2)


class Workspace:
    """Every tensor the loop writes, allocated once per (batch, rows) at its largest scale.

    ``view(name, k)`` gives the scale-k shape over the same storage, so addresses never change:
    what a CUDA graph captured for scale k stays valid for every later replay.
    """

    def __init__(self, config: FlowARConfig, schedule: Schedule, B: int, R: int, official_rows: bool,
                 device: torch.device | str):
        c = config
        # B samples, R AR rows (2B with guidance), X rows of ODE state (B, or R for the official layout)
        self.B, self.R, self.X = B, R, (R if official_rows else B)
        n, C = max(c.tokens_per_scale), c.latent_channels
        f32, f64 = torch.float32, torch.float64
        self._store = {
            "draw": torch.zeros(R * n * C, dtype=f32, device=device),        # this scale's noise (R rows)
            "xin": torch.zeros(R * n * C, dtype=f32, device=device),         # head input (B or 2B rows)
            "x64": torch.zeros(self.X * n * C, dtype=f64, device=device),    # ODE state the head reads
            "acc64": torch.zeros(self.X * n * C, dtype=f64, device=device),  # accepted state (heun, skip)
            "vnull64": torch.zeros(B * n * C, dtype=f64, device=device),
            "next_in": torch.zeros(R * n * C, dtype=f32, device=device),     # next scale's AR input
            "z": torch.zeros(B * n * C, dtype=f32, device=device),           # this scale's kept sample
        }
        for j in range(schedule.slots):                                      # velocities the solver combines
            self._store[f"v64_{j}"] = torch.zeros(self.X * n * C, dtype=f64, device=device)
        self.rows = {"draw": R, "xin": R, "x64": self.X, "acc64": self.X, "vnull64": B, "next_in": R, "z": B} | {
            f"v64_{j}": self.X for j in range(schedule.slots)}
        self.config = c
        # per scale, the float32 time of each head evaluation, one per row: (evaluations, R)
        self.t_table = [torch.tensor([e.t for e in plan], dtype=torch.float64).to(torch.float32).to(device)[:, None]
                        .expand(-1, R).contiguous() for plan in schedule.plan]

    def view(self, name: str, k: int) -> Tensor:
        n, C = self.config.tokens_per_scale[k], self.config.latent_channels
        r = self.rows[name]
        return self._store[name][: r * n * C].view(r, n, C)

    def addresses(self) -> dict[str, int]:
        return {k: v.data_ptr() for k, v in self._store.items()}


def check_finite(t: Tensor, what: str, k: int, side: int, at_eval: tuple[int, float] | None = None) -> None:
    """Refuse NaN/Inf from a stage, naming where it came (one host sync): ``at_eval`` (i, t), the scale's head
    evaluation i at flow time t (the ODE's step i for Euler only: Heun and the skip solver evaluate otherwise)."""
    if not bool(torch.isfinite(t).all()):
        at = f"scale {k} ({side}x{side})" + (f", head evaluation {at_eval[0]} (t = {at_eval[1]:.4f})" if at_eval else "")
        raise FlowARError(f"finite values from the {what} stage", f"NaN or Inf at {at}",
                          "check the checkpoint (it may be corrupt or trained with a diverged loss) and the precision")


def run_scale(stages: Stages, ws: Workspace, schedule: Schedule, k: int, check: str = "none",
              rows_trace: list[int] | None = None) -> None:
    """One scale: AR step, per-scale head constants, the ODE (the schedule's plan) with guidance, hand-off.

    Reads ``draw`` (and, for k > 0, ``next_in`` written by scale k-1); writes ``z`` and the next
    scale's ``next_in``. No allocation of the loop's own; no host sync unless ``check`` asks:
    "step" checks every velocity, "scale" the state once per scale (both name where NaN/Inf came).
    """
    c, B, R, X = ws.config, ws.B, ws.R, ws.X
    side = c.scales[k]
    cond = stages.ar(k, ws.view("next_in", k) if k > 0 else None)
    if check != "none":
        check_finite(cond, "AR", k, side)
    ctx = stages.prepare(k, cond)
    draw, xin, x64, vnull64 = (ws.view(n, k) for n in ("draw", "xin", "x64", "vnull64"))
    state = {"x": x64, "acc": ws.view("acc64", k)}
    V = [ws.view(f"v64_{j}", k) for j in range(schedule.slots)]
    x64.copy_(draw[:X])
    cfg_k = schedule.cfg_k[k]
    t_k = ws.t_table[k]
    for i, ev in enumerate(schedule.plan[k]):
        v64 = V[ev.slot]
        if ev.guided:
            xin[:B].copy_(x64[:B])
            xin[B:].copy_(x64[:B])
            v = stages.velocity(ctx, xin, t_k[i])
            v64[:B].copy_(v[:B])
            vnull64.copy_(v[B:])
            v64[:B].sub_(vnull64).mul_(cfg_k).add_(vnull64)
            if X > B:
                v64[B:].copy_(v64[:B])
            rows = R
        else:
            xin[:X].copy_(x64)
            v = stages.velocity(ctx, xin[:X], t_k[i, :X])
            v64.copy_(v)
            rows = X
        if check == "step":
            check_finite(v, "velocity", k, side, (i, ev.t))
        if rows_trace is not None:
            rows_trace.append(rows)
        for u in ev.updates:                                               # e.g. Euler: x += (t_next - t_cur) v
            dst = state[u.dst]
            if u.src != u.dst:
                dst.copy_(state[u.src])
            for slot, w in u.terms:
                dst.add_(V[slot], alpha=w)
    z = ws.view("z", k)
    z.copy_(x64[:B])
    if check == "scale":
        check_finite(z, "velocity", k, side)
    if k + 1 < c.n_scales:
        nxt = ws.view("next_in", k + 1)                                   # (R, n', C)
        nxt[:B].copy_(hand_off(z, side, c.latent_size, c.scales[k + 1]))  # resized once, for B rows
        if R > B:
            nxt[B:].copy_(nxt[:B])                                         # the null rows see the same tokens


class ScaleRunner(Protocol):
    """Runs one scale of the loop: :func:`run_scale` itself, or a replay of what it captured
    (:class:`flowar.runtime.cudagraph.GraphRunner`). It also owns the workspace, because a
    replayed graph needs the addresses it was captured with."""

    def workspace(self, config: FlowARConfig, schedule: Schedule, B: int, R: int, official_rows: bool,
                  device: torch.device | str) -> "Workspace": ...

    def run(self, stages: Stages, ws: "Workspace", schedule: Schedule, k: int, check: str,
            rows_trace: list[int] | None) -> None: ...

    def bucket(self, B: int) -> int:
        """The batch size B samples run at (B, or a larger captured size they are padded to)."""


def sample(stages: Stages, config: FlowARConfig, schedule: Schedule, labels_B: Tensor, noise: NoiseFn,
           decode: bool = False, device: torch.device | str = "cpu",
           on_scale: Callable[[ScaleTrace], None] | None = None,
           official_rows: bool = False, check: str | None = None,
           runner: ScaleRunner | None = None) -> tuple[Tensor, Tensor | None]:
    """Sample tokens (B, C, S, S) in the scaled latent space and, if ``decode``, images.

    labels_B: (B,) int64 class ids. ``official_rows`` integrates the null half too, as the
    official solver does (same tokens, more work): the benchmark's eager baseline. ``check``:
    NaN/Inf checks, "step" by default on CPU (free there), "scale" on GPU (one sync per scale).
    ``runner``: how each scale runs (default: :func:`run_scale` on a new workspace; CUDA graphs replay it).
    """
    c = config
    B = labels_B.shape[0]
    R = schedule.rows(B)
    null = torch.full((B,), c.null_class, dtype=torch.int64, device=labels_B.device)
    labels_R = torch.cat([labels_B, null]) if R > B else labels_B
    dev = torch.device(device)
    check = check or ("step" if dev.type == "cpu" else "scale")
    stages.start(labels_R.to(device))
    ws = (runner.workspace(c, schedule, B, R, official_rows, device) if runner is not None
          else Workspace(c, schedule, B, R, official_rows, device))
    for k in range(c.n_scales):
        ws.view("draw", k).copy_(noise(k, (R, c.tokens_per_scale[k], c.latent_channels)))   # official draw order
        trace: list[int] = []
        if runner is not None:
            runner.run(stages, ws, schedule, k, check, trace)
        else:
            run_scale(stages, ws, schedule, k, check, trace)
        if on_scale is not None:
            on_scale(ScaleTrace(k, R, trace, ws.view("z", k)))
    S = c.latent_size                                                 # the last scale's sample as a token map
    tokens = ws.view("z", c.n_scales - 1).transpose(1, 2).reshape(B, c.latent_channels, S, S).clone(
        memory_format=torch.contiguous_format)
    images = None
    if decode:
        images = stages.decode(tokens / c.latent_scale)
        if check != "none":
            check_finite(images, "VAE decode", c.n_scales - 1, c.latent_size)
    return tokens, images
