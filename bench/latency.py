"""Latency of FlowAR sampling: eager PyTorch (the official way) vs this project's backends.

    python bench/latency.py --preset flowar-s --batch 1 --backends eager,ort
    python bench/latency.py --engine-dir out/engines --batch 1,8 --backends eager,cached,ort

Backends:
  eager      the official method in eager PyTorch: KV-cached AR, every ODE step evaluates all
             2B rows and recomputes the head's per-scale constants. The baseline (ratio 1.0).
  eager-bf16 the same under bfloat16 autocast (what the official GPU evaluation does in fp16).
  cached     this project's sampler on eager PyTorch stages with the AR's KV cache (what
             `flowar-run --ckpt` runs: B rows where guidance cannot act, per-scale constants once
             per scale). Not the engine directory's `--backend torch`, which runs the reference
             modules behind the runtime's interface, recomputing the AR prefix.
  compile    as cached, with the head's velocity under torch.compile (compile time reported apart).
  ort        the lean runtime on ONNX Runtime engines (exported on the fly for --preset/--ckpt).
  auto       the runtime on what `flowar-export --precision auto` measures and picks on this
             machine, per stage (ONNX Runtime or PyTorch, fp32 or bf16), never slower than eager fp32.
  bf16       the runtime on `flowar-export --precision bf16`: the fastest bf16 engine of every stage.
  trt        the runtime on TensorRT plans (GPU with TensorRT only).
  cudagraph  the runtime on PyTorch stages replayed as CUDA graphs (GPU only).

Every backend does the same work (labels, seeded noise, schedule, decode or not); its tokens
are compared with eager's and the worst difference is printed beside the time; a backend above
--parity-tol is marked WRONG and the run exits with status 1 (after writing its outputs). In a
16-bit run (--dtype bf16/fp16) two paths differ by their rounding as much as either differs from
float32 (a kernel chosen differently is enough), so each row is also compared with eager's float32
tokens (computed untimed) and passes where its error there is at most 1.5 times 16-bit eager's
(+1e-3); a wrong input or buffer errs by the tokens' own size, far beyond either.
Warm-up runs are discarded; medians, min and max are over --repeat runs, each timed end to end
with no synchronisation inside it. The per-stage split (AR, head, decode; head per scale) comes
from one separate instrumented run (CUDA events on a GPU); "other" is the median minus that
split. Replayed CUDA graphs have no split. Effective GFLOP/s = FLOPs of the row's schedule done the
official way (2B head rows on every step; counted once per schedule with torch's FlopCounterMode) /
time, against the faster GEMM peak (fp32 or bf16) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latency_backends import ALL as ALL_BACKENDS
from latency_backends import Backends, BenchSource, Skip
from latency_measure import STAGE_KEYS, Work, gemm_peak_gflops, schedule_flops, stage_split, time_end_to_end
from latency_report import Result, line, machine_info, markdown, plot, scale_table, within_16_bit_rounding

ENGINE_BACKENDS = ("ort", "auto", "bf16", "trt")     # the rows that run an engine directory's engines


@dataclass(frozen=True, slots=True)
class BenchSpec:
    """The command line, parsed and checked."""
    engine_dir: str | None
    preset: str | None
    ckpt: str | None
    config: str | None
    vae: str | None
    batches: tuple[int, ...]
    schedules: tuple[str, ...]           # "official" first: the baseline of every ratio
    steps: int | None
    cfg: float | None
    guidance: float | None
    backends: tuple[str, ...]            # "eager" first: ratios and parity need it in the same run
    repeat: int
    warmup: int
    seed: int
    json: str | None
    plot: str | None
    device: torch.device
    dtype: str
    parity_tol: float | None
    reduced_tol: float | None = None
    threads: int | None = None
    fresh: int = 0

    def tolerance(self, reduced_source: bool, precision: str, backend: str) -> float:
        """--parity-tol in float32 (1e-3), --reduced-tol where the run or the backend computes in 16 bits (5e-2):
        a directory's 16-bit engines only for the backends that run them, not the float32 eager rows."""
        if (reduced_source and backend in ENGINE_BACKENDS) or self.dtype != "fp32" or "16" in precision:
            return 5e-2 if self.reduced_tol is None else self.reduced_tol
        return 1e-3 if self.parity_tol is None else self.parity_tol


