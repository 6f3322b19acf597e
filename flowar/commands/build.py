"""Orchestration behind ``flowar-export``, one function per phase:

1. :func:`check_request`: every option checked (and TensorRT's presence) before any work;
2. :func:`export_graphs`: the checkpoint's stages to ONNX, each verified against eager PyTorch;
3. :func:`choose_engines`: on a CPU with ``--precision auto`` or ``bf16``, the engine and precision of each stage
   measured on this machine (:mod:`flowar.commands.precision`), and the weights its PyTorch stages need copied in;
4. :func:`build_plans`: TensorRT plans (``--backend trt|all``);
5. the manifest, written last, inside a staged directory that replaces the target only when complete.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flowar.config import MAX_BATCH, SAMPLING_DEFAULTS
from flowar.errors import CheckpointError, FlowARError
from flowar.export.manifest import MANIFEST, PRECISIONS, VERIFIED, sha256_file

# fp16/bf16 graphs (for TensorRT) differ from the fp32 eager reference by their rounding, which grows with the values, so
# by a fraction of each output's largest magnitude: the shipped model's fp16 velocity 0.47 / 0.72 / 0.90 % at --max-batch
# 1 / 8 / 32 (an absolute 5e-2 refused it at 32); FlowAR-S's 9.2e-3 of a largest 3-6 (~0.2 %); the flow time rounded to
# fp16 before its timestep (a bug, fixed) put FlowAR-S's off by 0.904 (15-30 %).
REDUCED_TOLERANCE = {"fp32": None, "fp16": 3e-2, "bf16": 3e-1}
TIMING_CACHE = "timing.cache"     # full TensorRT's timing cache, kept in the directory for the next export
ALWAYS = {MANIFEST, TIMING_CACHE, VERIFIED, ".ort-cache", ".DS_Store"}   # its names the manifest does not list (macOS's)


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What flowar-export was asked for, checked."""
    ckpt: Path
    out: Path
    preset: str | None = None
    config_path: str | None = None
    vae_path: Path | None = None
    backend: str = "ort"                       # ort, trt, all
    precision: str = "fp32"                    # auto, fp32, fp16, bf16
    max_batch: int = 8
    verify: bool = True
    use_ema: bool = True
    schedule_defaults: dict | None = None
    compute_capability: str | None = None
    candidates: tuple[str, ...] | None = None  # --auto-candidates
    max_memory_gb: float | None = None         # --max-memory: no compile estimated to take more

    @property
    def measured(self) -> bool:
        """Engines chosen per stage by measurement on this CPU (auto, or bf16 without TensorRT)."""
        return self.precision == "auto" or (self.precision == "bf16" and self.backend == "ort")

    @property
    def graph_precision(self) -> str:
        """What the ONNX graphs hold: float32 when engines are chosen by measurement."""
        return "fp32" if self.measured else self.precision


@dataclass(slots=True)
class BuildReport:
    out: Path
    checks: list = field(default_factory=list)          # StageCheck per stage
    seconds: dict[str, float] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # stage -> peak resident GB of its export (+ verify)
    precision: object = None                             # flowar.commands.precision.PrecisionReport (auto, bf16)
    anon_peak_gb: float | None = None                    # the whole export's anonymous peak (file pages not counted)
    notes: list[str] = field(default_factory=list)
    weights: str = ""                                    # which weights of the checkpoint (LoadedCheckpoint.source)
    found: dict = field(default_factory=dict)            # file -> [sha256, *its state when hashed] (Manifest.remember)

    def lines(self) -> list[str]:
        """What flowar-export prints: each stage's check and, for measured precision, each choice."""
        out = [f"  {c.name:<10} max {'' if c.relative else 'abs '}diff vs eager {c.describe()} worst at {c.where}"
               for c in self.checks]
        if self.memory:
            out.append("  peak memory per stage (export" + (" + verify" if self.checks else "") + "): "
                       + ", ".join(f"{s} {gb:.1f} GB" for s, gb in self.memory.items()))
        if self.anon_peak_gb is not None:
            out.append(f"  anonymous memory peak of the whole export: {self.anon_peak_gb:.1f} GB (the pages of "
                       "mapped files, such as the checkpoint, not counted; sampled every 0.2 s)")
        return out + (self.precision.lines() if self.precision is not None else []) + [f"  note: {n}" for n in self.notes]

    def summary(self, precision: str, max_batch: int, decodes: bool = True) -> str:
        """flowar-export's last line: where, what runs (the engine chosen per stage where the export
        measured them; the ONNX graphs stay as the fallback), the batch limit, tokens only (no
        decoder: said here, not first by a later command's refusal) and the time."""
        chose = self.precision.choice if self.precision is not None else {}
        if chose:
            kinds = set(chose.values())
            runs = f"{precision}: " + (f"{kinds.pop()} for every stage" if len(kinds) == 1 else
                                       ", ".join(f"{s} {c}" for s, c in chose.items()))
            runs += "; TensorRT plans" if "trt" in self.backends else ""
        else:
            runs = f"{', '.join(self.backends)}, {precision}"
        tokens = "" if decodes else "; tokens only, no decoder: export with --vae for images"
        # a training checkpoint holds two sets: which one runs (it was said in the manifest only)
        tokens += {"model_ema": "; its EMA weights", "model": "; its raw weights"}.get(self.weights, "")
        return (f"engine directory -> {self.out} ({runs}, max batch {max_batch}{tokens}) in "
                f"{sum(self.seconds.values()):.0f} s")


