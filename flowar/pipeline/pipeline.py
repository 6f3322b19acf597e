"""``FlowARPipeline``: the one way in, in the diffusers style.

    from flowar import FlowARPipeline
    with FlowARPipeline.from_pretrained("out/engines") as pipe:
        ids = pipe.get_label_ids(["white shark", "umbrella"])
        images = pipe(ids, seed=3, num_inference_steps=25, guidance_scale=4.3).images   # PIL

``from_pretrained`` opens an engine directory (what ``flowar-export`` wrote) through the runtime
on the engines chosen for this machine (TensorRT and CUDA graphs on a GPU where the plans fit,
the measured ``--precision auto`` choice on a CPU, else ONNX Runtime), or a checkpoint in eager
PyTorch. ``flowar-run``, ``flowar-serve``, ``flowar-sample``, ``flowar-judge`` and the bench all
sample through this object, so they run the same engines and give the same images.

A seed names an image: sample i of a call gets the noise of (seed, i), whatever the batch size,
backend, shard or worker (``indices`` renames the samples, for shards of a larger request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.runtime.source import Source, graph_runner, open_source
from flowar.sampling.batches import SampleResult, run_sampling
from flowar.sampling.labels import ClassNames, class_names_for, label_ids
from flowar.sampling.sampler import ScaleTrace
from flowar.sampling.schedule import Schedule, sampling_schedule

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(slots=True)
class FlowAROutput:
    """What a pipeline call returns.

    ``images``: a list of PIL images (``"pil"``), a float32 array (B, H, W, 3) in [0, 1] (``"np"``),
    a float32 tensor (B, 3, H, W) in [0, 1] (``"pt"``), or the latent tokens (B, C, S, S) in the
    scaled latent space (``"latent"``). ``timings``: seconds per stage (``ar``, ``head``,
    ``decode``; ``sampling`` instead where CUDA graphs replay whole scales) and ``total``.
    """
    images: Any
    labels: list[int]
    seeds: list[int]
    indices: list[int]
    timings: dict[str, float]
    tokens: Tensor


class _TimedStages:
    """The sampler's stages with the time spent in each one added up (CUDA events on a GPU, so
    that no call waits for the device; read once at the end)."""

    KIND = {"start": "ar", "ar": "ar", "prepare": "head", "velocity": "head", "decode": "decode"}

    def __init__(self, stages, device: torch.device):
        self.stages, self.cuda = stages, device.type == "cuda"
        self.host_threads = getattr(stages, "host_threads", None)
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    def _timed(self, name: str, *args):
        fn = getattr(self.stages, name)
        kind = self.KIND[name]
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn(*args)
            b.record()
            self._events.append((kind, a, b))
            return out
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
        return out

    def start(self, labels_R):
        return self._timed("start", labels_R)

    def ar(self, k, x_in):
        return self._timed("ar", k, x_in)

    def prepare(self, k, cond):
        return self._timed("prepare", k, cond)

    def velocity(self, ctx, x, t):
        return self._timed("velocity", ctx, x, t)

    def decode(self, latent):
        return self._timed("decode", latent)

    def read(self) -> dict[str, float]:
        if self._events:
            torch.cuda.synchronize()
            for kind, a, b in self._events:
                self.seconds[kind] = self.seconds.get(kind, 0.0) + a.elapsed_time(b) / 1e3
            self._events.clear()
        return dict(self.seconds)


@dataclass
class FlowARPipeline:
    """A source opened once (engines or a checkpoint) and the one sampling call over it."""

    source: Source
    cuda_graphs: bool = True
    _runners: dict = field(default_factory=dict, repr=False)
    _schedules: dict = field(default_factory=dict, repr=False)

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", preset: str | None = None,
                        config: str | Path | None = None, vae: str | Path | None = None,
                        device: str | None = None, threads: int | None = None, raw_weights: bool = False,
                        cuda_graphs: bool = True, precision: str = "fp32") -> "FlowARPipeline":
        """An engine directory (a folder with ``manifest.json``) or a checkpoint file.

        ``backend`` (engine directories): ``auto`` (TensorRT where usable, else the directory's
        ``--precision auto`` choice, else ONNX Runtime), ``ort``, ``trt``, ``torch``. ``preset`` /
        ``config`` / ``vae`` / ``raw_weights``: for checkpoints (official files carry no config).
        ``threads``: CPU cores to compute on (default: every core this process may use).
        ``precision`` (checkpoints): ``bf16`` computes the GEMMs in bf16 with float32 around them.
        """
        p = Path(path)
        if p.is_dir():
            return cls.open(engine_dir=p, backend=backend, preset=preset, config=config, vae=vae, device=device,
                            threads=threads, raw_weights=raw_weights, cuda_graphs=cuda_graphs, precision=precision)
        return cls.open(ckpt=p, backend=backend, preset=preset, config=config, vae=vae, device=device,
                        threads=threads, raw_weights=raw_weights, cuda_graphs=cuda_graphs, precision=precision)

    @classmethod
    def open(cls, *, ckpt: str | Path | None = None, engine_dir: str | Path | None = None, backend: str = "auto",
             preset: str | None = None, config: str | Path | None = None, vae: str | Path | None = None,
             device: str | None = None, threads: int | None = None, raw_weights: bool = False,
             cuda_graphs: bool = True, precision: str = "fp32") -> "FlowARPipeline":
        """Exactly one of ``ckpt`` or ``engine_dir`` (the commands' ``--ckpt`` / ``--engine-dir``)."""
        if ckpt and backend not in ("auto", "torch"):
            raise FlowARError("--backend auto or torch with --ckpt (engines come from an engine directory)",
                              repr(backend), "export it with flowar-export and pass --engine-dir")
        src = open_source(ckpt, engine_dir, backend=backend, preset=preset, config_path=config, vae=vae,
                          raw_weights=raw_weights, device=device or "auto", threads=threads, precision=precision)
        return cls(src, cuda_graphs)

    # ---- what it is -----------------------------------------------------------------------
    @property
    def config(self) -> FlowARConfig:
        return self.source.config

    @property
    def class_names(self) -> ClassNames | None:
        return class_names_for(self.config.num_classes, self.source.class_names)

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def backend(self) -> str:
        return self.source.backend

    @property
    def detail(self) -> str:
        """What computes, per stage where it differs (for logs, /health and run.json)."""
        return self.source.detail

    @property
    def max_batch(self) -> int | None:
        return self.source.max_batch

    @property
    def decodes(self) -> bool:
        return self.source.decodes

    def caption(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and label < len(names) else str(label)

    # ---- requests -------------------------------------------------------------------------
    def get_label_ids(self, names: str | Sequence[str]) -> list[int]:
        """Class ids from names (ImageNet names and synonyms for the official 1000-class models)."""
        return label_ids([names] if isinstance(names, str) else list(names), self.config.num_classes,
                         self.class_names)

    def schedule(self, schedule: str | None = None, *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, guidance: float | None = None, solver: str | None = None,
                 stride: int | None = None) -> Schedule:
        """The schedule of a call: what is given, else what the engine directory recorded, else
        the official sampler's (25-point grid, cfg 4.3, guidance 0.9).

        The same settings give the same object, so CUDA graphs captured for it are replayed by
        every later call (a served replica meets the same few settings again and again)."""
        key = (schedule, num_inference_steps, guidance_scale, guidance, solver, stride)
        sched = self._schedules.get(key)
        if sched is None:
            if len(self._schedules) >= 64:             # many distinct settings: do not hold graphs for each
                self._schedules.clear()
                self._runners.clear()
            sched = self._schedules[key] = sampling_schedule(
                self.config.n_scales, self.source.schedule_defaults, schedule=schedule, steps=num_inference_steps,
                cfg=guidance_scale, guidance=guidance, solver=solver, stride=stride)
        return sched

    def batch_size(self, requested: int | None = None) -> int | None:
        return self.source.batch_size(requested)

    def _runner(self, batch: int):
        key = self.max_batch or batch          # engines: one runner (its graphs keyed by batch) for every size
        if key not in self._runners:
            self._runners[key] = graph_runner(self.source, self.cuda_graphs, batch)
        return self._runners[key]

    def graphs(self, batch: int) -> str:
        """Whether CUDA graphs replay scales at this batch size (for the log line)."""
        return self._runner(batch)[2]

    def warm_up(self, batch_sizes, schedule: Schedule | None = None) -> None:
        """Capture the CUDA graphs of each batch size now (a replica at start), where they are
        captured at all; elsewhere (CPU) nothing is done."""
        sched = schedule or self.schedule()
        for b in batch_sizes:
            runner = self._runner(b)[0]
            if getattr(runner, "capture", False):
                self.sample([0] * b, sched, batch_size=b, decode=False)

    def sample(self, labels: Sequence[int], schedule: Schedule, *, seed: int | Sequence[int] = 0,
               indices: Sequence[int] | None = None, noise_file: str | Path | None = None,
               batch_size: int | None = None, decode: bool = True, progress: bool = False,
               on_scale: Callable[[ScaleTrace], None] | None = None, timings: dict | None = None) -> SampleResult:
        """The one sampling call: tokens (and images in [-1, 1] with ``decode``) of ``labels``.

        ``timings``, when given, receives the seconds per stage.
        """
        if decode and not self.decodes:
            raise FlowARError("a VAE to decode images", "an engine directory exported without --vae"
                              if self.source.manifest is not None else "a checkpoint opened without vae=",
                              "pass --vae (or re-export with --vae), or ask for tokens only")
        bs = self.batch_size(batch_size)
        runner, stages, _ = self._runner(bs or len(labels))
        timed = _TimedStages(stages, self.device) if timings is not None and not getattr(runner, "capture", False) \
            else None
        with torch.inference_mode():
            res = run_sampling(timed or stages, self.config, list(labels), schedule, seed, noise_file, decode=decode,
                               device=self.device, progress=progress, on_scale=on_scale, batch_size=bs,
                               indices=indices, runner=runner)
        if timings is not None:
            timings.update(timed.read() if timed is not None else {"sampling": res.seconds})
            timings["total"] = res.seconds
        return res

    def __call__(self, class_labels: int | str | Sequence[int | str], *, seed: int | Sequence[int] = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 guidance: float | None = None, schedule: str | None = None, batch_size: int | None = None,
                 output_type: str = "pil", generator: torch.Generator | None = None,
                 indices: Sequence[int] | None = None, progress: bool = False) -> FlowAROutput:
        """Images of ``class_labels`` (ids and/or names).

        ``num_inference_steps``: points of the official time grid (25 = the official 24 Euler
        steps per scale); ``guidance_scale``: cfg at the last scale (1 = off); ``guidance``: guide
        only at t <= this; ``schedule``: ``official`` or ``fast`` (default: the engine
        directory's, else official). ``seed`` (or a ``generator``'s initial seed) names the
        images; one seed per label is accepted too. ``output_type``: pil, np, pt or latent.
        """
        if output_type not in OUTPUT_TYPES:
            raise FlowARError(f"output_type among {', '.join(OUTPUT_TYPES)}", repr(output_type), 'use "pil"')
        items = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        labels = self.get_label_ids(items) if items else []
        if not labels:
            raise FlowARError("at least one class label", "none", 'pass e.g. ["cat"] or [3]')
        if generator is not None:
            seed = int(generator.initial_seed())
        seeds = [int(seed)] * len(labels) if isinstance(seed, int) else [int(s) for s in seed]
        sched = self.schedule(schedule, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              guidance=guidance)
        timings: dict[str, float] = {}
        res = self.sample(labels, sched, seed=seeds, indices=indices, batch_size=batch_size,
                          decode=output_type != "latent", progress=progress, timings=timings)
        idx = list(range(len(labels))) if indices is None else [int(i) for i in indices]
        return FlowAROutput(to_output(res, output_type), labels, seeds, idx, timings, res.tokens)

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        self._runners.clear()
        self.source.close()

    def __enter__(self) -> "FlowARPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_output(res: SampleResult, output_type: str):
    """The images of a result in the requested form (see :class:`FlowAROutput`)."""
    if output_type == "latent":
        return res.tokens
    from flowar.io.images import to_uint8
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray(a) for a in to_uint8(res.images)]
    x = ((res.images.float().clamp(-1, 1) + 1) / 2)
    return x.permute(0, 2, 3, 1).numpy() if output_type == "np" else x
