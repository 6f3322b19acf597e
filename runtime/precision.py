"""``flowar-export --precision auto``: per stage, the fastest engine and precision that is accurate
enough, measured on this machine.

Candidates for the network stages (AR, head preparation, velocity):

* ``ort-fp32``: the exported ONNX graph on ONNX Runtime;
* ``torch-fp32``: the reference module in eager PyTorch (oneDNN GEMMs; on some CPUs faster than
  ONNX Runtime for wide models);
* ``torch-bf16``: the same with weights and activations stored in bfloat16, float32 in and out
  (fast only where the CPU computes bf16: AMX or AVX512-BF16; emulated, and slow, elsewhere).

The VAE decoder stays ONNX Runtime fp32: it is a small share of the work and was not measured
safe in bf16. The ODE state stays float64 in the sampler whatever the stages compute in.

How it chooses: each candidate's time per sample is measured with the engine the runtime would
use (batch 1: two rows with guidance, at every scale, weighted by the official schedule's calls
per scale), and its error against the float32 reference module on the same inputs. A stage takes
the fastest candidate within its tolerance (the export tolerance for fp32, a wide one for bf16,
which is then judged end to end). The chosen combination must then sample like float32: on
probe samples through the whole sampler, image PSNR against float32 (median >= 30 dB) or, without
a decoder, token error (mean <= 0.05). If it does not, the reduced stages fall back to their
fastest fp32 candidate. Everything measured is recorded in the manifest under ``auto``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from flowar.runtime.load import AUTO_STAGES, CANDIDATES      # what the runtime can build

BF16_TOLERANCE = 0.3          # per-stage screen only; the end-to-end check decides
MIN_PSNR = 30.0               # median dB against float32, decoded probe samples
MAX_TOKEN_MEAN = 0.05         # without a decoder: mean |tokens - float32 tokens|
PROBE_LABELS = 8


@dataclass(slots=True)
class StageMeasure:
    seconds: float            # per sample at batch 1 (the official schedule's calls)
    error: float              # max |out - fp32 reference| over scales, 2 rows
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass(slots=True)
class AutoReport:
    choice: dict[str, str]                                  # stage -> candidate
    measured: dict[str, dict[str, StageMeasure]]            # stage -> candidate -> measure
    end_to_end: dict = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)      # stages demoted to fp32 by the end-to-end check
    machine: dict = field(default_factory=dict)

    def to_manifest(self) -> dict:
        return {"choice": self.choice, "machine": self.machine, "end_to_end": self.end_to_end,
                "fallback": self.fallback,
                "measured": {s: {c: asdict(m) for c, m in ms.items()} for s, ms in self.measured.items()}}


def measure_stage(engine, module, spec, config, calls: list[int], repeat: int = 5, rows: int = 2,
                  tolerance: float = 1e-4) -> StageMeasure:
    """Seconds per sample (sum over scales of calls x median call time) and worst error vs ``module``."""
    from flowar.export.specs import sample_inputs
    gen = torch.Generator().manual_seed(0)
    total, worst = 0.0, 0.0
    scales = range(config.n_scales) if spec.per_scale else [0]
    for k in scales:
        ins = sample_inputs(spec, config, k, rows if spec.per_scale else rows // 2, gen)
        shapes = spec.shapes(k, rows if spec.per_scale else rows // 2)
        outs = {n: torch.empty(shapes[n], dtype=spec.dtype(n)) for n in spec.outputs}
        with torch.no_grad():
            ref = module(*(ins[n] for n in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        times = []
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            engine.infer(ins, outs, profile=k)
            if r:
                times.append(time.perf_counter() - t0)
        total += statistics.median(times) * (calls[k] if spec.per_scale else 1)
        for n, want in zip(spec.outputs, ref):
            d = (outs[n].float() - want.float()).abs().max().item() if want.numel() else 0.0
            worst = max(worst, d if d == d else float("inf"))
    return StageMeasure(total, worst, tolerance)


def choose(measured: dict[str, dict[str, StageMeasure]], exclude: set[str] = frozenset()) -> dict[str, str]:
    """Per stage, the fastest candidate within tolerance (never one in ``exclude``); fp32 ONNX
    Runtime when nothing passes."""
    out = {}
    for stage, ms in measured.items():
        ok = {c: m for c, m in ms.items() if m.ok and c not in exclude}
        out[stage] = min(ok, key=lambda c: ok[c].seconds) if ok else "ort-fp32"
    return out


def select(model, vae, specs: dict, graphs: dict, candidates: tuple[str, ...] = CANDIDATES,
           threads: int | None = None, progress=lambda s: None) -> AutoReport:
    """Measure every candidate of every auto stage, choose, and check the choice end to end.

    ``graphs``: stage -> (path, sha256) of the exported fp32 ONNX graphs.
    """
    from flowar.engines.cpu import cpu_kind
    from flowar.engines.ort import split_limits
    from flowar.runtime.load import stage_engine
    from flowar.sampling.schedule import sampling_schedule
    config = model.config
    official = sampling_schedule(config.n_scales)
    calls = {"velocity": [len(p) for p in official.plan]}
    measured: dict[str, dict[str, StageMeasure]] = {}
    modules = {s: specs[s].module(model, vae) for s in AUTO_STAGES}
    for stage in AUTO_STAGES:
        spec = specs[stage]
        measured[stage] = {}
        for cand in candidates:
            progress(f"measure {stage} {cand}")
            eng = stage_engine(stage, cand, modules[stage], spec, *graphs[stage], threads,
                                   split_limits(stage, config))
            with eng:
                tol = BF16_TOLERANCE if cand.endswith("bf16") else spec.tolerance
                measured[stage][cand] = measure_stage(eng, modules[stage], spec, config,
                                                      calls.get(stage, [1] * config.n_scales), tolerance=tol)
    report = AutoReport(choose(measured), measured, machine=cpu_kind())
    progress("check the choice end to end")
    report.end_to_end = end_to_end(report.choice, model, vae, specs, graphs, threads)
    if not report.end_to_end["ok"]:
        report.fallback = [s for s, c in report.choice.items() if not c.endswith("fp32")]
        report.choice = choose(measured, exclude={c for c in CANDIDATES if not c.endswith("fp32")})
        report.end_to_end = end_to_end(report.choice, model, vae, specs, graphs, threads) | {
            "rejected": report.end_to_end}
    return report


def end_to_end(choice: dict[str, str], model, vae, specs: dict, graphs: dict, threads: int | None = None) -> dict:
    """Probe samples through the whole sampler with ``choice`` against float32 eager stages."""
    from flowar.io.images import psnr_each
    from flowar.sampling.batches import run_sampling
    from flowar.runtime.load import stage_engines
    from flowar.runtime.stages import EngineStages
    from flowar.sampling.schedule import sampling_schedule
    from flowar.sampling.eager import TorchStages
    config = model.config
    labels = [i % config.num_classes for i in range(PROBE_LABELS)]
    sched = sampling_schedule(config.n_scales)
    decode = vae is not None
    with torch.inference_mode():
        ref = run_sampling(TorchStages(model, vae.decode if decode else None), config, labels, sched, 0, decode=decode)
        with contextlib.ExitStack() as stack:
            engines = {n: stack.enter_context(e) for n, e in stage_engines(choice, config, model, vae, specs, graphs,
                                                                           threads).items()}
            st = EngineStages(engines, config, PROBE_LABELS, torch.device("cpu"), specs)
            got = run_sampling(st, config, labels, sched, 0, decode=decode)
    d = (got.tokens - ref.tokens).abs()
    out = {"samples": len(labels), "token_max": float(d.max()), "token_mean": float(d.mean())}
    if decode:
        ps = sorted(psnr_each(got.images, ref.images))
        out |= {"psnr_median": ps[len(ps) // 2], "psnr_worst": ps[0]}
        out["ok"] = ps[len(ps) // 2] >= MIN_PSNR
    else:
        out["ok"] = out["token_mean"] <= MAX_TOKEN_MEAN
    return out