def check_request(req: ExportRequest):
    """Refuse what cannot be built before any work; the TensorRT builder when plans are asked for."""
    if req.backend not in ("ort", "trt", "all"):
        raise FlowARError("--backend ort, trt or all", repr(req.backend), "use --backend ort")
    if req.precision not in PRECISIONS:
        raise FlowARError("--precision auto, fp32, fp16 or bf16", repr(req.precision), "use --precision fp32")
    if req.precision == "bf16" and req.backend == "all":
        raise FlowARError("--precision bf16 with --backend trt (TensorRT plans) or ort (CPU engines measured in bf16)",
                          "--backend all: ONNX Runtime has no bf16 kernels to run bf16 graphs on a CPU",
                          "use --backend trt, or --backend ort, or --precision fp16 with --backend all")
    if req.precision == "auto" and req.backend != "ort":
        raise FlowARError("--precision auto with --backend ort (it measures CPU engines)", f"--backend {req.backend}",
                          "export TensorRT plans with --precision fp32/fp16/bf16")
    if req.candidates is not None:
        from flowar.runtime.candidates import CANDIDATES, REDUCED
        bad = [c for c in req.candidates if c not in CANDIDATES]
        if not req.measured:
            raise FlowARError("--auto-candidates with --precision auto or bf16", f"--precision {req.precision}",
                              "drop --auto-candidates")
        if bad or not req.candidates:
            raise FlowARError(f"--auto-candidates among {', '.join(CANDIDATES)}", f"{bad or 'none'}",
                              "e.g. --auto-candidates ort-fp32,torch-bf16")
        if req.precision == "bf16" and not set(req.candidates) & set(REDUCED):    # (found after the export)
            raise FlowARError(f"--auto-candidates with a bf16 engine for --precision bf16 ({' or '.join(REDUCED)})",
                              ",".join(req.candidates), f"add {REDUCED[0]}, or use --precision auto")
    if req.max_memory_gb is not None and not 0 < req.max_memory_gb < float("inf"):     # (inf: Infinity in the JSON)
        raise FlowARError("--max-memory in GB, > 0 and finite", repr(req.max_memory_gb), "use e.g. --max-memory 16")
    # options that would do nothing here are refused, not ignored
    if req.max_memory_gb is not None and not req.measured:
        raise FlowARError("--max-memory with --precision auto or bf16 (it bounds their compiles)",
                          f"--precision {req.precision}", "drop --max-memory")
    if req.compute_capability is not None and req.backend == "ort":
        raise FlowARError("--compute-capability with --backend trt or all (the TensorRT plans' GPU)", "--backend ort",
                          "drop --compute-capability, or add --backend trt")
    if req.vae_path is not None and not Path(req.vae_path).exists():
        raise FlowARError("a VAE at --vae (MAR kl16.ckpt or a diffusers folder)", f"no file or folder at {req.vae_path}",
                          "check the --vae path, or omit --vae for tokens only")
    if not 1 <= req.max_batch <= MAX_BATCH:
        raise FlowARError(f"--max-batch in 1..{MAX_BATCH}", str(req.max_batch), "use e.g. --max-batch 8")
    from flowar.io.files import check_replaceable
    check_replaceable(req.out, MANIFEST, "--out", (req.ckpt, req.vae_path, req.config_path), owned=exported_names)
    if req.backend in ("trt", "all"):
        from flowar.engines.trt import load_builder, plan_target, polygraphy_trt
        builder = load_builder()                       # fail before any work if TensorRT or Polygraphy is missing
        polygraphy_trt(builder)
        plan_target(builder, req.compute_capability)   # (a target it cannot build for: refused after every graph)
        return builder
    return None


