"""Precision chosen per machine (flowar-export --precision auto|bf16): bf16 GEMMs with float32
around them, the official mixed precision as a yardstick, candidates timed in the pipeline, the
choice recorded and run as recorded. (Which candidate wins is a property of the machine, so no
test asserts it; bench/RESULTS.md has the figures.)"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flowar.commands.build import build_engine_dir
from flowar.runtime.runtime import Runtime
from flowar.runtime.bf16 import bf16_gemms, bf16_throughout
from flowar.eval.quality import relative_error
from flowar.commands.precision import Combination, StageMeasure, combinations, decide, passes
from flowar.sampling.batches import run_sampling
from flowar.sampling.schedule import build_schedule

SM = StageMeasure


@pytest.fixture(autouse=True)
def _fewer_probes(monkeypatch):
    """The choice's own measurements at their smallest (2 probe samples, 1 timed image per
    combination): the tests check what is measured and recorded, not how well."""
    import flowar.commands.workbench as workbench
    monkeypatch.setattr(workbench, "PROBE_LABELS", 2)
    monkeypatch.setattr(workbench, "TIME_REPEAT", 1)


def test_bf16_gemms_round_the_operands_and_keep_everything_else_in_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48), nn.Conv1d(1, 1, 1))   # Conv1d: not converted
    x = torch.randn(5, 64)
    got = bf16_gemms(net[:1])(x)
    lin = net[0]
    exact = x.bfloat16().double() @ lin.weight.bfloat16().double().T + lin.bias.bfloat16().double()
    # the GEMM's result is rounded to bf16: within one bf16 step (2^-8 relative) of the float64 product
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    assert (got.double() - (x.double() @ lin.weight.double().T + lin.bias.double())).abs().max() > 1e-4
    assert lin.weight.dtype == torch.float32                              # the caller's module is unchanged
    conv = nn.Conv2d(3, 8, 3, padding=1)
    img = torch.randn(2, 3, 8, 8)
    exact = nn.functional.conv2d(img.bfloat16().double(), conv.weight.bfloat16().double(),
                                 conv.bias.bfloat16().double(), padding=1)
    got = bf16_gemms(nn.Sequential(conv))(img)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    # the norm between GEMMs stays float32: its output equals float32 LayerNorm of the bf16 GEMM's output
    mixed = bf16_gemms(net[:2])
    assert torch.equal(mixed(x), net[1](bf16_gemms(net[:1])(x)))


def test_the_bf16_decoder_computes_in_bf16_throughout(fixtures_dir, tiny_v1):
    """The decode stage's bf16 flavour (the VAE in bf16 throughout, float32 in and out) against
    the same decoder in float64: several bf16 roundings away (measured 0.022 relative on the MAR
    fixture VAE, GEMMs-only bf16 0.014), far from float32's 1e-6, and the caller's VAE unchanged."""
    from flowar.export.specs import stage_specs
    from flowar.model.vae import load_vae
    from flowar.runtime.candidates import stage_module
    from safetensors.torch import load_file
    model, _ = tiny_v1
    vae = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16)
    latent = load_file(str(fixtures_dir / "mar_vae_tiny_io.safetensors"))["decode.latent"]
    spec = stage_specs(model.config, vae.downsample)["decode"]
    dec = stage_module("torch-bf16", spec, model, vae)
    assert {t.dtype for t in dec.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in vae.parameters()} == {torch.float32}
    with torch.no_grad():
        img, img32 = dec(latent), vae.decode(latent)
        img64 = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16).double().decode(latent.double())
    err, err32 = relative_error(img.double(), img64), relative_error(img32.double(), img64)
    assert img.dtype == torch.float32 and err32 * 1000 < err < 2 ** -4, (err, err32)
    assert torch.equal(bf16_throughout(vae).decode(latent), img)   # flowar-run --ckpt --precision bf16 alike


def test_bf16_gemms_are_closer_to_float32_than_bf16_everywhere(tiny_v1):
    """On the official fixture's head: float32 around the GEMMs keeps the velocity closer to float32
    than running weights and activations in bf16 (the former torch-bf16), the flow time in float32
    for both (measured 1.5e-2 against 2.0e-2; with the time rounded to bf16 too, "everywhere" was
    several times further)."""
    from flowar.export.onnx_export import Reduced
    from flowar.export.specs import sample_inputs, stage_specs
    model, _ = tiny_v1
    spec = stage_specs(model.config)["velocity"]
    mod = spec.module(model, None)
    ins = sample_inputs(spec, model.config, 4, 2, torch.Generator().manual_seed(0))
    args = [ins[n] for n in spec.inputs]
    with torch.no_grad():
        ref, gemms, everywhere = mod(*args), bf16_gemms(mod)(*args), Reduced(mod, torch.bfloat16, spec.inputs)(*args)
    e_gemms, e_all = relative_error(gemms, ref), relative_error(everywhere, ref)
    assert 1e-4 < e_gemms < 0.02 and e_gemms * 1.15 < e_all, (e_gemms, e_all)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_reduced_graph_embeds_the_timesteps_of_its_float32_times(tiny_v1, dtype):
    """fp16/bf16 graphs (TensorRT's) take the flow time in float32: the head truncates t * 1000 to
    its integer timestep, and the official grid's times rounded first moved: to bf16, 6 of 24 (--steps
    25) by up to 2 timesteps; to fp16, 24 of 50 (--steps 50) by one (FlowAR-S's fp16 export was
    refused, its velocity 0.9 off at random times)."""
    from flowar.export.onnx_export import Reduced
    from flowar.export.specs import sample_inputs, stage_specs
    from flowar.sampling.schedule import build_schedule
    model, _ = tiny_v1
    spec = stage_specs(model.config)["velocity"]
    t = torch.cat([build_schedule(n, 4.3, 0.9, model.config.n_scales).t32 for n in (25, 50)])   # as the head gets them
    want = torch.from_numpy(np.floor(t.numpy() * np.float32(1000)).astype(np.int64))   # the official rule, float32
    ins = sample_inputs(spec, model.config, 0, len(t), torch.Generator().manual_seed(0)) | {"t": t}
    red = Reduced(spec.module(model, None), dtype, tuple(spec.inputs))
    seen = []
    embed = next(m for n, m in red.named_modules() if n.endswith("time_embed"))
    embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    with torch.no_grad():
        red(*(ins[n] for n in spec.inputs))
    assert len(seen) == 1 and torch.equal(seen[0].long().flatten(), want), (seen, want)

def test_the_official_mixed_precision_computes_every_gemm_in_float32_from_fp16_operands(tiny_v1, fixtures_dir):
    """Under the emulation no GEMM or convolution runs in fp16 (a CPU computes those in software:
    FlowAR-S's yardstick took 3.5x its float32 time, its decoder's convolutions 8x), every one that
    autocast gives fp16 operands runs in float32 on them and is rounded to fp16 once: a linear layer's
    output is the float64 result of its fp16 operands rounded to fp16 (within one fp16 step; float32
    accumulation is far finer). PyTorch 2.13 hands a dispatch mode linear and conv2d whole: they ran
    as fp16 kernels, unseen by the emulation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flowar.eval.mixed import OfficialFp16, _Fp16GemmsInFloat32
    from flowar.model.vae import load_vae
    from flowar.sampling.eager import EagerStages
    aten = torch.ops.aten
    gemms = {aten.linear.default, aten.conv2d.default, aten.convolution.default, aten.mm.default, aten.addmm.default,
             aten.bmm.default, aten.baddbmm.default, aten.matmul.default}
    ran: dict[str, set] = {}

    class Kernels(TorchDispatchMode):          # (entered first: it sees what the emulation's mode calls)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in gemms:
                ran.setdefault(str(func), set()).update(
                    a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            return func(*args, **(kwargs or {}))
    model, _ = tiny_v1
    vae = load_vae(fixtures_dir / "mar_vae_tiny.ckpt")
    c = model.config
    with torch.inference_mode(), Kernels():
        run_sampling(OfficialFp16(EagerStages(model, vae.decode)), c, [3], build_schedule(2, 4.3, 0.9, c.n_scales), 0,
                     decode=True)
    assert ran and all(dtypes == {torch.float32} for dtypes in ran.values()), ran
    assert {"aten.linear.default", "aten.conv2d.default"} <= set(ran), ran       # (the AR, the head, the decoder)
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    x = torch.randn(8, 256)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16), _Fp16GemmsInFloat32():
        got = layer(x)
    w, b, x16 = layer.weight.half().double(), layer.bias.half().double(), x.half().double()
    want = (x16 @ w.T + b).half()
    assert got.dtype == torch.float16
    step = torch.finfo(torch.float16).eps * want.double().abs().clamp_min(torch.finfo(torch.float16).tiny)
    assert ((got.double() - want.double()).abs() <= step).all()


