"""Engines prepared at export: a stage compiled by AOTInductor, verified against eager, stored
with its sha256 and the CPU it was built for, loaded without compiling, refused on a CPU that
lacks that CPU's instructions (falling back to the stage's ONNX graph, and saying so); the call
plan's row blocks. One compile of the smallest stage (the tiny fixture's head preparation)."""

import json
import shutil

import pytest
import torch

from flowar.commands.build import build_engine_dir
from flowar.export.manifest import sha256_file


@pytest.fixture(scope="module")
def compiled_dir(fixtures_dir, tmp_path_factory):
    """tiny_v1 exported to ONNX, then its head preparation compiled (aoti-bf16) and recorded as the
    directory's choice for that stage, as ``--precision auto`` records a compiled engine."""
    from flowar.engines.aoti import compile_stage
    from flowar.engines.cpu import compiled_for, cpu_kind
    from flowar.model.checkpoint import load_model
    from flowar.runtime.candidates import stage_module
    d = tmp_path_factory.mktemp("compiled") / "e"
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", d, config_path=str(fixtures_dir / "tiny_v1.config.json"),
                     max_batch=2, verify=False)
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    spec = json.loads((d / "manifest.json").read_text())
    from flowar.export.specs import stage_specs
    st = stage_specs(model.config)["head_prep"]
    # (the GEMMs as C++ templates whatever their timing where the export uses them, on a CPU with AMX,
    # so that the tests below run its tiles; elsewhere, and where the templates do not build, ATen's calls)
    from flowar.engines import aoti
    tuned, aoti.TUNED = aoti.TUNED, aoti.TUNED | {"max_autotune_gemm_backends": "CPP"}
    try:
        seconds, _ = compile_stage(st, stage_module("aoti-bf16", st, model, None), model.config, st.max_rows(2),
                                d / "head_prep.aoti-bf16.so")
    finally:
        aoti.TUNED = tuned
    spec["precision"] = "auto"
    spec["auto"] = {"choice": {"head_prep": "aoti-bf16"}, "machine": cpu_kind()}
    spec["engines"] = {"head_prep": {"candidate": "aoti-bf16", "file": "head_prep.aoti-bf16.so",
                                     "sha256": sha256_file(d / "head_prep.aoti-bf16.so"), "cpu": compiled_for()}}
    (d / "manifest.json").write_text(json.dumps(spec))
    return d, model, st, seconds


def test_a_compiled_stage_matches_eager_at_every_scale_and_row_count(compiled_dir):
    """The package serves every scale and row count (its dimensions are dynamic) and computes
    what the bf16 module computes, which is float32's within bf16 rounding; a bug in it (another
    module's weights) would be far off."""
    from flowar.engines.aoti import load_package
    from flowar.eval.quality import relative_error
    from flowar.export.specs import sample_inputs
    from flowar.runtime.candidates import stage_module
    d, model, spec, seconds = compiled_dir
    assert seconds > 0 and not list(d.glob("*.pt2*"))         # the library alone is kept, the package removed
    package = load_package(d / "head_prep.aoti-bf16.so")
    fp32, bf16 = spec.module(model, None), stage_module("aoti-bf16", spec, model, None)
    gen = torch.Generator().manual_seed(3)
    for k in range(model.config.n_scales):
        for rows in (1, 3, 4):
            ins = sample_inputs(spec, model.config, k, rows, gen)
            got = package([ins[n] for n in spec.inputs])
            with torch.no_grad():
                want, ref = bf16(*(ins[n] for n in spec.inputs)), fp32(*(ins[n] for n in spec.inputs))
            for name, g, w, r in zip(spec.outputs, got, want, ref):
                assert g.shape == w.shape and relative_error(g, w) < 1e-2, (k, rows)       # bf16 rounds, fused
                assert relative_error(g, r) < 5e-2, (k, rows)                             # near float32
                if name == "c":                                 # from GEMMs: bf16 did happen (RoPE tables: exact)
                    assert relative_error(g, r) > 1e-5, (k, rows)


