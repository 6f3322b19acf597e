"""Precision chosen per machine, by measurement (``flowar-export --precision auto`` and ``bf16``).

Engines a stage can run on (its *candidates*):

* ``ort-fp32``: the exported ONNX graph on ONNX Runtime;
* ``torch-fp32``: the reference module in eager PyTorch;
* ``torch-bf16`` (:mod:`flowar.runtime.bf16`): the reference module with every GEMM and
  convolution in bfloat16 (weights stored once in bf16, activations rounded to bf16 at each
  GEMM's input and output) and everything else in float32: norms, softmax, residual adds,
  modulation, which is what makes bf16 accurate enough. Fast only where the CPU computes bf16
  (AVX512-BF16, AMX), emulated elsewhere.

OpenVINO was measured too (``python bench/velocity_engines.py``) and is not a candidate: on the
exported graphs its results go wrong once a compiled model meets a second set of shapes (scale
2 after scales 0 and 1, in fp32 and bf16 alike), and where it was right it was no faster than
ONNX Runtime (fp32) or ``torch-bf16`` (bf16) on the CPUs measured (bench/RESULTS.md).

Every stage has them, the VAE decoder included. The ODE state stays float64 in the sampler.

How ``auto`` chooses (all on this machine, on the user's own checkpoint):

1. per stage and candidate: the time per sample (the runtime's engine, two rows with guidance,
   every scale, weighted by the official schedule's calls) and the error against the float32
   module on the same inputs, relative to the output's scale (rms of the difference over rms of
   the output). A float32 candidate must be within float32 noise, a reduced one within
   :data:`REDUCED_SCREEN`;
2. combinations timed inside the pipeline, whole images at batch 1 (per-stage times summed are
   not the pipeline's time): the per-stage fastest, the fastest in float32, and eager float32
   (every stage ``torch-fp32``), which is always among them;
3. accuracy end to end: probe samples through the whole sampler against float32, beside the
   deviation of the official sampler's own mixed precision (fp16 autocast,
   :mod:`flowar.eval.mixed`) on the same samples. A combination with reduced stages passes when
   its images are within :data:`MIN_PSNR` of float32 (median) or deviate no more than the
   official mixed precision does;
4. the fastest combination that passes is kept, so ``auto`` is never slower than eager float32.

``bf16`` takes the fastest reduced candidate of every stage, without a gate, and reports the
same deviations. Everything measured goes into the manifest (``auto``) and the export log.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from flowar.errors import FlowARError
from flowar.eval.quality import deviation, relative_error
from flowar.runtime.candidates import CANDIDATES, REDUCED, stage_engine, stage_engines

STAGES = ("ar", "head_prep", "velocity", "decode")
FP32_SCREEN = 1e-4            # relative rms error of a float32 engine: float32 noise
REDUCED_SCREEN = 0.05         # per-stage screen of a reduced engine; the end-to-end check decides
MIN_PSNR = 30.0               # median dB against float32 (decoded probe samples)
MAX_TOKEN_REL = 0.05          # without a decoder: relative rms token error against float32
PROBE_LABELS = 4             # samples of the end-to-end check
TIME_REPEAT = 2              # timed whole images per combination (after one warm-up)


@dataclass(slots=True)
class StageMeasure:
    seconds: float            # per sample at batch 1 (the official schedule's calls)
    error: float              # rms |out - fp32 reference| / rms |reference|, worst scale
    tolerance: float          # what the screen allows (inf: no gate)

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    @property
    def finite(self) -> bool:
        """False for an engine that gave NaN/Inf: never chosen, even without an accuracy gate."""
        return self.error != float("inf")


def measure_stage(engine, module, spec, config, calls: list[int], repeat: int = 3, rows: int = 2,
                  tolerance: float = FP32_SCREEN) -> StageMeasure:
    """Seconds per sample (sum over scales of calls x median call time) and worst relative error."""
    from flowar.export.specs import sample_inputs
    gen = torch.Generator().manual_seed(0)
    total, worst = 0.0, 0.0
    r = rows if spec.rows_per_sample == 2 else rows // 2
    for k in spec.scales(config):
        ins = sample_inputs(spec, config, k, r, gen)
        shapes = spec.shapes(k, r)
        outs = {n: torch.empty(shapes[n], dtype=spec.dtype(n)) for n in spec.outputs}
        with torch.no_grad():
            ref = module(*(ins[n] for n in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        times = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            engine.infer(ins, outs, profile=k)
            if i:
                times.append(time.perf_counter() - t0)
        total += statistics.median(times) * (calls[k] if spec.per_scale else 1)
        for n, want in zip(spec.outputs, ref):
            worst = max(worst, relative_error(outs[n].float(), want.float()))
    return StageMeasure(total, worst, tolerance)


@dataclass(slots=True)
class Combination:
    """A choice of engine per stage, as it ran inside the pipeline."""
    choice: dict[str, str]
    seconds: float = float("nan")          # whole image at batch 1 (median), decode included
    deviation: dict = field(default_factory=dict)   # against float32 on the probe samples
    ok: bool = True

    @property
    def reduced(self) -> bool:
        return any(c in REDUCED for c in self.choice.values())


@dataclass(slots=True)
class PrecisionReport:
    mode: str                                               # auto or bf16
    choice: dict[str, str]                                  # stage -> candidate
    measured: dict[str, dict[str, StageMeasure]]            # stage -> candidate -> measure
    combinations: list[Combination] = field(default_factory=list)
    official_fp16: dict = field(default_factory=dict)       # the official mixed precision's deviation
    machine: dict = field(default_factory=dict)

    @property
    def kept(self) -> Combination:
        return next(c for c in self.combinations if c.choice == self.choice)

    def to_manifest(self) -> dict:
        return {"mode": self.mode, "choice": self.choice, "machine": self.machine,
                "measured": {s: {c: asdict(m) for c, m in ms.items()} for s, ms in self.measured.items()},
                "combinations": [asdict(c) for c in self.combinations], "official_fp16": self.official_fp16}

    def lines(self) -> list[str]:
        """What the export log says: each stage's candidates, each timed combination, the deviations."""
        out = []
        for stage, ms in self.measured.items():
            cells = ", ".join(f"{c} {m.seconds * 1e3:.1f} ms (err {m.error:.1e}{'' if m.ok else ', too far'})"
                              for c, m in ms.items())
            out.append(f"  {self.mode} {stage:<10} -> {self.choice[stage]:<14} [{cells}]")
        fp16 = _describe(self.official_fp16)
        for c in self.combinations:
            mark = "kept" if c.choice == self.choice else ("too far" if not c.ok else "")
            what = ", ".join(f"{s} {e}" for s, e in c.choice.items())
            dev = f"; vs fp32 {_describe(c.deviation)}" if c.deviation else ""
            out.append(f"  {self.mode} pipeline {c.seconds:.3f} s per image [{what}]{dev} {mark}".rstrip())
        if fp16:
            out.append(f"  {self.mode} the official mixed precision (fp16 autocast) on the same samples: {fp16}")
        return out


