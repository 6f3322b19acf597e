"""Orchestration behind ``flowar-export``: checkpoint -> ONNX per stage -> verification ->
engines -> manifest, all inside a staged directory that replaces the target only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flowar.model.checkpoint import load_model
from flowar.errors import FlowARError
from flowar.config import SAMPLING_DEFAULTS

# fp16/bf16 graphs are compared with the fp32 eager reference: they differ by their rounding.
REDUCED_TOLERANCE = {"fp32": None, "fp16": 5e-2, "bf16": 3e-1}


@dataclass(slots=True)
class BuildReport:
    out: Path
    checks: list = field(default_factory=list)          # StageCheck per stage
    seconds: dict[str, float] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)
    auto: object = None                                  # flowar.runtime.precision.AutoReport with --precision auto

    def lines(self) -> list[str]:
        """What flowar-export prints: each stage's check and, with --precision auto, each choice."""
        out = [f"  {c.name:<10} max abs diff vs eager {c.worst:.2e} (tolerance {c.tolerance:.0e}) worst at {c.where}"
               for c in self.checks]
        if self.auto is not None:
            a = self.auto
            for stage, ms in a.measured.items():
                cells = ", ".join(f"{c} {m.seconds * 1e3:.1f} ms (err {m.error:.1e}{'' if m.ok else ', too far'})"
                                  for c, m in ms.items())
                out.append(f"  auto {stage:<10} -> {a.choice[stage]:<10} [{cells}]")
            e = a.end_to_end
            quality = (f"PSNR vs fp32 median {e['psnr_median']:.1f} dB, worst {e['psnr_worst']:.1f} dB"
                       if "psnr_median" in e else f"token error mean {e['token_mean']:.2e}")
            out.append(f"  auto end to end on {e['samples']} samples: {quality}"
                       + (f"; reduced precision rejected for {', '.join(a.fallback)}" if a.fallback else ""))
        return out


