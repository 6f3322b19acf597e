"""flowar-export: per-stage ONNX graphs, verification, manifest, TensorRT-RTX plans."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from flowar.commands.build import build_engine_dir
from flowar.errors import FlowARError
from flowar.export.manifest import EngineDirError, read_manifest, sealed, sha256_file
from flowar.sampling.schedule import build_schedule
from conftest import invoke


@pytest.fixture(scope="module")
def engine_dirs(fixtures_dir, tmp_path_factory):
    """ONNX engine directories of both official tiny fixtures (with the MAR VAE's decoder)."""
    import flowar.engines.cpu as cpu
    out = {}
    for name, bf16 in (("tiny_v1", False), ("tiny_v2", True)):   # (as on a CPU without bf16 products, and one with)
        d = tmp_path_factory.mktemp("engines") / name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu, "fast_bf16", lambda kind=None, bf16=bf16: bf16)
            rep = build_engine_dir(fixtures_dir / f"{name}.safetensors", d,
                                   config_path=str(fixtures_dir / f"{name}.config.json"),
                                   vae_path=fixtures_dir / "mar_vae_tiny.ckpt", max_batch=2)
        out[name] = (d, rep)
    return out


def test_an_fp32_export_on_a_cpu_with_bf16_products_points_to_precision_auto(engine_dirs):
    """The default export's fp32 graphs sample at eager fp32's pace where the CPU has AMX (FlowAR-S:
    1.04x the first image, 3.5x with --precision auto): the export says so there, and only there."""
    hint = [n for n in engine_dirs["tiny_v2"][1].notes if "--precision auto" in n]
    assert len(hint) == 1 and "bf16 in hardware" in hint[0] and "\n" not in hint[0]
    assert not [n for n in engine_dirs["tiny_v1"][1].notes if "--precision auto" in n]


def test_every_stage_verified_within_tolerance(engine_dirs, fixtures_dir):
    """The export's own verification ran and saw float32 noise (a comparison of the reference with
    itself would see exactly 0); and, independently of it, each graph in ONNX Runtime gives what
    the eager module gives on inputs of its own."""
    import onnxruntime as ort
    from flowar.export.specs import sample_inputs
    from flowar.model.checkpoint import load_model
    from flowar.model.vae import load_vae
    for name, (d, rep) in engine_dirs.items():
        assert [c.name for c in rep.checks] == ["ar", "head_prep", "velocity", "decode"]
        for c in rep.checks:
            assert 0 < c.worst <= 1e-4, (name, c)
        m = read_manifest(d)
        assert m.stages["velocity"]["verified_max_abs_diff"] == rep.checks[2].worst
        # nothing of this checkout in the graphs (the exporter's stack traces named its files): the same model
        # exported from another folder gives the same bytes
        from conftest import ROOT
        assert not any(str(ROOT).encode() in m.graph(s)[0].read_bytes() for s in m.stages), name
        model, _ = load_model(fixtures_dir / f"{name}.safetensors", config_path=fixtures_dir / f"{name}.config.json")
        vae = load_vae(fixtures_dir / "mar_vae_tiny.ckpt")
        gen = torch.Generator().manual_seed(11)
        for stage, spec in m.specs().items():
            sess = ort.InferenceSession(str(m.graph(stage)[0]), providers=["CPUExecutionProvider"])
            k = m.config.n_scales - 1 if spec.per_scale else 0
            ins = sample_inputs(spec, m.config, k, 2, gen)
            got = sess.run(list(spec.outputs), {n: ins[n].numpy() for n in spec.inputs})
            with torch.no_grad():
                ref = spec.module(model, vae)(*(ins[n] for n in spec.inputs))
            for g, r in zip(got, ref if isinstance(ref, tuple) else (ref,)):
                assert (torch.from_numpy(g) - r).abs().max().item() <= spec.tolerance, (name, stage)


def test_a_relative_check_measures_the_difference_against_the_largest_value(engine_dirs, fixtures_dir):
    """The check of fp16 graphs (relative: their rounding grows with the values): an fp32 graph
    against its module scaled by 1 + e differs by exactly e / (1 + e) of the largest value (closed
    form), so a 2 % scaling passes a 3 % tolerance and 4 % does not; an absolute check sees the
    difference itself."""
    from flowar.export.onnx_export import verify_stage
    from flowar.model.checkpoint import load_model
    d, _ = engine_dirs["tiny_v1"]
    m = read_manifest(d)
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    spec = m.specs()["ar"]
    module = spec.module(model, None)
    for e, ok in ((0.02, True), (0.04, False)):
        scaled = lambda *a, e=e: module(*a) * (1 + e)             # noqa: E731
        chk = verify_stage(spec, scaled, m.config, m.graph("ar")[0], 2, 0.03, relative=True)
        assert chk.relative and abs(chk.worst - e / (1 + e)) < 1e-4 and chk.ok == ok, (e, chk)
        assert f"{chk.worst:.2%} of its largest value (tolerance 3%)" == chk.describe()
    absolute = verify_stage(spec, module, m.config, m.graph("ar")[0], 2)
    assert not absolute.relative and 0 < absolute.worst <= spec.tolerance