def parse(argv=None) -> tuple[BenchSpec, bool]:
    from flowar.config import SAMPLING_DEFAULTS
    from entry import Parser
    ap = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--engine-dir", help="engine directory from flowar-export (its checkpoint is the eager model)")
    src.add_argument("--ckpt", help="a checkpoint (self-describing, or with --preset/--config)")
    ap.add_argument("--preset", help="alone: random weights of a preset (flowar-s, flowar-l, flowar-h, tiny); with "
                    "--ckpt: the config of an official file")
    ap.add_argument("--config", help="config JSON for --ckpt files that carry none")
    ap.add_argument("--vae", help="include VAE decoding (--preset/--ckpt); engine dirs use their own decoder")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    ap.add_argument("--schedules", default="official", help="comma-separated sampling schedules: official, fast "
                    "(speed ratios are against eager with the official schedule; parity against eager with the same one)")
    ap.add_argument("--steps", type=int, default=None, help="the official sampler's num_steps N (25: its 24 steps) [default: the schedule's]")
    ap.add_argument("--cfg", type=float, default=None, help=f"[default: {SAMPLING_DEFAULTS['cfg']}]")
    ap.add_argument("--guidance", type=float, default=None, help=f"[default: {SAMPLING_DEFAULTS['guidance']}]")
    ap.add_argument("--backends", default="eager,cached,ort", help=f"comma-separated, from {','.join(ALL_BACKENDS)}")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row [default: 3]")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them [default: 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/out/latency.json", help="write results here (relative to the working "
                    "directory) [default: bench/out/latency.json]")
    ap.add_argument("--plot", default="bench/out/latency.png", help="write a per-stage bar chart here [default: "
                    "bench/out/latency.png]")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="PyTorch backends: run the stages under autocast in this type (as the official evaluation "
                         "does with fp16 on GPU); engines keep the precision they were exported with")
    ap.add_argument("--parity-tol", type=float, default=None,
                    help="largest max|tokens - eager tokens| a float32 backend may show before it is marked WRONG "
                         "(default 1e-3)")
    ap.add_argument("--reduced-tol", type=float, default=None,
                    help="the same for 16-bit runs and engines (--dtype bf16/fp16, bf16/fp16 engines; default 5e-2; "
                         "random weights amplify bf16 rounding: pass inf to report their deviation without a verdict)")
    ap.add_argument("--threads", type=int, default=None, help="cores for every backend (PyTorch's threads, the "
                    "engines' threads, and --threads of the fresh-process commands) [default: every core]")
    ap.add_argument("--fresh", type=int, default=0, help="with --engine-dir: also run flowar-run --engine-dir against "
                    "flowar-run --ckpt (its checkpoint) this many times each, each in a fresh process: the first "
                    "image's sampling, the opening and the whole command, as a user gets them")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    return a, a.debug


