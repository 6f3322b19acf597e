"""Open an engine directory with the backend asked for (or the best one available).

``auto`` takes TensorRT when the directory has plans, a GPU is present, TensorRT imports and
the plans were built for this GPU and TensorRT version; otherwise ONNX Runtime. The caller is
told which backend (and ONNX Runtime provider) ran.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.manifest import EngineDirError, Manifest, read_manifest, sha256_file
from flowar.runtime.engines import OrtEngine, SharedDeviceMemory, TrtEngine
from flowar.runtime.stages import EngineStages

BACKENDS = ("auto", "ort", "trt", "torch")


@dataclass(slots=True)
class Runtime:
    manifest: Manifest
    stages: EngineStages
    backend: str                 # what ran: ort, trt or torch
    detail: str                  # provider / flavour, for the log line
    device: torch.device
    _stack: contextlib.ExitStack = field(repr=False, default=None)

    @property
    def config(self) -> FlowARConfig:
        return self.manifest.config

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.class_names

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _trt_usable(m: Manifest) -> tuple[bool, str]:
    info = m.tensorrt
    if not info:
        return False, "the directory has no TensorRT plans"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        from flowar.engines.trt import gpu_compute_capability, load_builder
        b = load_builder()
    except FlowARError:
        return False, "TensorRT is not installed"
    if (b.flavour, b.version) != (info["flavour"], info["version"]):
        return False, f"plans built by {info['flavour']} {info['version']}, this is {b.flavour} {b.version}"
    cc = gpu_compute_capability()
    if info.get("compute_capability") not in (cc, None):
        return False, f"plans built for {info['compute_capability']}, this GPU is {cc}"
    return True, ""


def _carried(m: Manifest, what: str) -> Path:
    """A weights file the directory carries for its PyTorch stages, checked against its sha256."""
    w = (m.weights or {}).get(what)
    path = m.member(w["file"]) if w else None
    if path is None or not path.exists() or sha256_file(path if path.is_file() else path / w["digest_of"]) != w["sha256"]:
        raise EngineDirError(f"the {what} weights the manifest records, with the sha256 recorded at export",
                             f"{path or 'none'} (missing or modified)", f"re-export: flowar-export --out {m.root}")
    return path


def _dir_model(m: Manifest):
    """The float32 model whose weights the directory carries (for its PyTorch stages)."""
    from flowar.model.checkpoint import load_model
    model, _ = load_model(_carried(m, "model"), config=m.config)
    return model


def _dir_vae(m: Manifest):
    """The VAE the directory carries (for a PyTorch decode stage)."""
    from flowar.model.vae import load_vae
    return load_vae(_carried(m, "vae"), expect_channels=m.config.latent_channels)


def exported_from(m: Manifest, device: torch.device, ckpt: str | Path | None = None):
    """(model, vae or None): the checkpoint (and VAE) the directory was exported from, in eager
    PyTorch on ``device``; the checkpoint must be the very file (sha256) the export recorded."""
    from flowar.model.checkpoint import load_model
    recorded, digest, ema = m.exported_checkpoint
    src = Path(ckpt) if ckpt else recorded
    if not src.is_file() or sha256_file(src) != digest:
        raise FlowARError("the checkpoint the engine directory was exported from",
                          f"{src if str(src) not in ('', '.') else 'no path'} (missing or a different file)",
                          "pass --ckpt with the original checkpoint, or re-export the directory")
    model, _ = load_model(src, config=m.config, use_ema=ema, device=device)
    vae = None
    if m.vae:
        from flowar.model.vae import load_vae
        vae = load_vae(m.vae["source"], expect_channels=m.config.latent_channels).to(device)
    return model, vae


def choose_backend(m: Manifest, requested: str = "auto") -> str:
    """The backend an engine directory runs on here: what ``requested`` names, or for ``auto``
    TensorRT where its plans fit this GPU and TensorRT, else the directory's ``--precision auto``
    choice ("mixed"), else ONNX Runtime. Every command decides here (through the pipeline)."""
    if requested not in BACKENDS:
        raise FlowARError(f"--backend one of {', '.join(BACKENDS)}", repr(requested), "use --backend auto")
    if requested == "auto":
        ok, _ = _trt_usable(m)
        return "trt" if ok else ("mixed" if m.choice else "ort")
    if requested == "trt":
        ok, why = _trt_usable(m)
        if not ok:
            raise FlowARError("a TensorRT-ready engine directory and GPU for --backend trt", why,
                              "rebuild plans here with flowar-export --backend trt, or use --backend ort")
    return requested


def _open_ort(m: Manifest, specs: dict, stack: contextlib.ExitStack, device, ckpt, threads):
    from flowar.device import resolve_device
    from flowar.engines.ort import choose_provider, split_limits
    provider = choose_provider()
    dev = resolve_device(device if device is not None else "cuda" if provider == "CUDAExecutionProvider" else "cpu")
    engines = {name: stack.enter_context(OrtEngine(name, *m.graph(name), specs[name].row_tensors, provider,
                                                   m.root / ".ort-cache", threads, *split_limits(name, m.config)))
               for name in specs}
    return engines, dev, f"ONNX Runtime {provider}"


def _open_trt(m: Manifest, specs: dict, stack: contextlib.ExitStack, device, ckpt, threads):
    from flowar.engines.trt import load_builder
    b = load_builder()
    dev = torch.device("cuda")
    shared = SharedDeviceMemory(dev)
    engines = {name: stack.enter_context(TrtEngine(name, m.plan(name), b.trt, shared)) for name in specs}
    return engines, dev, f"{b.flavour} {b.version}"


def _open_mixed(m: Manifest, specs: dict, stack: contextlib.ExitStack, device, ckpt, threads):
    """What ``flowar-export --precision auto`` measured and chose, per stage."""
    from flowar.engines.cpu import cpu_kind, describe
    from flowar.runtime.candidates import needs_weights, stage_engines
    choice = m.choice
    need = needs_weights(choice)
    model = _dir_model(m) if "model" in need else None
    vae = _dir_vae(m) if "vae" in need else None
    graphs = {n: m.graph(n) for n in specs}
    engines = {name: stack.enter_context(eng) for name, eng in
               stage_engines(choice, m.config, model, vae, specs, graphs, threads, m.root / ".ort-cache").items()}
    detail = f"{m.precision}: " + ", ".join(f"{n} {choice.get(n, 'ort-fp32')}" for n in specs)
    measured_on = m.auto.get("machine", {})
    if measured_on and measured_on != cpu_kind():
        detail += f" (measured on {describe(measured_on)}; re-export here to measure this CPU)"
    return engines, torch.device("cpu"), detail


def _open_torch(m: Manifest, specs: dict, stack: contextlib.ExitStack, device, ckpt, threads):
    """The reference modules of the checkpoint the directory came from, behind the same interface."""
    from flowar.device import resolve_device
    from flowar.runtime.stages import torch_engines
    dev = resolve_device(device)
    model, vae_mod = exported_from(m, dev, ckpt)
    return torch_engines(model, specs, vae_mod), dev, f"eager PyTorch on {dev}"


OPENERS = {"ort": _open_ort, "trt": _open_trt, "mixed": _open_mixed, "torch": _open_torch}


def open_engine_dir(path: str | Path, backend: str = "auto", device: str | torch.device | None = None,
                    ckpt: str | Path | None = None, threads: int | None = None) -> Runtime:
    """An engine directory's engines on the backend :func:`choose_backend` picks, fed to the sampler."""
    root = Path(path)
    m = read_manifest(root)
    config, specs = m.config, m.specs()
    missing = [s for s in specs if s not in m.stages]
    if missing:
        raise EngineDirError(f"graphs for every stage ({', '.join(specs)})", f"missing {missing}",
                             f"re-export: flowar-export --out {root}")
    backend = choose_backend(m, backend)
    stack = contextlib.ExitStack()
    try:
        engines, dev, detail = OPENERS[backend](m, specs, stack, device, ckpt, threads)
    except BaseException:
        stack.close()
        raise
    stages = EngineStages(engines, config, m.max_batch, dev, specs)
    return Runtime(m, stages, backend, detail, dev, stack)
