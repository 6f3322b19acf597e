"""bench/latency.py: the same work for every backend, parity beside the times, and timing that
measures what it says (checked against stages with a known cost, not against its own formulas)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "7", "--backends", "eager,cached,ort",
                        "--schedules", "official,fast",
                        "--repeat", "1", "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    return rc, json.loads((out / "r.json").read_text()), out


def test_every_backend_does_the_same_work_and_agrees_with_eager(run):
    rc, data, out = run
    assert rc == 0
    recs = {(r["backend"], r["schedule"], r["batch"]): r for r in data["results"]}
    assert set(recs) == {(b, s, n) for b in ("eager", "cached", "ort") for s in ("official", "fast") for n in (1, 2)}
    from flowar.config import get_preset
    n_scales = get_preset("tiny").n_scales
    assert n_scales == 5
    # Head evaluations per sample, counted by hand for the 7-point official grid (t = 1, .65, .3 | .25,
    # .167, .083, 0: 6 steps) on 5 scales: official Euler 6 per scale = 30; fast (head on 1 step in 3,
    # and where guidance switches on, and on the last step): scale 0 is unguided, steps {0, 3, 5} = 3;
    # scales 1-4 are guided from step 1 (t <= 0.9): steps {0, 1, 4, 5} = 4 each; 3 + 4 x 4 = 19.
    evals = {"official": 30, "fast": 19}
    for (backend, schedule, batch), r in recs.items():
        # the schedule each row claims is the one that ran: its head evaluations per sample
        assert r["head_evals"] == evals[schedule]
        if schedule == "fast":                                          # another schedule: other tokens
            assert r["max_abs_diff_vs_official"] > 1e-3
        # the tokens of every backend against eager's, same noise: known to agree within 1e-4
        assert r["max_abs_diff_vs_eager"] <= (0.0 if backend == "eager" else 1e-4), (backend, batch)
        assert len(r["head_by_scale_s"]) == n_scales and all(t > 0 for t in r["head_by_scale_s"])
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_row_counts_the_flops_of_its_own_schedule(run):
    """The fast rows' GFLOP/s come from the fast schedule's work, not the official one's: the same AR
    and decode, and per scale 3 or 4 head evaluations of the official 6 (hand count above), plus the
    per-scale preparation both do once. A row's rate times its median is its schedule's count."""
    rc, data, out = run
    f = data["flops_per_max_batch"]
    assert f["fast"]["ar"] == f["official"]["ar"] > 0 and f["fast"]["decode"] == f["official"]["decode"]
    assert 0.5 * f["official"]["head"] <= f["fast"]["head"] < 0.75 * f["official"]["head"]
    for r in data["results"]:
        total = sum(f[r["schedule"]].values()) * r["batch"] / 2               # counted at the largest batch, 2
        assert r["effective_gflops"]["total"] * 1e9 * r["median_s"] == pytest.approx(total, rel=1e-9)


class Sleepy:
    """Stages that compute nothing and sleep a known time in every call of one stage, so what
    the clock reads is known whatever else the machine is doing."""

    def __init__(self, config, stage: str, seconds: float):
        self.c, self.stage, self.seconds, self.calls = config, stage, seconds, 0

    def _cost(self, stage: str) -> None:
        if stage == self.stage:
            self.calls += 1
            time.sleep(self.seconds)

    def start(self, labels):
        self.R = labels.shape[0]

    def ar(self, k, x):
        self._cost("ar")
        return torch.zeros(self.R, self.c.tokens_per_scale[k], self.c.ar_width)

    def prepare(self, k, cond):
        self._cost("head")
        return None

    def velocity(self, ctx, x, t):
        self._cost("head")
        return torch.zeros_like(x)


@pytest.mark.parametrize("stage", ["ar", "head"])
def test_the_stage_split_finds_a_known_delay_and_timed_runs_do_not_synchronise_inside(bench, stage):
    import latency_measure as m
    from flowar.config import get_preset
    from flowar.sampling.schedule import Settings
    c = get_preset("tiny")
    work = m.Work(c, Settings(steps=5).resolve(c.n_scales), torch.tensor([3, 7]), 0, False, torch.device("cpu"))
    slow = Sleepy(c, stage, {"ar": 0.05, "head": 0.01}[stage])
    split, by_scale = m.stage_split(slow, work, False)
    delay = slow.calls * slow.seconds
    other = "head" if stage == "ar" else "ar"
    assert delay <= split[stage] <= delay + 0.5, (split, delay)        # found in the stage it was put in
    assert split[other] < delay / 2, split       # and nowhere else (at most half: a loaded host's pauses, not 10 %)
    if stage == "head":
        assert sum(by_scale) == pytest.approx(split["head"]) and all(t >= slow.seconds for t in by_scale)
    syncs = []
    slow.calls = 0
    t = m.time_end_to_end(slow, work, False, warmup=1, repeat=2, synchronize=syncs.append)
    assert len(syncs) == 2 * 3                        # one before and one after each of the 3 calls, none inside
    assert len(t.times) == 2 and min(t.times) >= slow.calls / 3 * slow.seconds


def test_bad_backend_is_one_line_and_exit_2():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--preset", "tiny", "--backends", "fast"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--backends" in p.stderr and "Traceback" not in p.stderr


def test_a_backend_off_eager_is_marked_wrong_and_fails_the_run(bench, default_auto_engines, tmp_path):
    """With a tolerance below what float32 kernels can agree on, ONNX Runtime must be flagged (on
    the suite's directory of the default model: its checkpoint is the eager side, no export)."""
    rc = bench.main(["--engine-dir", str(default_auto_engines), "--batch", "1", "--steps", "2", "--backends", "eager,ort",
                        "--repeat", "1", "--parity-tol", "1e-12", "--json", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "r.png")])
    data = json.loads((tmp_path / "r.json").read_text())
    recs = {r["backend"]: r for r in data["results"]}
    assert recs["eager"]["parity_ok"] is True
    assert recs["ort"]["max_abs_diff_vs_eager"] > 1e-12 and recs["ort"]["parity_ok"] is False
    assert rc == 1 and "WRONG" in data["markdown"]