def check(a) -> BenchSpec:
    from flowar.device import resolve_device
    from flowar.errors import FlowARError
    from flowar.io.files import check_writable
    from flowar.sampling.schedule import SCHEDULES
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad or not backends:
        raise FlowARError(f"--backends from {', '.join(ALL_BACKENDS)}", f"{bad or 'none'}", "e.g. --backends eager,ort")
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        raise FlowARError("--batch as comma-separated integers", repr(a.batch), "e.g. --batch 1,8") from None
    if a.engine_dir and (a.preset or a.config):
        raise FlowARError("no --preset/--config with --engine-dir", "both", "the engine directory records its config")
    if a.config and not a.ckpt:                        # (it was ignored: random flowar-s weights ran)
        raise FlowARError("--config with --ckpt (the config of a checkpoint that carries none)", "--config alone",
                          "add --ckpt, or use --preset for random weights")
    for name, v in (("--parity-tol", a.parity_tol), ("--reduced-tol", a.reduced_tol)):
        if v is not None and not v >= 0:
            raise FlowARError(f"{name} >= 0", repr(v), f"e.g. {name} 1e-3")
    if any(b < 1 for b in batches) or a.repeat < 1:
        raise FlowARError("--batch and --repeat >= 1", f"{a.batch} / {a.repeat}", "use positive numbers")
    if a.warmup < 0:                                  # (-1 ended in an AttributeError, or timed one run fewer)
        raise FlowARError("--warmup >= 0", str(a.warmup), "use e.g. --warmup 1")
    if a.fresh < 0:                                   # (found after the warm runs)
        raise FlowARError("--fresh >= 0", str(a.fresh), "use e.g. --fresh 3")
    if a.threads is not None and a.threads < 1:       # (found by torch)
        raise FlowARError("--threads >= 1", str(a.threads), "use e.g. --threads 2, or leave it out for every core")
    if a.fresh and not a.engine_dir:                  # (it was ignored)
        raise FlowARError("--fresh with --engine-dir (fresh flowar-run --engine-dir against --ckpt)",
                          "--fresh without --engine-dir", "add --engine-dir, or drop --fresh")
    if "cudagraph" in backends and a.warmup < 1:
        raise FlowARError("--warmup >= 1 with the cudagraph backend (the warm-up run captures)", str(a.warmup),
                          "use --warmup 1")
    names = [s.strip() for s in a.schedules.split(",") if s.strip()]
    if not names or any(s not in SCHEDULES for s in names):
        raise FlowARError(f"--schedules from {', '.join(SCHEDULES)}", repr(a.schedules), "e.g. --schedules official,fast")
    check_writable(a.json or None, False, "--json")
    check_writable(a.plot or None, False, "--plot")
    first = lambda xs, x: tuple([x] + [y for y in xs if y != x])          # noqa: E731
    return BenchSpec(a.engine_dir, a.preset, a.ckpt, a.config, a.vae, tuple(batches), first(names, "official"),
                     a.steps, a.cfg, a.guidance, first(backends, "eager"), a.repeat, a.warmup, a.seed, a.json or None,
                     a.plot or None, resolve_device(a.device), a.dtype, a.parity_tol, a.reduced_tol, a.threads, a.fresh)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from entry import run_script
    return run_script(lambda args: run(check(parse(args)[0])), argv)


def open_bench_source(spec: BenchSpec) -> tuple[BenchSource, str, bool, bool]:
    """(source, label, random weights, engines in reduced precision)."""
    from flowar.export.manifest import read_manifest
    from flowar.runtime.directory import exported_from
    from flowar.runtime.runtime import Runtime
    batch = max(spec.batches)
    if spec.engine_dir:
        m = read_manifest(spec.engine_dir)
        model, vae = exported_from(m, spec.device)
        return (BenchSource(model, vae, Path(spec.engine_dir), m.precision, spec.dtype, batch, spec.device, spec.threads,
                            m.vae["source"] if m.vae else None),
                f"engine dir {spec.engine_dir}", False, m.precision not in ("fp32", "auto"))
    if spec.ckpt:
        ref = Runtime.open_checkpoint(spec.ckpt, preset=spec.preset, config=spec.config, vae=spec.vae,
                                      device=spec.device, cuda_graphs=False)
        return (BenchSource(ref.model, ref.vae, None, None, spec.dtype, batch, spec.device, spec.threads, spec.vae),
                Path(spec.ckpt).name, False, False)
    from flowar.config import get_preset
    from flowar.model.ar import FlowAR
    torch.manual_seed(0)
    model = FlowAR(get_preset(spec.preset or "flowar-s")).eval()
    # The official init zeroes the head's output layer (velocity identically 0): perturb every
    # parameter, as the official fixtures do, so that parity checks compare real numbers.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.02)
    vae = None
    if spec.vae:
        from flowar.model.vae import load_vae
        vae = load_vae(spec.vae, expect_channels=model.config.latent_channels, decode_only=True).to(spec.device)
    return (BenchSource(model.to(spec.device), vae, None, None, spec.dtype, batch, spec.device, spec.threads, spec.vae),
            f"preset {spec.preset or 'flowar-s'}", True, False)