def build_engine_dir(ckpt: str | Path, out: str | Path, preset: str | None = None, config_path: str | None = None,
                     vae_path: str | Path | None = None, backend: str = "ort", precision: str = "fp32",
                     max_batch: int = 8, verify: bool = True, use_ema: bool = True,
                     schedule_defaults: dict | None = None, compute_capability: str | None = None,
                     progress: Callable[[str, int], None] | None = None,
                     auto_candidates: tuple[str, ...] | None = None) -> BuildReport:
    """Export, verify, build engines and write the manifest into ``out`` (atomically).

    ``precision="auto"`` exports float32 graphs, then measures the engine and precision
    candidates of each network stage on this machine and records the choice (flowar.runtime.precision);
    ``auto_candidates`` restricts the candidates (e.g. to force bf16 for a measurement).
    """
    from flowar.export.manifest import Manifest, library_versions, sha256_file, staged_directory, write_manifest
    from flowar.export.onnx_export import OPSET, PRECISIONS, ExportError, export_stage, verify_stage
    from flowar.export.specs import stage_specs

    if backend not in ("ort", "trt", "all"):
        raise FlowARError("--backend ort, trt or all", repr(backend), "use --backend ort")
    auto = precision == "auto"
    if precision not in PRECISIONS and not auto:
        raise FlowARError("--precision auto, fp32, fp16 or bf16", repr(precision), "use --precision fp32")
    if auto and backend != "ort":
        raise FlowARError("--precision auto with --backend ort (it measures CPU engines)", f"--backend {backend}",
                          "export TensorRT plans with --precision fp32/fp16/bf16")
    if auto:
        from flowar.runtime.precision import AUTO_STAGES, CANDIDATES
        auto_candidates = tuple(auto_candidates or CANDIDATES)
        bad = [c for c in auto_candidates if c not in CANDIDATES]
        if bad or not auto_candidates:
            raise FlowARError(f"--auto-candidates among {', '.join(CANDIDATES)}", f"{bad or 'none'}",
                              "e.g. --auto-candidates ort-fp32,torch-bf16")
    graph_precision = "fp32" if auto else precision
    if not 1 <= max_batch <= 1024:
        raise FlowARError("--max-batch in 1..1024", str(max_batch), "use e.g. --max-batch 8")
    builder = None
    if backend in ("trt", "all"):
        from flowar.engines.trt import load_builder, polygraphy_trt
        builder = load_builder()                       # fail before any work if TensorRT or Polygraphy is missing
        polygraphy_trt(builder)
    model, ck = load_model(ckpt, preset, config_path, use_ema=use_ema)
    config = ck.config
    vae = None
    if vae_path is not None:
        from flowar.model.vae import load_vae
        vae = load_vae(vae_path, expect_channels=config.latent_channels)
    specs = stage_specs(config, vae.downsample if vae else None)
    # progress(what, of how many steps): export (+ verify) (+ TensorRT) per stage, + auto's measurements
    total = len(specs) * (1 + verify + (builder is not None)) + (len(AUTO_STAGES) * len(auto_candidates) + 1 if auto else 0)
    say = (lambda msg: progress(msg, total)) if progress else (lambda msg: None)
    report = BuildReport(Path(out))
    with staged_directory(out) as tmp:
        stages = {}
        for name, spec in specs.items():
            say(f"export {name}")
            t0 = time.perf_counter()
            module = spec.module(model, vae)
            path = tmp / f"{name}.onnx"
            rows = spec.max_rows(max_batch)
            export_stage(spec, module, config, path, rows, graph_precision)
            report.seconds[f"export {name}"] = time.perf_counter() - t0
            stages[name] = {"file": path.name, "sha256": sha256_file(path), "inputs": list(spec.inputs),
                            "outputs": list(spec.outputs), "tolerance": spec.tolerance, "max_rows": rows}
            if verify:
                say(f"verify {name}")
                t0 = time.perf_counter()
                chk = verify_stage(spec, module, config, path, rows, REDUCED_TOLERANCE[graph_precision])
                report.checks.append(chk)
                stages[name]["verified_max_abs_diff"] = chk.worst
                report.seconds[f"verify {name}"] = time.perf_counter() - t0
        bad = [c for c in report.checks if not c.ok]
        if bad:
            raise ExportError("every stage within its tolerance of eager PyTorch",
                              "; ".join(f"{c.name} differs by {c.worst:.3g} > {c.tolerance:.3g} ({c.where})" for c in bad),
                              "nothing was written; rerun with --debug, or report the model and versions")
        report.backends.append("ort")
        auto_info, weights = None, None
        if auto:
            from flowar.runtime.precision import select
            t0 = time.perf_counter()
            rep = select(model, vae, specs, {n: (tmp / stages[n]["file"], stages[n]["sha256"]) for n in specs},
                         auto_candidates, progress=say)
            report.seconds["auto precision"] = time.perf_counter() - t0
            report.auto = rep
            auto_info = rep.to_manifest()
            if any(c.startswith("torch") for c in rep.choice.values()):       # PyTorch stages need the weights
                from flowar.model.checkpoint import save_checkpoint
                save_checkpoint(tmp / "weights.safetensors", model.state_dict(), config, ck.class_names)
                weights = {"file": "weights.safetensors", "sha256": sha256_file(tmp / "weights.safetensors")}
        trt_info = None
        if builder is not None:
            from flowar.engines.trt import build_plan
            plans = {}
            for name, spec in specs.items():
                say(f"tensorrt {name}")
                t0 = time.perf_counter()
                plans[name] = build_plan(builder, tmp / stages[name]["file"], stages[name]["sha256"], spec, config,
                                         stages[name]["max_rows"], precision, tmp, tmp / "timing.cache",
                                         compute_capability)
                report.seconds[f"tensorrt {name}"] = time.perf_counter() - t0
            trt_info = {"flavour": builder.flavour, "version": builder.version, "plans": plans,
                        "compute_capability": next(iter(plans.values()))["compute_capability"]}
            report.backends.append("trt")
        manifest = Manifest(
            root=tmp, config=config, stages=stages, precision=precision, max_batch=max_batch,
            checkpoint={"file": Path(ckpt).name, "source": str(Path(ckpt).resolve()), "sha256": sha256_file(ckpt),
                        "weights": ck.source},
            class_names=ck.class_names,
            schedule_defaults=schedule_defaults or dict(SAMPLING_DEFAULTS),
            vae=None if vae is None else {"source": str(Path(vae_path).resolve()), "latent_channels": vae.latent_channels,
                                          "downsample": vae.downsample, "image_size": config.latent_size * vae.downsample},
            tensorrt=trt_info, auto=auto_info, weights=weights,
            meta={"opset": OPSET,
                  "scales": [{"side": s, "tokens": n, "seq_begin": b, "seq_end": e} for s, n, b, e in
                             zip(config.scales, config.tokens_per_scale, config.scale_begin, config.scale_end)],
                  "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_manifest(tmp, manifest)
    return report
