"""The solvers of the one sampler loop against known math, and against the official Euler path.

A stand-in for the networks gives the sampler an ODE with a closed-form solution,
dx/dt = x sin(2t), so x(0) = x(1) exp((cos(2) - 1) / 2): the error of each solver on uniform grids
shows its order of convergence. Then, on the official fixtures: where a solver coincides with
the official Euler method (the skip solver with stride 1), it gives the same tokens bit for bit.
"""

import math

import pytest
import torch

from flowar.config import get_preset
from flowar.sampling.sampler import per_sample_noise, sample
from flowar.sampling.schedule import Settings, build_schedule
from flowar.sampling.eager import EagerStages


class ClosedForm:
    """Stages whose velocity is a known function of (x, t); the AR and head constants are dummies."""


    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def start(self, labels_R):
        pass

    def ar(self, k, x_in):
        return torch.zeros(1)

    def prepare(self, k, cond):
        return None

    def velocity(self, ctx, x, t):
        self.calls += 1
        return self.fn(x.double(), t.double()[:, None, None]).float()


CONFIG = get_preset("tiny")


def _solve(fn, schedule):
    st = ClosedForm(fn)
    with torch.no_grad():
        tokens, _ = sample(st, CONFIG, schedule, torch.tensor([0, 1]), per_sample_noise(0, range(2)))
    x1 = per_sample_noise(0, range(2))(CONFIG.n_scales - 1, (2, CONFIG.tokens_per_scale[-1], CONFIG.latent_channels))
    return tokens.flatten(2).transpose(1, 2).double(), x1.double(), st.calls


def _errors(solver, points, **kw):
    exact = lambda x1: x1 * math.exp((math.cos(2.0) - 1) / 2)                     # noqa: E731
    out = []
    for n in points:
        tokens, x1, _ = _solve(lambda x, t: x * torch.sin(2 * t), build_schedule(n, 1.0, 0.9, CONFIG.n_scales, solver,
                                                                             "uniform", **kw))
        out.append((tokens - exact(x1)).abs().max().item())
    return out


@pytest.mark.parametrize("solver,order", [("euler", 1), ("ab2", 2), ("heun", 2)])
def test_order_of_convergence_on_a_closed_form_ode(solver, order):
    errs = _errors(solver, (17, 33, 65))                                     # 16, 32, 64 uniform steps
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(r - order) < 0.25 for r in rates), (solver, errs, rates)


def test_skip_converges_to_the_euler_path_of_its_reference_grid():
    """Evaluating 1 step in m of a fixed fine grid: the distance to that grid's Euler result
    falls with m like m^(order + 1) (predict with `order` points, correct with one more)."""
    fn = lambda x, t: x * torch.sin(2 * t)                                    # noqa: E731
    ref, _, n_ref = _solve(fn, build_schedule(241, 1.0, 0.9, CONFIG.n_scales, "euler", "uniform"))
    for order in (1, 2):
        errs = []
        for m in (16, 8, 4):
            got, _, calls = _solve(fn, build_schedule(241, 1.0, 0.9, CONFIG.n_scales, "skip", "uniform", m, order))
            assert calls < n_ref / m + 2 * CONFIG.n_scales
            errs.append((got - ref).abs().max().item())
        rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(r > order + 0.6 for r in rates), (order, errs, rates)


def test_skip_reproduces_the_euler_chain_exactly_where_its_polynomials_are_exact():
    """For a velocity linear in t (and free of x), the corrector (through two or more evaluations)
    recovers every skipped velocity exactly: the result is the official grid's Euler chain."""
    fn = lambda x, t: 0.3 - 1.7 * t + 0 * x                                  # noqa: E731
    ref, _, _ = _solve(fn, build_schedule(25, 1.0, 0.9, CONFIG.n_scales))
    for order in (1, 2, 3):
        got, _, calls = _solve(fn, build_schedule(25, 1.0, 0.9, CONFIG.n_scales, "skip", stride=3, order=order))
        assert (got - ref).abs().max().item() < 1e-6 and calls == 9 * CONFIG.n_scales
    # a quadratic is not recovered on the first interval (two points), so it must differ there
    quad = lambda x, t: 0.3 - 1.7 * t + 4.0 * t * t + 0 * x                  # noqa: E731
    ref, _, _ = _solve(quad, build_schedule(25, 1.0, 0.9, CONFIG.n_scales))
    got, _, _ = _solve(quad, build_schedule(25, 1.0, 0.9, CONFIG.n_scales, "skip", stride=3, order=3))
    assert (got - ref).abs().max().item() > 1e-3