def test_an_exported_directory_opens_without_optimizing_or_reading_its_graphs(engine_dirs, monkeypatch):
    """The export prepared ONNX Runtime's optimized copy of every graph for this CPU (in .ort-cache,
    each with the sha256s of its files in it, written before the manifest), so opening the directory and
    sampling optimizes nothing and reads no graph's bytes: only the checked copies."""
    import onnxruntime as ort
    from flowar.export.manifest import Manifest
    from flowar.runtime.runtime import Runtime
    d, _ = engine_dirs["tiny_v1"]
    m = read_manifest(d)
    copies = sorted((d / ".ort-cache").glob("*.opt"))
    assert len(copies) == len(m.stages), copies
    made_by_export = (d / "manifest.json").stat().st_mtime_ns
    for c in copies:
        assert (c / "graph.onnx").stat().st_mtime_ns <= made_by_export and (c / "record.json").is_file()
    levels, reads = [], []
    real_session, real_read = ort.InferenceSession, Manifest.read_checked

    def session(model, so, providers):
        levels.append(so.graph_optimization_level)
        return real_session(model, so, providers=providers)
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(Manifest, "read_checked", lambda self, rel, sha: reads.append(rel) or real_read(self, rel, sha))
    with Runtime.open_engine_dir(d, backend="ort") as rt:
        res = rt.sample([0, 1], rt.schedule(), seed=0)
    assert res.images is not None and bool(torch.isfinite(res.images).all())
    assert len(levels) >= len(m.stages) and set(levels) == {ort.GraphOptimizationLevel.ORT_DISABLE_ALL}, levels
    assert reads == []


def test_the_exporter_writes_the_same_bytes_for_the_same_stage(engine_dirs, export_memo, fixtures_dir, tmp_path):
    """What makes a manifest's hashes reproducible, and what the suite's export memo (conftest.py)
    relies on: the real exporter, run again on the same stage, writes the directory's bytes; and with
    another row limit (another --max-batch) the same bytes again: no graph holds its limit (the dims'
    ranges the exporter noted in it made one model's graphs, ONNX Runtime's optimized copies and
    TensorRT plan keys differ by --max-batch alone)."""
    from flowar.export.onnx_export import export_stage
    from flowar.export.specs import stage_specs
    from flowar.model.checkpoint import load_model
    real = export_memo.real if export_memo else export_stage
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    spec = stage_specs(model.config)["head_prep"]
    d, _ = engine_dirs["tiny_v1"]
    m = read_manifest(d)
    (tmp_path / "again").mkdir()
    files = real(spec, spec.module(model), model.config, tmp_path / "again" / "head_prep.onnx", m.stages["head_prep"]["max_rows"])
    assert [f.name for f in files] == ["head_prep.onnx"]
    assert sha256_file(files[0]) == m.stages["head_prep"]["sha256"]
    (tmp_path / "other").mkdir()
    files = real(spec, spec.module(model), model.config, tmp_path / "other" / "head_prep.onnx",
                 8 * m.stages["head_prep"]["max_rows"])
    assert sha256_file(files[0]) == m.stages["head_prep"]["sha256"]


def test_weights_that_give_nan_are_blamed_on_the_checkpoint_not_the_exporter(engine_dirs, fixtures_dir):
    """A checkpoint whose weights hold NaN (a diverged run) failed verification as 'velocity differs by
    inf ... report the model and versions': the exporter blamed. The check now says the checkpoint's
    own stage gives NaN in eager PyTorch, before comparing anything."""
    from flowar.export.onnx_export import verify_stage
    from flowar.export.specs import stage_specs
    from flowar.model.checkpoint import load_model
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    spec = stage_specs(model.config)["velocity"]
    d, _ = engine_dirs["tiny_v1"]
    m = read_manifest(d)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("flownet.") and p.ndim == 2).view(-1)[:8] = float("nan")
    with pytest.raises(FlowARError, match="finite outputs of the checkpoint's velocity stage in eager PyTorch"):
        verify_stage(spec, spec.module(model), model.config, m.graph("velocity")[0], m.stages["velocity"]["max_rows"])


def test_manifest_records_what_it_was_built_from(engine_dirs, fixtures_dir):
    d, _ = engine_dirs["tiny_v2"]
    m = read_manifest(d)
    assert m.config.to_dict() == json.loads((fixtures_dir / "tiny_v2.config.json").read_text())
    assert m.checkpoint["sha256"] == sha256_file(fixtures_dir / "tiny_v2.safetensors")
    assert all(m.stages[s]["sha256"] == sha256_file(d / m.stages[s]["file"]) for s in m.stages)
    assert m.precision == "fp32" and m.max_batch == 2 and m.meta["opset"] >= 18
    assert {"torch", "onnx", "onnxruntime"} <= set(m.meta["versions"])
    assert [s["side"] for s in m.meta["scales"]] == [1, 2, 4, 8, 16]