def test_the_emulated_mixed_precision_moves_samples_as_far_as_real_fp16_autocast(tiny_v1):
    """What the yardstick reports, how far fp16 autocast moves the tokens from float32, is what real
    fp16 autocast on this CPU gives (two fp16 computations differ from each other by about as much
    as from float32 once the ODE has amplified their roundings, so the distance, not the tokens, is
    compared): within 1.5x either way, and far above float32's own noise (the emulation in float32
    throughout, or in bf16, would be far off)."""
    from flowar.eval.mixed import OfficialFp16
    from flowar.sampling.eager import EagerStages
    model, _ = tiny_v1
    c = model.config
    sched = build_schedule(10, 4.3, 0.9, c.n_scales)
    labels = [3, 7, 1, 5]

    class RealAutocast(EagerStages):
        def ar(self, k, x_in):
            with torch.autocast("cpu", dtype=torch.float16):
                return super().ar(k, x_in).float()

        def prepare(self, k, cond):
            with torch.autocast("cpu", dtype=torch.float16):
                return super().prepare(k, cond)

        def velocity(self, ctx, x, t):
            with torch.autocast("cpu", dtype=torch.float16):
                return super().velocity(ctx, x, t).float()

    with torch.inference_mode():
        fp32 = run_sampling(EagerStages(model), c, labels, sched, 0)
        real = run_sampling(RealAutocast(model), c, labels, sched, 0)
        emul = run_sampling(OfficialFp16(EagerStages(model)), c, labels, sched, 0)
    d_real, d_emul = relative_error(real.tokens, fp32.tokens), relative_error(emul.tokens, fp32.tokens)
    assert d_real > 1e-3 and d_real / 1.5 <= d_emul <= 1.5 * d_real, (d_real, d_emul)


