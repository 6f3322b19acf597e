"""Precision chosen per machine, by measurement (``flowar-export --precision auto`` and ``bf16``).

Engines a stage can run on (its *candidates*, :mod:`flowar.runtime.candidates`): ``ort-fp32``
(the ONNX graph on ONNX Runtime), ``torch-fp32`` / ``torch-bf16`` (the reference module in eager
PyTorch, the bf16 one with every GEMM and convolution in bfloat16 and float32 around them) and
``aoti-fp32`` / ``aoti-bf16`` (those two modules compiled by AOTInductor at export: their build
time is reported apart, and a stage Inductor cannot compile here simply has no such candidate).
By default ``auto`` measures the bf16 engines only where the CPU computes bf16 in hardware
(:func:`flowar.runtime.candidates.default_candidates`); ``--auto-candidates`` chooses.

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

import hashlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from flowar.commands.workbench import Probe, Workbench
from flowar.errors import FlowARError
from flowar.eval.quality import deviation, relative_error
from flowar.io.memory import release_free_memory
from flowar.runtime.candidates import CANDIDATES, COMPILED, REDUCED, default_candidates, stage_tensors

STAGES = ("ar", "head_prep", "velocity", "decode")
FP32_SCREEN = 1e-4            # relative rms error of a float32 engine: float32 noise
REDUCED_SCREEN = 0.05         # per-stage screen of a reduced engine; the end-to-end check decides
MIN_PSNR = 30.0               # median dB against float32 (decoded probe samples)
MAX_TOKEN_REL = 0.05          # without a decoder: relative rms token error against float32


@dataclass(slots=True)
class StageMeasure:
    seconds: float            # per sample at batch 1 (the official schedule's calls)
    error: float              # rms |out - fp32 reference| / rms |reference|, worst scale
    tolerance: float          # what the screen allows (inf: no gate)
    build_s: float = 0.0      # compile time (compiled candidates), reported apart
    untuned: str = ""         # why its GEMM templates failed to build, where they did (compiled with ATen's calls)
    note: str = ""            # why a candidate could not be measured (it then never wins)
    setup_s: float = 0.0      # what its first call at each scale costs beyond the others (oneDNN primitives,
                              # weight reorders): paid by the first image (or at open, where eager engines warm up)
    open_s: float = 0.0       # what opening it costs a fresh process: loading it (a package, a session), the
                              # imports its module needs there (the VAE's PyTorch engines import diffusers) and,
                              # for the PyTorch engines, hashing the weights file they map (the head's two
                              # stages share one: counted for each)
    open_bytes: int = 0       # the bytes of that weights file's tensors (PyTorch engines)

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    @property
    def finite(self) -> bool:
        """False for an engine that gave NaN/Inf: never chosen, even without an accuracy gate."""
        return self.error != float("inf")


MEASURE_ROWS = 2      # the AR rows a stage is timed at (batch 1 with guidance)


def measure_stage(engine, module, spec, config, calls: list[int], repeat: int = 3, rows: int = MEASURE_ROWS,
                  tolerance: float = FP32_SCREEN) -> StageMeasure:
    """Seconds per sample (sum over scales of calls x median call time) and worst relative error."""
    from flowar.export.specs import sample_inputs
    gen = torch.Generator().manual_seed(0)
    total, worst, setup = 0.0, 0.0, 0.0
    r = rows if spec.rows_per_sample == 2 else rows // 2
    for k in spec.scales:
        ins = sample_inputs(spec, config, k, r, gen)
        shapes = spec.shapes(k, r)
        outs = {n: torch.empty(shapes[n], dtype=spec.dtypes[n]) for n in spec.outputs}
        with torch.no_grad():
            ref = module(*(ins[n] for n in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        times = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            engine.infer(ins, outs, profile=k)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times[1:]) * (calls[k] if spec.per_scale else 1)
        setup += max(0.0, times[0] - statistics.median(times[1:]))
        for n, want in zip(spec.outputs, ref):
            worst = max(worst, relative_error(outs[n].float(), want.float()))
    return StageMeasure(total, worst, tolerance, setup_s=setup)


@dataclass(slots=True)
class Combination:
    """A choice of engine per stage, as it ran inside the pipeline."""
    choice: dict[str, str]
    seconds: float = float("nan")          # whole image at batch 1 (median), decode included
    deviation: dict = field(default_factory=dict)   # against float32 on the probe samples
    ok: bool = True
    setup_s: float = 0.0                   # what its engines set up per shape the first time
    open_s: float = 0.0                    # what opening its engines costs a fresh process

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
    machine: dict = field(default_factory=dict)             # the CPU (cpu_kind): a directory opened elsewhere says so
    others_cpu: float | None = None                         # what other processes took of its CPUs while timing

    @property
    def kept(self) -> Combination:
        return next(c for c in self.combinations if c.choice == self.choice)

    def to_manifest(self) -> dict:
        return {"mode": self.mode, "choice": self.choice, "machine": self.machine, "others_cpu": self.others_cpu,
                "measured": {s: {c: asdict(m) for c, m in ms.items()} for s, ms in self.measured.items()},
                "combinations": [asdict(c) for c in self.combinations], "official_fp16": self.official_fp16}

    def lines(self) -> list[str]:
        """What the export log says: each stage's candidates, each timed combination, the deviations."""
        out = []
        for stage, ms in self.measured.items():
            cells = ", ".join(f"{c} unavailable ({m.note})" if m.note else
                              f"{c} {m.seconds * 1e3:.1f} ms per image (err {m.error:.1e}{'' if m.ok else ', too far'}"
                              f"{f', compiled in {m.build_s:.0f} s' if m.build_s else ''}"
                              f"{f' with ATen GEMMs, its GEMM templates failed: {m.untuned}' if m.untuned else ''})"
                              for c, m in ms.items())
            out.append(f"  {self.mode} {stage:<10} -> {self.choice[stage]:<14} [{cells}]")
        fp16 = _describe(self.official_fp16)
        for c in self.combinations:
            mark = "kept" if c.choice == self.choice else ("too far" if not c.ok else "")
            what = ", ".join(f"{s} {e}" for s, e in c.choice.items())
            dev = f"; vs fp32 {_describe(c.deviation)}" if c.deviation else ""
            setup = (f" + {c.setup_s:.2f} s set-up" if c.setup_s else "") + (f" + {c.open_s:.2f} s to open"
                                                                                  if c.open_s else "")
            out.append(f"  {self.mode} pipeline {c.seconds:.3f} s per image{setup} [{what}]{dev} {mark}".rstrip())
        if fp16:
            out.append(f"  {self.mode} the official mixed precision (fp16 autocast) on the same samples: {fp16}")
        from flowar.engines.cpu import OthersShare
        if (self.others_cpu or 0.0) > OthersShare.BUSY:
            out.append(f"  warning: other processes took {self.others_cpu:.0%} of this machine's CPU "
                       "while the engines were timed, so the times above are theirs too and the choice may not be "
                       "this machine's fastest: export again when the machine is quiet")
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