def test_graphs_have_dynamic_rows_and_token_maps(engine_dirs):
    import onnx
    d, _ = engine_dirs["tiny_v2"]
    g = onnx.load(str(d / "ar.onnx"), load_external_data=False).graph
    tokens = next(i for i in g.input if i.name == "tokens").type.tensor_type.shape.dim
    assert tokens[0].dim_param and tokens[1].dim_param and tokens[2].dim_value == 16
    g = onnx.load(str(d / "velocity.onnx"), load_external_data=False).graph
    x = next(i for i in g.input if i.name == "x").type.tensor_type.shape.dim
    assert x[0].dim_param and x[1].dim_param
    # per-scale constants are inputs of the velocity graph, not recomputed in it
    assert {i.name for i in g.input} == {"x", "t", "c", "rope", "cross_kv", "cross_rope"}


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v2"])
def test_onnx_runtime_reproduces_official_tokens(engine_dirs, fixtures_dir, name, tmp_path, assert_tokens):
    from safetensors.torch import load_file
    io = load_file(str(fixtures_dir / f"{name}_io.safetensors"))
    from flowar.sampling.batches import run_sampling
    from flowar.runtime.runtime import Runtime
    noise = tmp_path / "N.safetensors"
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(noise))
    with Runtime.open_engine_dir(engine_dirs[name][0], backend="ort") as rt:
        assert rt.backend == "ort"
        res = run_sampling(rt.stages, rt.config, [3, 7], build_schedule(25, 4.3, 0.9, 5), noise_file=noise)
    assert_tokens(res.tokens, name)


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v2"])
def test_row_blocks_on_separate_cores_equal_one_whole_call(engine_dirs, name):
    """The CPU runtime splits a call's rows into blocks run at once; each block must give its
    rows as one call over all rows does (same graph, one thread each): within a few float32 ulps of
    the largest value (other row counts may take other GEMM kernels), where a block given another
    block's rows is off by the values themselves."""
    from flowar.export.specs import sample_inputs
    from flowar.runtime.engines import OrtEngine
    d, _ = engine_dirs[name]
    m = read_manifest(d)
    c = m.config
    specs = m.specs()
    gen = torch.Generator().manual_seed(3)
    for stage, spec in specs.items():
        info = m.stages[stage]
        k = c.n_scales - 1 if spec.per_scale else 0
        ins = sample_inputs(spec, c, k, 3, gen)
        shapes = spec.shapes(k, 3)
        outs = {}
        for threads in (1, 2):
            with OrtEngine(stage, d / info["file"], info["sha256"], spec.row_tensors, "CPUExecutionProvider",
                           threads=threads) as eng:
                o = {n: torch.full(shapes[n], float("nan")) for n in spec.outputs}
                eng.infer(ins, o)
                outs[threads] = o
                blocks = max(len(r) for r in eng._runs.values())
                assert blocks == (1 if threads == 1 or stage == "head_prep" else 2), (stage, blocks)
        for n in spec.outputs:
            assert torch.isfinite(outs[2][n]).all(), (stage, n)        # every row written
            assert (outs[2][n] - outs[1][n]).abs().max().item() <= _ulps(outs[1][n]), (stage, n)


def test_blocks_with_several_threads_each_get_their_own_session(engine_dirs):
    """Concurrent runs of one session share its thread pool, so multi-thread blocks must not."""
    from flowar.export.specs import sample_inputs, stage_specs
    from flowar.runtime.engines import OrtEngine
    d, _ = engine_dirs["tiny_v1"]
    m = read_manifest(d)
    c = m.config
    spec = stage_specs(c)["velocity"]
    ins = sample_inputs(spec, c, c.n_scales - 1, 2, torch.Generator().manual_seed(5))
    got = {}
    for threads in (1, 4):
        with OrtEngine("velocity", *m.graph("velocity"), spec.row_tensors, "CPUExecutionProvider",
                       threads=threads) as eng:
            out = {"v": torch.full(spec.shapes(c.n_scales - 1, 2)["v"], float("nan"))}
            eng.infer(ins, out)
            got[threads] = out["v"]
            (runs,) = eng._runs.values()
            if threads == 4:                  # two blocks of two threads
                assert len(runs) == 2 and runs[0].func.__self__ is not runs[1].func.__self__   # two sessions
    assert (got[4] - got[1]).abs().max().item() <= _ulps(got[1])


def _ulps(t: torch.Tensor, n: int = 8) -> float:
    """``n`` float32 ulps of ``t``'s largest magnitude (of 1 at least)."""
    return n * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item())


def test_velocity_bindings_are_made_once_per_scale_and_row_count(engine_dirs):
    """The ODE loop must replay bindings: one per (scale, rows) however many steps and samples."""
    from flowar.sampling.batches import run_sampling
    from flowar.runtime.runtime import Runtime
    with Runtime.open_engine_dir(engine_dirs["tiny_v1"][0], backend="ort") as rt:
        traces = []
        for seed in (0, 1):
            traces += run_sampling(rt.stages, rt.config, [3, 7], build_schedule(25, 4.3, 0.9, 5), seed=seed).traces
        pairs = {(tr.k, rows) for tr in traces for rows in tr.head_rows}
        assert len(pairs) == 9                       # scale 0: 2 rows; scales 1-4: 2 and 4 rows
        assert len(rt.stages.engines["velocity"]._runs) == len(pairs)