def exported_names(directory: Path) -> set[str]:
    """The names an export wrote at the top of ``directory``: its manifest, what that lists and full TensorRT's
    timing cache; where the manifest is refused, what it still names and the names an export gives files;
    none where it is another tool's (a web app's folder, with its manifest.json, was replaced whole)."""
    from flowar.export.manifest import FORMAT, STAGES, read_manifest
    from flowar.io.files import files_of
    from flowar.runtime.candidates import GROUPS
    try:
        m = read_manifest(directory)
    except FlowARError:                 # (refused, e.g. a stage's record missing: the files it still names are ours)
        try:
            rec = json.loads((Path(directory) / MANIFEST).read_text())
        except (OSError, ValueError):   # (unreadable: a damaged export's, whose files are named as an export names them)
            rec = {"format": FORMAT}
        top = Path(directory).resolve()
        names = {f.relative_to(top).parts[0] for f in files_of(Path(directory))[1:] if f.is_relative_to(top)}
        ours = {c.name for c in top.iterdir() if c.name.split(".")[0] in (*STAGES, *GROUPS.values())
                and c.name.endswith((".onnx", ".onnx.data", ".so", ".safetensors", ".plan"))}
        return ALWAYS | names | ours if isinstance(rec, dict) and rec.get("format") == FORMAT else set()
    return ALWAYS | {Path(rel).parts[0] for rel, _ in m.members()}


def _require_disk(req: ExportRequest, model, vae, specs: dict) -> None:
    """Refuse, before the export's work, a disk without room for what it writes, counted from the weights it exports
    (not the checkpoint's file, which may hold optimizer state and a second set of weights), per graph: what each
    stage reads (:func:`~flowar.runtime.candidates.stage_tensors`; the head's weights once, in the velocity's graph:
    head_prep's keeps the few it uses). Each graph holds its weights once (half in fp16/bf16), ONNX Runtime's
    optimized copy of a graph without external data once more in float32 (fp16 weights are widened there), compiled
    engines (measured precision) once more, TensorRT plans once more in the graphs' precision; 10 % and 256 MB for
    caches and logs (at most the need again, and 16 MB)."""
    from flowar.export.onnx_export import EXTERNAL_DATA_BYTES
    from flowar.io.memory import require_free_space
    from flowar.runtime.candidates import stage_tensors
    half = 0.5 if req.graph_precision in ("fp16", "bf16") else 1.0
    parts = [sum(t.nbytes for t in stage_tensors(s, spec.module(model, vae)).values())     # float32 bytes per graph
             for s, spec in specs.items() if s != "head_prep"]
    weights = sum(parts)
    # a graph above EXTERNAL_DATA_BYTES keeps its weights beside it and gets no optimized copy (bf16 graphs: no
    # CPU session, no copy)
    cached = 0 if req.graph_precision == "bf16" else sum(p for p in parts if p * half <= EXTERNAL_DATA_BYTES)
    need = weights * half + cached + weights * req.measured + weights * half * (req.backend != "ort")
    require_free_space(req.out.parent, int(need * 1.1) + min(256 << 20, int(need) + (16 << 20)),   # (270 MB for 15)
                       f"the engine directory ({weights / 1e9:.2f} GB of weights: graphs, optimized copies"
                       + (", compiled engines" if req.measured else "") + (", TensorRT plans" if req.backend != "ort" else "")
                       + ")")


