"""Latency of FlowAR sampling: eager PyTorch (the official way) vs this project's backends.

    python bench/latency.py --preset flowar-s --batch 1 --backends eager,ort
    python bench/latency.py --engine-dir out/engines --batch 1,8 --backends eager,torch,ort

Backends:
  eager      the official method in eager PyTorch: KV-cached AR, every ODE step evaluates all
             2B rows and recomputes the head's per-scale constants. The baseline (ratio 1.0).
  eager-bf16 the same under bfloat16 autocast (what the official GPU evaluation does in fp16).
  torch      this project's sampler on eager PyTorch stages (B rows where guidance cannot act,
             per-scale constants once per scale).
  compile    as torch, with the head's velocity under torch.compile (compile time reported apart).
  ort        the lean runtime on ONNX Runtime engines (exported on the fly for --preset/--ckpt).
  auto       the runtime on what `flowar-export --precision auto` measures and picks on this
             machine, per stage (ONNX Runtime fp32, PyTorch fp32 or PyTorch bf16).
  trt        the runtime on TensorRT plans (GPU with TensorRT only).
  cudagraph  the runtime on PyTorch stages replayed as CUDA graphs (GPU only).

Every backend samples with the same seeded noise; its tokens are compared with eager's and the
worst difference is printed beside the time; a backend above --parity-tol is marked WRONG and
the run exits with status 1 (after writing its outputs). Warm-up runs are discarded; medians, min and max
are over --repeat runs. Effective GFLOP/s = FLOPs of the official method (counted once with
torch's FlopCounterMode) / time, against a float32 GEMM peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ALL_BACKENDS = ("eager", "eager-bf16", "torch", "compile", "ort", "auto", "trt", "cudagraph")


# ---- timing wrapper around any Stages --------------------------------------------------------

class StageProbe:
    """Wraps any Stages and measures each call by stage: AR, head (prepare + velocity), decode."""

    def __init__(self, inner, measure):
        self.inner, self.measure = inner, measure      # measure(key, fn, *args) -> fn(*args)
        self.host_threads = getattr(inner, "host_threads", None)

    def start(self, labels):
        self.inner.start(labels)

    def ar(self, k, x):
        return self.measure("ar", self.inner.ar, k, x)

    def prepare(self, k, cond):
        return self.measure("head", self.inner.prepare, k, cond)

    def velocity(self, ctx, x, t):
        return self.measure("head", self.inner.velocity, ctx, x, t)

    def decode(self, latent):
        return self.measure("decode", self.inner.decode, latent)


class TimedStages(StageProbe):
    """Accumulates wall time per stage (synchronising before reading the clock)."""

    def __init__(self, inner, sync):
        super().__init__(inner, self._timed)
        self.sync = sync
        self.t = {"ar": 0.0, "head": 0.0, "decode": 0.0}
        self.head_by_scale: dict[int, float] = {}      # head time of each scale (the AR step opens a scale)
        self._k = 0

    def ar(self, k, x):
        self._k = k
        return super().ar(k, x)

    def _timed(self, key, fn, *a):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*a)
        self.sync()
        dt = time.perf_counter() - t0
        self.t[key] += dt
        if key == "head":
            self.head_by_scale[self._k] = self.head_by_scale.get(self._k, 0.0) + dt
        return out


@dataclass
class Result:
    backend: str
    batch: int
    median_s: float
    min_s: float
    max_s: float
    speedup_vs_eager: float | None
    max_abs_diff_vs_eager: float | None
    stage_median_s: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    images_per_s: float = 0.0
    effective_gflops: dict = field(default_factory=dict)
    build_s: float | None = None
    note: str = ""
    head_by_scale_s: list = field(default_factory=list)   # median head seconds per scale
    parity_ok: bool | None = None                          # max_abs_diff_vs_eager within --parity-tol
    schedule: str = "official"                             # the sampling schedule (official, fast)
    head_evals: int = 0                                    # head evaluations per sample
    max_abs_diff_vs_official: float | None = None          # tokens vs eager with the official schedule
    precision: str = "fp32"                                # what the backend computes in


def machine_info() -> dict:
    from flowar.engines.cpu import cpu_kind
    from flowar.engines.ort import cpu_threads
    from flowar.export.manifest import library_versions
    kind = cpu_kind()
    return library_versions() | {
        "cpu": kind["model"], "cpu_flags": kind["flags"], "cpu_cores_usable": cpu_threads(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def gemm_peak_gflops(device: torch.device, n: int = 2048, repeat: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the run ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--engine-dir", help="engine directory from flowar-export (its checkpoint is the eager model)")
    src.add_argument("--preset", help="random weights of a preset: flowar-s, flowar-l, flowar-h, tiny")
    src.add_argument("--ckpt", help="a checkpoint (self-describing, or with --config)")
    ap.add_argument("--config", help="config JSON for --ckpt files that carry none")
    ap.add_argument("--vae", help="include VAE decoding (--preset/--ckpt); engine dirs use their own decoder")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    ap.add_argument("--schedules", default="official", help="comma-separated sampling schedules: official, fast "
                    "(speed ratios are against eager with the official schedule; parity against eager with the same one)")
    ap.add_argument("--steps", type=int, default=None, help="time-grid points [default: the schedule's, 25]")
    ap.add_argument("--cfg", type=float, default=4.3)
    ap.add_argument("--guidance", type=float, default=0.9)
    ap.add_argument("--backends", default="eager,torch,ort", help=f"comma-separated, from {','.join(ALL_BACKENDS)}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/out/latency.json", help="write results here")
    ap.add_argument("--plot", default="bench/out/latency.png", help="write a per-stage bar chart here")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="PyTorch backends: run the stages under autocast in this type (as the official evaluation "
                         "does with fp16 on GPU); engines keep the precision they were exported with")
    ap.add_argument("--parity-tol", type=float, default=None,
                    help="largest max|tokens - eager tokens| a backend may show before it is marked WRONG "
                         "(default 1e-3 in float32, 5e-2 with --dtype bf16/fp16 or reduced-precision engines)")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flowar.errors import FlowARError
    try:
        return run(a)
    except FlowARError as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if a.debug:
            raise
        print(f"error: expected paths this command can read and write; got {e.filename or ''}: {e.strerror or e}. "
              "Fix: check the path, its permissions and the free disk space", file=sys.stderr)
        return 2


def run(a) -> int:
    from flowar.errors import FlowARError
    from flowar.sampler import per_sample_noise, sample
    from flowar.schedule import SCHEDULES, sampling_schedule

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad or not backends:
        raise FlowARError(f"--backends from {', '.join(ALL_BACKENDS)}", f"{bad or 'none'}", "e.g. --backends eager,ort")
    if "eager" not in backends:
        backends.insert(0, "eager")                 # ratios and parity need the baseline in the same run
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        raise FlowARError("--batch as comma-separated integers", repr(a.batch), "e.g. --batch 1,8") from None
    if a.parity_tol is not None and not a.parity_tol >= 0:
        raise FlowARError("--parity-tol >= 0", repr(a.parity_tol), "e.g. --parity-tol 1e-3")
    if any(b < 1 for b in batches) or a.repeat < 1:
        raise FlowARError("--batch and --repeat >= 1", f"{a.batch} / {a.repeat}", "use positive numbers")
    names = [s.strip() for s in a.schedules.split(",") if s.strip()]
    if not names or any(s not in SCHEDULES for s in names):
        raise FlowARError(f"--schedules from {', '.join(SCHEDULES)}", repr(a.schedules), "e.g. --schedules official,fast")
    if "official" not in names:
        names.insert(0, "official")                 # the baseline of every ratio
    from flowar.outputs import check_writable
    check_writable(a.json or None, False, "--json")
    check_writable(a.plot or None, False, "--plot")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    model, vae, engine_dir, random_weights, label = load_source(a, device)
    reduced = a.dtype != "fp32" or (engine_dir is not None and read_precision(engine_dir) != "fp32")
    def tol_for(precision: str) -> float:
        """--parity-tol, else 1e-3 in float32 and 5e-2 where this run or the backend computes in 16 bits."""
        if a.parity_tol is not None:
            return a.parity_tol
        return 5e-2 if reduced or "16" in precision else 1e-3
    config = model.config
    schedules = {s: sampling_schedule(config.n_scales, schedule=s, steps=a.steps, cfg=a.cfg, guidance=a.guidance)
                 for s in names}
    schedule = schedules["official"]
    decode = vae is not None
    print(f"# FlowAR latency: {label}{' (random weights)' if random_weights else ''}, {a.dtype} PyTorch stages, "
          f"schedules {', '.join(s.describe() for s in schedules.values())}, cfg {a.cfg}, "
          f"guidance {a.guidance}, {'tokens + decode' if decode else 'tokens only'}, device {device}", flush=True)
    peak = gemm_peak_gflops(device)
    info = machine_info() | {"gemm_peak_gflops": peak}
    print(f"# machine: {info['cpu']}, {info['torch_threads']} threads, GPU {info['gpu']}; fp32 GEMM peak {peak:.1f} GFLOP/s",
          flush=True)
    flops = official_flops(model, vae, schedule, max(batches))
    results: list[Result] = []
    for B, (sname, schedule) in ((B, s) for B in batches for s in schedules.items()):
        labels = torch.arange(B) % config.num_classes
        eager_tokens = None
        if sname == "official":
            official_tokens, eager_median = None, None
        for backend in backends:
            try:
                factory, build_s, note, official, precision = make_backend(backend, model, vae, engine_dir, B, device,
                                                                           a, schedule)
            except Skip as s:
                print(f"  skip {backend} (batch {B}): {s}", flush=True)
                results.append(Result(backend, B, float("nan"), float("nan"), float("nan"), None, None, note=str(s),
                                      schedule=sname, head_evals=schedule.head_evals))
                continue
            times, stage_t, tokens = [], [], None
            runner = getattr(factory, "runner", None)
            graphed = runner is not None              # replayed graphs: no per-stage split
            if graphed and a.warmup < 1:
                raise FlowARError("--warmup >= 1 with the cudagraph backend (the warm-up run captures)",
                                  str(a.warmup), "use --warmup 1")
            for r in range(a.warmup + a.repeat):
                st = factory() if graphed else TimedStages(factory(), lambda: sync(device))
                sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    tok, _ = sample(st, config, schedule, labels.to(device), per_sample_noise(a.seed, range(B)),
                                    decode=decode, device=device, official_rows=official, check="none",
                                    runner=runner)
                sync(device)
                if r >= a.warmup:
                    times.append(time.perf_counter() - t0)
                    stage_t.append({"ar": 0.0, "head": 0.0, "decode": 0.0, "by_scale": {}} if graphed else
                                   dict(st.t) | {"by_scale": dict(st.head_by_scale)})
                tokens = tok.cpu()
            med = statistics.median(times)
            if backend == "eager":
                eager_tokens = tokens
                if sname == "official":
                    official_tokens, eager_median = tokens, med
            diff = float((tokens - eager_tokens).abs().max()) if eager_tokens is not None else None
            vs_official = float((tokens - official_tokens).abs().max()) if official_tokens is not None else None
            stages_med = {k: statistics.median(s[k] for s in stage_t) for k in ("ar", "head", "decode")}
            stages_med["other"] = max(0.0, med - sum(stages_med.values()))
            by_scale = [statistics.median(s["by_scale"].get(k, 0.0) for s in stage_t) for k in range(config.n_scales)]
            n_tok = B * config.seq_len
            eff = {k: (flops[k] * B / max(batches)) / stages_med[k] / 1e9 for k in ("ar", "head", "decode")
                   if stages_med[k] > 0 and flops.get(k)}
            eff["total"] = sum(flops[k] for k in ("ar", "head", "decode") if flops.get(k)) * B / max(batches) / med / 1e9
            res = Result(backend, B, med, min(times), max(times), eager_median / med if eager_median else None, diff,
                         stages_med, n_tok / med, B / med, eff, build_s, note, by_scale if not graphed else [],
                         None if diff is None else bool(diff <= tol_for(precision)), sname, schedule.head_evals,
                         vs_official,
                         precision)
            results.append(res)
            print(f"  {backend:<9} {sname:<8} batch {B:<3} median {med:8.3f} s  x{res.speedup_vs_eager or 0:5.2f} vs eager  "
                  f"max|dtokens| {diff if diff is not None else float('nan'):.1e}"
                  f"{'' if res.parity_ok is not False else f' WRONG (above {tol_for(precision):g})'}  "
                  f"{eff['total']:.1f} GFLOP/s ({eff['total'] / peak:.0%} of peak){'  ' + note if note else ''}", flush=True)
    table = markdown(results, peak, decode) + "\n\n" + scale_table(results, config.scales)
    wrong = [f"{r.backend} {r.schedule} batch {r.batch} ({r.max_abs_diff_vs_eager:.1e})" for r in results
             if r.parity_ok is False]
    print()
    print(table)
    out = {"machine": info, "source": label, "random_weights": random_weights, "dtype": a.dtype,
           "schedules": {n: s.describe() for n, s in schedules.items()}, "cfg": a.cfg,
           "guidance": a.guidance, "decode": decode, "official_flops_per_max_batch": flops,
           "results": [asdict(r) for r in results], "markdown": table}
    if a.json:
        from flowar.outputs import atomic_write_bytes
        atomic_write_bytes(a.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1, default=float)))
        print(f"\nJSON -> {a.json}")
    if a.plot:
        plot(results, Path(a.plot), label)
        print(f"chart -> {a.plot}")
    if wrong:
        print(f"error: expected every backend's tokens within the parity tolerance of eager's (1e-3 in float32, "
              f"5e-2 in 16 bits, or --parity-tol); got {', '.join(wrong)}. "
              "Fix: rebuild the engines from this checkpoint, or pass --parity-tol if the precision explains it",
              file=sys.stderr)
        return 1
    return 0


class Skip(Exception):
    pass


def read_precision(engine_dir) -> str:
    from flowar.export.manifest import read_manifest
    return read_manifest(engine_dir).get("precision", "fp32")


def load_source(a, device):
    from flowar.checkpoint import load_model
    from flowar.config import get_preset
    from flowar.model import FlowAR
    vae = None
    if a.engine_dir:
        from flowar.export.manifest import read_manifest
        m = read_manifest(a.engine_dir)
        model, _ = load_model(m["checkpoint"]["source"], config=m["config_obj"], device=device)
        if m.get("vae"):
            from flowar.vae import load_vae
            vae = load_vae(m["vae"]["source"]).to(device)
        return model, vae, Path(a.engine_dir), False, f"engine dir {a.engine_dir}"
    if a.ckpt:
        model, ck = load_model(a.ckpt, config_path=a.config, device=device)
        label, rw = Path(a.ckpt).name, False
    else:
        torch.manual_seed(0)
        model = FlowAR(get_preset(a.preset or "flowar-s")).eval()
        # The official init zeroes the head's output layer (velocity identically 0): perturb every
        # parameter, as the official fixtures do, so that parity checks compare real numbers.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.02)
        model = model.to(device)
        label, rw = f"preset {a.preset or 'flowar-s'}", True
    if a.vae:
        from flowar.vae import load_vae
        vae = load_vae(a.vae, expect_channels=model.config.latent_channels).to(device)
    return model, vae, None, rw, label


def official_flops(model, vae, schedule, B: int) -> dict:
    """FLOPs of one official-style sample of batch B, per stage, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    from flowar.sampler import per_sample_noise, sample
    from flowar.stages import OfficialStyleStages

    counted = {"ar": 0, "head": 0, "decode": 0}

    def count(key, fn, *a):
        with FlopCounterMode(display=False) as fc:
            out = fn(*a)
        counted[key] += fc.get_total_flops()
        return out

    dev = next(model.parameters()).device
    st = StageProbe(OfficialStyleStages(model, vae.decode if vae is not None else None), count)
    with torch.inference_mode():
        sample(st, model.config, schedule, torch.zeros(B, dtype=torch.int64, device=dev),
               per_sample_noise(0, range(B)),
               decode=vae is not None, device=dev, official_rows=True)
    return counted