def select(bench: Workbench, mode: str = "auto", candidates: tuple[str, ...] | None = None,
           progress=lambda s: None) -> PrecisionReport:
    """Measure, time inside the pipeline, check end to end, choose (see the module docstring), on
    the engines of ``bench`` (which compiles what it is asked for, once)."""
    from flowar.engines.cpu import OthersShare, cpu_kind, fast_bf16
    from flowar.sampling.schedule import Settings
    if mode not in ("auto", "bf16"):
        raise FlowARError("precision mode auto or bf16", repr(mode), "use --precision auto")
    config, specs = bench.model.config, bench.specs
    cands = tuple(candidates or default_candidates(mode, fast_bf16()))
    if mode == "bf16":
        cands = tuple(c for c in cands if c in REDUCED)
    if not cands:
        raise FlowARError("at least one engine candidate", f"none of {candidates}", f"choose among {', '.join(CANDIDATES)}")
    calls = {"velocity": [len(p) for p in Settings().resolve(config.n_scales).plan]}
    stages = [s for s in STAGES if s in specs]
    measured: dict[str, dict[str, StageMeasure]] = {}
    imports: dict[str, float] = {}      # stage -> seconds a fresh process takes to import its PyTorch module's code
    busy = OthersShare()                # what other processes computed while candidates were timed
    for stage in stages:
        spec, module = specs[stage], specs[stage].module(bench.model, bench.vae)
        measured[stage] = {}
        for cand in cands:
            progress(f"{'compile and ' if cand in COMPILED else ''}measure {stage} {cand}")
            tol = float("inf") if mode == "bf16" else REDUCED_SCREEN if cand in REDUCED else FP32_SCREEN
            try:
                eng = bench.engine(stage, cand)
            except FlowARError as e:                        # e.g. no C++ compiler: not a candidate here
                measured[stage][cand] = StageMeasure(float("inf"), float("inf"), tol, note=str(e))
                continue
            t0 = time.perf_counter()
            try:
                with eng, busy:
                    if hasattr(eng, "open_sessions"):   # (the sessions its timed calls split onto: at open, as the runtime)
                        r = MEASURE_ROWS if spec.rows_per_sample == 2 else MEASURE_ROWS // 2       # (measure_stage's)
                        for f in [f for k in spec.scales for f in eng.open_sessions(spec.shapes(k, r)[spec.inputs[0]])]:
                            f.result()
                    opened = time.perf_counter() - t0
                    measured[stage][cand] = measure_stage(eng, module, spec, config,
                                                          calls.get(stage, [1] * config.n_scales), tolerance=tol)
                    if cand.startswith("torch"):    # opening the directory hashes the weights file it maps
                        tensors = stage_tensors(stage, eng.module)
                        measured[stage][cand].open_bytes = sum(t.nbytes for t in tensors.values())
                        opened += hash_seconds(tensors)
            except Exception as e:   # noqa: BLE001 - one that cannot load or run here (a library the loader refuses, an
                # op its provider lacks) is not a candidate, as one that cannot compile: the others are measured
                said = (str(e).strip().splitlines() or [""])[0][:200]
                measured[stage][cand] = StageMeasure(float("inf"), float("inf"), tol,
                                                     note=f"it failed here: {type(e).__name__}: {said}")
                opened = 0.0
            release_free_memory()
            measured[stage][cand].build_s = bench.build_s.get((stage, cand), 0.0)
            measured[stage][cand].untuned = bench.untuned.get((stage, cand), "")
            if stage == "decode" and cand.startswith("torch") and "decode" not in imports:
                # (what opening a directory's PyTorch decoder imports: flowar.model.decoder, not diffusers)
                imports["decode"] = import_seconds("import flowar.model.decoder, flowar.model.vae")
            measured[stage][cand].open_s = opened + (imports.get(stage, 0.0) if cand.startswith("torch") else 0.0)
    report = PrecisionReport(mode, {}, measured, machine=dict(cpu_kind()))     # (a copy: cpu_kind's is cached)
    combos = combinations(measured, mode)
    # eager fp32 is always timed, unless the candidates were restricted without it (--auto-candidates)
    report.combinations = [Combination(c) for c in combos if set(c.values()) <= set(cands)] or [Combination(combos[0])]
    probe = Probe(bench)
    for combo in report.combinations:
        progress(f"time in the pipeline: {', '.join(f'{s} {c}' for s, c in combo.choice.items())}")
        with busy:
            combo.seconds = probe.seconds(combo.choice)
        combo.setup_s = sum(measured[s][c].setup_s for s, c in combo.choice.items() if c in measured[s])
        combo.open_s = sum(measured[s][c].open_s for s, c in combo.choice.items() if c in measured[s])
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
    if busy.share is not None:
        report.others_cpu = round(busy.share, 3)
    return report