def test_engines_the_bench_exports_for_a_checkpoint_decode_with_the_vae_it_was_given(bench, tmp_path):
    """Where no directory holds a row's engines the bench exports one (flowar-export, in a process
    of its own) with the VAE the user named: the decoder it read from that VAE (without diffusers)
    cannot be saved as one, and the bench died with a traceback (--ckpt or --engine-dir with a VAE)."""
    rc = bench.main(["--ckpt", str(ROOT / "models" / "default" / "flowar.safetensors"), "--vae",
                     str(ROOT / "models" / "default" / "vae"), "--batch", "1", "--steps", "2", "--backends", "eager,ort",
                     "--repeat", "1", "--json", str(tmp_path / "r.json"), "--plot", ""])
    recs = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rc == 0 and recs["ort"]["build_s"] > 0                               # exported for the run
    assert recs["ort"]["stage_median_s"]["decode"] > 0 and recs["ort"]["max_abs_diff_vs_eager"] <= 1e-4


def test_a_failed_fresh_run_keeps_the_warm_results_and_bad_fresh_options_are_one_line(bench, default_auto_engines,
                                                                                       tmp_path, monkeypatch, capsys):
    """--fresh runs after the warm measurements: where it fails (a moved checkpoint, say) the warm
    results are still written, with the reason, and the run fails (they were lost to a traceback).
    --fresh without --engine-dir (ignored before), --fresh -1 and --threads 0 are refused before any work."""
    import latency_fresh
    from flowar.errors import FlowARError
    monkeypatch.setattr(latency_fresh, "fresh_runs", lambda *a: (_ for _ in ()).throw(RuntimeError("no checkpoint")))
    from flowar.engines.cpu import OthersShare
    timed = []

    def others(self, *exc):            # others took 30 % of the CPUs in every timed block: recorded, and warned of
        timed.append(1)
        self.others, self.wall = self.others + 0.3 * len(self.cpus or [1]), self.wall + 1.0
    monkeypatch.setattr(OthersShare, "__exit__", others)
    rc = bench.main(["--engine-dir", str(default_auto_engines), "--batch", "1", "--steps", "2", "--backends", "eager",
                     "--repeat", "1", "--fresh", "1", "--json", str(tmp_path / "r.json"), "--plot", ""])
    data = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and data["results"] and data["fresh_processes"] == {"error": "RuntimeError: no checkpoint"}
    assert timed and data["machine"]["others_cpu"] == 0.3
    assert "# warning: other processes took 30% of this machine's CPU while the backends were timed" in capsys.readouterr().err
    for bad, said in ((["--preset", "tiny", "--fresh", "2"], "expected --fresh with --engine-dir"),
                      (["--engine-dir", "d", "--fresh", "-1"], "expected --fresh >= 0; got -1. Fix: use e.g. --fresh 3"),
                      (["--preset", "tiny", "--threads", "0"], "expected --threads >= 1; got 0. Fix: use e.g. --threads 2")):
        with pytest.raises(FlowARError) as e:                # (--threads 0 was told to "use e.g. --fresh 3")
            bench.check(bench.parse(bad)[0])
        assert str(e.value).startswith(said), str(e.value)