def make_backend(name, model, vae, engine_dir, B, device, a, schedule):
    """(stages factory, build seconds, note, official_rows, precision) for one backend."""
    from flowar.stages import OfficialStyleStages, TorchStages
    dec = vae.decode if vae is not None else None
    if name == "eager":
        return autocast(lambda: OfficialStyleStages(model, dec), device, a.dtype), None, "", True, a.dtype
    if name == "eager-bf16":
        return autocast(lambda: OfficialStyleStages(model, dec), device, "bf16"), None, "", True, "bf16 autocast"
    if name == "torch":
        return autocast(lambda: TorchStages(model, dec), device, a.dtype), None, "", False, a.dtype
    if name == "compile":
        t0 = time.perf_counter()
        compiled = autocast(CompiledStages.build(model, dec), device, a.dtype)
        st = compiled()
        from flowar.sampler import per_sample_noise, sample
        with torch.inference_mode():      # compile every (scale, rows) shape now, timed apart
            sample(st, model.config, schedule,
                   torch.zeros(B, dtype=torch.int64, device=device), per_sample_noise(0, range(B)),
                   decode=False, device=device)
        return compiled, time.perf_counter() - t0, f"compile {time.perf_counter() - t0:.0f} s", False, a.dtype
    if name == "ort":
        d, build_s = ensure_engine_dir(engine_dir, model, vae, a, max(int(b) for b in a.batch.split(",")))
        from flowar.runtime.load import open_engine_dir
        rt = open_engine_dir(d, "ort")
        if B > rt.manifest["max_batch"]:
            raise Skip(f"batch {B} above the directory's max batch {rt.manifest['max_batch']}")
        return ((lambda: rt.stages), build_s, rt.detail + (f", export {build_s:.0f} s" if build_s else ""), False,
                rt.manifest["precision"] if rt.manifest["precision"] != "auto" else "fp32")
    if name == "auto":
        d, build_s = ensure_engine_dir(engine_dir if engine_dir is not None and read_precision(engine_dir) == "auto"
                                       else None, model, vae, a, max(int(b) for b in a.batch.split(",")), "ort", "auto")
        from flowar.runtime.load import open_engine_dir
        rt = open_engine_dir(d, "auto")
        if B > rt.manifest["max_batch"]:
            raise Skip(f"batch {B} above the directory's max batch {rt.manifest['max_batch']}")
        choice = rt.manifest["auto"]["choice"]
        return ((lambda: rt.stages), build_s, rt.detail + (f", export and measure {build_s:.0f} s" if build_s else ""),
                False, "auto: " + ", ".join(f"{s} {c}" for s, c in choice.items()))
    if name == "trt":
        if not torch.cuda.is_available():
            raise Skip("TensorRT needs a CUDA GPU")
        d, build_s = ensure_engine_dir(engine_dir, model, vae, a, max(int(b) for b in a.batch.split(",")), "trt")
        from flowar.runtime.load import open_engine_dir
        rt = open_engine_dir(d, "trt")
        return (lambda: rt.stages), build_s, rt.detail, False, rt.manifest["precision"]
    if name == "cudagraph":
        if device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA GPU")
        from flowar.runtime.cudagraph import GraphRunner
        from flowar.runtime.pipeline import torch_engine_stages
        stages = autocast(lambda: torch_engine_stages(model, B, device, vae), device, a.dtype)()
        factory = lambda: stages                                            # noqa: E731
        factory.runner = GraphRunner(device)               # captures on the first (warm-up) run, replays after
        return factory, None, "CUDA graphs, captured in the warm-up run", False, a.dtype
    raise Skip(f"unknown backend {name}")