def test_candidates_are_timed_in_the_pipeline_and_eager_fp32_is_always_among_them():
    measured = {"ar": {"ort-fp32": SM(0.1, 1e-6, 1e-4), "torch-fp32": SM(0.2, 0.0, 1e-4),
                       "torch-bf16": SM(0.05, 0.2, 0.05)},                       # fastest, outside its screen
                "velocity": {"ort-fp32": SM(0.9, 1e-6, 1e-4), "torch-fp32": SM(0.7, 0.0, 1e-4),
                             "torch-bf16": SM(0.2, 0.01, 0.05)}}
    auto = combinations(measured, "auto")
    assert auto == [{"ar": "ort-fp32", "velocity": "torch-bf16"}, {"ar": "ort-fp32", "velocity": "torch-fp32"},
                    {"ar": "torch-fp32", "velocity": "torch-fp32"}]
    # bf16: the fastest reduced engine of every stage, no gate, but never one that gave NaN/Inf
    assert combinations(measured, "bf16") == [{"ar": "torch-bf16", "velocity": "torch-bf16"}]
    measured["ar"]["torch-bf16"] = SM(0.05, float("inf"), float("inf"))
    assert combinations(measured, "bf16") == [{"ar": "torch-fp32", "velocity": "torch-bf16"}]
    # the whole image's time decides (not the sum of stage times); a reduced choice too far off is not kept
    combos = [Combination(auto[0], 3.0, ok=False), Combination(auto[1], 2.0), Combination(auto[2], 2.5)]
    assert decide(combos).choice == auto[1]
    combos[0].ok = True
    assert decide(combos).choice == auto[1]                                  # slower in the pipeline: not kept
    combos[0].seconds = 1.0
    assert decide(combos).choice == auto[0]
    # what opening its engines costs a fresh process counts too (DESIGN decision 15): a PyTorch
    # decoder that is faster per image but imports diffusers loses to one that loads at once
    combos[0].open_s = 1.6
    assert decide(combos).choice == auto[1]
    measured["velocity"]["torch-bf16"].open_s = 1.0                        # per stage as well
    assert combinations(measured, "auto")[0]["velocity"] == "torch-fp32"


