"""TensorRT plans built through Polygraphy's loaders, and their profiles read back from TensorRT.

Without a GPU, TensorRT-RTX builds ahead of time (sm80) but cannot deserialize a plan, so the
profiles are read back from the builder's objects (``inspect_profiles``); on a GPU the plans
themselves are inspected (``inspect_plan``) and compared with ONNX Runtime.
"""

import pytest
import torch

from flowar.errors import FlowARError

pytestmark = pytest.mark.trt
MAX_BATCH = 2


@pytest.fixture(scope="module")
def trt_dir(fixtures_dir, tmp_path_factory):
    """tiny_v2 (v2 head: cross-attention inputs too) with its decoder, plans for sm80 or this GPU."""
    pytest.importorskip("polygraphy", reason="Polygraphy not installed (pip install '.[trt]')")
    from flowar.engines.trt import load_builder
    try:
        load_builder()
    except FlowARError:
        pytest.skip("TensorRT or TensorRT-RTX not installed (pip install '.[trt]')")
    from flowar.commands.build import build_engine_dir
    d = tmp_path_factory.mktemp("trt") / "tiny_v2"
    build_engine_dir(fixtures_dir / "tiny_v2.safetensors", d, config_path=str(fixtures_dir / "tiny_v2.config.json"),
                     vae_path=fixtures_dir / "mar_vae_tiny.ckpt", backend="trt", max_batch=MAX_BATCH, verify=False,
                     compute_capability=None if torch.cuda.is_available() else "sm80")
    from flowar.export.manifest import read_manifest
    return read_manifest(d)