def autocast(factory, device, dtype: str):
    """Stages factory whose calls run under torch.autocast (fp32: unchanged)."""
    if dtype == "fp32":
        return factory
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def measure(key, fn, *a):
        with torch.autocast(device.type, dtype=dt):
            return fn(*a)
    return lambda: StageProbe(factory(), measure)


class CompiledStages:
    """TorchStages whose head velocity runs under torch.compile (one compiled function shared)."""

    @staticmethod
    def build(model, dec):
        from flowar.stages import TorchStages
        import torch._dynamo
        # one specialisation per (scale, rows): 2 x scales x batches, above the default limit of 8
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        vel = torch.compile(model.flownet.velocity, dynamic=False)

        class _S(TorchStages):
            def velocity(self, ctx, x, t):
                return vel(x, t, ctx)
        return lambda: _S(model, dec)


_ENGINE_CACHE: dict = {}


def ensure_engine_dir(engine_dir, model, vae, a, max_batch, backend="ort", precision="fp32"):
    if engine_dir is not None:
        return engine_dir, None
    key = (id(model), backend, precision)
    if key in _ENGINE_CACHE:
        return _ENGINE_CACHE[key], None
    from flowar.build import build_engine_dir
    from flowar.checkpoint import save_checkpoint
    tmp = Path(tempfile.mkdtemp(prefix="flowar-bench-"))
    ck = tmp / "model.safetensors"
    save_checkpoint(ck, model.state_dict(), model.config)
    t0 = time.perf_counter()
    vae_path = None
    if vae is not None:
        vae_path = tmp / "vae"
        vae.autoencoder.save_pretrained(vae_path)
    build_engine_dir(ck, tmp / "engines", vae_path=vae_path, backend=backend, max_batch=max_batch, verify=False,
                     precision=precision)
    _ENGINE_CACHE[key] = tmp / "engines"
    return tmp / "engines", time.perf_counter() - t0


