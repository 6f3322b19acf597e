"""flowar-export --precision auto: measured per stage, chosen by speed within accuracy, checked end
to end, recorded, and run as recorded. (Which candidate wins is a property of the machine, so
no test asserts it; bench/RESULTS.md has the figures.)"""

import json

import pytest
from safetensors.torch import save_file

from flowar.runtime.precision import StageMeasure, choose
from flowar.commands.build import build_engine_dir
from flowar.sampling.batches import run_sampling
from flowar.runtime.load import open_engine_dir
from flowar.sampling.schedule import build_schedule


def test_choose_takes_the_fastest_candidate_within_its_tolerance():
    m = {"velocity": {"ort-fp32": StageMeasure(0.9, 1e-5, 1e-4), "torch-fp32": StageMeasure(0.7, 0.0, 1e-4),
                      "torch-bf16": StageMeasure(0.2, 0.5, 0.3)},                 # fastest, but too far off
         "ar": {"ort-fp32": StageMeasure(0.1, 1e-6, 1e-4), "torch-bf16": StageMeasure(0.05, 0.01, 0.3)}}
    assert choose(m) == {"velocity": "torch-fp32", "ar": "torch-bf16"}
    assert choose(m, exclude={"torch-bf16"}) == {"velocity": "torch-fp32", "ar": "ort-fp32"}
    broken = {"velocity": {"torch-bf16": StageMeasure(0.1, 9.0, 0.3)}}
    assert choose(broken) == {"velocity": "ort-fp32"}                          # nothing passes: the fp32 graph


def _export(fixtures_dir, out, candidates):
    return build_engine_dir(fixtures_dir / "tiny_v1.safetensors", out, config_path=str(fixtures_dir / "tiny_v1.config.json"),
                            max_batch=2, verify=False, precision="auto", auto_candidates=candidates)




@pytest.mark.slow
def test_auto_records_what_it_measured_and_the_runtime_runs_that(fixtures_dir, tmp_path, tiny_v1, assert_tokens,
                                                                 monkeypatch):
    _, io = tiny_v1
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(tmp_path / "n.safetensors"))
    sched = build_schedule(25, 4.3, 0.9, 5)
    rep = _export(fixtures_dir, tmp_path / "torch", ("torch-fp32",))
    m = json.loads((tmp_path / "torch" / "manifest.json").read_text())
    assert m["precision"] == "auto" and m["auto"]["choice"] == {s: "torch-fp32" for s in ("ar", "head_prep", "velocity")}
    for stage in ("ar", "head_prep", "velocity"):
        rec = m["auto"]["measured"][stage]["torch-fp32"]
        assert rec["seconds"] > 0 and rec["error"] == 0.0                     # the reference module itself
    assert m["auto"]["end_to_end"]["ok"] and m["auto"]["machine"]["model"] and m["weights"]["file"]
    assert rep.auto.end_to_end["token_max"] <= 1e-4
    with open_engine_dir(tmp_path / "torch", "auto") as rt:
        assert rt.backend == "mixed" and "velocity torch-fp32" in rt.detail
        assert rt.stages.host_threads is None            # PyTorch stages keep every thread PyTorch has
        res = run_sampling(rt.stages, rt.config, [3, 7], sched, noise_file=tmp_path / "n.safetensors")
    assert_tokens(res.tokens)
    # ONNX Runtime chosen: no weights carried; --backend ort ignores the choice altogether
    _export(fixtures_dir, tmp_path / "ort", ("ort-fp32",))
    m = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    assert m["weights"] is None and not (tmp_path / "ort" / "weights.safetensors").exists()
    with open_engine_dir(tmp_path / "ort", "auto") as rt:
        assert rt.detail.startswith("auto: ar ort-fp32") and rt.stages.host_threads == 1
        assert_tokens(run_sampling(rt.stages, rt.config, [3, 7], sched, noise_file=tmp_path / "n.safetensors").tokens)
    # measured on another CPU: said, not hidden
    import flowar.engines.cpu
    monkeypatch.setattr(flowar.engines.cpu, "cpu_kind", lambda: {"model": "Another CPU", "flags": ["amx_bf16"]})
    with open_engine_dir(tmp_path / "torch", "auto") as rt:
        assert "re-export here to measure this CPU" in rt.detail
    # the weights the PyTorch stages run are checked like the graphs
    w = tmp_path / "torch" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    from flowar.export.manifest import EngineDirError
    with pytest.raises(EngineDirError, match="sha256"):
        open_engine_dir(tmp_path / "torch", "auto")


@pytest.mark.slow
def test_a_choice_that_does_not_sample_like_fp32_falls_back_to_fp32(fixtures_dir, tmp_path, monkeypatch):
    import flowar.runtime.precision
    monkeypatch.setattr(flowar.runtime.precision, "MAX_TOKEN_MEAN", -1.0)              # nothing reduced can pass now
    rep = _export(fixtures_dir, tmp_path / "e", ("torch-bf16",))
    # the stages that had taken bf16 (those within the per-stage screen) are demoted to fp32
    assert rep.auto.fallback and set(rep.auto.fallback) <= {"ar", "head_prep", "velocity"}
    assert set(rep.auto.choice.values()) == {"ort-fp32"}
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["auto"]["end_to_end"]["rejected"]["ok"] is False and m["auto"]["fallback"]