def _describe(d: dict) -> str:
    if not d:
        return ""
    s = f"tokens rel rms {d['token_rel']:.2e}"
    if "psnr_median" in d:
        s += f", image PSNR median {d['psnr_median']:.1f} dB (worst {d['psnr_worst']:.1f})"
    return s


def passes(dev: dict, official: dict) -> bool:
    """A reduced choice is kept when its images are within MIN_PSNR of float32, or when it moves
    them no more than the official mixed precision does."""
    if not dev:
        return False
    if "psnr_median" in dev and dev["psnr_median"] >= MIN_PSNR:
        return True
    if "psnr_median" not in dev and dev["token_rel"] <= MAX_TOKEN_REL:
        return True
    return bool(official) and dev["token_rel"] <= official["token_rel"]


def select(model, vae, specs: dict, graphs: dict, mode: str = "auto", candidates: tuple[str, ...] | None = None,
           threads: int | None = None, progress=lambda s: None) -> PrecisionReport:
    """Measure, time inside the pipeline, check end to end, choose (see the module docstring).

    ``graphs``: stage -> (path, sha256) of the exported float32 ONNX graphs.
    """
    from flowar.engines.cpu import cpu_kind
    from flowar.engines.ort import split_limits
    from flowar.sampling.schedule import Settings
    if mode not in ("auto", "bf16"):
        raise FlowARError("precision mode auto or bf16", repr(mode), "use --precision auto")
    config = model.config
    cands = tuple(candidates or CANDIDATES)
    if mode == "bf16":
        cands = tuple(c for c in cands if c in REDUCED)
    if not cands:
        raise FlowARError("at least one engine candidate", f"none of {candidates}", f"choose among {', '.join(CANDIDATES)}")
    calls = {"velocity": [len(p) for p in Settings().resolve(config.n_scales).plan]}
    stages = [s for s in STAGES if s in specs]
    measured: dict[str, dict[str, StageMeasure]] = {}
    for stage in stages:
        spec, module = specs[stage], specs[stage].module(model, vae)
        measured[stage] = {}
        for cand in cands:
            progress(f"measure {stage} {cand}")
            eng = stage_engine(stage, cand, module, spec, *graphs[stage], threads, split_limits(stage, config))
            tol = float("inf") if mode == "bf16" else REDUCED_SCREEN if cand in REDUCED else FP32_SCREEN
            with eng:
                measured[stage][cand] = measure_stage(eng, module, spec, config,
                                                      calls.get(stage, [1] * config.n_scales), tolerance=tol)
    report = PrecisionReport(mode, {}, measured, machine=cpu_kind())
    combos = combinations(measured, mode)
    # eager fp32 is always timed, unless the candidates were restricted without it (--auto-candidates)
    report.combinations = [Combination(c) for c in combos if set(c.values()) <= set(cands)] or [Combination(combos[0])]
    probe = Probe(model, vae, specs, graphs, threads)
    for combo in report.combinations:
        progress(f"time in the pipeline: {', '.join(f'{s} {c}' for s, c in combo.choice.items())}")
        combo.seconds = probe.seconds(combo.choice)
    if any(c.reduced for c in report.combinations):
        progress("check reduced precision end to end")
        report.official_fp16 = deviation(probe.official_fp16(), probe.reference())
        for combo in report.combinations:
            if combo.reduced:
                combo.deviation = deviation(probe.sample(combo.choice), probe.reference())
                combo.ok = mode == "bf16" or passes(combo.deviation, report.official_fp16)
    if not any(c.ok for c in report.combinations):       # restricted candidates, none close enough: eager fp32
        eager = Combination({s: "torch-fp32" for s in stages})
        progress("time in the pipeline: eager fp32")
        eager.seconds = probe.seconds(eager.choice)
        report.combinations.append(eager)
    report.choice = decide(report.combinations).choice
    return report