def test_tampered_partial_and_foreign_directories_are_refused(engine_dirs, tmp_path, fixtures_dir):
    """A modified file is refused where it is read (opening the engines that use it, or a full
    check); a missing or foreign one as soon as the manifest is read."""
    from flowar.runtime.runtime import Runtime
    src, _ = engine_dirs["tiny_v1"]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    read_manifest(d, verify_hashes=True)
    with open(d / "velocity.onnx", "ab") as f:
        f.write(b"\0")
    read_manifest(d)                                            # present: the hash is checked where it is read
    with pytest.raises(EngineDirError, match="velocity.onnx with the sha256") as e:
        Runtime.open_engine_dir(d, backend="ort")
    # the fix is the export that made it (its checkpoint, config, VAE and limit), not a tokens-only default one
    f = fixtures_dir.resolve()
    assert str(e.value).endswith(f"rebuild it: flowar-export --ckpt {f / 'tiny_v1.safetensors'} --config "
                                 f"{f / 'tiny_v1.config.json'} --vae {f / 'mar_vae_tiny.ckpt'} --max-batch 2 --out {d}"), \
        str(e.value)
    with pytest.raises(EngineDirError, match="sha256"):
        read_manifest(d, verify_hashes=True)
    # fields of the wrong type or range: one line when read (a TypeError in the runtime, or after sampling)
    good = json.loads((d / "manifest.json").read_text())
    for change, said in (({"max_batch": "eight"}, "max_batch an integer in 1..1024"),
                         ({"class_names": [1, 2, 3]}, "class_names a list of 1000 strings"),
                         ({"schedule_defaults": [4]}, "schedule_defaults a mapping")):
        (d / "manifest.json").write_text(json.dumps(good | change))
        with pytest.raises(EngineDirError, match=said):
            read_manifest(d)
    d2 = tmp_path / "defaults"
    shutil.copytree(src, d2)
    (d2 / "manifest.json").write_text(json.dumps(good | {"schedule_defaults": {"cfg": -5}}))
    with pytest.raises(FlowARError, match="schedule_defaults in the engine directory's manifest.json: cfg in") as e:
        Runtime.open_engine_dir(d2, backend="ort")
    assert "--cfg" not in str(e.value)
    (d / "manifest.json").write_text(json.dumps(good))
    (d / "velocity.onnx").unlink()
    with pytest.raises(EngineDirError, match="missing"):
        read_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(EngineDirError, match="manifest.json"):
        read_manifest(d)
    with pytest.raises(EngineDirError, match=r"no directory at .*nope\. Fix: check the path \(the folder flowar-export wrote\)"):
        read_manifest(tmp_path / "nope")          # (a mistyped path: it said "rebuild it" first)


def test_a_graph_onnx_runtime_cannot_run_is_one_line_naming_it(engine_dirs, tmp_path):
    """A directory whose graph ONNX Runtime refuses (a 16-bit graph for TensorRT under a manifest
    edited to say fp32: NOT_IMPLEMENTED; measured with a bf16 export, 2026-12-06) is one line naming
    the graph and ONNX Runtime's reason, from the runtime and the command, not ONNX Runtime's traceback.
    Here head_prep.onnx is replaced by a bf16 MatMul, its hash recorded as the export would."""
    import onnx
    from onnx import TensorProto, helper
    from flowar.runtime.runtime import Runtime
    src, _ = engine_dirs["tiny_v1"]
    d = tmp_path / "edited"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(".ort-cache"))
    x, w = (helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in ("x", "w"))
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])
    graph = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(graph, str(d / "head_prep.onnx"))
    m = json.loads((d / "manifest.json").read_text())
    m["stages"]["head_prep"]["sha256"] = sha256_file(d / "head_prep.onnx")
    (d / "manifest.json").write_text(json.dumps(sealed(m)))          # (sealed again, as the export seals it)
    with pytest.raises(EngineDirError, match=r"ONNX Runtime [0-9.]+ can run on CPUExecutionProvider; got "
                                             r"head_prep.onnx: NOT_IMPLEMENTED : Could not find an implementation for MatMul"):
        Runtime.open_engine_dir(d, backend="ort")
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flowar-run"), "--engine-dir", str(d), "--labels", "1",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists(), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: expected graphs ONNX Runtime"), proc.stderr
    # flowar-check (in this process): intact (exit 0) and the reason it does not open here said; with --must-open exit 3
    from flowar.commands.check import check_cmd
    said = "does not open on this machine: expected graphs ONNX Runtime"
    ok, must = (invoke(check_cmd, ["--engine-dir", str(d), *more]) for more in ([], ["--must-open"]))
    assert ok.returncode == 0 and said in ok.stdout and ok.stdout.splitlines()[-1].startswith("intact: "), ok
    # what its export's check saw, per graph (an export with --no-verify: "not verified against eager")
    assert f"  ar         ar.onnx (fp32 graph, within {m['stages']['ar']['verified_max_abs_diff']:.1e} of eager)" \
        in ok.stdout.splitlines(), ok.stdout
    lines = must.stderr.strip().splitlines()
    assert must.returncode == 3 and len(lines) == 1 and lines[0].startswith(f"error: {said}") and lines[0].endswith(
        "(--must-open)"), must
    assert said not in must.stdout and must.stdout.splitlines()[-1].startswith("intact: "), must   # (said once: it was twice)
    quiet = invoke(check_cmd, ["--engine-dir", str(d), "--must-open", "--quiet"])
    assert quiet.returncode == 3 and quiet.stdout == "" and quiet.stderr == must.stderr, quiet    # (the verdict line only)