def export_graphs(req: ExportRequest, model, vae, specs: dict, tmp: Path, report: BuildReport, say) -> dict:
    """Each stage to ONNX (and verified), one at a time; the manifest's ``stages`` records, with the peak resident
    memory of each stage's export and verification. Failures are collected over every stage before raising."""
    from flowar.export.onnx_export import ExportError, export_stage, verify_stage
    from flowar.io.memory import GB, peak_rss, release_free_memory, reset_peak
    stages = {}
    for name, spec in specs.items():
        say(f"export {name}")
        reset_peak()
        t0 = time.perf_counter()
        module = spec.module(model, vae)
        path = tmp / f"{name}.onnx"
        rows = spec.max_rows(req.max_batch)
        files = export_stage(spec, module, model.config, path, rows, req.graph_precision)
        report.seconds[f"export {name}"] = time.perf_counter() - t0
        rec = {"file": path.name, "sha256": sha256_file(path, report.found), "inputs": list(spec.inputs),
               "outputs": list(spec.outputs), "max_rows": rows, "tolerance": REDUCED_TOLERANCE[req.graph_precision] or spec.tolerance}
        if len(files) > 1:                             # weights as external data beside the graph
            rec |= {"data": files[1].name, "data_sha256": sha256_file(files[1], report.found)}
        rec["bytes"] = sum(f.stat().st_size for f in files)
        if req.verify and req.graph_precision == "bf16":   # (ONNX Runtime's CPU provider: no bf16 MatMul)
            if not report.notes:
                report.notes.append("bf16 graphs are not verified here: ONNX Runtime has no bf16 kernels on a CPU; "
                                    "compare where the plans run: flowar-judge --engine-dir DIR --vs-engine-dir "
                                    "an fp32 export")
        elif req.verify:
            say(f"verify {name}")
            t0 = time.perf_counter()
            chk = verify_stage(spec, module, model.config, path, rows, rec["tolerance"],
                               relative=req.graph_precision != "fp32")
            report.checks.append(chk)
            rec["verified_max_rel_diff" if chk.relative else "verified_max_abs_diff"] = chk.worst
            report.seconds[f"verify {name}"] = time.perf_counter() - t0
        if len(files) == 1:
            # ONNX Runtime's optimized copy for this CPU, made here (where opening would make it, .ort-cache), so
            # that the first command pays no optimization; graphs with external data have none
            from flowar.engines.ort import create_session
            t0 = time.perf_counter()
            try:
                create_session(path, rec["sha256"], "CPUExecutionProvider", None, tmp / ".ort-cache", path)
            except Exception:     # noqa: BLE001 - a graph ONNX Runtime's CPU provider cannot run (e.g. bf16 for
                pass              # TensorRT) needs no copy; verification, when asked, reports what fails
            report.seconds[f"optimize {name}"] = time.perf_counter() - t0
        del module
        release_free_memory()           # what the exporter and ONNX Runtime freed, before the next stage
        rec["peak_rss_gb"] = round(peak_rss() / GB, 2)
        report.memory[name] = rec["peak_rss_gb"]
        stages[name] = rec
    if bad := [c for c in report.checks if not c.ok]:
        raise ExportError("every stage within its tolerance of eager PyTorch",
                          "; ".join(f"{c.name} differs by {c.describe()} ({c.where})" for c in bad),
                          "nothing was written; rerun with --debug, or report the model and versions")
    return stages


