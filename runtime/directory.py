"""What an engine directory holds, opened as engines: the backend this machine runs it on, each
stage's engine in the form the export stored it, every file checked against its sha256 (in the
pass that reads it, or once: a file found whole is recorded with its state and not hashed again
while that holds, :meth:`~flowar.export.manifest.Manifest.checked`), and nothing read that the
chosen engines do not use.

* ONNX Runtime: the session is made from the optimized copy cached beside the graphs (checked
  against the hash written when it was made), else from the graph's bytes, hashed (a graph with
  its weights in external data is checked in one streaming pass, then opened by path);
* a compiled package (``aoti-*``): checked, then loaded as it is; refused on a CPU that lacks a
  flag the export CPU had (code compiled for it would stop with an illegal instruction), and
  replaced by the stage's ONNX graph on ONNX Runtime, which is said in the detail line;
* eager PyTorch (``torch-*``): the stage's module built without initialising its weights and given
  the tensors of its weights file, checked and memory-mapped, already in the precision it runs;
* TensorRT: each plan's bytes, hashed, deserialized.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from flowar.errors import FlowARError
from flowar.export.manifest import Manifest, read_manifest, vae_sha256

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "ort", "trt", "torch")
WARM_SETUP_S = 0.25   # set-up (s) above which an engine's shapes are run once at open instead of in the first image


def _trt_usable(m: Manifest) -> tuple[bool, str]:
    info = m.tensorrt
    if not info:
        return False, "the directory has no TensorRT plans"
    return _probe(info["flavour"], info["version"], info.get("compute_capability"))


@functools.lru_cache(maxsize=8)
def _probe(flavour: str, version: str, target: str | None) -> tuple[bool, str]:
    """Whether plans of this flavour, version and target run here (once per process: it imports
    TensorRT and starts CUDA)."""
    info = {"flavour": flavour, "version": version, "compute_capability": target}
    import torch                    # (late: choosing a backend needs PyTorch only where there are plans)
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        from flowar.engines.trt import gpu_compute_capability, load_builder
        b = load_builder(info["flavour"])
    except FlowARError:
        return False, "TensorRT is not installed"
    if (b.flavour, b.version) != (info["flavour"], info["version"]):
        return False, f"plans built by {info['flavour']} {info['version']}, this is {b.flavour} {b.version}"
    cc = gpu_compute_capability()
    if info.get("compute_capability") not in (cc, None):
        return False, f"plans built for {info['compute_capability']}, this GPU is {cc}"
    return True, ""


def trt_unused(m: Manifest, requested: str, gpu: bool, chosen: str) -> str:
    """Why a directory's TensorRT plans do not run ("" where it has none, or they run): what the
    automatic choice found (probed once), or that they were not asked for (--backend, --device cpu)."""
    if not m.tensorrt or chosen == "trt":
        return ""
    return _trt_usable(m)[1] if requested == "auto" and gpu else "not asked for"


def engines_named(precision: str, ran: dict[str, str]) -> str:
    """The engines of a directory's measured choice as every command names them: "auto: aoti-bf16",
    or per stage where they differ ("auto: ar aoti-bf16, ..., decode ort-fp32")."""
    kinds = list(ran.values())
    return f"{precision}: " + (kinds[0] if len(set(kinds)) == 1 else ", ".join(f"{n} {e}" for n, e in ran.items()))


def backend_named(m: Manifest, chosen: str) -> str:
    """A backend as users are told it: the directory's measured choice by its engines ("auto: aoti-bf16":
    "measured" is no --backend), else its name ("ort")."""
    return engines_named(m.precision, {s: m.choice.get(s, "ort-fp32") for s in m.stages}) if chosen == "measured" \
        else chosen


def choose_backend(m: Manifest, requested: str = "auto", gpu: bool = True) -> str:
    """The backend an engine directory runs on here: what ``requested`` names, or for ``auto``
    TensorRT where its plans fit this GPU and TensorRT (unless ``gpu`` is off: ``--device cpu``),
    else the engines the directory's ``--precision auto|bf16`` measured and chose (``measured``),
    else ONNX Runtime. Every command decides here."""
    if requested not in BACKENDS:
        raise FlowARError(f"--backend one of {', '.join(BACKENDS)}", repr(requested), "use --backend auto")
    chosen = requested
    if requested == "auto":                     # (no plans: nothing to probe)
        chosen = "trt" if gpu and m.tensorrt and _trt_usable(m)[0] else ("measured" if m.choice else "ort")
    elif requested == "trt":
        ok, why = _trt_usable(m)
        if not ok:                  # (the fix follows the reason: rebuilding on a machine without a GPU cannot help)
            here = re.sub(r" --compute-capability \S+", "", m.rebuild.removeprefix("rebuild it: "))   # (this GPU's)
            fix = ("export it with plans (flowar-export --backend trt)" if not m.tensorrt else
                   "run it on a machine with an NVIDIA GPU" if why == "no CUDA GPU" else
                   f"install {m.tensorrt['flavour']}, which built the plans" if why == "TensorRT is not installed" else
                   f"rebuild the plans on this machine: {here}")
            raise FlowARError("a TensorRT-ready engine directory and GPU for --backend trt", why,
                              f"{fix}, or use --backend ort")
    if chosen == "ort" and m.precision == "bf16" and not m.choice:
        raise FlowARError("engines this machine runs", "bf16 graphs for TensorRT only (ONNX Runtime has no bf16 "
                          "kernels on a CPU)" + (f", and no TensorRT plans usable here ({_trt_usable(m)[1]})"
                                                  if m.tensorrt else ""),
                          f"run on the GPU the plans were built for; here, flowar-run --engine-dir {m.root} --backend "
                          f"torch runs its checkpoint in float32 and flowar-run --ckpt {m.exported_checkpoint[0]} --precision bf16 in bf16 GEMMs, or "
                          "export for this machine: flowar-export --precision bf16 --backend ort (measured CPU engines) "
                          "or flowar-export --precision fp32")
    return chosen


def trt_engines(m: Manifest, specs: dict, asked: torch.device | None = None):
    """(engines, device, detail): the directory's TensorRT plans (not entered); the stages, which
    never run at once, share one block of scratch memory. They run on the first visible GPU: another
    one ``asked`` for (``--device cuda:1``) is refused (it ran on GPU 0 in silence)."""
    from flowar.device import first_visible_gpu
    first_visible_gpu(asked, "TensorRT's plans")
    from flowar.engines.trt import load_builder
    from flowar.runtime.engines import SharedDeviceMemory, TrtEngine
    import torch
    b, dev = load_builder(m.tensorrt["flavour"]), torch.device("cuda")
    shared = SharedDeviceMemory(dev)
    plans = m.tensorrt["plans"]
    return ({n: TrtEngine(n, m.read_checked(plans[n]["file"], plans[n]["sha256"]), b.trt, shared) for n in specs}, dev,
            f"{b.flavour} {b.version}")


def directory_engines(m: Manifest, specs: dict, choice: dict[str, str], chosen: str, threads: int, provider: str,
                      device: torch.device, ckpt: str | Path | None = None, unused: str = "") -> tuple[dict, str]:
    """(engines not yet entered, the detail line): each stage on the engine ``choice`` names
    (ONNX Runtime where it names none), in the form the export stored it. ``chosen == "torch"``:
    the reference modules of the checkpoint the directory was exported from (``ckpt`` if it moved)."""
    from flowar.engines.cpu import FAST_BF16, describe, fast_bf16, missing_for, same_cpu
    from flowar.engines.ort import split_limits
    from flowar.runtime.candidates import COMPILED, assign_tensors, stage_module
    from flowar.runtime.engines import AotiEngine, OrtEngine, TorchEngine
    if chosen == "torch":
        model, vae = exported_from(m, device, ckpt)
        return ({n: TorchEngine(n, s.module(model, vae), s.inputs, s.outputs) for n, s in specs.items()},
                f"eager PyTorch on {device}")
    engines, fallback, mapped, skeletons = {}, {}, {}, {}
    for stage, spec in specs.items():
        cand, rec = choice.get(stage, "ort-fp32"), (m.engines or {}).get(stage, {})
        if cand in COMPILED and missing_for(rec.get("cpu", {})):
            lacks = missing_for(rec["cpu"])
            fallback.setdefault((cand, ", ".join(lacks[:4]) + ", ..." * (len(lacks) > 4)), []).append(stage)
            cand = "ort-fp32"
        elif cand == "torch-bf16" and not fast_bf16():
            # it would run, but in emulated bf16: a 1024^3 GEMM at 1 GFLOP/s against 135 in float32
            fallback.setdefault((cand, " or ".join(FAST_BF16)), []).append(stage)
            cand = "ort-fp32"
        if cand in COMPILED:
            engines[stage] = AotiEngine(stage, m.checked(rec["file"], rec["sha256"]), spec.inputs, spec.outputs)
        elif cand.startswith("torch"):
            key = rec["weights"]
            if key not in mapped:
                from flowar.io.tensors import map_safetensors
                w = m.weights[key]
                mapped[key] = map_safetensors(m.checked(w["file"], w["sha256"]))
            model, vae = _skeleton_modules(m, skeletons, stage == "decode")
            engines[stage] = TorchEngine(stage, assign_tensors(stage, stage_module(cand, spec, model, vae), mapped[key]),
                                         spec.inputs, spec.outputs)
        else:
            # a graph with external data is checked here and opened from its path; any other is read
            # (and checked) only where ONNX Runtime's optimized copy is not cached or the graph's file
            # changed since the copy was made (create_session)
            info = m.stages[stage]
            graph = (m.checked(info["file"], info["sha256"]) if "data" in info and m.checked(info["data"],
                     info["data_sha256"]) else functools.cache(functools.partial(m.read_checked, info["file"],
                                                                                 info["sha256"])))
            engines[stage] = OrtEngine(stage, graph, info["sha256"], spec.row_tensors, provider, m.root / ".ort-cache",
                                       threads, *split_limits(stage, m.config), source=m.member(info["file"]),
                                       expect=tuple(spec.shapes(k, r)[spec.inputs[0]] for k in spec.scales
                                                    for r in {1, spec.rows_per_sample}))   # (batch 1's calls)
    # Warmed at open: the engines whose first calls (one per scale) cost at least WARM_SETUP_S more
    # than later ones, by the export's measurement. Warming runs each shape once on zeros, i.e. costs
    # the calls themselves: for an engine that sets up little (a PyTorch fp32 decoder: 0.04 s against
    # 0.7 s per call on FlowAR-S's VAE) it would only add to the command. Without a record, the
    # engine's own default (eager PyTorch warms; the others set up little).
    fell = {n for stages in fallback.values() for n in stages}
    ran = [("ort-fp32" if n in fell else choice.get(n, "ort-fp32")) for n in specs]
    measured = (m.auto or {}).get("measured", {})
    for (stage, eng), cand in zip(engines.items(), ran):
        rec = measured.get(stage, {}).get(cand)
        if rec is not None and "setup_s" in rec:
            eng.warm = rec["setup_s"] >= WARM_SETUP_S
    if chosen == "ort":       # (fp16 graphs: said; plans it has but does not run here: why)
        return engines, f"ONNX Runtime {provider}" + (f", {m.precision} graphs" if m.precision == "fp16" else "") + (
            f"; its TensorRT plans unused ({unused})" if unused else "")
    notes = [f"{', '.join(stages)} {cand} {'compiled for' if cand in COMPILED else 'needs'} {flags}, which this CPU "
             f"lacks: ONNX Runtime fp32 instead (re-export here to {'compile' if cand in COMPILED else 'choose'} for "
             "this CPU)" for (cand, flags), stages in fallback.items()]
    detail = engines_named(m.precision, dict(zip(specs, ran)))
    measured_on = (m.auto or {}).get("machine", {})
    if measured_on and not same_cpu(measured_on):
        detail += f" (measured on {describe(measured_on)}; re-export here to measure this CPU)"
    return engines, detail + "".join(f"; {n}" for n in notes)


def _skeleton_modules(m: Manifest, cache: dict, vae: bool):
    """(model, vae) built from the manifest (structure only: parameters allocated, never written):
    what a stage's module is cut from before it is given its mapped tensors. Only what the stage
    reads: the decoder (``vae``) or the FlowAR model (None for the other)."""
    key = "vae" if vae else "model"
    if key not in cache:
        from flowar.model.checkpoint import skeleton
        with skeleton():
            if vae:
                from flowar.model.decoder import KLDecoder          # the decoder alone, without importing diffusers
                from flowar.model.vae import VAE
                cache[key] = VAE(KLDecoder(m.vae["config"]))
            else:
                from flowar.model.ar import FlowAR
                cache[key] = FlowAR(m.config)
    return (None, cache[key]) if vae else (cache[key], None)


def exported_from(m: Manifest | str | Path, device: torch.device | str = "cpu", ckpt: str | Path | None = None):
    """(model, vae or None): the checkpoint (and VAE) an engine directory was exported from, in
    eager PyTorch on ``device``: its reference. The checkpoint must be the very file (sha256) the
    export recorded."""
    from flowar.model.checkpoint import load_model
    m = m if isinstance(m, Manifest) else read_manifest(m)
    recorded, digest, ema = m.exported_checkpoint
    src = Path(ckpt) if ckpt else recorded
    if not src.is_file() or not m.hashes_to(src, digest, f"checkpoint {src.resolve()}"):     # (hashed once, as members)
        raise FlowARError("the checkpoint the engine directory was exported from",
                          f"{src if str(src) not in ('', '.') else 'no path'} (missing or a different file)",
                          f"put it back at {recorded}, or pass it with --ckpt beside --engine-dir (flowar-run), or "
                          "use another --backend, or re-export the directory")
    model, _ = load_model(src, config=m.config, use_ema=ema, device=device)
    vae = None
    if m.vae:
        from flowar.model.vae import load_decoder
        _check_vae(m)
        vae = load_decoder(m.vae["source"], expect_channels=m.config.latent_channels).to(device)
    return model, vae


def _check_vae(m: Manifest) -> None:
    """The VAE at ``m.vae["source"]`` refused unless it hashes to the sha256 the export recorded (a
    changed VAE file gave other images with exit 0; a file, as MAR's kl16.ckpt, hashed once, as the
    checkpoint; a diffusers folder on every open). A manifest written before the hash was recorded
    has none: its VAE opens as before, unchecked."""
    rec = m.vae
    src = Path(rec["source"])
    if "sha256" in rec and not (src.is_file() and m.hashes_to(src, rec["sha256"], f"vae {src.resolve()}") or
                                src.is_dir() and vae_sha256(src) == rec["sha256"]):
        raise FlowARError("the VAE the engine directory was exported from", f"{src} (missing or a different file)",
                          f"put it back at {src}, or use another --backend, or re-export the directory")