def test_flowar_check_finds_a_manifest_edited_since_the_export(engine_dirs, tmp_path):
    """An edited manifest.json (latent_scale, a class name) changed the images while flowar-check said
    "intact": every file it lists still hashed to its record. The export seals it; an edit is exit 2
    naming the fields edited (it named none), the seal put back is intact again, a seal without the
    fields' digests (an export before them) still finds an edit, and a manifest from before the seal
    passes, said."""
    src, _ = engine_dirs["tiny_v1"]
    d = tmp_path / "shipped"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(".ort-cache"))
    # (flowar-check and flowar-run in this process: their installed commands' exits are tests/test_cli.py's)
    from flowar.commands.check import check_cmd
    from flowar.commands.cli import run as run_cmd
    exe = ["--engine-dir", str(d), "--quiet"]
    text = (d / "manifest.json").read_text()
    m = json.loads(text)
    assert m["sealed_sha256"] and invoke(check_cmd, exe).returncode == 0
    bare = invoke(check_cmd, [str(d)])                                         # (the folder without its option)
    assert bare.returncode == 2 and bare.stderr.endswith(f"came without an option name. Fix: give it as --engine-dir {d}\n"), \
        bare.stderr
    for edit, named in ((lambda m: m["config"].update(latent_scale=2.0), "since: config.latent_scale. Fix"),
                        (lambda m: m.update(max_batch=m["max_batch"] + 1), "since: max_batch. Fix"),
                        (lambda m: m.update(precision="fp16"), "since: precision. Fix"),
                        (lambda m: m.update(class_names=[f"c{i}" for i in range(m["config"]["num_classes"])]),
                         "since: class_names. Fix"),
                        (lambda m: m.pop("sealed_parts") and m["config"].update(latent_scale=2.0),
                         "since (its fields hash to ")):
        edited = json.loads(text)
        edit(edited)
        (d / "manifest.json").write_text(json.dumps(edited, indent=1))
        bad = invoke(check_cmd, exe)
        line, = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and bad.stdout == "" and "and the manifest itself; got manifest.json itself edited " \
            "since" in line and "Fix: rebuild it: flowar-export" in line, bad
        assert named in line, (named, line)
        assert f"--max-batch {m['max_batch'] + 1}" not in line and "--precision fp16" not in line, line   # (the fix
        # repeated the edited value)
    # what runs it says it (it sampled other images with exit 0 and no word), once, and runs it as edited
    run = ["--engine-dir", str(d), "--labels", "1", "--steps", "3", "--save-tokens", str(tmp_path / "t.safetensors")]
    ran = invoke(run_cmd, run)                                        # (the last edit: latent_scale without its parts)
    said = [ln for ln in ran.stderr.splitlines() if ln.startswith("note: ") and "edited since its export" in ln]
    assert ran.returncode == 0 and said == [f"note: {d / 'manifest.json'} was edited since its export (its fields): it runs "
                                            f"as edited, not as exported and verified; flowar-check --engine-dir {d} names the change, "
                                            "a re-export undoes it"], ran.stderr
    (d / "manifest.json").write_text(text)
    assert "edited since" not in invoke(run_cmd, run).stderr
    edited = json.loads(text)
    edited["config"].update(latent_scale=2.0)
    (d / "manifest.json").write_text(json.dumps(edited, indent=1))
    assert "edited since its export (config.latent_scale): it runs" in invoke(run_cmd, run).stderr
    # what its graphs were made for is not run as edited: a head deeper than the graphs' was ONNX Runtime's traceback
    for what in ("head_depth", "ar_mlp_hidden"):
        (d / "manifest.json").write_text(json.dumps(json.loads(text) | {"config": m["config"] | {what: m["config"][what] + 1}}))
        ran = invoke(run_cmd, run)
        assert ran.returncode == 2 and ran.stderr.splitlines()[-1].startswith(
            "error: expected manifest.json's config and decoder shape as exported (its graphs were made for them)") and \
            f"got config.{what} edited since. Fix: restore it" in ran.stderr, ran.stderr
    edited["config"].update(latent_scale=-1.0)         # refused: the refusal alone, no note that it runs
    (d / "manifest.json").write_text(json.dumps(edited, indent=1))
    ran = invoke(run_cmd, run)
    assert ran.returncode == 2 and "latent_scale=-1.0" in ran.stderr and "edited since" not in ran.stderr, ran.stderr
    (d / "manifest.json").write_text(json.dumps(m | {"sealed_sha256": 5}))          # (a seal that is no string)
    bad = invoke(check_cmd, exe)
    assert bad.returncode == 2 and "manifest.json itself edited since" in bad.stderr and "Traceback" not in bad.stderr, bad
    (d / "manifest.json").write_text(text)
    assert invoke(check_cmd, exe).returncode == 0
    del m["sealed_sha256"]                               # the seal alone removed, over an edit: the edit is found
    (d / "manifest.json").write_text(json.dumps(m | {"config": m["config"] | {"latent_scale": 2.0}}))
    bad = invoke(check_cmd, exe)          # (it said "unsealed (an export before the seal)", exit 0; and flowar-run nothing)
    assert bad.returncode == 2 and "itself edited since: config.latent_scale, sealed_sha256. Fix" in bad.stderr, bad
    assert "edited since its export (config.latent_scale, sealed_sha256): it runs" in invoke(run_cmd, run).stderr
    (d / "manifest.json").write_text(json.dumps(m | {"sealed_parts": None}))          # (digests of no use: one line)
    bad = invoke(check_cmd, exe)
    assert bad.returncode == 2 and "itself edited since (its fields hash to" in bad.stderr and "Traceback" not in \
        bad.stderr, bad
    del m["sealed_parts"]                                # an export from before the seal: intact, and said
    (d / "manifest.json").write_text(json.dumps(m))
    old = invoke(check_cmd, exe)
    assert old.returncode == 0 and old.stdout.strip().endswith("manifest.json unsealed (an export before the seal): an "
                                                               "edit of it is not found"), old