def choose_engines(req: ExportRequest, model, ck, vae, specs: dict, stages: dict, tmp: Path, report: BuildReport,
                   say) -> dict:
    """The manifest's ``auto``, ``engines``, ``weights`` and ``call_plan``: the engine of each stage measured and chosen
    on this CPU, stored in the form it runs (a compiled package, or the weights of an eager PyTorch stage in the
    precision it runs, each with its sha256), and the call plan measured on those engines."""
    from flowar.commands.plan import measure_plan
    from flowar.commands.precision import select
    from flowar.commands.workbench import Workbench
    from flowar.engines.cpu import compiled_for
    from flowar.io.memory import GB
    from flowar.io.tensors import save_tensors
    from flowar.runtime.candidates import COMPILED, GROUPS, stage_module, stage_tensors
    from flowar.sampling.schedule import Settings
    t0 = time.perf_counter()
    (compiled := tmp / ".candidates").mkdir()
    bench = Workbench(model, vae, specs, {n: (tmp / stages[n]["file"], stages[n]["sha256"]) for n in specs}, compiled,
                      req.max_batch, max_memory=req.max_memory_gb * GB if req.max_memory_gb else None)
    rep = select(bench, "auto" if req.precision == "auto" else "bf16", req.candidates, progress=say)
    report.precision = rep
    # the plan's seconds per image are for the directory's own default schedule (what a served image counts in)
    plan = measure_plan(bench, rep.choice, req.max_batch, Settings().resolve(model.config.n_scales,
                                                                             req.schedule_defaults), progress=say)
    engines, weights = {}, {}
    for stage, cand in rep.choice.items():
        if cand in COMPILED:
            dst = tmp / bench.packages[(stage, cand)].name
            bench.packages[(stage, cand)].rename(dst)
            engines[stage] = {"candidate": cand, "file": dst.name, "sha256": sha256_file(dst, report.found), "cpu": compiled_for()}
        elif cand.startswith("torch"):
            key = f"{GROUPS[stage]}.{cand}"
            if key not in weights:
                save_tensors(tmp / f"{key}.safetensors", stage_tensors(stage, stage_module(cand, specs[stage], model, vae)))
                weights[key] = {"file": f"{key}.safetensors", "sha256": sha256_file(tmp / f"{key}.safetensors", report.found)}
            engines[stage] = {"candidate": cand, "weights": key}
    shutil.rmtree(compiled)
    report.seconds["compile engines"] = sum(bench.build_s.values())
    report.seconds["choose engines"] = time.perf_counter() - t0 - report.seconds["compile engines"]
    asked = {"candidates": list(req.candidates) if req.candidates else None, "max_memory_gb": req.max_memory_gb}
    return {"auto": rep.to_manifest() | asked, "engines": engines, "weights": weights, "call_plan": plan}


def build_plans(req: ExportRequest, builder, specs: dict, stages: dict, config, tmp: Path, report: BuildReport,
                say) -> dict:
    from flowar.engines.trt import build_plan
    plans = {}
    for name, spec in specs.items():
        say(f"tensorrt {name}")
        t0 = time.perf_counter()
        plans[name] = build_plan(builder, tmp / stages[name]["file"], stages[name]["sha256"], spec, config,
                                 stages[name]["max_rows"], req.precision, tmp, tmp / TIMING_CACHE, req.compute_capability)
        report.seconds[f"tensorrt {name}"] = time.perf_counter() - t0
    return {"flavour": builder.flavour, "version": builder.version, "plans": plans,
            "compute_capability": next(iter(plans.values()))["compute_capability"]}


