"""The sampling schedule as data, built once before the loop.

Conventions of the official sampler (``fixtures/official/README.md``):

* time runs from 1 (noise) to 0 (data); the grid is float64;
* 50 steps: ``linspace(1, 0, 51)``; any other N: ``linspace(1, 0.3, N//2)`` then
  ``linspace(0.25, 0, N//2 + 1)``, so 25 gives 24 Euler steps and no point between 0.3 and 0.25;
* the guidance weight rises linearly over scales, ``cfg_k = (cfg - 1) * k / (n - 1) + 1``,
  so the first scale is never guided;
* a step is guided iff ``cfg_k > 1`` and ``0 <= t_cur <= guidance`` (float64, inclusive);
* the head sees ``t_cur`` cast to float32, and embeds ``int(float32(t) * 1000)``.

Solvers (all in this one plan, so every backend and the CUDA-graph runner get every solver).
A schedule is compiled, before the loop, into a per-scale list of head evaluations
(:class:`Eval`), each followed by updates of the form ``state = state' + sum_j w_j * V_j`` over a
few stored velocities V_j. The loop only executes that list:

* ``euler``: the official method (one evaluation per step).
* ``ab2``: Adams-Bashforth 2 with variable steps, one evaluation per step (second order).
* ``heun``: Heun's second-order single-step method, two evaluations per step.
* ``skip``: the official Euler steps, with the head evaluated on every ``stride``-th of them
  only. The velocity of a skipped step is predicted by extrapolating the last ``order``
  evaluated velocities (a polynomial in t), and once the next evaluation is in, the steps since
  the previous one are redone with the polynomial through it as well (predict, evaluate,
  correct: no extra evaluation). With stride 1 it is Euler exactly; it approximates the
  official discrete path itself rather than the exact ODE, which is what keeps its images
  close to the official ones.

Multistep history never crosses a change of the velocity field: where guidance switches on (or
off), a method restarts, and ``skip`` evaluates there. Guidance applies per evaluation by the
official rule on that evaluation's t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowar.config import SAMPLING_DEFAULTS
from flowar.errors import FlowARError
from flowar.model.head import timestep_integers

MAX_STEPS = 1000
MAX_CFG = 50.0


SOLVERS = ("euler", "ab2", "heun", "skip")
GRIDS = ("official", "uniform")

# Named settings, stored as data. "fast": see bench/RESULTS.md for the measurements behind it
# (solver x steps -> head evaluations, latency, PSNR against the official images, accuracy).
SCHEDULES: dict[str, dict] = {
    "official": {"solver": "euler", "steps": 25, "grid": "official", "stride": 1, "order": 1},
    "fast": {"solver": "skip", "steps": 25, "grid": "official", "stride": 3, "order": 3},
}


def time_grid(num_steps: int, grid: str = "official") -> torch.Tensor:
    """The float64 time points t_0 = 1 > ... > t_last = 0.

    ``official``: the official Euler sampler's grid for its ``num_steps`` N: N // 2 points from 1
    to 0.3, then N // 2 + 1 from 0.25 to 0, so 2 (N // 2) + 1 points (N = 25 and N = 24 both give
    25 points, 24 steps), and 51 for N = 50. ``uniform``: ``num_steps`` equally spaced points
    (``num_steps - 1`` steps, the official rule's count for odd N).
    """
    if grid == "uniform":
        return torch.linspace(1, 0, num_steps, dtype=torch.float64)
    if num_steps == 50:
        return torch.linspace(1, 0, 51, dtype=torch.float64)
    return torch.cat([torch.linspace(1, 0.3, num_steps // 2, dtype=torch.float64),
                      torch.linspace(0.25, 0, num_steps // 2 + 1, dtype=torch.float64)])


def in_guidance_interval(t: float, guidance: float) -> bool:
    """The official rule: guidance acts at t iff 0 <= t <= guidance (float64, inclusive)."""
    return 0 <= t <= guidance


def scale_cfg(cfg: float, k: int, n_scales: int) -> float:
    """Guidance weight of scale k, in Python float and in the official order of operations."""
    return (cfg - 1) * k / (n_scales - 1) + 1 if n_scales > 1 else cfg


@dataclass(frozen=True, slots=True)
class Update:
    """``dst = src + sum(w * V[slot])``; the states are ``x`` (what the next evaluation reads,
    and the result) and ``acc`` (the last accepted state of a multi-stage or corrected method)."""
    dst: str
    src: str
    terms: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Eval:
    """One head evaluation at time t (float64) into velocity slot ``slot``, then its updates."""
    t: float
    guided: bool
    slot: int
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    """Everything the loop needs, decided before it runs. A value: two schedules built from the
    same settings are equal and hash alike (CUDA graphs are keyed by it)."""
    num_steps: int               # the requested count on the reference grid (25 gives 24 steps)
    cfg: float
    guidance: float
    times: tuple[float, ...]     # (S+1,) the float64 reference grid t_0 = 1 > ... > 0
    cfg_k: tuple[float, ...]     # per scale
    guided: tuple[tuple[bool, ...], ...]   # per scale, per reference step (the official rule)
    solver: str = "euler"
    grid: str = "official"
    stride: int = 1              # skip: evaluate every stride-th step
    order: int = 1               # skip: velocities extrapolated from this many evaluations
    plan: tuple[tuple[Eval, ...], ...] = ()   # per scale: the head evaluations and updates
    slots: int = 1               # velocity buffers the plan uses
    name: str | None = None      # "official", "fast", or None for a custom choice
    head_evals: int = 0          # head evaluations per sample, summed over scales (a guided one counts once)

    @property
    def n_steps(self) -> int:
        return len(self.times) - 1

    # The reference grid as the official sampler sees it (for checks and people; the loop reads the plan).
    @property
    def t64(self) -> torch.Tensor:
        """(S+1,) float64 reference grid."""
        return torch.tensor(self.times, dtype=torch.float64)

    @property
    def t32(self) -> torch.Tensor:
        """(S,) float32 t_cur as the head receives it."""
        return self.t64[:-1].to(torch.float32)

    @property
    def t_int(self) -> torch.Tensor:
        """(S,) int64 timesteps the head embeds."""
        return timestep_integers(self.t32)

    def describe(self) -> str:
        what = self.solver if self.solver != "skip" else f"skip (head on 1 step in {self.stride}, order {self.order})"
        return (f"{self.name + ': ' if self.name else ''}{what} on the {self.grid} {len(self.times)}-point grid, "
                f"{self.head_evals} head evaluations per sample")

    def rows(self, B: int) -> int:
        """AR rows for B samples: [labels; null] with guidance, the labels alone without."""
        return 2 * B if self.cfg != 1.0 else B


@dataclass(frozen=True, slots=True)
class Settings:
    """What a sampling request may choose, checked when built: the command options, a served
    request's fields, the pipeline's keywords and an engine directory's recorded defaults are all
    one of these. A field left None takes the engine directory's recorded default, else
    :data:`~flowar.config.SAMPLING_DEFAULTS`, else the named schedule's own (:meth:`resolve`)."""
    schedule: str | None = None      # a named schedule: official, fast
    steps: int | None = None         # the official sampler's num_steps N: 2 (N // 2) + 1 grid points (25: 24 steps)
    cfg: float | None = None         # guidance weight at the last scale (1 = off)
    guidance: float | None = None    # guide only at t <= this
    solver: str | None = None        # euler, ab2, heun, skip
    stride: int | None = None        # skip: the head on 1 step in stride
    order: int | None = None         # skip: velocities extrapolated from this many evaluations

    def __post_init__(self) -> None:
        # (type(v) is int / in (int, float): strict, a served true or "5" is not a number)
        s = self
        for bad, expected, got, fix in (
            (s.schedule is not None and (not isinstance(s.schedule, str) or s.schedule not in SCHEDULES),
             f"--schedule one of {', '.join(SCHEDULES)}",
             s.schedule, "use --schedule official"),
            (s.steps is not None and not (type(s.steps) is int and 2 <= s.steps <= MAX_STEPS),
             f"--steps an integer in 2..{MAX_STEPS}", s.steps, "use e.g. --steps 25"),
            (s.cfg is not None and not (type(s.cfg) in (int, float) and 1.0 <= s.cfg <= MAX_CFG),
             f"--cfg in [1, {MAX_CFG:g}] (1 = no guidance)", s.cfg, "use e.g. --cfg 4.3"),
            (s.guidance is not None and not (type(s.guidance) in (int, float) and 0.0 <= s.guidance <= 1.0),
             "--guidance (the time below which guidance applies) in [0, 1]", s.guidance, "use e.g. --guidance 0.9"),
            (s.solver is not None and s.solver not in SOLVERS, f"--solver one of {', '.join(SOLVERS)}", s.solver,
             "use --solver euler (official)"),
            (s.stride is not None and not (type(s.stride) is int and 1 <= s.stride <= 64),
             "--stride an integer in 1..64", s.stride, "use e.g. --stride 3"),
            (s.order is not None and not (type(s.order) is int and 1 <= s.order <= 4),
             "an order in 1..4 for the skip solver", s.order, "use e.g. order 3")):
            if bad:
                raise FlowARError(expected, repr(got), fix)

    @classmethod
    def of(cls, values: "Settings | dict | None") -> "Settings":
        """Settings from a mapping of these field names: an engine directory's recorded defaults,
        whose errors name where they are (one said "--cfg in [1, 50] ... use e.g. --cfg 4.3" where no
        --cfg was given)."""
        if isinstance(values, Settings):
            return values
        try:
            return cls(**{k: v for k, v in (values or {}).items() if k in cls.__dataclass_fields__})
        except FlowARError as e:
            raise FlowARError(f"schedule_defaults in the engine directory's manifest.json: "
                              f"{e.expected.removeprefix('--')}", e.got,
                              "re-export the directory (flowar-export)") from None

    def given(self) -> dict:
        """The fields that were set, by name (what a command records)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) is not None}

    def resolve(self, n_scales: int, recorded: "Settings | dict | None" = None) -> "Schedule":
        """The schedule these settings name: each field as given, else ``recorded`` (an engine
        directory's defaults), else :data:`~flowar.config.SAMPLING_DEFAULTS`, else the named
        schedule's own."""
        layers = (self, Settings.of(recorded), _DEFAULTS)
        s = {f: next((getattr(x, f) for x in layers if getattr(x, f) is not None), None) for f in self.__dataclass_fields__}
        named = SCHEDULES[s["schedule"]]
        if s["solver"] == "skip" and named["solver"] != "skip":     # the skip solver's own stride and order, fast's
            named = named | {k: SCHEDULES["fast"][k] for k in ("stride", "order")}    # (official's 1 and 1: Euler)
        spec = named | {k: s[k] for k in ("steps", "solver", "stride", "order") if s[k] is not None}
        if self.stride is not None and spec["solver"] != "skip":        # (it would be dropped: the plain solver ran)
            raise FlowARError("--stride with the skip solver (--schedule fast, or --solver skip)",
                              f"--stride {self.stride} with --solver {spec['solver']}",
                              "drop --stride, or add --schedule fast")
        custom = spec != SCHEDULES[s["schedule"]]
        return build_schedule(spec["steps"], float(s["cfg"]), float(s["guidance"]), n_scales, spec["solver"],
                              spec["grid"], spec["stride"], spec["order"], name=None if custom else s["schedule"])


def _lagrange_sum(nodes: list[float], points: list[float], steps: list[float]) -> list[float]:
    """Weights w_a with sum_j steps[j] * p(points[j]) = sum_a w_a * V_a, p the polynomial through (nodes[a], V_a)."""
    w = [0.0] * len(nodes)
    for a, ta in enumerate(nodes):
        for s, h in zip(points, steps):
            w[a] += h * math.prod((s - tb) / (ta - tb) for b, tb in enumerate(nodes) if b != a)
    return w


def _plan_scale(solver: str, t: list[float], guided: tuple[bool, ...], cfg_k: float, guidance: float,
                stride: int, order: int) -> list[Eval]:
    n = len(t) - 1
    h = [t[i + 1] - t[i] for i in range(n)]
    seg = [0] * n                                             # run of equal guidance (linear: 1000 steps)
    for i in range(1, n):
        seg[i] = seg[i - 1] + (guided[i] != guided[i - 1])
    if solver == "euler":
        return [Eval(t[i], guided[i], 0, (Update("x", "x", ((0, h[i]),)),)) for i in range(n)]
    if solver == "ab2":
        plan = []
        for i in range(n):
            slot, prev = i % 2, (i - 1) % 2
            if i == 0 or seg[i] != seg[i - 1]:
                plan.append(Eval(t[i], guided[i], slot, (Update("x", "x", ((slot, h[i]),)),)))
            else:
                r = h[i] / h[i - 1]
                terms = ((slot, h[i] * (1 + r / 2)), (prev, -h[i] * r / 2))
                plan.append(Eval(t[i], guided[i], slot, (Update("x", "x", terms),)))
        return plan
    if solver == "heun":
        plan = []
        for i in range(n):
            g_next = cfg_k > 1 and in_guidance_interval(t[i + 1], guidance)
            plan.append(Eval(t[i], guided[i], 0, (Update("acc", "x", ()), Update("x", "x", ((0, h[i]),)))))
            plan.append(Eval(t[i + 1], g_next, 1, (Update("x", "acc", ((0, h[i] / 2), (1, h[i] / 2))),)))
        return plan
    # skip: evaluate at each segment's start, every stride-th step after it, and the last step
    first = {}                                                # each segment's first step
    for i in range(n):
        first.setdefault(seg[i], i)
    nodes = sorted({i for i in range(n) if (i - first[seg[i]]) % stride == 0} | {n - 1})
    at = {j: q for q, j in enumerate(nodes)}
    slots = order + 1
    plan, same = [], []
    for q, i in enumerate(nodes):
        nxt = nodes[q + 1] if q + 1 < len(nodes) else n
        same = (same if q and seg[nodes[q - 1]] == seg[i] else []) + [i]   # this segment's evaluations so far
        same = same[-(order + 1):]
        ups = []
        if q and seg[nodes[q - 1]] == seg[i]:                            # correct the steps since the last one
            corr = same[-(order + 1):]
            w = _lagrange_sum([t[j] for j in corr], [t[j] for j in range(nodes[q - 1], i)],
                              [h[j] for j in range(nodes[q - 1], i)])
            ups.append(Update("acc", "acc", tuple((at[j] % slots, wa) for j, wa in zip(corr, w))))
        else:
            ups.append(Update("acc", "x", ()))
        pred = same[-order:]
        w = _lagrange_sum([t[j] for j in pred], [t[j] for j in range(i, nxt)], [h[j] for j in range(i, nxt)])
        ups.append(Update("x", "acc", tuple((at[j] % slots, wa) for j, wa in zip(pred, w))))
        plan.append(Eval(t[i], guided[i], q % slots, tuple(ups)))
    return plan


def build_schedule(num_steps: int, cfg: float, guidance: float, n_scales: int, solver: str = "euler",
                   grid: str = "official", stride: int = 1, order: int = 3, name: str | None = None) -> Schedule:
    Settings(steps=num_steps, cfg=cfg, guidance=guidance, solver=solver, stride=stride, order=order)    # checked
    if grid not in GRIDS:
        raise FlowARError(f"a time grid among {', '.join(GRIDS)}", repr(grid), "use the official grid")
    t64 = time_grid(num_steps, grid)
    t_cur = t64[:-1]
    cfg_k = tuple(scale_cfg(cfg, k, n_scales) for k in range(n_scales))
    in_interval = [in_guidance_interval(x, guidance) for x in t_cur.tolist()]
    guided = tuple(tuple(ck > 1 and g for g in in_interval) for ck in cfg_k)
    t_list = t64.tolist()
    if solver != "skip":
        stride, order = 1, 1
    plan = tuple(tuple(_plan_scale(solver, t_list, guided[k], cfg_k[k], guidance, stride, order))
                 for k in range(n_scales))
    slots = {"euler": 1, "ab2": 2, "heun": 2, "skip": order + 1}[solver]
    return Schedule(num_steps, float(cfg), float(guidance), tuple(t_list), cfg_k, guided, solver, grid, stride, order, plan,
                    slots, name, sum(len(p) for p in plan))


_DEFAULTS = Settings(**SAMPLING_DEFAULTS)