def test_the_bench_scripts_say_a_bad_argument_a_refusal_and_a_stop_in_one_line(bench, monkeypatch, capsys):
    """What the commands do, the bench scripts a user runs do too: argparse's refusal without its usage
    block, a refusal found late without a traceback (solvers.py: after the export, a StatisticsError),
    Ctrl-C and SIGTERM as "interrupted" with exit 130 (a KeyboardInterrupt traceback; SIGTERM ended
    the run without a word, exit 143)."""
    import os
    import signal
    import time

    import solvers
    for argv, code, said in ((["--dtype", "foo"], 2, "error: argument --dtype: invalid choice: 'foo'"),
                             (["--engine-dir", "a", "--ckpt", "b"], 2, "error: argument --ckpt: not allowed with")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and err.startswith(said) and err.count("\n") == 1, err
    from entry import run_script
    assert run_script(solvers.main, ["--repeat", "0", "--out", os.devnull]) == 2
    assert capsys.readouterr().err == "error: expected --repeat >= 1; got 0. Fix: use e.g. --repeat 1\n"
    for sig, line in ((signal.SIGINT, "interrupted\n"), (signal.SIGTERM, "interrupted: SIGTERM\n")):
        monkeypatch.setattr(bench, "run", lambda spec, sig=sig: (os.kill(os.getpid(), sig), time.sleep(5), 0)[-1])
        assert bench.main(["--preset", "tiny", "--json", "", "--plot", ""]) == 130
        assert capsys.readouterr().err == line


def test_a_16_bit_engine_directory_loosens_the_verdict_of_its_engines_only(bench):
    """Against a bf16 engine directory the rows that run its engines are judged at --reduced-tol;
    the float32 eager rows keep --parity-tol (every row was loosened)."""
    spec = bench.check(bench.parse(["--preset", "tiny", "--parity-tol", "1e-4", "--reduced-tol", "0.5"])[0])
    assert [spec.tolerance(True, "fp32", b) for b in ("eager", "cached", "compile")] == [1e-4] * 3
    assert [spec.tolerance(True, "bf16", b) for b in ("ort", "auto", "bf16")] == [0.5] * 3
    assert spec.tolerance(True, "fp32", "ort") == 0.5 and spec.tolerance(False, "fp32", "ort") == 1e-4


def test_a_config_without_a_checkpoint_is_refused(bench):
    from flowar.errors import FlowARError
    with pytest.raises(FlowARError, match="--config with --ckpt .*; got --config alone"):
        bench.check(bench.parse(["--config", "c.json"])[0])


def test_a_16_bit_run_judges_each_row_against_float32_eager(bench, tmp_path, monkeypatch):
    """In a bf16 run a row may differ from bf16 eager by rounding alone (on a GPU, a kernel chosen
    differently under capture: 0.26 on FlowAR-S), so each row is also held to float32 eager: within
    1.5x bf16 eager's own error there it passes. Two rows stand in for the two cases, with the plain
    tolerance set below anything (--reduced-tol 1e-12) so that the float32 yardstick decides: one
    computing in float32 (more exact than bf16 eager: passes), one with its velocity 5% off (a bug:
    fails, and the run exits 1)."""
    from latency_backends import Backends, Prepared
    from flowar.sampling.eager import EagerStages
    from flowar.sampling.sampler import Hooked

    def exact(self, work):
        return Prepared(EagerStages(self.src.model), False, "fp32")

    def off(self, work):
        bad = Hooked(EagerStages(self.src.model), lambda kind, fn, *a: fn(*a) * 1.05 if kind == "velocity" else fn(*a))
        return Prepared(self._torch_stages(bad, "bf16"), False, "bf16")
    monkeypatch.setattr(Backends, "_cached", exact)
    monkeypatch.setattr(Backends, "_eager_bf16", off)
    rc = bench.main(["--preset", "tiny", "--batch", "1", "--steps", "4", "--backends", "eager,cached,eager-bf16",
                     "--dtype", "bf16", "--reduced-tol", "1e-12", "--repeat", "1", "--json", str(tmp_path / "r.json"),
                     "--plot", ""])
    recs = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    eager, exact_row, off_row = recs["eager"], recs["cached"], recs["eager-bf16"]
    assert eager["max_abs_diff_vs_fp32"] > 1e-4                 # bf16 eager is itself off float32
    assert exact_row["max_abs_diff_vs_eager"] > 1e-12 and exact_row["max_abs_diff_vs_fp32"] <= 1e-5
    assert exact_row["parity_ok"] is True
    assert off_row["max_abs_diff_vs_fp32"] > 1.5 * eager["max_abs_diff_vs_fp32"] + 1e-3
    assert off_row["parity_ok"] is False and rc == 1


def test_compile_backend_matches_eager(bench, tmp_path):
    """torch.compile of the head's velocity, compile time reported apart, tokens as eager's. On a
    tiny model of two scales: the backend compiles once per (scale, rows) shape, 4-8 s each."""
    pytest.importorskip("torch._inductor")
    import dataclasses
    from flowar.config import PRESETS
    from flowar.model.ar import FlowAR
    from flowar.model.checkpoint import save_checkpoint
    config = dataclasses.replace(PRESETS["tiny"], scales=(1, 2))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "two.safetensors", FlowAR(config).state_dict(), config)
    rc = bench.main(["--ckpt", str(tmp_path / "two.safetensors"), "--batch", "1", "--steps", "3", "--backends", "eager,compile",
                        "--repeat", "1", "--json", str(tmp_path / "r.json"), "--plot", ""])
    recs = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rc == 0 and recs["compile"]["build_s"] > 0
    assert recs["compile"]["max_abs_diff_vs_eager"] <= 1e-4


@pytest.mark.gpu
def test_cudagraph_backend_matches_eager_on_the_same_work(bench, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rc = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "5", "--backends", "eager,cudagraph",
                        "--device", "cuda", "--repeat", "2", "--json", str(tmp_path / "r.json"), "--plot", ""])
    recs = {(r["backend"], r["batch"]): r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rc == 0
    for b in (1, 2):
        assert recs[("cudagraph", b)]["max_abs_diff_vs_eager"] <= 1e-3 and recs[("cudagraph", b)]["parity_ok"]