def test_a_fresh_process_runs_it_before_anything_else_computes(compiled_dir, tmp_path):
    """Its GEMMs may be C++ templates on AMX tiles, which Linux lets a process use only once it has
    asked (oneDNN asks for itself, the library does not): the loader asks, so a process whose first
    computation is the compiled stage gets its outputs (it died of SIGILL on an AMX machine; on
    another kind there is nothing to ask for, and the same must hold)."""
    import subprocess
    import sys
    from flowar.engines.aoti import load_package
    from flowar.export.specs import sample_inputs
    d, model, spec, _ = compiled_dir
    ins = sample_inputs(spec, model.config, 1, 2, torch.Generator().manual_seed(0))
    torch.save([ins[n] for n in spec.inputs], tmp_path / "ins.pt")
    code = ("import sys, torch; from flowar.engines.aoti import load_package; "
            "out = load_package(sys.argv[1])(torch.load(sys.argv[2])); torch.save(out, sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, str(d / "head_prep.aoti-bf16.so"), str(tmp_path / "ins.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])
    want = load_package(d / "head_prep.aoti-bf16.so")([ins[n] for n in spec.inputs])
    assert all(torch.equal(g, w) for g, w in zip(torch.load(tmp_path / "out.pt"), want))


def test_a_library_runs_on_more_threads_than_its_compile_had(tmp_path):
    """A compiled library takes the thread count of the process that runs it: a stage whose loop
    is a reduction split over threads, compiled here on every CPU's thread, runs on four times as
    many (a machine with more cores than the export's) and gives the float64 mean's
    value. Inductor's default sized that split by the compile's threads: the run on more wrote past
    it and died of SIGSEGV."""
    import os
    import subprocess
    import sys

    from flowar.config import PRESETS
    from flowar.engines.aoti import compile_stage
    from flowar.export.specs import StageSpec

    class MeanSquare(torch.nn.Module):          # one output from a million inputs: the reduction is what is split
        def forward(self, x):
            return (x * x).mean(dim=-1, keepdim=True)
    n = 1 << 20
    spec = StageSpec("reduce", ("x",), ("y",), {}, 0.0, {"x": (1, n), "y": (1, 1)},
                     {"x": torch.float32, "y": torch.float32}, lambda model, vae: MeanSquare(), frozenset(),
                     per_scale=False, seq_end=(1,), tokens=(1,))
    cpus, before = os.cpu_count() or 1, torch.get_num_threads()
    torch.set_num_threads(cpus)                 # (as an export compiles: PyTorch on every CPU)
    cache = tmp_path / "inductor"               # (the user's Inductor cache: the compile leaves nothing in it)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
            compile_stage(spec, MeanSquare(), PRESETS["tiny"], 1, tmp_path / "reduce.so")
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    finally:
        torch.set_num_threads(before)
    left = [p for p in cache.rglob("*") if p.is_file()] + [p for p in tmp_path.iterdir() if p.name != "reduce.so"
                                                          and p != cache]
    assert not left, left                       # (Inductor's copy of each library stayed: 2.4 GB of /tmp in a day)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from flowar.engines.aoti import load_package; torch.set_num_threads(int(sys.argv[3])); "
            "print(float(load_package(sys.argv[1])([torch.load(sys.argv[2])])[0]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "reduce.so"), str(tmp_path / "x.pt"), str(4 * cpus)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])
    want = (x.double() ** 2).mean().item()
    assert abs(float(r.stdout.split()[-1]) - want) <= 1e-5 * want, (r.stdout, want)


