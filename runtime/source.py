"""What a command samples from, opened in one place: a checkpoint in eager PyTorch, or an engine
directory through the runtime. ``flowar-run``, ``flowar-judge`` and ``bench/latency.py`` all
open their sources here, so defaults, batch limits and clean-up are decided once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowar.config import FlowARConfig
from flowar.errors import FlowARError


@dataclass(slots=True)
class Source:
    stages: object                          # the sampler's Stages (flowar.sampling.sampler)
    config: FlowARConfig
    class_names: list[str] | None
    device: torch.device
    decodes: bool                           # has a decoder: images, not only tokens
    detail: str                             # what computes, for the log line
    backend: str                            # torch (a checkpoint), or the runtime's: ort, trt, mixed
    schedule_defaults: dict | None = None   # an engine directory's recorded defaults
    max_batch: int | None = None            # an engine directory's limit; None: any batch
    model: object = None                    # the reference modules (checkpoints)
    vae: object = None
    manifest: object = None                 # flowar.export.manifest.Manifest (engine directories)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def batch_size(self, requested: int | None) -> int | None:
        """``requested`` checked against the engines' limit; unset: the limit (None: all at once)."""
        if requested is not None and requested < 1:
            raise FlowARError("--batch >= 1", str(requested), "use e.g. --batch 8")
        if self.max_batch is not None and requested is not None and requested > self.max_batch:
            raise FlowARError(f"--batch at most {self.max_batch} (the engines' max batch)", str(requested),
                              f"use --batch {self.max_batch}, or re-export with --max-batch {requested}")
        return requested or self.max_batch

    def hold(self, resource):
        """Enter ``resource`` (a context manager) and keep it until this source closes."""
        return self._stack.enter_context(resource)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(ckpt: str | Path, preset: str | None = None, config_path: str | Path | None = None,
                    vae: str | Path | None = None, use_ema: bool = True, device: str | torch.device = "auto",
                    config: FlowARConfig | None = None, precision: str = "fp32") -> Source:
    """A checkpoint (official .pth, training checkpoint, or .safetensors) in eager PyTorch;
    ``precision="bf16"``: its GEMMs and convolutions in bf16, float32 around them (the engines'
    ``torch-bf16``; tensor cores on a GPU)."""
    from flowar.device import resolve_device
    from flowar.model.checkpoint import load_model
    from flowar.sampling.eager import EagerStages
    if precision not in ("fp32", "bf16"):
        raise FlowARError("--precision fp32 or bf16 for a checkpoint", repr(precision), "use --precision bf16")
    dev = resolve_device(device)
    model, ck = load_model(ckpt, preset, config_path, use_ema=use_ema, device=dev, config=config)
    vae_mod = None
    if vae:
        from flowar.model.vae import load_vae
        vae_mod = load_vae(vae, expect_channels=ck.config.latent_channels).to(dev)
    if precision == "bf16":
        from flowar.runtime.bf16 import bf16_gemms
        model = bf16_gemms(model)
        vae_mod = bf16_gemms(vae_mod) if vae_mod is not None else None
    what = f"eager PyTorch{' (bf16 GEMMs)' if precision == 'bf16' else ''} on {dev}"
    return Source(EagerStages(model, vae_mod.decode if vae_mod else None), ck.config, ck.class_names, dev,
                  vae_mod is not None, what, "torch", model=model, vae=vae_mod)


def open_engines(engine_dir: str | Path, backend: str = "auto", threads: int | None = None) -> Source:
    """An engine directory through the runtime (see flowar.runtime.load.open_engine_dir)."""
    from flowar.runtime.load import open_engine_dir
    rt = open_engine_dir(engine_dir, backend, threads=threads)
    m = rt.manifest
    src = Source(rt.stages, m.config, m.class_names, rt.device, m.decodes, rt.detail, rt.backend,
                 m.schedule_defaults, m.max_batch, manifest=m)
    src._stack.callback(rt.close)
    return src


def exported_from(engine_dir: str | Path, device: str | torch.device = "auto") -> Source:
    """The checkpoint (and VAE) an engine directory was exported from, in eager PyTorch: its
    reference (the very checkpoint file the export recorded)."""
    from flowar.device import resolve_device
    from flowar.export.manifest import read_manifest
    from flowar.runtime.load import exported_from as load_exported
    from flowar.sampling.eager import EagerStages
    m = read_manifest(engine_dir)
    dev = resolve_device(device)
    model, vae = load_exported(m, dev)
    return Source(EagerStages(model, vae.decode if vae else None), m.config, m.class_names, dev, vae is not None,
                  f"eager PyTorch on {dev}", "torch", model=model, vae=vae, manifest=m)


def open_source(ckpt: str | Path | None = None, engine_dir: str | Path | None = None, *, backend: str = "auto",
                preset: str | None = None, config_path: str | Path | None = None, vae: str | Path | None = None,
                raw_weights: bool = False, device: str = "auto", threads: int | None = None,
                precision: str = "fp32") -> Source:
    """Exactly one of ``ckpt`` (with its options) or ``engine_dir`` (which records them)."""
    if bool(ckpt) == bool(engine_dir):
        raise FlowARError("exactly one of --ckpt or --engine-dir", "both" if ckpt else "neither",
                          "pass --engine-dir DIR (from flowar-export) or --ckpt PATH")
    if engine_dir and (preset or config_path or vae or raw_weights or precision != "fp32"):
        raise FlowARError("no --preset/--config/--vae/--raw-weights/--precision with --engine-dir", "some of them",
                          "the engine directory records its config, decoder and precision; drop those options")
    if threads is not None and threads < 1:
        raise FlowARError("--threads >= 1", str(threads), "use e.g. --threads 2, or omit it to use every core")
    if engine_dir:
        return open_engines(engine_dir, backend, threads)
    return open_checkpoint(ckpt, preset, config_path, vae, not raw_weights, device, precision=precision)


def graph_runner(src, cuda_graphs: bool, max_batch: int):
    """(runner, stages, what the log says): CUDA graphs where the stages can be captured; on a CPU
    the same per-scale plan without capture, so the CPU tests run the graphed path."""
    checkpoint = src.manifest is None                   # eager stages of a checkpoint, not the runtime's
    if not cuda_graphs or (checkpoint and src.device.type != "cuda"):
        return None, src.stages, "off"
    from flowar.runtime.cudagraph import GraphRunner
    cuda = src.device.type == "cuda"
    capturable = cuda and src.backend in ("trt", "torch")
    stages = src.stages
    if cuda and checkpoint:                             # static buffers: the reference modules as engines
        from flowar.runtime.stages import torch_engine_stages
        stages = torch_engine_stages(src.model, max_batch, src.device, src.vae)
    what = ("on" if capturable else "off (ONNX Runtime sessions are not captured)" if cuda
            else "off (CPU: the same plan without capture)")
    return GraphRunner(src.device, capture=capturable), stages, what