def test_where_a_solver_coincides_with_the_official_euler_it_is_bitwise_the_same(official_v1):
    model, io = official_v1.model, official_v1.a
    labels = io["sample25.labels"]
    noise = per_sample_noise(3, range(2))
    with torch.no_grad():
        euler, _ = sample(EagerStages(model), model.config, Settings(schedule="official", cfg=4.3, guidance=0.9).resolve(5), labels, noise)
        skip1, _ = sample(EagerStages(model), model.config,
                          build_schedule(25, 4.3, 0.9, 5, "skip", stride=1, order=3), labels, noise)
    assert torch.equal(euler, skip1)


def test_fast_evaluates_the_head_at_guidance_switches_and_restarts_there():
    s = Settings(schedule="fast", cfg=4.3, guidance=0.9).resolve(5)
    assert s.head_evals == 45 and Settings(schedule="official", cfg=4.3, guidance=0.9).resolve(5).head_evals == 120
    t = s.t64.tolist()
    for k, plan in enumerate(s.plan):
        evaluated = [t.index(e.t) for e in plan]
        switches = [i for i in range(1, s.n_steps) if s.guided[k][i] != s.guided[k][i - 1]]
        assert set(switches) <= set(evaluated) and evaluated[-1] == s.n_steps - 1
        for e in plan:                                                       # guidance by the official rule
            assert e.guided == (s.cfg_k[k] > 1 and e.t <= 0.9)
    # at the switch (step 2, t = 0.873) the history restarts: no update reads an unguided velocity
    plan = s.plan[4]
    e = next(e for e in plan if e.guided)
    assert e.t == t[2] and all(slot == e.slot for u in e.updates for slot, _ in u.terms)


def test_schedule_arguments_are_checked():
    from flowar.errors import FlowARError
    with pytest.raises(FlowARError, match="--solver one of"):
        build_schedule(25, 4.3, 0.9, 5, "rk45")
    with pytest.raises(FlowARError, match="--stride"):
        build_schedule(25, 4.3, 0.9, 5, "skip", stride=0)
    with pytest.raises(FlowARError, match="--schedule one of"):
        Settings(schedule="turbo")


def test_settings_are_checked_when_built_and_resolve_over_the_recorded_defaults():
    """One settings object for every entry point: strict types (a served "5" or true is not a step
    count), the user's fields over an engine directory's recorded defaults over the official
    defaults, and a schedule that is a value (the same settings give an equal, equally hashed one)."""
    from flowar.errors import FlowARError
    for bad in (dict(steps="5"), dict(steps=True), dict(cfg=True), dict(cfg="4.3"), dict(steps=1), dict(cfg=0.5),
                dict(guidance=1.5), dict(solver="rk4"), dict(stride=0), dict(schedule="turbo")):
        with pytest.raises(FlowARError):
            Settings(**bad)
    recorded = {"schedule": "fast", "cfg": 3.0, "guidance": 0.9}
    s = Settings(steps=7).resolve(5, recorded)
    assert (s.solver, s.num_steps, s.cfg, s.guidance, s.stride) == ("skip", 7, 3.0, 0.9, 3) and s.name is None
    s = Settings(cfg=2.0, schedule="official").resolve(5, recorded)
    assert (s.solver, s.num_steps, s.cfg, s.name) == ("euler", 25, 2.0, "official")
    assert Settings().resolve(5).cfg == 4.3 and Settings().resolve(5, recorded).name == "fast"
    a, b = Settings(schedule="fast").resolve(5), Settings(schedule="fast").resolve(5)
    assert a is not b and a == b and hash(a) == hash(b) and a != Settings(schedule="fast", cfg=4.0).resolve(5)