def test_only_onnx_runtimes_refusals_of_the_graph_become_the_export_again_line(tmp_path, monkeypatch):
    """ONNX Runtime's errors about the graph (NOT_IMPLEMENTED, INVALID_GRAPH, ...) are the one line
    that says to export again; one about the machine (FAIL: out of memory, a provider that does not
    start) keeps its own exception, where "export again" would be the wrong advice."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    from flowar.engines.ort import create_session
    g = tmp_path / "g.onnx"
    g.write_bytes(b"graph")
    for raised, expected in ((state.NotImplemented, EngineDirError), (state.InvalidGraph, EngineDirError),
                             (state.Fail, state.Fail), (MemoryError, MemoryError)):
        def refuse(*a, **k):
            raise raised("[ONNXRuntimeError] : 1 : FAIL : bad allocation")
        monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
        with pytest.raises(expected) as e:
            create_session(g, "0" * 64, "CPUExecutionProvider", 1, None, g)
        assert (expected is EngineDirError) == ("got g.onnx: FAIL : bad allocation. Fix: export the directory again"
                                                in str(e.value)), (raised, str(e.value))


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "link.onnx"])
def test_manifest_paths_cannot_escape(engine_dirs, tmp_path, bad):
    src, _ = engine_dirs["tiny_v1"]
    d = tmp_path / "esc"
    shutil.copytree(src, d)
    (tmp_path / "outside.onnx").write_bytes(b"x")
    os.symlink(tmp_path / "outside.onnx", d / "link.onnx")
    m = json.loads((d / "manifest.json").read_text())
    m["stages"]["ar"]["file"] = bad
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="inside the engine directory|relative to the engine directory"):
        read_manifest(d)


def test_failed_export_leaves_the_previous_directory(engine_dirs, tmp_path, fixtures_dir):
    from flowar.errors import FlowARError
    src, _ = engine_dirs["tiny_v1"]
    d = tmp_path / "eng"
    shutil.copytree(src, d)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(FlowARError):
        build_engine_dir(fixtures_dir / "tiny_v1.safetensors", d, preset="flowar-s")   # wrong preset
    assert sorted(p.name for p in d.iterdir()) == before
    read_manifest(d)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eng.tmp")]


@pytest.mark.slow
# FlowAR-S at its real sizes (tokens 256, sequence 341); head Block v2 is exported by the tiny_v2
# fixture's directory above, FlowAR-L and H for real in bench/RESULTS.md (L and H each add 45 s
# here), and tests/test_large_weights.py crosses the 2 GB limit
@pytest.mark.parametrize("preset", ["flowar-s"])
def test_real_presets_export_ar_and_velocity_with_dynamic_shapes(preset, tmp_path):
    """Real sizes, traced on the meta device (no weights in memory or on disk)."""
    import onnx
    from flowar.config import get_preset
    from flowar.export.onnx_export import export_stage
    from flowar.export.specs import stage_specs
    from flowar.model.ar import FlowAR
    cfg = get_preset(preset)
    specs = stage_specs(cfg)
    for name in ("ar", "velocity"):
        path = tmp_path / f"{name}.onnx"
        with torch.device("meta"):
            module = specs[name].module(FlowAR(cfg))
        export_stage(specs[name], module, cfg, path, 16, weights=False)
        g = onnx.load(str(path), load_external_data=False).graph
        first = g.input[1 if name == "ar" else 0].type.tensor_type.shape.dim
        assert first[0].dim_param and first[1].dim_param
        out = g.output[0].type.tensor_type.shape.dim
        assert out[-1].dim_value == (cfg.ar_width if name == "ar" else cfg.latent_channels)


def test_stage_wrappers_keep_their_tables_on_the_models_device():
    """A stage's module is built around a model already on its device (the PyTorch and CUDA-graph
    engines on a GPU): every table a wrapper makes must be there too. The AR graph's scale-of-position
    table stayed on the CPU, and the first GPU run failed in attention ("attn_bias is on cpu")."""
    from flowar.config import get_preset
    from flowar.export.specs import stage_specs
    from flowar.model.ar import FlowAR
    cfg = get_preset("tiny")
    with torch.device("meta"):                 # a device other than the CPU, with no memory behind it
        model = FlowAR(cfg)
    for name, spec in stage_specs(cfg).items():
        module = spec.module(model)            # built outside the device context, as the engines build them
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        assert len(tensors) > 3
        assert {n: str(t.device) for n, t in tensors.items() if t.device.type != "meta"} == {}, name


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_runtime_reproduces_official_tokens(fixtures_dir, tmp_path):
    """Runs plans on a GPU (full TensorRT, or TensorRT-RTX on a supported GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        from flowar.engines.trt import load_builder
        load_builder()
    except Exception:
        pytest.skip("needs TensorRT or TensorRT-RTX")
    from safetensors.torch import load_file
    from flowar.sampling.batches import run_sampling
    from flowar.runtime.runtime import Runtime
    io = load_file(str(fixtures_dir / "tiny_v1_io.safetensors"))
    d = tmp_path / "trt"
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", d, preset="tiny", backend="trt", max_batch=2, verify=False)
    noise = tmp_path / "N.safetensors"
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(noise))
    with Runtime.open_engine_dir(d, backend="trt") as rt:
        res = run_sampling(rt.stages, rt.config, [3, 7], build_schedule(25, 4.3, 0.9, 5), noise_file=noise, device=rt.device)
    assert (res.tokens - io["sample25.tokens"]).abs().max().item() <= 1e-2