def test_flowar_check_finds_a_damaged_plan_that_opening_on_a_cpu_never_reads(trt_dir, tmp_path):
    """A directory for a GPU, checked where it was made: flowar-check hashes every file the manifest
    lists, plans included; opening it on a CPU reads no plan, so a damaged one went unnoticed until
    the GPU machine opened it. Intact: what it holds, whether it opens here, exit 0; a plan with one
    byte changed: one line naming it, exit 2."""
    import shutil
    d = tmp_path / "ship"
    shutil.copytree(trt_dir.root, d, ignore=shutil.ignore_patterns(".ort-cache"))
    from conftest import invoke
    from flowar.commands.check import check_cmd
    ok = invoke(check_cmd, ["--engine-dir", str(d)])                  # (in this process)
    n = len(trt_dir.members())
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith(f"intact: {n} files, "), ok
    plans = trt_dir.tensorrt["plans"]
    assert f"velocity   velocity.onnx (fp32 graph, not verified against eager); TensorRT plan {plans['velocity']['file']}" in ok.stdout, ok.stdout
    assert ("opens here as flowar-run opens it: " if torch.cuda.is_available() else
            "opens here as flowar-run opens it: ONNX Runtime CPUExecutionProvider; its TensorRT plans unused (no CUDA GPU)"
            ) in ok.stdout, ok.stdout
    p = d / plans["decode"]["file"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    if not torch.cuda.is_available():                    # what opening here does with it: nothing (it reads no plan)
        from flowar.runtime.runtime import Runtime
        Runtime.open_engine_dir(d).close()
    bad = invoke(check_cmd, ["--engine-dir", str(d)])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stdout == "", bad      # (nothing said before it)
    line, = bad.stderr.strip().splitlines()
    assert line.startswith(f"error: expected every file {d / 'manifest.json'} lists as the export wrote it; got 1 of "
                           f"{n} not: {plans['decode']['file']} changed (sha256 ") and "Fix: rebuild it: flowar-export" in line, line


def test_a_gpu_other_than_the_first_is_refused_for_the_plans_with_how_to_choose_it(trt_dir, monkeypatch):
    """TensorRT's plans run on the first visible GPU: --device cuda:1 ran them on GPU 0 in silence.
    Opening the directory as on a machine with GPUs where TensorRT takes it (the choice and the
    device check stood in for, since this test also runs without a GPU): cuda:1 is refused before
    any plan is read, with CUDA_VISIBLE_DEVICES; cuda:0 and cuda go on to load the plans."""
    import flowar.device
    import flowar.engines.trt
    import flowar.runtime.runtime as runtime
    monkeypatch.setattr(runtime, "choose_backend", lambda m, backend, gpu=True: "trt")
    monkeypatch.setattr(flowar.device, "resolve_device", lambda name: torch.device(name))
    loaded = []

    def no_builder(flavour=None):
        loaded.append(flavour)
        raise FlowARError("x", "y", "z")
    monkeypatch.setattr(flowar.engines.trt, "load_builder", no_builder)
    with pytest.raises(FlowARError, match=r"expected --device cuda \(the first visible GPU, where TensorRT's plans run\); "
                                          r"got cuda:1. Fix: choose that GPU with CUDA_VISIBLE_DEVICES=1"):
        runtime.Runtime.open_engine_dir(trt_dir.root, device="cuda:1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")               # cuda:1 is GPU 3 then
    with pytest.raises(FlowARError, match="Fix: choose that GPU with CUDA_VISIBLE_DEVICES=3 and pass --device cuda"):
        runtime.Runtime.open_engine_dir(trt_dir.root, device="cuda:1")
    assert loaded == []
    for ok in ("cuda:0", "cuda"):
        with pytest.raises(FlowARError, match="expected x"):          # (past the check: loading the plans)
            runtime.Runtime.open_engine_dir(trt_dir.root, device=ok)
    assert len(loaded) == 2


def test_every_stage_has_a_plan_with_one_profile_per_scale(trt_dir):
    m = trt_dir
    # how to make it again, should a file of it be refused: its backend and (built ahead of a GPU) its target too
    assert " --backend trt " in m.rebuild and " --max-batch 2 " in m.rebuild and " --vae " in m.rebuild
    assert (" --compute-capability sm80 " in m.rebuild) == (m.tensorrt["flavour"] == "tensorrt-rtx"), m.rebuild
    plans = m.tensorrt["plans"]
    assert set(plans) == {"ar", "head_prep", "velocity", "decode"}
    assert m.tensorrt["flavour"] in ("tensorrt", "tensorrt-rtx") and m.tensorrt["compute_capability"]
    for name, p in plans.items():
        assert m.member(p["file"]).stat().st_size > 0 and p["key"].startswith(p["file"].split(".")[1])
        assert len(p["profiles"]) == (1 if name == "decode" else 5)
    assert plans["velocity"]["profiles"][4]["x"] == [[1, 256, 16], [2, 256, 16], [4, 256, 16]]


def requests(spec, config, max_batch):
    """Every (profile, scale, rows) the runtime asks of a stage: profile k at scale k (decode: one
    profile); rows B or 2B for B = 1..max_batch (the velocity stage gets both), decode B rows."""
    # written out here, not read from the spec the build uses: B conditional + B unconditional rows
    # for the guided stages, B images for the decoder; every scale, one decode shape
    most = max_batch if spec.name == "decode" else 2 * max_batch
    for k in range(1 if spec.name == "decode" else config.n_scales):
        for rows in range(1, most + 1):
            yield k, rows


def uncovered(held, spec, config, max_batch) -> list[str]:
    out = []
    for k, rows in requests(spec, config, max_batch):
        if k >= len(held):
            out.append(f"{spec.name}: no profile {k}")
            continue
        for name, shape in spec.input_shapes(k, rows).items():
            lo, _, hi = held[k][name]
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                out.append(f"{spec.name} profile {k} {name}: {shape} outside [{lo}, {hi}] ({rows} rows)")
    return out


def test_profiles_held_by_tensorrt_cover_every_shape_the_runtime_requests(trt_dir):
    from flowar.engines.trt import inspect_profiles, load_builder
    m, b = trt_dir, load_builder()
    plans = m.tensorrt["plans"]
    assert set(plans) == {"ar", "head_prep", "velocity", "decode"}
    bad = []
    for name, spec in m.specs().items():
        assert m.member(plans[name]["file"]).stat().st_size > 0
        held = inspect_profiles(b, m.member(m.stages[name]["file"]), plans[name]["profiles"])
        assert len(held) == len(spec.scales), name
        assert all(set(p) == set(spec.inputs) for p in held), name        # every network input, no defaults
        bad += uncovered(held, spec, m.config, m.max_batch)
    assert not bad, "; ".join(bad[:5])


def test_profiles_are_exact_rows_1_to_max(trt_dir):
    """Not wider than needed either: min at 1 row, max at the stage's max rows."""
    from flowar.engines.trt import inspect_profiles, load_builder
    m = trt_dir
    spec = m.specs()["velocity"]
    held = inspect_profiles(load_builder(), m.member(m.stages["velocity"]["file"]),
                            m.tensorrt["plans"]["velocity"]["profiles"])
    k = m.config.n_scales - 1
    assert held[k]["x"] == (spec.shapes(k, 1)["x"], spec.shapes(k, MAX_BATCH)["x"], spec.shapes(k, 2 * MAX_BATCH)["x"])


def test_profiles_missing_an_input_are_refused(trt_dir):
    """Polygraphy would fill a missing input with a default shape; the build refuses instead."""
    from flowar.engines.trt import inspect_profiles, load_builder
    m = trt_dir
    profs = [{n: s for n, s in p.items() if n != "t"} for p in m.tensorrt["plans"]["velocity"]["profiles"]]
    with pytest.raises(FlowARError, match="profiles for the inputs of velocity.onnx"):
        inspect_profiles(load_builder(), m.member(m.stages["velocity"]["file"]), profs)


def test_unknown_compute_capability_is_one_line_error(trt_dir, tmp_path):
    from flowar.engines.trt import build_plan, load_builder
    b = load_builder()
    if b.flavour != "tensorrt-rtx":
        pytest.skip("compute capabilities are a TensorRT-RTX setting")
    m = trt_dir
    spec = m.specs()["head_prep"]
    with pytest.raises(FlowARError, match="--compute-capability among .*sm80") as e:
        build_plan(b, m.member(m.stages["head_prep"]["file"]), m.stages["head_prep"]["sha256"], spec, m.config,
                   spec.max_rows(MAX_BATCH), "fp32", tmp_path, tmp_path / "timing.cache", "sm99")
    assert "\n" not in str(e.value)


@pytest.mark.gpu
def test_built_plans_hold_the_profiles_and_agree_with_onnx_runtime(trt_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from flowar.engines.trt import compare_with_ort, inspect_plan, inspect_profiles, load_builder
    m, b = trt_dir, load_builder()
    for name, spec in m.specs().items():
        plan, graph = m.member(m.tensorrt["plans"][name]["file"]), m.member(m.stages[name]["file"])
        held = inspect_plan(b, plan)
        assert held == inspect_profiles(b, graph, m.tensorrt["plans"][name]["profiles"]), name
        assert not uncovered(held, spec, m.config, m.max_batch), name
        # fp32 plans may use TF32 matmuls (TensorRT's default), so not the fp32 tolerance
        assert compare_with_ort(b, graph, plan, spec, m.config, spec.max_rows(m.max_batch), atol=1e-2), name



def test_a_stop_while_a_plan_builds_cancels_it_and_prints_no_stack(trt_dir, tmp_path, capfd, monkeypatch):
    """Ctrl-C (or SIGTERM) while TensorRT builds a plan: the command's handler raised inside TensorRT's
    callback into Python (its logger), and TensorRT printed "Exception caught in log()" with a stack
    before "interrupted". The stop is recorded there, the build cancelled at its next step, and the
    stop raised once TensorRT has returned: no plan written, nothing printed."""
    import os
    import signal

    from polygraphy.backend.trt import util

    from flowar.engines.trt import build_plan, load_builder
    from flowar.errors import stop_asked, stops_cleared
    m, b = trt_dir, load_builder()
    logger = type(util.get_trt_logger())
    real, sent = logger.log, []

    def log(self, severity, msg):                 # the stop comes while TensorRT works (as the signal did)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(self, severity, msg)
    monkeypatch.setattr(logger, "log", log)
    before = signal.signal(signal.SIGINT, stop_asked)
    stops_cleared()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_plan(b, m.member(m.stages["velocity"]["file"]), m.stages["velocity"]["sha256"], m.specs()["velocity"],
                       m.config, m.stages["velocity"]["max_rows"], "fp32", tmp_path, tmp_path / "timing.cache", "sm80")
    finally:
        signal.signal(signal.SIGINT, before)
        stops_cleared()
    err = capfd.readouterr().err
    assert sent and not [w for w in ("Exception caught", "Traceback", "At:", "Invalid Engine") if w in err], err
    assert not list(tmp_path.glob("*.plan"))


def test_bf16_graphs_for_tensorrt_skip_onnx_runtime_and_a_cpu_is_told_what_runs(trt_dir, fixtures_dir, tmp_path):
    """--backend trt --precision bf16: ONNX Runtime has no bf16 kernels on a CPU, so the export's check
    against it ended in its NotImplemented traceback, and a directory exported with --no-verify did on
    every command where the plans could not run. Now the export says the graphs are not verified here,
    a machine without usable plans is told in one line what runs (--backend torch does), and
    --backend all (ONNX Runtime engines from bf16 graphs) is refused before any work."""
    import json
    import shutil

    from flowar.commands.build import BuildReport, ExportRequest, check_request, export_graphs
    from flowar.export.specs import stage_specs
    from flowar.model.checkpoint import load_model
    from flowar.runtime.runtime import Runtime
    ckpt, cfg = fixtures_dir / "tiny_v2.safetensors", str(fixtures_dir / "tiny_v2.config.json")
    with pytest.raises(FlowARError, match="--backend all: ONNX Runtime has no bf16 kernels"):
        check_request(ExportRequest(ckpt, tmp_path / "all", config_path=cfg, backend="all", precision="bf16"))
    model, _ = load_model(ckpt, config_path=cfg)
    req = ExportRequest(ckpt, tmp_path / "e", config_path=cfg, backend="trt", precision="bf16", max_batch=1)
    report = BuildReport(req.out)
    (tmp_path / "g").mkdir()
    specs = {"head_prep": stage_specs(model.config)["head_prep"]}         # (one stage: the others export alike)
    stages = export_graphs(req, model, None, specs, tmp_path / "g", report, lambda msg: None)
    assert set(stages) == {"head_prep"} and not report.checks
    assert any("bf16 graphs are not verified here" in n for n in report.notes), report.notes
    d = tmp_path / "bf16"                     # a TensorRT directory of bf16 graphs (as recorded), on this machine
    shutil.copytree(trt_dir.root, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(m | {"precision": "bf16"}))
    if not torch.cuda.is_available():
        with pytest.raises(FlowARError, match="bf16 graphs for TensorRT only") as e:
            Runtime.open(d)
        # what runs here named with the command that has the option (flowar-decode, say, has no --backend)
        assert f"here, flowar-run --engine-dir {d} --backend torch runs its checkpoint in float32" in str(e.value)
        with Runtime.open(trt_dir.root) as rt:       # its fp32 graphs run here; the plans' not running is said
            assert rt.detail == "ONNX Runtime CPUExecutionProvider; its TensorRT plans unused (no CUDA GPU)", rt.detail
        with Runtime.open(trt_dir.root, backend="ort") as rt:      # (asked for ONNX Runtime: nothing probed)
            assert rt.detail.endswith("; its TensorRT plans unused (not asked for)"), rt.detail
        with pytest.raises(FlowARError) as e:        # the fix follows the reason (rebuilding here could not help)
            Runtime.open(trt_dir.root, backend="trt")
        assert str(e.value).endswith("got no CUDA GPU. Fix: run it on a machine with an NVIDIA GPU, or use --backend ort")
    with Runtime.open(d, backend="torch") as rt:
        assert rt.sample([1], rt.schedule(), decode=False).tokens.isfinite().all()


def test_the_flavour_that_built_the_plans_is_loaded_first(monkeypatch):
    """With NVIDIA's TensorRT and TensorRT-RTX both installed, a directory's TensorRT-RTX plans are
    opened with TensorRT-RTX (they were judged by TensorRT's version, refused, and ONNX Runtime ran
    instead); without a flavour asked for, TensorRT first, as before."""
    import sys
    import types
    from flowar.engines.trt import load_builder
    for name, version in (("tensorrt", "10.13.0"), ("tensorrt_rtx", "1.7.1")):
        fake = types.ModuleType(name)
        fake.__version__ = version
        monkeypatch.setitem(sys.modules, name, fake)
    assert (load_builder("tensorrt-rtx").flavour, load_builder("tensorrt-rtx").version) == ("tensorrt-rtx", "1.7.1")
    assert load_builder("tensorrt").flavour == load_builder().flavour == "tensorrt"