def test_a_compile_whose_gemm_templates_fail_is_made_again_with_aten_s_calls(compiled_dir, monkeypatch, tmp_path):
    """On a CPU with AMX the C++ GEMM templates are timed where PyTorch can build them: a compile that
    fails with them is made again without (ATen's calls, as before they were timed); one that fails
    both ways is one line naming the stage and Inductor's reason. The export says which compiles fell
    back. Without AMX (where they did not pay: an AMD EPYC Zen 4) ATen's calls alone, compiled once."""
    from torch import _inductor

    import flowar.engines.cpu as cpu
    amx = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    monkeypatch.setattr(cpu, "cpu_kind", lambda honour_env=True: {"model": "an AMX CPU", "flags": amx})

    from flowar.commands.precision import PrecisionReport, StageMeasure
    from flowar.engines import aoti
    from flowar.engines.aoti import load_package
    from flowar.errors import FlowARError
    from flowar.eval.quality import relative_error
    from flowar.export.specs import sample_inputs
    from flowar.runtime.candidates import stage_module
    _, model, spec, _ = compiled_dir
    calls, real = [], _inductor.aoti_compile_and_package

    def templates_fail(program, package_path=None, inductor_configs=None):
        calls.append(dict(inductor_configs))
        if set(aoti.TUNED) <= set(inductor_configs):
            raise RuntimeError("no template for this CPU")
        return real(program, package_path=package_path, inductor_configs=inductor_configs)
    with monkeypatch.context() as mp:
        mp.setattr(_inductor, "aoti_compile_and_package", templates_fail)
        _, untuned = aoti.compile_stage(spec, stage_module("aoti-bf16", spec, model, None), model.config, 2,
                                        tmp_path / "h.so")
    assert [set(aoti.TUNED) <= set(c) for c in calls] == [True, False] and untuned == "RuntimeError: no template for this CPU"
    ins = sample_inputs(spec, model.config, 1, 2, torch.Generator().manual_seed(0))     # (it computes the stage)
    with torch.no_grad():
        want = stage_module("aoti-bf16", spec, model, None)(*(ins[n] for n in spec.inputs))
    got = load_package(tmp_path / "h.so")([ins[n] for n in spec.inputs])
    assert all(relative_error(g, w) < 1e-2 for g, w in zip(got, want)) and not list(tmp_path.glob("*.pt2"))
    report = PrecisionReport("auto", {spec.name: "aoti-bf16"},
                             {spec.name: {"aoti-bf16": StageMeasure(1e-3, 1e-3, 0.05, build_s=3.0, untuned=untuned)}})
    assert "aoti-bf16 1.0 ms per image (err 1.0e-03, compiled in 3 s with ATen GEMMs, its GEMM templates failed: RuntimeError: " \
           "no template for this CPU)" in report.lines()[0]
    calls.clear()

    def fails(program, package_path=None, inductor_configs=None):
        calls.append(dict(inductor_configs))
        raise RuntimeError("no template for this CPU")
    monkeypatch.setattr(_inductor, "aoti_compile_and_package", fails)
    with pytest.raises(FlowARError, match="AOTInductor to compile the head_prep stage.*no template for this CPU"):
        aoti.compile_stage(spec, stage_module("aoti-bf16", spec, model, None), model.config, 2, tmp_path / "h.so")
    assert [set(aoti.TUNED) <= set(c) for c in calls] == [True, False], calls
    assert all(c["freezing"] and c["aot_inductor.force_mmap_weights"] for c in calls)
    calls.clear()
    monkeypatch.setattr(cpu, "cpu_kind", lambda honour_env=True: {"model": "AMD EPYC", "flags": amx[:3]})
    with pytest.raises(FlowARError, match="AOTInductor to compile the head_prep stage.*no template for this CPU"):
        aoti.compile_stage(spec, stage_module("aoti-bf16", spec, model, None), model.config, 2, tmp_path / "h.so")
    assert [("max_autotune" in c, c["freezing"]) for c in calls] == [(False, True)], calls