def test_a_reduced_choice_passes_near_fp32_or_no_farther_than_the_official_mixed_precision():
    assert passes({"token_rel": 0.5, "psnr_median": 31.0}, {})
    assert not passes({"token_rel": 0.5, "psnr_median": 25.0}, {"token_rel": 0.1})
    assert passes({"token_rel": 0.05, "psnr_median": 25.0}, {"token_rel": 0.1})
    assert passes({"token_rel": 0.01}, {}) and not passes({"token_rel": 0.2}, {"token_rel": 0.1})


def _export(fixtures_dir, out, candidates, precision="auto", **kw):
    return build_engine_dir(fixtures_dir / "tiny_v1.safetensors", out, config_path=str(fixtures_dir / "tiny_v1.config.json"),
                            max_batch=2, verify=False, precision=precision, auto_candidates=candidates, **kw)


@pytest.mark.slow
def test_auto_records_what_it_measured_and_the_runtime_runs_that(fixtures_dir, tmp_path, tiny_v1, assert_tokens,
                                                                 monkeypatch):
    _, io = tiny_v1
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(tmp_path / "n.safetensors"))
    sched = build_schedule(25, 4.3, 0.9, 5)
    from flowar.engines.cpu import OthersShare
    blocks = []

    def others(self, *exc):              # a known share of others' time in every timed block: what is recorded
        blocks.append(1)
        self.others, self.wall = self.others + 0.1 * len(self.cpus or [1]), self.wall + 1.0
    with monkeypatch.context() as mp:
        mp.setattr(OthersShare, "__exit__", others)
        rep = _export(fixtures_dir, tmp_path / "torch", ("torch-fp32",))
    m = json.loads((tmp_path / "torch" / "manifest.json").read_text())
    assert blocks and m["auto"]["others_cpu"] == 0.1           # (the timings were taken within the meter)
    assert m["precision"] == "auto" and m["auto"]["choice"] == {s: "torch-fp32" for s in ("ar", "head_prep", "velocity")}
    from safetensors.torch import load_file
    for stage in ("ar", "head_prep", "velocity"):
        rec = m["auto"]["measured"][stage]["torch-fp32"]
        assert rec["seconds"] > 0 and rec["error"] == 0.0                     # the reference module itself
        # what opening counts is hashing the very file the directory holds for the stage
        held = load_file(str(tmp_path / "torch" / m["weights"][m["engines"][stage]["weights"]]["file"]))
        assert rec["open_bytes"] == sum(t.nbytes for t in held.values()) > 0 and rec["open_s"] > 0
    assert m["auto"]["combinations"][0]["seconds"] > 0 and m["auto"]["machine"]["model"]
    import flowar.engines.cpu
    flowar.engines.cpu.cpu_kind.cache_clear()        # (as a fresh process opens it: the export's CPU record, not
                                                     # its process's cached one, is compared with this CPU's)
    # the weights each PyTorch stage runs, once per module group (the head's two stages share one file)
    assert set(m["weights"]) == {"ar.torch-fp32", "head.torch-fp32"} and m["engines"]["velocity"] == {
        "candidate": "torch-fp32", "weights": "head.torch-fp32"}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "torch" / "ar.torch-fp32.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.class_emb.weight" in names and not any(".flownet." in n for n in names)   # the AR's only
    assert any("pipeline" in line and "kept" in line for line in rep.lines())
    # the first open after the export hashes none of the weights it wrote (the export recorded them as
    # found whole, .verified.json: it hashed every one), nor reads a graph whose optimized copy it made
    import flowar.export.manifest as manifest
    hashed, graphs, sha256_file, read_checked = [], [], manifest.sha256_file, manifest.Manifest.read_checked
    with monkeypatch.context() as mp:
        mp.setattr(manifest, "sha256_file", lambda p: hashed.append(Path(p).name) or sha256_file(p))
        mp.setattr(manifest.Manifest, "read_checked", lambda self, rel, sha: graphs.append(rel) or read_checked(self, rel, sha))
        with Runtime.open_engine_dir(tmp_path / "torch", backend="auto"):
            pass
        with Runtime.open_engine_dir(tmp_path / "torch", backend="ort"):
            pass
    assert not any(n.endswith(".safetensors") for n in hashed) and graphs == [], (hashed, graphs)
    with Runtime.open_engine_dir(tmp_path / "torch", backend="auto") as rt:
        assert rt.backend == "measured" and rt.detail == "auto: torch-fp32"      # one engine for every stage
        assert rt.threads.host == rt.threads.cores >= 1  # PyTorch stages keep every core
        w = rt.stages.engines["velocity"].module.head.final_layer.linear.weight
        assert not w.is_meta and w.data_ptr() == rt.stages.engines["head_prep"].module.head.final_layer.linear.weight.data_ptr()
        res = rt.sample([3, 7], sched, noise_file=tmp_path / "n.safetensors", decode=False)
    assert_tokens(res.tokens)
    # ONNX Runtime chosen: no weights carried; --backend ort ignores the choice altogether
    _export(fixtures_dir, tmp_path / "ort", ("ort-fp32",))
    m = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    assert not m["weights"] and not list((tmp_path / "ort").glob("*.safetensors"))
    with Runtime.open_engine_dir(tmp_path / "ort", backend="auto") as rt:
        assert rt.detail == "auto: ort-fp32" and rt.threads.host == 1   # ONNX Runtime's threads compute
        assert_tokens(rt.sample([3, 7], sched, noise_file=tmp_path / "n.safetensors", decode=False).tokens)
    # measured on another CPU: said, not hidden; also one of the same name and flags but another
    # generation ("AMD EPYC" is Zen 4 and Zen 5 alike); a record without family and model numbers
    # (written before they were recorded) is judged by name and flags
    import flowar.engines.cpu
    here = flowar.engines.cpu.cpu_kind()
    other_gen = {**here, "cpuid": "AuthenticAMD 26 2" if here.get("cpuid") != "AuthenticAMD 26 2" else "AuthenticAMD 25 17"}
    for kind, noted in (({"model": "Another CPU", "flags": ["amx_bf16"]}, True), (other_gen, "cpuid" in here),
                        (here, False)):
        monkeypatch.setattr(flowar.engines.cpu, "cpu_kind", lambda honour_env=True, k=kind: k)
        with Runtime.open_engine_dir(tmp_path / "torch", backend="auto") as rt:
            assert ("re-export here to measure this CPU" in rt.detail) == noted, (kind, rt.detail)
    mpath = tmp_path / "torch" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["auto"]["machine"].pop("cpuid", None)
    mpath.write_text(json.dumps(m))
    monkeypatch.setattr(flowar.engines.cpu, "cpu_kind", lambda honour_env=True: other_gen)
    with Runtime.open_engine_dir(tmp_path / "torch", backend="auto") as rt:
        assert "re-export here" not in rt.detail, rt.detail
    # the weights the PyTorch stages run are checked like the graphs
    w = tmp_path / "torch" / "head.torch-fp32.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    from flowar.export.manifest import EngineDirError
    with pytest.raises(EngineDirError, match="sha256"):
        Runtime.open_engine_dir(tmp_path / "torch", backend="auto")


