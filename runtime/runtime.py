"""The runtime object: one opened source and everything it owns.

    with Runtime.open("out/engines") as rt:                  # an engine directory, or a checkpoint file
        sched = rt.schedule(Settings(schedule="fast"))
        res = rt.sample([3, 7], sched, seed=0)                # tokens, images in [-1, 1], seconds

A :class:`Runtime` is opened in one of two ways. :meth:`Runtime.open_engine_dir` reads what
``flowar-export`` wrote and opens the engines chosen for this machine: TensorRT (and CUDA graphs)
on a GPU where the plans fit, the ``--precision auto`` choice on a CPU, else ONNX Runtime; or what
``backend`` names. :meth:`Runtime.open_checkpoint` loads a checkpoint into the reference modules
(eager PyTorch; on a GPU behind static buffers, so that CUDA graphs can replay it). Either way the
result owns its stages, its batch limit, its thread policy and its runner (the per-scale runner
that replays CUDA graphs, keyed by batch bucket and schedule), and samples through the one
sampler loop. :class:`~flowar.pipeline.pipeline.FlowARPipeline` holds one, and every command
opens its source in one of those two ways.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from flowar.config import MAX_BATCH, FlowARConfig
from flowar.errors import FlowARError
from flowar.export.manifest import Manifest, read_manifest
from flowar.runtime.directory import choose_backend, directory_engines, trt_engines, trt_unused
from flowar.runtime.threads import Threads
from flowar.sampling.batches import SampleResult, batch_that_fits, run_sampling
from flowar.sampling.labels import ClassNames, class_names_for
from flowar.sampling.sampler import Hooked, ScaleTrace, check_finite
from flowar.sampling.schedule import Schedule, Settings

GRAPH_BATCH = 16      # a checkpoint on a GPU: the static buffers' batch (larger requests run in batches)


class Runtime(contextlib.AbstractContextManager):
    """An opened source: its stages, limits, threads and runner, and the one sampling call; a
    context manager (leaving it closes the source)."""

    def __init__(self, *, kind: str, config: FlowARConfig, class_names: list[str] | None, stages, device: torch.device,
                 backend: str, detail: str, threads: Threads, decodes: bool, capture: bool = False,
                 max_batch: int | None = None, defaults: dict | None = None, manifest: Manifest | None = None,
                 image_size: int | None = None, call_plan: dict | None = None, model=None, vae=None,
                 trained: dict | None = None, stack: contextlib.ExitStack | None = None):
        from flowar.runtime.cudagraph import GraphRunner
        self.config, self.stages, self.device, self.threads = config, stages, device, threads
        self.class_names: ClassNames | None = class_names_for(config.num_classes, class_names)
        self.backend = backend              # torch (a checkpoint), ort, trt, or the --precision auto choice
        self.detail = detail                # what computes, per stage where it differs (logs, /health, run.json)
        self.decodes = decodes              # has a decoder: images, not only tokens
        self.image_size = image_size        # the side of its images (None without a decoder)
        self.max_batch = max_batch          # the engines' limit; None: any batch at once
        self.defaults = Settings.of(defaults)   # an engine directory's recorded defaults
        self.kind = kind                    # what it was opened from: "engine directory" (its manifest) or "checkpoint"
        self.manifest, self.model, self.vae = manifest, model, vae       # (its modules)
        self.opened: dict = {}              # seconds to open (read and check the files, warm up), shapes warmed
        self.trained = trained or {}        # a checkpoint's training record: its "data" (animal-mnist), its "vae" (trained_vae)
        # The call plan measured at export for the engines that run ({}: none, or other engines); from it the
        # batch sizes that pay here (each costs less per image than every smaller one), else every size
        # up to the engines' max batch ([]: no limit, one batch); and the default batch, the one with
        # the best images/s (the largest that pays; None: all at once).
        self.call_plan: dict = call_plan or {}
        self.batch_sizes = sorted(int(b) for b in self.call_plan.get("batches") or range(1, (max_batch or 0) + 1))
        self.batch: int | None = max(self.batch_sizes, default=None)
        # Where the stages can be captured, one runner for every batch: a workspace per (batch bucket: powers
        # of two up to the limit, and the limit; rows, schedule) and a CUDA graph per scale of each; elsewhere
        # the sampler's plain loop.
        self.runner = GraphRunner(device, capture=True, buckets=tuple(sorted(
            {1 << i for i in range(max_batch.bit_length())} | {max_batch}))) if capture else None
        # How many samplings may run at once, each on a thread of its own (lane()): 2 where every
        # engine computes in PyTorch's threads and takes calls from several threads at once (the
        # compiled and PyTorch engines on a CPU) and there are threads to share, else 1.
        engines = getattr(stages, "engines", {}).values()
        self.lanes = 2 if device.type == "cpu" and threads.host >= 2 and engines and all(
            getattr(e, "CALLS_AT_ONCE", 1) > 1 for e in engines) else 1
        if device.type == "cpu" and threads.torch_computes:
            from flowar.io.memory import reuse_large_allocations
            reuse_large_allocations()
        self._stack = stack or contextlib.ExitStack()
        self._calls, self._caller = threading.Lock(), None     # one sampling at a time (see sample)

    # ---- the two ways to open one -----------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, engine_dir: bool | None = None, **options) -> "Runtime":
        """An engine directory (a folder with ``manifest.json``) or a checkpoint file: what ``path``
        is, unless ``engine_dir`` says (the commands' ``--engine-dir`` / ``--ckpt``)."""
        p = Path(path)
        if p.is_dir() if engine_dir is None else engine_dir:
            ckpt_only = {k: v for k, v in options.items() if k in ("preset", "config", "vae", "raw_weights", "precision")
                         and v not in (None, False, "fp32")}
            if given := [f"--{k.replace('_', '-')}" for k in sorted(ckpt_only)]:     # (named as given: flowar-decode
                raise FlowARError(f"no {'/'.join(given)} with --engine-dir", ", ".join(given),  # has no --precision)
                                  "the engine directory records its config, decoder and precision; drop "
                                  + ", ".join(given))
            return cls.open_engine_dir(p, **{k: v for k, v in options.items() if k in
                                             ("backend", "device", "threads", "cuda_graphs", "warm", "ckpt", "only")})
        if options.get("backend", "auto") not in ("auto", "torch"):
            raise FlowARError("--backend auto or torch with --ckpt (engines come from an engine directory)",
                              repr(options["backend"]), "export it with flowar-export and pass --engine-dir")
        return cls.open_checkpoint(p, **{k: v for k, v in options.items() if k not in ("backend", "warm", "ckpt", "only")})

    @classmethod
    def open_engine_dir(cls, path: str | Path, *, backend: str = "auto", device: str | None = None,
                        threads: int | None = None, cuda_graphs: bool = True, ckpt: str | Path | None = None,
                        warm: Sequence[int] = (1,), only: Sequence[str] | None = None) -> "Runtime":
        """What ``flowar-export`` wrote, on the engines :func:`choose_backend` picks (``ckpt``: for
        ``backend="torch"``, the checkpoint the directory was exported from, if it moved); ``only``:
        these stages alone (``("decode",)``: flowar-decode, without FlowAR-H's 5 GB AR stage). ``warm``:
        the batch sizes whose shapes the engines that set up a lot per shape are run at once, here,
        so that the first image does not pay it, and whose ONNX Runtime sessions for row blocks are
        waited for (``()``: none; the first call that needs one of those waits; see :meth:`warm_up`)."""
        from flowar.device import resolve_device
        from flowar.runtime.engines import OrtEngine, enter_engines
        from flowar.runtime.stages import EngineStages
        m = read_manifest(path, note_edits=True)
        specs = {n: s for n, s in m.specs().items() if only is None or n in only}
        made = {n for s in specs.values() for n in s.outputs}
        if lacking := sorted({n for s in specs.values() for n in s.from_stage if n not in made}):    # (a KeyError)
            raise FlowARError("only= stages with the stages their inputs come from", f"{tuple(only)}, without the one "
                              f"making {', '.join(lacking)}", "add it, e.g. only=('head_prep', 'velocity')")
        if only is not None and "decode" in only and "decode" not in specs:
            raise FlowARError("an engine directory with a decode stage (images)", f"{path}, exported without --vae",
                              "export it again with --vae (the VAE the model was trained with)")
        # The engines decide where they compute ("auto": theirs); --device cpu keeps auto off the GPU
        # engines (TensorRT, ONNX Runtime's CUDA provider), --device chooses for the checkpoint's
        # modules (--backend torch), and a device the chosen engines do not compute on is refused.
        asked = None if device is None or str(device) == "auto" else resolve_device(device)
        gpu = asked is None or asked.type == "cuda"         # the GPU engines may be taken
        chosen = choose_backend(m, backend, gpu=gpu)
        stack = contextlib.ExitStack()
        try:
            t0 = time.perf_counter()
            if chosen == "trt":
                engines, dev, detail = trt_engines(m, specs, asked)
                threads_ = Threads.resolve(threads, False)
            else:
                from flowar.engines.ort import choose_provider
                provider = choose_provider(prefer_gpu=gpu, device=asked) if chosen == "ort" else "CPUExecutionProvider"
                # the checkpoint's modules where --device says, else on the GPU PyTorch sees; engines where their provider computes
                dev = ((asked or resolve_device("auto")) if chosen == "torch" else
                       torch.device("cuda" if provider == "CUDAExecutionProvider" else "cpu"))
            if asked is not None and asked.type != dev.type:
                raise FlowARError(f"--device {dev.type} for these engines ({detail if chosen == 'trt' else chosen})",
                                  str(asked), "omit --device (the engines decide); on a GPU: --backend torch (the "
                                  "checkpoint's modules), or ONNX Runtime's CUDA provider (pip install '.[gpu]')")
            if chosen != "trt":
                choice = m.choice if chosen == "measured" else {} if chosen == "ort" else dict.fromkeys(specs, "torch-fp32")
                engines, detail = directory_engines(m, specs, choice, chosen, Threads.resolve(threads, True).cores,
                                                    provider, dev, ckpt, trt_unused(m, backend, gpu, chosen) if m.tensorrt else "")
                # by what runs, not the record: a stage this CPU cannot run fast falls back to ONNX Runtime
                threads_ = Threads.resolve(threads, any(not isinstance(e, OrtEngine) for e in engines.values()))
            engines = enter_engines(stack, engines, threads_.cores if dev.type == "cpu" else 1)
            stages = EngineStages(engines, m.config, m.max_batch, dev, specs, m.call_plan if chosen == "measured"
                                  else None)
            seconds = {"read": time.perf_counter() - t0}
            t0 = time.perf_counter()
            warmed = 0
            if warm and any(getattr(e, "warm", False) or hasattr(e, "open_sessions") for e in engines.values()):
                with threads_.applied():
                    warmed = stages.warm_up(warm)
            seconds["warm-up"] = time.perf_counter() - t0
            rt = cls(kind="engine directory", config=m.config, class_names=m.class_names, stages=stages, device=dev,
                     backend=chosen, detail=detail, threads=threads_, decodes="decode" in specs, max_batch=m.max_batch,
                     capture=captures(dev, chosen, cuda_graphs), image_size=m.vae["image_size"] if m.vae else None,
                     call_plan=m.call_plan if chosen == "measured" else None,
                     defaults=m.schedule_defaults, manifest=m, trained={"data": m.checkpoint.get("data")},
                     stack=stack)
        except BaseException:               # (the engines entered so far closed: a failed open leaves none open)
            stack.close()
            raise
        rt.opened = seconds | {"shapes warmed": warmed}
        return rt

    @classmethod
    def open_checkpoint(cls, path: str | Path, *, preset: str | None = None, config: str | Path | FlowARConfig | None = None,
                        vae: str | Path | None = None, raw_weights: bool = False, device: str | None = None,
                        threads: int | None = None, precision: str = "fp32", cuda_graphs: bool = True) -> "Runtime":
        """A checkpoint (official .pth, training checkpoint, or .safetensors) in eager PyTorch;
        ``precision="bf16"``: its GEMMs and convolutions in bf16, float32 around them, the decoder in
        bf16 throughout (the engines' ``torch-bf16``; tensor cores on a GPU). On a CUDA device with
        ``cuda_graphs`` the modules run behind static buffers (batches of up to :data:`GRAPH_BATCH`)
        and every scale is captured once and replayed."""
        from flowar.device import resolve_device
        from flowar.model.checkpoint import check_vae, load_model, trained_vae
        if precision not in ("fp32", "bf16"):
            raise FlowARError("--precision fp32 or bf16 for a checkpoint", repr(precision), "use --precision bf16")
        threads_ = Threads.resolve(threads, True)
        dev = resolve_device(device)
        model, ck = load_model(path, preset, config, use_ema=not raw_weights, device=dev)
        vae_mod = None
        if vae:
            from flowar.model.vae import load_decoder
            vae_mod = load_decoder(vae, expect_channels=ck.config.latent_channels).to(dev)
            check_vae(ck, vae)
        if precision == "bf16":
            from flowar.runtime.bf16 import bf16_engine, bf16_gemms
            model, vae_mod = bf16_gemms(model), (bf16_engine(vae_mod, "decode") if vae_mod is not None else None)
        capture = captures(dev, "torch", cuda_graphs)
        if capture:                         # static buffers: the reference modules as engines
            from flowar.runtime.stages import torch_engine_stages
            stages = torch_engine_stages(model, GRAPH_BATCH, dev, vae_mod)
        else:
            from flowar.sampling.eager import EagerStages
            stages = EagerStages(model, vae_mod.decode if vae_mod else None)
        what = (f"eager PyTorch{' (bf16 GEMMs)' if precision == 'bf16' else ''} on {dev}"
                + (", CUDA graphs" if capture else ""))
        return cls(kind="checkpoint", config=ck.config, class_names=ck.class_names, stages=stages, device=dev, backend="torch",
                   detail=what, threads=threads_, decodes=vae_mod is not None, capture=capture,
                   image_size=ck.config.latent_size * vae_mod.downsample if vae_mod is not None else None,
                   max_batch=GRAPH_BATCH if capture else None, model=model, vae=vae_mod,
                   trained={"data": ck.metadata.get("data"), "vae": trained_vae(ck)})

    # ---- a request --------------------------------------------------------------------------
    def schedule(self, settings: Settings | None = None) -> Schedule:
        """The schedule of ``settings``, over this source's recorded defaults."""
        return (settings or Settings()).resolve(self.config.n_scales, self.defaults)

    def require_decoder(self) -> None:
        """Refuse, before any work, to make images from a source without a decoder."""
        if not self.decodes:
            if self.kind == "engine directory":
                self.manifest.require_decoder()          # (its own line: re-export with --vae)
            raise FlowARError("a VAE to decode images", "a checkpoint opened without a VAE",
                              f"pass --vae{self.trained.get('vae', '')}, or ask for tokens only (--save-tokens without --out or --save-images)")

    def warm_up(self, batch_sizes: Sequence[int], every_engine: bool | None = None) -> int:
        """Run the engines once at the shapes of these batch sizes (ONNX Runtime's: open the sessions
        they run on), so that no batch of those sizes pays what a new shape sets up (before a served
        replica's or a bulk worker's first batch; a command's request). By default the engines whose
        set-up per shape the export measured as large, and those whose set-up nothing says (FlowAR-S's aoti-bf16 and torch-bf16 engines
        set up 0.02-0.06 s per shape: warming them all took 18.8 s of a replica's 29 s start, while
        without it the first batch of each size ran as fast as the second; ONNX Runtime's unmeasured
        engines open their sessions, see :class:`~flowar.runtime.engines.OrtEngine`); ``every_engine`` True:
        all, False: only the engines flagged ``warm`` (measured large, or unmeasured eager PyTorch,
        which warms by default; a command). Returns the calls made."""
        with self._one_call("warm_up"):          # (one closed is refused: it said 0 calls made)
            return self.stages.warm_up(batch_sizes, every_engine=every_engine) if hasattr(self.stages, "warm_up") else 0

    def sample(self, labels: Sequence[int], schedule: Schedule, *, seed: int | Sequence[int] = 0,
               indices: Sequence[int] | None = None, noise_file: str | Path | None = None,
               batch_size: int | None = None, decode: bool = True, progress: bool | dict = False,
               on_scale: Callable[[ScaleTrace], None] | None = None, timings: dict | None = None) -> SampleResult:
        """Tokens (and images in [-1, 1] with ``decode``) of ``labels``: sample i gets the noise of
        (seed[i], indices[i]) (indices: 0, 1, ... for one seed; 0 for a seed per label), in batches of ``batch_size`` (default :attr:`batch`: the best images/s by
        the call plan, else the engines' max batch, else all at once; it changes images by float
        rounding only). ``timings``, when given, receives the seconds per stage (``ar``, ``head``,
        ``decode``; ``sampling`` where CUDA graphs replay whole scales) and ``total``."""
        if decode:
            self.require_decoder()
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise FlowARError("--batch an int >= 1", repr(batch_size), "use e.g. --batch 8")    # (3.0: "expected >= 1")
        if self.max_batch is not None and batch_size is not None and batch_size > self.max_batch:
            raise FlowARError(f"--batch at most {self.max_batch} (the engines' max batch)", str(batch_size),
                              f"use --batch {self.max_batch}, or " + (f"re-export with --max-batch {min(batch_size, MAX_BATCH)}" if
                                                                      self.kind == "engine directory" else "--no-cuda-graphs"))
        bs = batch_size or self.batch
        if self.max_batch is None and self.device.type == "cpu":       # (eager: all at once, where that fits)
            labels = list(labels)               # (counted here: an iterator of labels was taken before)
            bs = batch_that_fits(len(labels), batch_size, self.config, self.image_size if decode else None, self.vae)
        clock = _Clock(self.device) if timings is not None and self.runner is None else None
        with self._one_call():
            stages = Hooked(self.stages, self.threads.share) if self.lanes > 1 else self.stages
            res = run_sampling(Hooked(stages, clock) if clock else stages, self.config, list(labels),
                               schedule, seed, noise_file, decode=decode, device=self.device, progress=progress,
                               on_scale=on_scale, batch_size=bs, indices=indices, runner=self.runner)
        if timings is not None:
            timings.update(clock.read() if clock else {"sampling": res.seconds})
            timings["total"] = res.seconds
        return res

    @contextlib.contextmanager
    def _one_call(self, what: str = "sample"):
        """One call at a time on this runtime (two threads on one pipeline got each other's images; a
        lane samples beside it), in its thread policy, refused from inside its own callback."""
        if self._caller == threading.get_ident():
            raise FlowARError("one call at a time on a runtime", f"a {what} call from inside a sampling's callback",
                              f"{what} after that call returns (collect what the callback needs, then call)")
        with self._calls, torch.inference_mode(), self.threads.applied():
            if self.stages is None:         # (checked in turn: close() on another thread may have come first)
                raise _closed()
            self._caller = threading.get_ident()
            try:
                yield
            finally:
                self._caller = None

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) of token maps (B, C, S, S) as :meth:`sample` returns them
        with ``decode=False``: the images it would have decoded (in the default batches: by float
        rounding only where it ran other ones)."""
        self.require_decoder()
        c = self.config
        want = (c.latent_channels, c.latent_size, c.latent_size)
        if not (isinstance(tokens, torch.Tensor) and tokens.is_floating_point() and tokens.dim() == 4
                and tuple(tokens.shape[1:]) == want and len(tokens)):
            got = (f"a {tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise FlowARError(f"token maps of this model, a float tensor (B, {', '.join(map(str, want))}), B >= 1", got,
                              "pass the tokens a call returned with output_type=\"latent\"")
        if not bool(torch.isfinite(tokens).all()):      # (the decode's check blamed the checkpoint, "at scale 3")
            raise FlowARError("finite token maps", "NaN or Inf in the tokens passed", "pass the tokens a call returned")
        bs = self.batch or batch_that_fits(len(tokens), None, c, self.image_size, self.vae)   # (as sample's batches)
        with self._one_call("decode"):
            parts = [self.stages.decode(tokens[i:i + bs].to(self.device, torch.float32) / c.latent_scale).cpu()
                     for i in range(0, len(tokens), bs)]
        images = torch.cat(parts)           # (outside inference mode: a tensor its caller may change in place)
        check_finite(images, "VAE decode", c.n_scales - 1, c.latent_size)      # (as a sampling's decode is)
        return images

    def lane(self) -> "Runtime":
        """Another lane over the same engines: a runtime with static buffers of its own that samples
        at the same time as this one, on another thread (a served replica's second lane). Lanes
        share the cores: while both sample, each stage call runs on half the threads; this runtime
        gets them all when it samples alone, the lane never more than half (see :class:`Threads`).
        Call it on the thread the lane will sample on: that thread's PyTorch thread count becomes
        the lane's share, for good. Where the engines allow it (:attr:`lanes` > 1); closing a lane
        leaves the engines open."""
        from flowar.runtime.stages import EngineStages
        if self.stages is None:                 # (it was an AttributeError)
            raise _closed()
        if self.lanes < 2:
            raise FlowARError("engines that take calls from several threads (compiled or PyTorch, on a CPU)",
                              self.detail, "serve with one lane, or export with --precision auto on a CPU")
        s = self.stages
        other = copy.copy(self)
        other.threads = dataclasses.replace(self.threads, floor=self.lanes)
        torch.get_num_threads()                 # (a new thread takes PyTorch's global count here, first)
        torch.set_num_threads(max(1, self.threads.host // self.lanes))
        other.stages = EngineStages(s.engines, s.config, s.max_batch, s.device, s.specs, {"stages": s.plan})
        other._stack = contextlib.ExitStack()
        other._calls, other._caller = threading.Lock(), None   # (its buffers are its own)
        return other

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self, *exc) -> None:
        """Release the engines (sessions, packages, graphs), once a call running on another thread has
        returned (it failed half way); also what leaving a ``with`` does."""
        if self._caller == threading.get_ident():
            raise FlowARError("close() after the call returns", "close() from inside the call's callback",
                              "close it once the call has returned")
        with self._calls:
            self.runner = self.stages = None  # (a closed runtime refuses to sample: its engines are gone)
            self._stack.close()

    __exit__ = close


def _closed() -> FlowARError:
    return FlowARError("an open source", "one closed (after close() or its with block)", "open it again")


def captures(device: torch.device, backend: str, cuda_graphs: bool = True) -> bool:
    """Whether scales are captured as CUDA graphs: on a CUDA device, for TensorRT and PyTorch stages
    (ONNX Runtime sessions are not captured); on a CPU the runner runs the same plan uncaptured."""
    return cuda_graphs and device.type == "cuda" and backend in ("trt", "torch")


class _Clock:
    """Seconds per stage kind, summed over the calls (CUDA events on a GPU, read once at the end)."""

    KIND = {"start": "ar", "ar": "ar", "prepare": "head", "velocity": "head", "decode": "decode"}

    def __init__(self, device: torch.device):
        self.cuda, self.seconds, self.events = device.type == "cuda", {}, []

    def __call__(self, kind: str, fn, *args):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn(*args)
            b.record()
            self.events.append((self.KIND[kind], a, b))
            return out
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[self.KIND[kind]] = self.seconds.get(self.KIND[kind], 0.0) + time.perf_counter() - t0
        return out

    def read(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for kind, a, b in self.events:
                self.seconds[kind] = self.seconds.get(kind, 0.0) + a.elapsed_time(b) / 1e3
        return dict(self.seconds)