def test_weights_in_external_data_are_exported_verified_run_and_checked(fixtures_dir, tmp_path, monkeypatch,
                                                                       tiny_v1, assert_tokens):
    """Graphs above 1 GB keep their weights beside them (<stage>.onnx.data); forced here on the
    tiny fixture with a threshold between its AR's weights (2.7 MB) and its head's (3.9 MB): the
    directory records and checks those files, and samples the official tokens."""
    import flowar.export.onnx_export as onnx_export
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.batches import run_sampling
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 3_300_000)
    d = tmp_path / "ext"
    from flowar.io.memory import _status_kb
    held_before = _status_kb("RssAnon") * 1024
    import flowar.export.manifest as manifest
    hashed, sha256 = [], manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p, *a: hashed.append(os.path.basename(p)) or sha256(p, *a))
    import flowar.commands.build as build                            # (the export's own name for it)
    monkeypatch.setattr(build, "sha256_file", manifest.sha256_file)
    rep = build_engine_dir(fixtures_dir / "tiny_v1.safetensors", d, config_path=str(fixtures_dir / "tiny_v1.config.json"),
                           max_batch=2)
    # each file the export wrote hashed once, and the first open after it hashes none of them again: the data
    # file it opens from its path (FlowAR-H's AR graph: 5.1 GB) recorded as found whole by the export
    ours = ["ar.onnx", "head_prep.onnx", "velocity.onnx", "velocity.onnx.data"]      # (not ONNX Runtime's copies)
    assert sorted(n for n in hashed if n in ours) == ours, hashed
    hashed.clear()
    with Runtime.open_engine_dir(d, backend="ort"):
        pass
    assert hashed == [], hashed
    assert all(c.ok for c in rep.checks) and set(rep.memory) == {"ar", "head_prep", "velocity"}
    m = read_manifest(d)
    assert "data" not in m.stages["ar"] and "data" not in m.stages["head_prep"]     # below it: one file
    for stage, info in m.stages.items():
        if stage != "velocity":
            continue
        data = d / info["data"]
        assert info["data"] == f"{stage}.onnx.data" and data.stat().st_size > 10_000, stage
        # a Python process that exported a graph holds more than 0.1 GB and, for this tiny model, less than 8 GB:
        # a peak recorded as 0, in MB or in bytes fails
        assert info["data_sha256"] == sha256_file(data) and 0.1 < info["peak_rss_gb"] < 8
        assert info["peak_rss_gb"] == rep.memory[stage]
        assert (d / info["file"]).stat().st_size < data.stat().st_size     # the graph without its weights
    # the whole export's anonymous peak: at least what the process held when it began (sampled on entry)
    assert rep.anon_peak_gb * 1e9 >= held_before and any("anonymous memory peak" in line for line in rep.lines())
    _, io = tiny_v1
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(tmp_path / "n.safetensors"))
    with Runtime.open_engine_dir(d, backend="ort") as rt:
        res = run_sampling(rt.stages, rt.config, [3, 7], build_schedule(25, 4.3, 0.9, 5),
                           noise_file=tmp_path / "n.safetensors")
        assert not rt.stages.engines["velocity"].splittable              # one session: weights loaded once
    assert_tokens(res.tokens)
    data = d / m.stages["velocity"]["data"]
    raw = bytearray(data.read_bytes())
    raw[-4:] = b"\0\0\0\0"
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineDirError, match="velocity.onnx.data with the sha256"):
        Runtime.open_engine_dir(d, backend="ort")