@pytest.mark.slow
def test_a_reduced_choice_that_does_not_sample_like_fp32_is_not_kept(fixtures_dir, tmp_path, monkeypatch):
    import flowar.commands.precision as precision
    monkeypatch.setattr(precision, "REDUCED_SCREEN", float("inf"))            # every bf16 stage reaches the check
    monkeypatch.setattr(precision, "passes", lambda dev, official: False)     # and none can pass it
    rep = _export(fixtures_dir, tmp_path / "e", ("torch-bf16",))
    reduced = [c for c in rep.precision.combinations if c.reduced]
    assert reduced and not any(c.ok for c in reduced) and all(c.deviation for c in reduced)
    assert set(rep.precision.choice.values()) == {"torch-fp32"}              # eager fp32 instead, timed too
    assert rep.precision.kept.seconds > 0
    assert rep.precision.official_fp16["token_rel"] > 0                     # the yardstick was measured too
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["auto"]["official_fp16"] and any(not c["ok"] for c in m["auto"]["combinations"])


@pytest.mark.slow
def test_bf16_takes_a_bf16_engine_for_every_stage_and_reports_its_deviation(tmp_path, monkeypatch):
    """The default model (trained) with --precision bf16: every stage reduced, the VAE decoder
    included (its weights carried), and the images within 30 dB of the float32 engines."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.io.images import psnr_each
    import flowar.engines.cpu
    # on a CPU without bf16 in hardware the directory opens as float32 (checked below); to check
    # its bf16 engines there too, this process (and the probe) are told the CPU has it (emulated)
    pretend = "" if flowar.engines.cpu.fast_bf16() else (
        "import flowar.engines.cpu as c; k = c.cpu_kind(); "
        "c.cpu_kind = lambda honour_env=True: {**k, 'flags': [*k['flags'], 'avx512_bf16']}\n")
    if pretend:
        kind = flowar.engines.cpu.cpu_kind()
        monkeypatch.setattr(flowar.engines.cpu, "cpu_kind",
                            lambda honour_env=True: {**kind, "flags": [*kind["flags"], "avx512_bf16"]})
    rep = build_engine_dir(DEFAULT_CKPT, tmp_path / "bf16", vae_path=DEFAULT_VAE, max_batch=4, verify=False,
                           precision="bf16", auto_candidates=("torch-bf16",))
    assert set(rep.precision.choice.values()) == {"torch-bf16"} and set(rep.precision.choice) == {
        "ar", "head_prep", "velocity", "decode"}
    # the command's last line says what runs (it said "ort, bf16" while no stage ran ONNX Runtime)
    assert f"{tmp_path / 'bf16'} (bf16: torch-bf16 for every stage, max batch 4) in " in rep.summary("bf16", 4)
    kept = rep.precision.kept
    assert kept.deviation["psnr_median"] > 0 and rep.precision.official_fp16["psnr_median"] > kept.deviation["psnr_median"]
    m = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert m["precision"] == "bf16" and set(m["weights"]) == {"ar.torch-bf16", "head.torch-bf16", "vae.torch-bf16"}
    # flowar-check's lines: the graphs beside measured engines are float32 (it called them bf16)
    from flowar.commands.check import holds
    from flowar.export.manifest import read_manifest
    assert all("onnx (fp32 graph, not verified against eager); CPU engine torch-bf16 (" in line for line in holds(read_manifest(tmp_path / "bf16")))
    import onnx
    held = {i.data_type for i in onnx.load(str(tmp_path / "bf16" / "velocity.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT in held and onnx.TensorProto.BFLOAT16 not in held, held      # (what the line says)
    sched = build_schedule(25, 4.3, 0.9, 4)
    labels = [0, 3, 6, 9]
    with Runtime.open_engine_dir(tmp_path / "bf16") as rt:
        assert rt.backend == "measured" and rt.detail == "bf16: torch-bf16"
        got = rt.sample(labels, sched, seed=5)
    from flowar import FlowARPipeline
    with FlowARPipeline.from_pretrained(DEFAULT_CKPT, vae=DEFAULT_VAE) as pipe:        # eager fp32
        ref = pipe.runtime.sample(labels, sched, seed=5)
    ps = sorted(psnr_each(got.images, ref.images))
    assert ps[len(ps) // 2] >= 30.0 and ps[-1] < 80, ps                       # bf16 moves them, a little
    # its PyTorch decoder opens without diffusers (2 s of a fresh process): flowar.model.decoder
    import subprocess
    import sys
    probe = (pretend + "import sys; from flowar.runtime.runtime import Runtime\n"
             f"rt = Runtime.open_engine_dir({str(tmp_path / 'bf16')!r})\n"
             "img = rt.sample([3], rt.schedule(), seed=5).images\n"
             "print(type(rt.stages.engines['decode'].module.vae.autoencoder).__name__, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["KLDecoder", "False"], done.stdout + done.stderr
    # on a CPU without bf16 in hardware (emulated there: 1 GFLOP/s), each stage's float32 graph instead, said
    monkeypatch.setattr(flowar.engines.cpu, "cpu_kind",
                        lambda honour_env=True: {"model": "An AVX2 CPU", "flags": ["avx2"]})
    with Runtime.open_engine_dir(tmp_path / "bf16") as rt:
        assert "torch-bf16 needs avx512_bf16 or amx_bf16, which this CPU lacks: ONNX Runtime fp32" in rt.detail
        fell = rt.sample(labels, sched, seed=5)
    assert min(psnr_each(fell.images, ref.images)) >= 60                      # the float32 graphs' images


def test_a_compile_that_would_not_fit_in_max_memory_is_not_a_candidate(fixtures_dir, tmp_path, tiny_v1):
    """--max-memory: a compile estimated to take more than what is left under it is refused before
    it starts (no compiler runs), reported as unavailable with the estimate, and auto chooses among
    the others; with room enough the same stage may compile."""
    from flowar.commands.workbench import Workbench
    from flowar.engines.aoti import compile_memory
    from flowar.errors import FlowARError
    from flowar.export.specs import stage_specs
    from flowar.io.memory import anon_bytes
    model = tiny_v1[0]
    specs = stage_specs(model.config)
    weights = sum(p.nbytes for p in model.parameters() if p.is_floating_point())
    held = anon_bytes()
    ok = Workbench(model, None, specs, {}, tmp_path, 2, max_memory=held + compile_memory(weights) + 1e9)
    ok._check_room("ar")                                          # room: no refusal
    tight = Workbench(model, None, specs, {}, tmp_path, 2, max_memory=held + compile_memory(0) / 2)
    with pytest.raises(FlowARError, match="memory to compile: about"):
        tight._check_room("ar")
    rep = _export(fixtures_dir, tmp_path / "m", ("torch-fp32", "aoti-fp32"), max_memory_gb=0.01)
    assert set(rep.precision.choice.values()) == {"torch-fp32"}
    for stage, ms in rep.precision.measured.items():
        assert "memory to compile" in ms["aoti-fp32"].note and ms["aoti-fp32"].build_s == 0, stage
    assert any("aoti-fp32 unavailable (expected memory to compile" in line for line in rep.lines())
    # the rebuild command a refused file is told repeats the candidates and the limit (it dropped both)
    from flowar.export.manifest import read_manifest
    said = read_manifest(tmp_path / "m").rebuild
    assert " --precision auto --auto-candidates torch-fp32,aoti-fp32 --max-memory 0.01 --max-batch 2 " in said, said


def test_a_candidate_that_cannot_load_here_is_not_a_candidate_and_the_others_are_measured(fixtures_dir, tmp_path,
                                                                                         monkeypatch):
    """A candidate that fails to open or run on this machine (a library the loader refuses, an op its provider lacks)
    is reported unavailable with what it said, as one that cannot compile; it ended the whole export with its
    traceback."""
    from flowar.runtime.engines import OrtEngine

    def refused(self):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nmore of its log")
    monkeypatch.setattr(OrtEngine, "__enter__", refused)
    rep = _export(fixtures_dir, tmp_path / "m", ("torch-fp32", "ort-fp32"))
    assert set(rep.precision.choice.values()) == {"torch-fp32"}
    for stage, ms in rep.precision.measured.items():
        assert ms["ort-fp32"].note == "it failed here: RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Load model failed"
        assert ms["torch-fp32"].note == "" and 0 < ms["torch-fp32"].seconds < float("inf"), stage
    assert any("ort-fp32 unavailable (it failed here: RuntimeError" in line for line in rep.lines())
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["auto"]["choice"]["ar"] == "torch-fp32"


def test_what_other_processes_compute_while_engines_are_timed_is_counted_and_warned(monkeypatch):
    """An export on a machine others were using timed every candidate 2-6x slow and kept all fp32,
    without a word: what other processes compute while the engines are timed is counted (the CPUs'
    busy time less this process's own), recorded, and warned about above a share."""
    import os
    from types import SimpleNamespace

    from flowar.commands.precision import PrecisionReport
    from flowar.engines.cpu import OthersShare
    with monkeypatch.context() as mp:              # known arithmetic: 3 s busy on 2 CPUs over 2 s, 2 s of them ours
        busy, own = iter([100.0, 103.0]), iter([SimpleNamespace(user=9.0, system=1.0, elapsed=50.0),
                                                SimpleNamespace(user=10.5, system=1.5, elapsed=52.0)])
        mp.setattr(OthersShare, "_busy", lambda self: next(busy))
        mp.setattr(os, "times", lambda: next(own))
        mp.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        with OthersShare() as meter:
            pass
        assert meter.share == pytest.approx((3.0 - 2.0) / (2.0 * 2))
    # the CPUs of this process's affinity only, their busy time (steal too; not idle or iowait), less its own: a
    # /proc/stat of known counts (real processes spinning measured the host's other load too)
    import flowar.engines.cpu as cpu

    def stat(ticks: dict[int, tuple[int, int, int]]) -> str:          # cpu -> (user, idle, steal) ticks
        return "cpu 0 0 0 0 0 0 0 0\n" + "".join(f"cpu{c} {u} 0 0 {i} 7 0 0 {st} 0 0\n" for c, (u, i, st) in ticks.items())
    reads = iter([stat({0: (100, 50, 0), 1: (100, 50, 0), 2: (100, 50, 0), 3: (100, 50, 0)}),
                  stat({0: (600, 50, 0), 1: (230, 200, 20), 2: (600, 50, 0), 3: (150, 900, 0)})])
    own = iter([SimpleNamespace(user=9.0, system=1.0, elapsed=50.0), SimpleNamespace(user=10.0, system=1.0, elapsed=52.0)])
    with monkeypatch.context() as mp:
        mp.setattr(cpu, "Path", lambda p: SimpleNamespace(read_text=lambda: next(reads)) if p == "/proc/stat" else Path(p))
        mp.setattr(os, "sched_getaffinity", lambda pid: {1, 3})
        mp.setattr(os, "sysconf", lambda name: 100)                   # ticks per second
        mp.setattr(os, "times", lambda: next(own))
        with OthersShare() as meter:
            pass
    # cpus 1 and 3: (130 + 20) + 50 ticks = 2.0 s busy over 2 s of wall, 1.0 s of it this process's
    assert meter.cpus == [1, 3] and meter.share == pytest.approx((2.0 - 1.0) / (2.0 * 2))
    with OthersShare() as meter:                  # and this machine's own /proc/stat reads
        __import__("time").sleep(0.1)
    assert meter.readable and meter.share is not None
    said = PrecisionReport("auto", {}, {}, others_cpu=0.4).lines()
    assert any("other processes took 40% of this machine's CPU" in line and "export again" in line for line in said)
    assert not any("other processes" in line for line in PrecisionReport("auto", {}, {}, others_cpu=0.01).lines())


def test_the_cpu_generation_is_named_from_its_family_and_model_numbers():
    """Facts from the vendors' numbering: AMD family 25 is Zen 3 and Zen 4 (Genoa is model 0x11),
    26 is Zen 5 (Turin 0x02); Intel family 6 model 143 is Sapphire Rapids. An unknown one shows its
    numbers; a record without them has no generation."""
    from flowar.engines.cpu import cpu_name, generation
    g = {c: generation({"cpuid": c}) for c in ("AuthenticAMD 25 17", "AuthenticAMD 25 1", "AuthenticAMD 26 2",
                                               "GenuineIntel 6 143", "GenuineIntel 6 999")}
    assert g == {"AuthenticAMD 25 17": "Zen 4", "AuthenticAMD 25 1": "Zen 3", "AuthenticAMD 26 2": "Zen 5",
                 "GenuineIntel 6 143": "Sapphire Rapids", "GenuineIntel 6 999": "family 6 model 999"}
    assert generation({"model": "AMD EPYC"}) is None and cpu_name({"model": "AMD EPYC"}) == "AMD EPYC"
    assert cpu_name({"model": "AMD EPYC", "cpuid": "AuthenticAMD 25 17"}) == "AMD EPYC Zen 4"