def build_engine_dir(ckpt: str | Path, out: str | Path, *, preset: str | None = None, config_path: str | None = None,
                     vae_path: str | Path | None = None, backend: str = "ort", precision: str = "fp32",
                     max_batch: int = 8, verify: bool = True, use_ema: bool = True,
                     schedule_defaults: dict | None = None, compute_capability: str | None = None,
                     progress: Callable[[str, int], None] | None = None,
                     auto_candidates: tuple[str, ...] | None = None, max_memory_gb: float | None = None) -> BuildReport:
    """Export, verify, choose engines, build plans and write the manifest into ``out`` (atomically).

    ``precision``: ``fp32``/``fp16``/``bf16`` graphs (with ``--backend trt|all``, bf16 and fp16
    are TensorRT's strongly typed graphs); on the CPU (``--backend ort``) ``bf16`` takes the
    fastest bf16 engines of this machine per stage and ``auto`` the fastest that samples like
    float32 (:mod:`flowar.commands.precision`). ``auto_candidates`` restricts their candidates;
    ``max_memory_gb`` keeps compiles out that would take more (estimated), else what is available.
    """
    from flowar.export.manifest import Manifest, library_versions, read_manifest, vae_sha256, write_manifest
    from flowar.io.files import file_state, staged_directory
    from flowar.export.onnx_export import OPSET
    from flowar.export.specs import stage_specs
    from flowar.model.checkpoint import check_vae, load_model, read_checkpoint
    req = ExportRequest(Path(ckpt), Path(out), preset, config_path, Path(vae_path) if vae_path else None, backend,
                        precision, max_batch, verify, use_ema, schedule_defaults, compute_capability,
                        tuple(auto_candidates) if auto_candidates is not None else None, max_memory_gb)
    builder = check_request(req)
    try:                # (hashed before it is loaded: the export is of the file recorded; unreadable: the reader's line)
        ckpt_sha256 = sha256_file(req.ckpt, read := {})
    except OSError:
        read_checkpoint(req.ckpt)
        raise
    model, ck = load_model(req.ckpt, req.preset, req.config_path, use_ema=req.use_ema, mapped=True)   # (checked below)
    config = ck.config
    vae = None
    if req.vae_path is not None:
        from flowar.model.vae import load_vae
        vae = load_vae(req.vae_path, expect_channels=config.latent_channels, decode_only=True)
        check_vae(ck, req.vae_path)
    specs = stage_specs(config, vae.downsample if vae else None)
    _require_disk(req, model, vae, specs)
    # progress(what, of how many steps): export (+ verify) (+ TensorRT) per stage, + the precision choice
    total = len(specs) * (1 + (req.verify and req.graph_precision != "bf16") + (builder is not None)) + (len(specs) * 5 + 6 if req.measured else 0)
    say = (lambda msg: progress(msg, total)) if progress else (lambda msg: None)
    report = BuildReport(req.out, weights=ck.source if ck.source == "model_ema" or not req.use_ema else "")   # (of two sets)
    from flowar.io.memory import GB, AnonPeak
    with AnonPeak() as anon, staged_directory(req.out, MANIFEST, owned=exported_names) as tmp:
        stages = export_graphs(req, model, vae, specs, tmp, report, say)
        if req.graph_precision != "bf16":              # (bf16 graphs run as TensorRT plans only)
            report.backends.append("ort")
        from flowar.engines.cpu import fast_bf16
        if req.precision == "fp32" and req.backend == "ort" and fast_bf16():
            report.notes.append("this CPU computes bf16 in hardware: --precision auto measures bf16 and compiled engines "
                                "and keeps the fastest that samples like fp32 (FlowAR-S, Intel Xeon with AMX: its first "
                                "image 3.5x faster than eager's, these fp32 graphs' 1.04x; its export 6-7 minutes)")
        chosen = choose_engines(req, model, ck, vae, specs, stages, tmp, report, say) if req.measured else {}
        trt_info = None
        if builder is not None:
            trt_info = build_plans(req, builder, specs, stages, config, tmp, report, say)
            report.backends.append("trt")
        manifest = Manifest(
            root=tmp, config=config, stages=stages, precision=req.precision, max_batch=req.max_batch,
            checkpoint={"file": req.ckpt.name, "source": str(req.ckpt.resolve()), "sha256": ckpt_sha256,
                        "weights": ck.source, "data": ck.metadata.get("data"),
                        "vae_sha256": ck.metadata.get("vae_sha256"),     # (the VAE it was trained with: flowar-check)
                        # (how its config was given: what a rebuild passes again)
                        "config": (f"--preset {req.preset}" if req.preset else
                                   f"--config {shlex.quote(str(Path(req.config_path).resolve()))}" if req.config_path
                                   else "in the file")},
            class_names=ck.class_names,
            schedule_defaults=req.schedule_defaults or dict(SAMPLING_DEFAULTS),
            vae=None if vae is None else {"source": str(req.vae_path.resolve()), "sha256": vae_sha256(req.vae_path),
                                          "latent_channels": vae.latent_channels,
                                          "downsample": vae.downsample, "image_size": config.latent_size * vae.downsample,
                                          "config": dict(vae.autoencoder.config)},
            tensorrt=trt_info, **chosen,
            meta={"opset": OPSET,
                  "scales": [{"side": s, "tokens": n, "seq_begin": b, "seq_end": e} for s, n, b, e in
                             zip(config.scales, config.tokens_per_scale, config.scale_begin, config.scale_end)],
                  "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if file_state(req.ckpt) != read[req.ckpt.name][1:]:     # (a training's checkpoint-last written meanwhile)
            raise CheckpointError(f"{req.ckpt} unchanged while it is exported", "a file changed since it was read",
                                  "export again once nothing writes it (or export a copy)")
        write_manifest(tmp, manifest)
    # the files it wrote recorded as found whole (.verified.json) where their state is still the one they were
    # hashed in (their modes set, their folder renamed), so that the first command after it hashes none again
    done = read_manifest(req.out)
    done.remember({rel: report.found[rel] for rel, _ in done.members()
                   if rel in report.found and report.found[rel][1:] == file_state(done.member(rel))})
    report.anon_peak_gb = anon.peak / GB if anon.peak is not None else None
    return report
