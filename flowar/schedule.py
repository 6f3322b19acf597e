"""The sampling schedule as data, built once before the loop.

Conventions of the official sampler (``fixtures/official/README.md``):

* time runs from 1 (noise) to 0 (data); the grid is float64;
* 50 steps: ``linspace(1, 0, 51)``; any other N: ``linspace(1, 0.3, N//2)`` then
  ``linspace(0.25, 0, N//2 + 1)``, so 25 gives 24 Euler steps and no point between 0.3 and 0.25;
* the guidance weight rises linearly over scales, ``cfg_k = (cfg - 1) * k / (n - 1) + 1``,
  so the first scale is never guided;
* a step is guided iff ``cfg_k > 1`` and ``0 <= t_cur <= guidance`` (float64, inclusive);
* the head sees ``t_cur`` cast to float32, and embeds ``int(float32(t) * 1000)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowar.errors import FlowARError
from flowar.head import timestep_integers

MAX_STEPS = 1000
MAX_CFG = 50.0


def time_grid(num_steps: int) -> torch.Tensor:
    """The float64 time points t_0 = 1 > ... > t_last = 0 of the official Euler sampler."""
    if num_steps == 50:
        return torch.linspace(1, 0, 51, dtype=torch.float64)
    return torch.cat([torch.linspace(1, 0.3, num_steps // 2, dtype=torch.float64),
                      torch.linspace(0.25, 0, num_steps // 2 + 1, dtype=torch.float64)])


def scale_cfg(cfg: float, k: int, n_scales: int) -> float:
    """Guidance weight of scale k, in Python float and in the official order of operations."""
    return (cfg - 1) * k / (n_scales - 1) + 1 if n_scales > 1 else cfg


@dataclass(frozen=True, slots=True)
class Schedule:
    num_steps: int               # the requested count (25 gives 24 Euler steps)
    cfg: float
    guidance: float
    t64: torch.Tensor            # (S+1,) float64 grid
    dt64: tuple[float, ...]      # S step sizes t_next - t_cur (negative)
    t32: torch.Tensor            # (S,) float32 t_cur as the head receives it
    t_int: torch.Tensor          # (S,) int64 timesteps the head embeds
    cfg_k: tuple[float, ...]     # per scale
    guided: tuple[tuple[bool, ...], ...]   # per scale, per step

    @property
    def n_steps(self) -> int:
        return len(self.dt64)

    def rows(self, B: int) -> int:
        """AR rows for B samples: [labels; null] with guidance, the labels alone without."""
        return 2 * B if self.cfg != 1.0 else B


def validate_sampling_args(num_steps: int, cfg: float, guidance: float) -> None:
    if not isinstance(num_steps, int) or not 2 <= num_steps <= MAX_STEPS:
        raise FlowARError(f"--steps an integer in 2..{MAX_STEPS}", repr(num_steps), "use e.g. --steps 25")
    if not (1.0 <= cfg <= MAX_CFG):
        raise FlowARError(f"--cfg in [1, {MAX_CFG:g}] (1 = no guidance)", repr(cfg), "use e.g. --cfg 4.3")
    if not (0.0 <= guidance <= 1.0):
        raise FlowARError("--guidance (the time below which guidance applies) in [0, 1]", repr(guidance),
                          "use e.g. --guidance 0.9")


def build_schedule(num_steps: int, cfg: float, guidance: float, n_scales: int) -> Schedule:
    validate_sampling_args(num_steps, cfg, guidance)
    t64 = time_grid(num_steps)
    t_cur = t64[:-1]
    dt = (t64[1:] - t_cur).tolist()
    t32 = t_cur.to(torch.float32)
    cfg_k = tuple(scale_cfg(cfg, k, n_scales) for k in range(n_scales))
    in_interval = ((t_cur >= 0) & (t_cur <= guidance)).tolist()
    guided = tuple(tuple(ck > 1 and g for g in in_interval) for ck in cfg_k)
    return Schedule(num_steps, float(cfg), float(guidance), t64, tuple(dt), t32, timestep_integers(t32), cfg_k, guided)