def test_the_runtime_runs_it_and_refuses_it_on_a_cpu_without_its_instructions(compiled_dir, monkeypatch):
    import flowar.engines.cpu as cpu
    from flowar.errors import EngineDirError
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.schedule import build_schedule
    d, model, _, _ = compiled_dir
    sched = build_schedule(5, 4.3, 0.9, model.config.n_scales)
    with Runtime.open_engine_dir(d) as rt:
        assert rt.detail.startswith("auto: ar ort-fp32, head_prep aoti-bf16") and rt.opened["shapes warmed"] == 0
        compiled = rt.sample([3, 7], sched, decode=False).tokens
    with Runtime.open_engine_dir(d, backend="ort") as rt:
        fp32 = rt.sample([3, 7], sched, decode=False).tokens
    assert 1e-6 < (compiled - fp32).abs().max().item() and (compiled - fp32).norm() / fp32.norm() < 0.05
    # on a CPU without the export CPU's instructions: the stage's ONNX graph instead, and the detail says so
    monkeypatch.setattr(cpu, "cpu_kind", lambda honour_env=True: {"model": "Another CPU", "flags": []})
    with Runtime.open_engine_dir(d) as rt:
        assert "head_prep aoti-bf16 compiled for avx2" in rt.detail and "ONNX Runtime fp32 instead" in rt.detail
        assert torch.equal(rt.sample([3, 7], sched, decode=False).tokens, fp32)
    monkeypatch.undo()
    # ... and on one of the same kind (its flags the same) that lacks an instruction set the export's CPU had: the
    # compiler, told -march=native, may have used it (SIGILL); the kind's six flags alone let the library run
    isa = cpu.own_isa()
    monkeypatch.setattr(cpu, "own_isa", lambda: [f for f in isa if f != "fma"])
    with Runtime.open_engine_dir(d) as rt:
        assert "head_prep aoti-bf16 compiled for fma, which this CPU lacks: ONNX Runtime fp32" in rt.detail, rt.detail
    monkeypatch.undo()
    # a modified package is refused where it is read
    bad = d.parent / "bad"
    shutil.copytree(d, bad)
    with open(bad / "head_prep.aoti-bf16.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineDirError, match="head_prep.aoti-bf16.so with the sha256"):
        Runtime.open_engine_dir(bad)


def test_a_call_plan_runs_calls_as_row_blocks_with_the_same_results(compiled_dir):
    """Blocks of the plan are row slices of the same static buffers: 7 rows as 4 + 2 + 1, and the
    tokens are those of whole calls (ONNX Runtime computes each row on its own)."""
    from flowar.runtime.runtime import Runtime
    from flowar.runtime.stages import blocks
    from flowar.sampling.schedule import build_schedule
    assert blocks(7, 4, [1, 2, 4]) == [4, 2, 1] and blocks(8, 2, [1, 2, 4, 8]) == [2, 2, 2, 2]
    assert blocks(3, 8, [1, 2, 4, 8]) == [2, 1]
    d, model, _, _ = compiled_dir
    sched = build_schedule(5, 4.3, 0.9, model.config.n_scales)
    plan = {"stages": {s: {"block": {str(k): 1 for k in range(model.config.n_scales)}, "sizes": [1, 2, 4]}
                       for s in ("ar", "head_prep", "velocity")}}
    with Runtime.open_engine_dir(d, backend="ort") as rt:
        whole = rt.sample([3, 7], sched, decode=False).tokens
        rt.stages.plan = plan["stages"]
        rt.stages.calls.clear()                # the bound calls (and their blocks) were made under no plan
        calls = []
        inner = rt.stages.engines["velocity"].infer
        rt.stages.engines["velocity"].infer = lambda i, o, profile=0: calls.append(i["x"].shape[0]) or inner(i, o, profile)
        blocked = rt.sample([3, 7], sched, decode=False).tokens
    assert set(calls) == {1} and (blocked - whole).abs().max().item() <= 1e-5


def test_image_seconds_follow_the_plan_and_the_schedule():
    """Seconds per batch by the plan, against a count by hand: every call 1 s whatever its rows
    (blocks as large as the batch), so a batch of B costs per scale one AR call, one preparation
    and one velocity call per head evaluation, plus one decode."""
    from types import SimpleNamespace

    from flowar.commands.plan import image_seconds
    from flowar.sampling.schedule import build_schedule
    config = SimpleNamespace(n_scales=3)
    flat = {"block": {str(k): 8 for k in range(3)}, "sizes": [1, 2, 4, 8],
            "seconds": {str(k): {str(r): 1.0 for r in (1, 2, 4, 8)} for k in range(3)}}
    plan = {"stages": {"ar": flat, "head_prep": flat, "velocity": flat,
                       "decode": flat | {"block": {"0": 8}, "seconds": {"0": {str(r): 1.0 for r in (1, 2, 4, 8)}}}}}
    sched = build_schedule(7, 4.3, 0.9, 3)                      # 6 Euler steps per scale: 18 evaluations
    assert image_seconds(plan, {"decode": None}, config, sched, 2) == 3 * 2 + 18 + 1
    assert image_seconds(plan, {}, config, sched, 2) == 3 * 2 + 18


def test_the_library_called_through_its_c_interface_gives_pytorchs_runner_outputs(compiled_dir):
    """The compiled stage's library called through AOTInductor's C interface (ctypes, which releases
    the GIL: what lets a replica's two lanes compute at once) gives what PyTorch's own runner gives,
    bit for bit, at every scale, also from two threads at once; a wrong input count is one clear
    error (the library itself would abort the process)."""
    import threading

    from flowar.engines.aoti import Library
    from flowar.errors import FlowARError
    from flowar.export.specs import sample_inputs
    d, model, spec, _ = compiled_dir
    path = d / "head_prep.aoti-bf16.so"
    theirs = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1).run
    lib = Library(path, models=2)
    gen = torch.Generator().manual_seed(3)
    cases = [[sample_inputs(spec, model.config, k, 3, gen)[n] for n in spec.inputs]
             for k in range(model.config.n_scales)]
    want = [theirs(c) for c in cases]
    got: dict[int, list] = {}

    def run(j):
        for _ in range(20):
            got[j] = [lib(c) for c in cases]
    jobs = [threading.Thread(target=run, args=(j,)) for j in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(60)
    for j in range(2):
        for w, g in zip(want, got[j]):
            assert len(w) == len(g) and all(torch.equal(a, b) for a, b in zip(w, g))
    with pytest.raises(FlowARError, match=f"{len(spec.inputs)} input tensors"):
        lib(cases[0][:-1])
    lib.close()


def test_a_library_replaced_at_its_path_is_loaded_anew_in_the_same_process(compiled_dir, tmp_path, monkeypatch):
    """A re-export swaps the directory whole: the same path, another file. Opened again in the same
    process (a notebook that re-exports), that file's library is what runs: glibc gave the library it
    had loaded for that name without looking at the file (old code over the new weights: SIGSEGV for
    another model). Here another library (a stand-in of AOTInductor's C interface: 7 inputs) in place
    of the stage's, then a copy of the stage's again, which computes what it did."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from flowar.engines.aoti import Library
    from flowar.export.specs import sample_inputs
    d, model, spec, _ = compiled_dir
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))       # (where a link to load it by goes)
    src = tmp_path / "other.c"
    src.write_text("#include <stddef.h>\n"
                   "int AOTInductorModelContainerCreateWithDevice(void **h, size_t n, const char *d, const char *c)"
                   " { *h = (void *)1; return 0; }\n"
                   "int AOTInductorModelContainerRun(void) { return 1; }\n"
                   "int AOTInductorModelContainerGetNumInputs(void *h, size_t *n) { *n = 7; return 0; }\n"
                   "int AOTInductorModelContainerGetNumOutputs(void *h, size_t *n) { *n = 5; return 0; }\n"
                   "int AOTInductorModelContainerDelete(void *h) { return 0; }\n")

    def swap_in(make) -> Path:                   # a new folder renamed into place, as an export's staging does
        new = tmp_path / "new"
        new.mkdir()
        make(new / "head_prep.aoti-bf16.so")
        if (tmp_path / "e").exists():
            os.rename(tmp_path / "e", tmp_path / "old")
        os.rename(new, tmp_path / "e")
        shutil.rmtree(tmp_path / "old", ignore_errors=True)
        return tmp_path / "e" / "head_prep.aoti-bf16.so"

    stage = lambda p: shutil.copy2(d / "head_prep.aoti-bf16.so", p)        # noqa: E731
    case = [sample_inputs(spec, model.config, 2, 3, torch.Generator().manual_seed(4))[n] for n in spec.inputs]
    lib = Library(swap_in(stage))
    want = lib(case)
    lib.close()
    lib = Library(swap_in(lambda p: subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(p)], check=True)))
    assert (lib.inputs, lib.outputs) == (7, 5)
    lib = Library(swap_in(stage))
    assert lib.inputs == len(spec.inputs) and all(torch.equal(a, b) for a, b in zip(want, lib(case)))
    lib.close()
    # the same through a link to the directory, retargeted to another export (its resolved path is another file)
    for name, make in (("v1", stage), ("v2", lambda p: subprocess.run(["cc", "-shared", "-fPIC", str(src), "-DV2", "-o",
                                                                        str(p)], check=True))):
        (tmp_path / name).mkdir()
        make(tmp_path / name / "head_prep.aoti-bf16.so")
    (tmp_path / "cur").symlink_to(tmp_path / "v1")
    assert Library(tmp_path / "cur" / "head_prep.aoti-bf16.so").inputs == len(spec.inputs)
    (tmp_path / "cur").unlink()
    (tmp_path / "cur").symlink_to(tmp_path / "v2")
    assert Library(tmp_path / "cur" / "head_prep.aoti-bf16.so").inputs == 7
    # a damaged library in its place: the error names the user's file, and no link is left behind
    bad = swap_in(lambda p: p.write_bytes(b"not a library"))
    with pytest.raises(OSError, match=str(bad)):
        Library(bad)
    assert not list((tmp_path / "tmp").iterdir())          # (each link went once its library was loaded, or failed to)
