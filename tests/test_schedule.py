"""The schedule against the per-step table recorded from the official sampler."""

import json

import pytest

from flowar.errors import FlowARError
from flowar.sampling.schedule import build_schedule, scale_cfg, time_grid


@pytest.mark.parametrize("run", ["sample25", "sample50"])
def test_schedule_matches_official_table(fixtures_dir, run):
    rec = json.loads((fixtures_dir / "tiny_v1.json").read_text())["sampling"][run]
    conf = rec["config"]
    s = build_schedule(conf["num_steps"], conf["cfg"], conf["guidance"], 5)
    for scale in rec["schedule"]:
        k = scale["scale_index"]
        assert s.cfg_k[k] == scale["cfg_scale"]
        steps = scale["steps"]
        assert len(steps) == s.n_steps
        for i, st in enumerate(steps):
            assert repr(s.t64[i].item()) == st["t_cur_f64"]
            assert repr(s.t64[i + 1].item()) == st["t_next_f64"]
            assert repr(s.t32[i].item()) == st["t_f32"]
            assert s.t_int[i].item() == st["t_int"]
            assert s.guided[k][i] == st["guided"]


def test_grid_shapes():
    assert len(time_grid(25)) == 25 and len(time_grid(50)) == 51 and len(time_grid(10)) == 11
    g = time_grid(25)
    assert g[11].item() == pytest.approx(0.3) and g[12].item() == 0.25 and g[-1].item() == 0.0


def test_linear_guidance_over_scales():
    assert [scale_cfg(4.3, k, 5) for k in range(5)] == [1.0, 1.825, 2.65, 3.4749999999999996, 4.3]
    s = build_schedule(25, 1.0, 0.9, 5)
    assert not any(any(g) for g in s.guided)


@pytest.mark.parametrize("args", [(1, 4.3, 0.9), (25, 0.5, 0.9), (25, 4.3, 1.5), (25, 4.3, -0.1), (5000, 2.0, 0.5)])
def test_out_of_range_arguments_are_refused(args):
    with pytest.raises(FlowARError):
        build_schedule(*args, 5)


def test_a_stride_without_the_skip_solver_is_refused_and_the_grid_is_described_by_its_points():
    """--stride only means something to the skip solver: with another it was dropped and the plain
    solver ran, reported as a custom schedule; the description counts the grid's points (N = 24
    gives the 25 of N = 25: it said "24-point")."""
    from flowar.sampling.schedule import Settings
    with pytest.raises(FlowARError, match=r"--stride with the skip solver .*; got --stride 2 with --solver euler"):
        Settings(stride=2).resolve(5)
    with pytest.raises(FlowARError, match="got --stride 2 with --solver heun"):
        Settings(schedule="fast", solver="heun", stride=2).resolve(5)
    assert Settings(schedule="fast", stride=2).resolve(5).stride == 2 and Settings(solver="skip", stride=4).resolve(5).stride == 4
    # --solver skip takes the skip solver's own stride and order (fast's 3 and 3): it took the official
    # schedule's 1 and 1, plain Euler at full cost, and --stride 4 ran order 1 where bench/RESULTS.md says 3
    with pytest.raises(FlowARError, match="--schedule one of"):        # (a list: unhashable, a traceback)
        Settings(schedule=["fast"])
    skip, fast = Settings(solver="skip").resolve(5), Settings(schedule="fast").resolve(5)
    assert (skip.stride, skip.order, skip.head_evals) == (3, 3, fast.head_evals) < (3, 3, Settings().resolve(5).head_evals)
    assert Settings(solver="skip", stride=4).resolve(5).order == 3
    for n, points in ((24, 25), (25, 25), (50, 51), (9, 9)):
        s = Settings(steps=n).resolve(5)
        assert len(s.times) == len(time_grid(n)) == points and f"official {points}-point grid" in s.describe()