def test_the_export_memo_key_sees_buffers_and_patched_code(export_memo, fixtures_dir, tmp_path, monkeypatch):
    """The suite's export memo (conftest.py) reuses a graph only for the very same inputs: a
    non-persistent buffer changed, or a model function patched by a test, is a new key; which
    other modules a test happened to import is not (the same graph got several keys)."""
    if export_memo is None:
        pytest.skip("FLOWAR_EXPORT_MEMO=0")
    import flowar.model.head as head
    from flowar.export.specs import stage_specs
    from flowar.model.checkpoint import load_model
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    spec = stage_specs(model.config)["velocity"]
    module = spec.module(model)
    args = (spec, module, model.config, tmp_path / "velocity.onnx", 4, "fp32")
    first = export_memo.key(*args)
    assert export_memo.key(*args) == first                                   # the same inputs: the same key
    monkeypatch.delitem(sys.modules, "flowar.model.vae")    # whatever else this process imported
    assert export_memo.key(*args) == first
    # nor what torch.compile left in the modules it compiled (a test of the bench compiles; its
    # functions are named by a uuid: the same graph got another key on that worker)
    monkeypatch.setattr(head, "__compiled_fn_1_0f3c", lambda *a: a, raising=False)
    monkeypatch.setattr(head, "__resume_at_30_2", lambda *a: a, raising=False)
    assert export_memo.key(*args) == first
    monkeypatch.setattr(head, "rope_tables_from_pos", lambda freqs, pos: (pos, pos))
    assert export_memo.key(*args) != first                                   # a patched function
    monkeypatch.undo()
    assert export_memo.key(*args) == first
    with torch.no_grad():
        model.flownet.time_embed.table.add_(1.0)                             # a buffer no state dict carries
    assert export_memo.key(*args) != first


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is Linux's")
def test_the_anonymous_peak_counts_allocations_not_mapped_file_pages(tmp_path):
    """Known sizes: 256 MB allocated and touched inside the block (and freed before it ends: only
    the sampler can see it) raise the peak by about 256 MB, and so do 256 MB held by a process the
    block starts (the export's compilers); a 256 MB file mapped and read (its pages resident, but
    the file's) raises it by far less."""
    import time

    import numpy as np

    from flowar.io.memory import AnonPeak, _status_kb
    size = 256 << 20
    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        out.truncate(size)
    before = _status_kb("RssAnon") * 1024
    with AnonPeak(every=0.02) as mapped:
        m = np.memmap(f, dtype=np.uint8, mode="r")
        assert int(m[:: 4096].sum()) == 0                   # every page read: resident, as file pages
        time.sleep(0.2)
        del m
    with AnonPeak(every=0.02) as allocated:
        a = torch.ones(size // 4)                             # 256 MB written: anonymous pages
        time.sleep(0.2)
        del a
    with AnonPeak(every=0.02) as child:
        subprocess.run([sys.executable, "-c", f"import time; b = bytearray(b'x' * {size}); time.sleep(0.3)"], check=True)
    assert allocated.peak - before > 0.9 * size, (allocated.peak, before)
    assert child.peak - before > 0.9 * size, (child.peak, before)
    assert mapped.peak - before < 0.25 * size, (mapped.peak, before)


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or os.uname().sysname != "Linux"
                    or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"), reason="glibc's malloc_trim")
def test_released_memory_goes_back_to_the_system():
    """Known sizes, in a fresh process: a worker thread allocates 192 MB in 64 KB blocks (its own
    glibc arena), frees all but every 16th (so nothing can be trimmed from the arena's top) and ends.
    The freed 180 MB stay resident until :func:`release_free_memory`, which returns most of them."""
    code = """
import threading
from flowar.io.memory import _status_kb, release_free_memory
held = []
def work():
    blocks = [bytearray(b"x" * (64 << 10)) for _ in range(3072)]
    held.extend(blocks[::16])
t = threading.Thread(target=work); t.start(); t.join()
kept = _status_kb("RssAnon")
assert release_free_memory()
print(kept, _status_kb("RssAnon"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, after = (int(x) * 1024 for x in out.stdout.split())
    assert kept - after > 150 << 20, (kept, after)


def test_the_free_disk_check_counts_what_the_export_writes(engine_dirs, fixtures_dir, tmp_path, monkeypatch):
    """The room an export asks for covers what it writes (graphs and ONNX Runtime's optimized copies,
    which it once left out: it asked for less than it wrote) without asking for several times that,
    and does not depend on how the checkpoint file stores the weights (it once counted a training
    checkpoint's optimizer state and second set of weights)."""
    import flowar.io.memory as memory
    from safetensors.torch import load_file

    class Asked(Exception):
        pass

    def asked(folder, needed, what, option="--out"):
        raise Asked(needed)

    def need(ckpt) -> int:
        with pytest.raises(Asked) as e:
            build_engine_dir(ckpt, tmp_path / "e", config_path=str(fixtures_dir / "tiny_v1.config.json"),
                             vae_path=fixtures_dir / "mar_vae_tiny.ckpt", max_batch=2)
        assert not (tmp_path / "e").exists()                  # asked before anything was written
        return e.value.args[0]

    monkeypatch.setattr(memory, "require_free_space", asked)
    d, _ = engine_dirs["tiny_v1"]                             # the same request, exported
    written = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    flat = need(fixtures_dir / "tiny_v1.safetensors")
    # (with its margin for caches and logs: at most 256 MB, and at most what it writes again and 16 MB for a small
    # directory, which was asked for 270 MB where it wrote 15)
    assert written <= flat <= 4 * written + (16 << 20), (written, flat)
    sd = load_file(str(fixtures_dir / "tiny_v1.safetensors"))
    train = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "model_ema": sd,
                "optimizer": {"state": {i: {"exp_avg": v.clone(), "exp_avg_sq": v.clone()} for i, v in enumerate(sd.values())}}},
               train)
    assert train.stat().st_size > 3 * (fixtures_dir / "tiny_v1.safetensors").stat().st_size
    assert need(train) == flat


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_transposed_weights_go_to_external_data_as_the_same_bytes_in_row_blocks(tmp_path, monkeypatch, dtype):
    """The folded weight transposes (views, not contiguous) are written in row blocks (several here: 64-byte
    blocks) as the bytes onnx_ir writes itself, for every precision a graph is exported in (bf16 arrays give
    numpy no buffer: a block written as the array failed the export)."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir
    import flowar.export.onnx_export as oe
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    base = np.random.default_rng(0).standard_normal((24, 40, 3)).astype(np_dtype)
    arrays = {"w_t": base.transpose(1, 0, 2), "w_rows": base[::2], "w": base}      # two views, one contiguous

    def save(path, blocks):
        values = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in arrays.items()]
        model = ir.Model(ir.Graph([], values, nodes=[], initializers=values, opset_imports={"": 18}), ir_version=10)
        if blocks:
            oe._write_in_row_blocks(model)
            assert sum(type(v.const_value) is not ir.Tensor for v in values) == 2      # the two views, wrapped
        ir.save(model, path, external_data=path.name + ".data")
        return path.with_name(path.name + ".data").read_bytes()

    monkeypatch.setattr(oe, "_BLOCK_BYTES", 64)
    want = save(tmp_path / "plain.onnx", False)
    assert len(want) >= sum(a.nbytes for a in arrays.values())
    assert save(tmp_path / "blocks.onnx", True) == want


def test_an_export_leaves_the_processs_torch_logging_as_it_found_it():
    """The exporter's narration is silenced while a stage exports; the torch logger stayed at ERROR
    for the rest of the process after (torch's warnings hidden from whatever ran next)."""
    import logging

    from flowar.export.onnx_export import _quiet
    log = logging.getLogger("torch")
    before = log.level
    log.setLevel(logging.INFO)
    try:
        with _quiet():
            assert log.level == logging.ERROR
        with pytest.raises(RuntimeError), _quiet():
            raise RuntimeError("a failed stage")
        assert log.level == logging.INFO
    finally:
        log.setLevel(before)