def combinations(measured: dict[str, dict[str, StageMeasure]], mode: str) -> list[dict[str, str]]:
    """The choices to time in the pipeline. ``auto``: the per-stage fastest within its screen, the
    fastest in float32, and eager float32 (every stage ``torch-fp32``); ``bf16``: the per-stage
    fastest reduced engine."""
    stages = list(measured)

    def fastest(pool) -> dict[str, str]:
        return {s: min(pool(s), key=lambda c: measured[s][c].seconds if c in measured[s] else float("inf"))
                for s in stages}
    if mode == "bf16":
        reduced = lambda s: [c for c, m in measured[s].items() if c in REDUCED and m.finite]             # noqa: E731
        combos = [fastest(lambda s: reduced(s) or ["torch-fp32"])]
    else:
        passing = lambda s: [c for c, m in measured[s].items() if m.ok] or ["torch-fp32"]              # noqa: E731
        fp32 = lambda s: [c for c in passing(s) if c not in REDUCED] or ["torch-fp32"]                 # noqa: E731
        combos = [fastest(passing), fastest(fp32), {s: "torch-fp32" for s in stages}]
    return [dict(c) for c in {tuple(c.items()): c for c in combos}.values()]


def decide(combos: list[Combination]) -> Combination:
    """The fastest combination (whole image, in the pipeline) that passed its accuracy check."""
    ok = [c for c in combos if c.ok]
    if not ok:
        raise FlowARError("an engine choice that samples like float32", "none passed",
                          "export with --precision fp32")
    return min(ok, key=lambda c: c.seconds)


class Probe:
    """Samples of the whole pipeline for a choice of engines: the time of one image at batch 1,
    and the probe samples against a float32 reference (ONNX Runtime fp32, within float32 noise
    of eager)."""

    def __init__(self, model, vae, specs, graphs, threads):
        self.model, self.vae, self.specs, self.graphs, self.threads = model, vae, specs, graphs, threads
        c = model.config
        self.labels = [(i * 37) % c.num_classes for i in range(PROBE_LABELS)]
        from flowar.sampling.schedule import Settings
        self.schedule = Settings().resolve(c.n_scales)
        self._ref = None

    @contextlib.contextmanager
    def _stages(self, choice: dict[str, str], batch: int):
        """A runtime on the engines of ``choice`` (what opening the finished directory will give)."""
        from flowar.runtime.runtime import Runtime, Threads
        from flowar.runtime.stages import EngineStages
        c = self.model.config
        threads = Threads.resolve(self.threads, any(e != "ort-fp32" for e in choice.values()))
        with contextlib.ExitStack() as stack:
            engines = {n: stack.enter_context(e) for n, e in stage_engines(
                choice, c, self.model, self.vae, self.specs, self.graphs, threads.cores).items()}
            yield Runtime(config=c, class_names=None, stages=EngineStages(engines, c, batch, torch.device("cpu"),
                                                                          self.specs),
                          device=torch.device("cpu"), backend="measured", detail=str(choice), threads=threads,
                          decodes=self.vae is not None, max_batch=batch)

    def _run(self, rt, labels):
        return rt.sample(labels, self.schedule, seed=0, decode=self.vae is not None)

    def seconds(self, choice: dict[str, str], repeat: int | None = None) -> float:
        repeat = repeat or TIME_REPEAT
        with self._stages(choice, 1) as st:
            self._run(st, self.labels[:1])                              # warm-up: sessions, caches, first calls
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                self._run(st, self.labels[:1])
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sample(self, choice: dict[str, str]):
        with self._stages(choice, len(self.labels)) as st:
            return self._run(st, self.labels)

    def reference(self):
        if self._ref is None:
            self._ref = self.sample({s: "ort-fp32" for s in self.specs})
        return self._ref

    def official_fp16(self):
        from flowar.eval.mixed import OfficialFp16
        from flowar.sampling.batches import run_sampling
        from flowar.sampling.eager import EagerStages
        with torch.inference_mode():
            return run_sampling(OfficialFp16(EagerStages(self.model, self.vae.decode if self.vae else None)),
                                self.model.config, self.labels, self.schedule, 0, decode=self.vae is not None)
