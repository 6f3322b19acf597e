"""Official parity on any x86 CPU, and proof that it is strict.

The bounds come from measured float32 noise (tests/parity.py explains them): this machine's
own (float32 against a float64 twin of the same code) and the official code's own (its AVX2
and AVX-512 recordings). The mutation tests below inject small plausible bugs into the code
under test and require the parity checks to catch each one.
"""

import pytest
import torch
import torch.nn.functional as F

import flowar.model.head
import flowar.model.layers
import flowar.sampling.sampler
import flowar.sampling.schedule
from parity import RUNS, ar_checks, ode_checks, token_check, velocity_check


def _report(checks):
    return "\n".join(str(c) for c in checks)


def test_velocity_within_float32_noise_of_both_recordings(official):
    c = velocity_check(official)
    assert c.ok, str(c)


@pytest.mark.parametrize("run", list(RUNS))
def test_sampled_tokens_within_float32_noise_of_both_recordings(official, official_tokens, run):
    c, _ = official_tokens(official.name, run)
    assert c.ok, str(c)


@pytest.mark.parametrize("run", list(RUNS))
def test_every_scale_ar_and_ode_within_float32_noise(official, run):
    """Per scale, on the official inputs of that scale, so that an error is found where it is made."""
    checks = ar_checks(official, run) + ode_checks(official, run)
    bad = [c for c in checks if not c.ok]
    assert not bad, _report(bad)


# ---- mutation tests: each small bug must make a parity check fail --------------------------------

def _timestep_off_by_one(monkeypatch):
    """The integer timestep of one ODE step (step 5 of the 25-step grid: 681) becomes 680."""
    real = flowar.model.head.timestep_integers
    target = int(flowar.sampling.schedule.build_schedule(25, 4.3, 0.9, 5).t_int[5])

    def mutant(t):
        i = real(t)
        return torch.where(i == target, i - 1, i)
    monkeypatch.setattr(flowar.model.head, "timestep_integers", mutant)


def _cfg_of_one_scale_off_by_1pct(monkeypatch):
    real = flowar.sampling.schedule.scale_cfg
    monkeypatch.setattr(flowar.sampling.schedule, "scale_cfg", lambda cfg, k, n: real(cfg, k, n) * (1.01 if k == 2 else 1.0))


def _rope_positions_shifted_by_one(monkeypatch):
    """Grid index 1..s instead of 0..s-1 (a uniform shift of every position would be invisible:
    RoPE depends only on differences of positions, and the scales' grids would move together)."""
    def mutant(side, device=None):
        p = torch.arange(1, side + 1, device=device, dtype=torch.float32) / side * flowar.model.layers.ROPE_GRID
        return torch.stack([p[:, None].expand(side, side), p[None, :].expand(side, side)], dim=-1).reshape(-1, 2)
    monkeypatch.setattr(flowar.model.layers, "grid_positions", mutant)
    monkeypatch.setattr(flowar.model.head, "grid_positions", mutant)


class _BilinearF:
    """torch.nn.functional with the hand-off's bicubic resize swapped for bilinear."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def interpolate(x, size=None, mode="nearest", **kw):
        return F.interpolate(x, size=size, mode="bilinear" if mode == "bicubic" else mode, **kw)


def _hand_off_bilinear(monkeypatch):
    monkeypatch.setattr(flowar.sampling.sampler, "F", _BilinearF())


def _guidance_interval_exclusive(monkeypatch):
    """t_cur < guidance instead of <=: the 50-step grid reaches t = 0.7 exactly."""
    monkeypatch.setattr(flowar.sampling.schedule, "in_guidance_interval", lambda t, guidance: 0 <= t < guidance)


# mutation -> (run, which per-scale checks must fail: "ar" / "ode")
MUTATIONS = {
    "timestep_off_by_one": (_timestep_off_by_one, "sample25", "ode"),
    "cfg_of_scale_2_off_by_1pct": (_cfg_of_one_scale_off_by_1pct, "sample25", "ode"),
    "rope_positions_shifted_by_one": (_rope_positions_shifted_by_one, "sample25", "ar"),
    "hand_off_bilinear": (_hand_off_bilinear, "sample25", "ar"),
    "guidance_interval_exclusive": (_guidance_interval_exclusive, "sample50", "ode"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_small_bug_fails_parity(fixtures_dir, mutation, monkeypatch):
    from conftest import _official
    o = _official(fixtures_dir, "tiny_v1")
    inject, run, where = MUTATIONS[mutation]
    inject(monkeypatch)
    tokens, _ = token_check(o, run)
    assert not tokens.ok, f"{mutation} went unnoticed end to end: {tokens}"
    local = ar_checks(o, run) if where == "ar" else ode_checks(o, run)
    assert any(not c.ok for c in local), f"{mutation} went unnoticed per scale:\n{_report(local)}"
    # and by a wide margin, not by rounding luck
    assert tokens.err > 10 * tokens.tol, str(tokens)