def measure(backends: Backends, name: str, work: Work, schedule_name: str, spec: BenchSpec, flops: dict,
            reference: dict) -> tuple[Result, torch.Tensor]:
    """One backend on one piece of work: its record and tokens. ``reference``: eager's tokens with
    this schedule and with the official one, eager's official median, whether engines are reduced."""
    prepared = backends.prepare(name, work)
    with prepared.threads():
        timing = time_end_to_end(prepared.stages, work, prepared.official_rows, spec.warmup, spec.repeat,
                                 prepared.runner)
        stages, by_scale = ({}, []) if prepared.graphed else stage_split(prepared.stages, work, prepared.official_rows)
    med, B = timing.median, work.batch
    if stages:
        stages["other"] = max(0.0, med - sum(stages.values()))
    scale = B / max(spec.batches)                                  # flops were counted at the largest batch
    eff = {k: flops[k] * scale / stages[k] / 1e9 for k in STAGE_KEYS if stages.get(k) and flops.get(k)}
    eff["total"] = sum(flops[k] for k in STAGE_KEYS if flops.get(k)) * scale / med / 1e9
    diff = lambda ref: float((timing.tokens - ref).abs().max()) if ref is not None else None   # noqa: E731
    d, d32 = diff(reference.get("eager")), diff(reference.get("fp32"))
    ok = None if d is None else d <= spec.tolerance(reference["reduced"], prepared.precision, name)
    if ok is False and d32 is not None and reference.get("eager_vs_fp32") is not None:
        ok = within_16_bit_rounding(d32, reference["eager_vs_fp32"])
    return Result(backend=name, batch=B, median_s=med, min_s=min(timing.times), max_s=max(timing.times),
                  speedup_vs_eager=reference["median"] / med if reference.get("median") else None,
                  max_abs_diff_vs_eager=d, stage_median_s=stages, tokens_per_s=B * work.config.seq_len / med,
                  images_per_s=B / med, effective_gflops=eff, build_s=prepared.build_s, note=prepared.note,
                  head_by_scale_s=by_scale,
                  parity_ok=ok, schedule=schedule_name, head_evals=work.schedule.head_evals,
                  max_abs_diff_vs_official=diff(reference.get("official")), precision=prepared.precision,
                  max_abs_diff_vs_fp32=d32), timing.tokens