def combinations(measured: dict[str, dict[str, StageMeasure]], mode: str) -> list[dict[str, str]]:
    """The choices to time in the pipeline. ``auto``: the per-stage fastest within its screen, the
    fastest in float32, and eager float32 (every stage ``torch-fp32``); ``bf16``: the per-stage
    fastest reduced engine. Fastest counts a first call's set-up too (see :func:`decide`)."""
    stages = list(measured)

    def fastest(pool) -> dict[str, str]:
        return {s: min(pool(s), key=lambda c: measured[s][c].seconds + measured[s][c].setup_s + measured[s][c].open_s
                       if c in measured[s] else float("inf")) for s in stages}
    if mode == "bf16":
        reduced = lambda s: [c for c, m in measured[s].items() if c in REDUCED and m.finite and not m.note]  # noqa: E731
        combos = [fastest(lambda s: reduced(s) or ["torch-fp32"])]
    else:
        passing = lambda s: [c for c, m in measured[s].items() if m.ok] or ["torch-fp32"]              # noqa: E731
        fp32 = lambda s: [c for c in passing(s) if c not in REDUCED] or ["torch-fp32"]                 # noqa: E731
        combos = [fastest(passing), fastest(fp32), {s: "torch-fp32" for s in stages}]
    return [dict(c) for c in {tuple(c.items()): c for c in combos}.values()]


def decide(combos: list[Combination]) -> Combination:
    """The combination that passed its accuracy check and gives the first image soonest from a
    fresh process: its whole image in the pipeline, plus what its engines set up per shape the
    first time and what opening them costs (both paid once by every process that opens the
    directory: DESIGN decision 15). A PyTorch decoder 0.1 s faster per image than a compiled one
    but 1.3 s dearer to open (diffusers' import) loses here."""
    ok = [c for c in combos if c.ok]
    if not ok:
        raise FlowARError("an engine choice that samples like float32", "none passed",
                          "export with --precision fp32")
    return min(ok, key=lambda c: c.seconds + c.setup_s + c.open_s)


def hash_seconds(tensors: dict[str, torch.Tensor]) -> float:
    """Seconds to sha256 these tensors' bytes: what opening an engine directory costs for the weights
    file a PyTorch engine maps (the file is checked in the pass that reads it). On FlowAR-S's head,
    169 MB in float32: about 0.1 s, more than that engine saved per image where it was chosen for
    head_prep without it."""
    h, t0 = hashlib.sha256(), time.perf_counter()
    for t in tensors.values():
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return time.perf_counter() - t0


def import_seconds(code: str) -> float:
    """Seconds a fresh Python process takes to run ``code`` after importing torch (what opening an
    engine that needs it adds there; this process has long imported everything)."""
    import subprocess
    import sys
    probe = f"import time, torch\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return 0.0                                       # unmeasured: counted as free, as before
