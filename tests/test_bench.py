"""bench/latency.py: the record format scripts read, parity beside the times, per-scale split."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("flowar_bench_latency", ROOT / "bench" / "latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod             # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = _bench().main(["--preset", "tiny", "--batch", "1,2", "--steps", "7", "--backends", "eager,torch,ort",
                        "--schedules", "official,fast",
                        "--repeat", "1", "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    return rc, json.loads((out / "r.json").read_text()), out


def test_records_carry_the_named_fields_and_parity_with_eager(run):
    rc, data, out = run
    assert rc == 0
    from flowar.config import get_preset
    n_scales = get_preset("tiny").n_scales
    assert data["random_weights"] is True and data["machine"]["gemm_peak_gflops"] > 0
    import onnxruntime
    import torch
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["onnxruntime"] == onnxruntime.__version__
    assert data["machine"]["cpu"] and data["machine"]["torch_threads"] == torch.get_num_threads()
    recs = {(r["backend"], r["schedule"], r["batch"]): r for r in data["results"]}
    assert set(recs) == {(b, s, n) for b in ("eager", "torch", "ort") for s in ("official", "fast") for n in (1, 2)}
    from flowar.schedule import sampling_schedule
    evals = {s: sampling_schedule(n_scales, schedule=s, steps=7).head_evals for s in ("official", "fast")}
    assert evals["fast"] < evals["official"]
    for (backend, schedule, batch), r in recs.items():
        for name in ("median_s", "min_s", "max_s", "speedup_vs_eager", "max_abs_diff_vs_eager"):
            assert r[name] is not None, (backend, name)
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["head_evals"] == evals[schedule]
        eager = recs[("eager", "official", batch)]                      # every ratio is against the official method
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_s"] / r["median_s"])
        if schedule == "fast":                                          # another schedule: other tokens
            assert r["max_abs_diff_vs_official"] > 1e-3
        # the tokens of every backend against eager's, same noise: known to agree within 1e-4
        assert r["max_abs_diff_vs_eager"] <= (0.0 if backend == "eager" else 1e-4), (backend, batch)
        assert r["parity_ok"] is True
        by_scale = r["head_by_scale_s"]
        assert len(by_scale) == n_scales and all(t > 0 for t in by_scale)
        assert sum(by_scale) == pytest.approx(r["stage_median_s"]["head"], rel=0.05)
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| backend | precision | schedule | head evals | batch | median s |" in data["markdown"]
    assert "head 1x1 s" in data["markdown"]


def test_bad_backend_is_one_line_and_exit_2():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--preset", "tiny", "--backends", "fast"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--backends" in p.stderr and "Traceback" not in p.stderr


def test_a_backend_off_eager_is_marked_wrong_and_fails_the_run(tmp_path):
    """With a tolerance below what float32 kernels can agree on, ONNX Runtime must be flagged."""
    rc = _bench().main(["--preset", "tiny", "--batch", "1", "--steps", "2", "--backends", "eager,ort",
                        "--repeat", "1", "--parity-tol", "1e-12", "--json", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "r.png")])
    data = json.loads((tmp_path / "r.json").read_text())
    recs = {r["backend"]: r for r in data["results"]}
    assert recs["eager"]["parity_ok"] is True
    assert recs["ort"]["max_abs_diff_vs_eager"] > 1e-12 and recs["ort"]["parity_ok"] is False
    assert rc == 1 and "WRONG" in data["markdown"]