def run(spec: BenchSpec) -> int:
    from flowar.sampling.schedule import Settings
    source, label, random_weights, reduced = open_bench_source(spec)
    config = source.model.config
    schedules = {s: Settings(schedule=s, steps=spec.steps, cfg=spec.cfg, guidance=spec.guidance).resolve(config.n_scales)
                 for s in spec.schedules}
    decode = source.vae is not None
    official = schedules["official"]
    print(f"# FlowAR latency: {label}{' (random weights)' if random_weights else ''}, {spec.dtype} PyTorch stages, "
          f"schedules {', '.join(s.describe() for s in schedules.values())}, cfg {official.cfg}, "
          f"guidance {official.guidance}, {'tokens + decode' if decode else 'tokens only'}, device {spec.device}",
          flush=True)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    fp32, bf16 = gemm_peak_gflops(spec.device), gemm_peak_gflops(spec.device, dtype=torch.bfloat16)
    peak = max(fp32, bf16)          # shares are of the faster GEMM this machine has (bf16 where it is native)
    info = machine_info() | {"gemm_peak_gflops": fp32, "bf16_gemm_peak_gflops": bf16}
    print(f"# machine: {info['cpu']}, {info['torch_threads']} threads, GPU {info['gpu']}; GEMM peak fp32 "
          f"{fp32:.1f}, bf16 {bf16:.1f} GFLOP/s (shares below are of {peak:.0f})", flush=True)
    flops = {n: schedule_flops(source.model, source.vae, s, max(spec.batches)) for n, s in schedules.items()}
    results: list[Result] = []
    from flowar.engines.cpu import OthersShare
    busy = OthersShare()              # what other processes computed while the backends were timed
    with Backends(source) as backends:
        for B in spec.batches:
            labels = (torch.arange(B) % config.num_classes).to(spec.device)
            reference = {"reduced": reduced}
            for sname, schedule in schedules.items():
                work = Work(config, schedule, labels, spec.seed, decode, spec.device)
                reference.pop("eager", None)
                reference.pop("eager_vs_fp32", None)
                if spec.dtype != "fp32":
                    reference["fp32"] = backends.fp32_tokens(work)
                for name in spec.backends:
                    try:
                        with busy:
                            res, tokens = measure(backends, name, work, sname, spec, flops[sname], reference)
                    except Skip as s:
                        print(f"  skip {name} (batch {B}): {s}", flush=True)
                        results.append(Result.skipped(name, B, str(s), sname, schedule.head_evals))
                        continue
                    if name == "eager":
                        reference["eager"], reference["eager_vs_fp32"] = tokens, res.max_abs_diff_vs_fp32
                        if sname == "official":
                            reference |= {"official": tokens, "median": res.median_s}
                            res.speedup_vs_eager, res.max_abs_diff_vs_official = 1.0, 0.0
                        res.max_abs_diff_vs_eager, res.parity_ok = 0.0, True
                    results.append(res)
                    print(line(res, peak, spec.tolerance(reduced, res.precision, res.backend)), flush=True)
    info["others_cpu"] = None if busy.share is None else round(busy.share, 3)
    if (busy.share or 0.0) > busy.BUSY:             # (a ratio from a shared machine was printed without a word)
        print(f"# warning: other processes took {busy.share:.0%} of this machine's CPU while the backends were timed: "
              "the times and ratios above measure them too; run again on a quiet machine", file=sys.stderr, flush=True)
    fresh = None
    if spec.fresh and spec.engine_dir:
        from latency_fresh import fresh_runs, lines
        print(f"# fresh processes: flowar-run --engine-dir against flowar-run --ckpt, {spec.fresh} each", flush=True)
        try:
            fresh = fresh_runs(spec.engine_dir, spec.fresh, spec.threads)
            print("\n".join(lines(fresh)), flush=True)
        except Exception as e:   # noqa: BLE001 - the warm results are still written, with the reason beside them
            from flowar.errors import FlowARError
            fresh = {"error": str(e) if isinstance(e, FlowARError) else f"{type(e).__name__}: {e}"[:300]}
            print(f"# fresh processes failed: {fresh['error']}", file=sys.stderr, flush=True)
    return report(spec, results, info, label, random_weights, schedules, decode, flops, peak, config, fresh)


def report(spec, results, info, label, random_weights, schedules, decode, flops, peak, config, fresh=None) -> int:
    table = markdown(results, peak, decode) + "\n\n" + scale_table(results, config.scales)
    if fresh is not None and "error" not in fresh:
        from latency_fresh import lines
        table += "\n\n" + "\n".join(lines(fresh))
    print()
    print(table)
    official = schedules["official"]
    out = {"machine": info, "source": label, "random_weights": random_weights, "dtype": spec.dtype,
           "schedules": {n: s.describe() for n, s in schedules.items()}, "cfg": official.cfg,
           "guidance": official.guidance, "decode": decode, "flops_per_max_batch": flops,
           "results": [asdict(r) for r in results], "fresh_processes": fresh, "markdown": table}
    from flowar.io.files import atomic_write_bytes
    if spec.json:
        atomic_write_bytes(spec.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1, default=float)))
        print(f"\nJSON -> {spec.json}")
    if spec.plot:
        plot(results, Path(spec.plot), label)
        print(f"chart -> {spec.plot}")
    wrong = [f"{r.backend} {r.schedule} batch {r.batch} ({r.max_abs_diff_vs_eager:.1e})" for r in results
             if r.parity_ok is False]
    if wrong:
        print(f"error: expected every backend's tokens within the parity tolerance of eager's (1e-3 in float32, "
              f"5e-2 in 16 bits, or --parity-tol; in a 16-bit run, or off fp32 eager by at most 1.5x 16-bit eager's "
              f"own error); got {', '.join(wrong)}. "
              "Fix: rebuild the engines from this checkpoint, or, if the precision explains it, pass --parity-tol "
              "(float32 rows) or --reduced-tol (16-bit rows and engines)",
              file=sys.stderr)
        return 1
    if fresh is not None and "error" in fresh:
        print(f"error: expected the fresh-process runs (--fresh); got {fresh['error']}. Fix: check that "
              "flowar-run --engine-dir and --ckpt run from a shell (the warm results above are written)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