def markdown(results: list[Result], peak: float, decode: bool) -> str:
    head = ("| backend | precision | schedule | head evals | batch | median s | min s | max s | vs eager official | AR s | head s | "
            + ("decode s | " if decode else "")
            + "other s | tokens/s | images/s | GFLOP/s (% peak) | max abs diff vs eager (same schedule) |")
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in results:
        if r.median_s != r.median_s:
            rows.append(f"| {r.backend} | {r.precision} | {r.schedule} | {r.head_evals} | {r.batch} | skipped: {r.note} |")
            continue
        s = r.stage_median_s
        tot = r.effective_gflops.get("total", 0.0)
        rows.append(f"| {r.backend} | {r.precision} | {r.schedule} | {r.head_evals} | {r.batch} | {r.median_s:.3f} | {r.min_s:.3f} | {r.max_s:.3f} | "
                    f"{r.speedup_vs_eager:.2f}x | {s['ar']:.3f} | {s['head']:.3f} | " + (f"{s['decode']:.3f} | " if decode else "")
                    + f"{s['other']:.3f} | {r.tokens_per_s:.0f} | {r.images_per_s:.2f} | {tot:.1f} ({tot / peak:.0%}) | "
                    f"{r.max_abs_diff_vs_eager:.1e}{' WRONG' if r.parity_ok is False else ''} |")
    return "\n".join(rows)


def scale_table(results: list[Result], scales) -> str:
    """Head time (per-scale constants + the ODE loop) of each scale: where the time goes."""
    head = "| backend | schedule | batch | " + " | ".join(f"head {s}x{s} s" for s in scales) + " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.head_by_scale_s:
            rows.append(f"| {r.backend} | {r.schedule} | {r.batch} | " + " | ".join(f"{t:.4f}" for t in r.head_by_scale_s) + " |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.median_s == r.median_s]
    if not ok:
        return
    names = [f"{r.backend}\n{r.schedule}\nB={r.batch}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(ok)), 4), dpi=110)
    bottom = [0.0] * len(ok)
    for stage, color in (("ar", "#4c72b0"), ("head", "#dd8452"), ("decode", "#55a868"), ("other", "#8c8c8c")):
        vals = [r.stage_median_s.get(stage, 0.0) for r in ok]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=stage, color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(ok):
        ax.text(i, bottom[i], f"{r.speedup_vs_eager:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per sample call (median)")
    ax.set_title(f"FlowAR latency per stage: {label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from flowar.outputs import atomic_write_bytes
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
