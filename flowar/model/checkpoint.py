"""Checkpoint I/O: the one place that knows the file formats and their quirks.

Accepted, always without executing pickled code:

* the official released ``.pth`` files (a flat state dict, buffers included);
* official training checkpoints (``{"model": ..., "model_ema": ..., "args": Namespace, ...}``):
  EMA weights by default, ``use_ema=False`` for the raw ones;
* this project's ``.safetensors``, whose metadata carries the config JSON (self-describing);
* a flat ``.safetensors`` state dict without metadata (the config must then be named).

Official files carry no config: the caller names a preset or a config file. A state dict that
does not fit the config is refused with the first differing keys/shapes and the preset whose
shapes it does fit, if any.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowar.config import PRESETS, FlowARConfig, get_preset
from flowar.errors import CheckpointError, ConfigError
from flowar.io.files import atomic_write_bytes

META_CONFIG = "flowar_config"
META_CLASSES = "class_names"
META_FORMAT = "format"
FORMAT_TAG = "flowar-checkpoint-v1"
TRAIN_FORMAT_TAG = "flowar-train-v1"          # written by flowar/train/trainer.py
_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")


@dataclass(slots=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    path: Path
    config: FlowARConfig | None = None                # from the file's metadata, when it has one
    class_names: list[str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "flat"                                # flat | model | model_ema | safetensors


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"a {what} file", f"no file at {path}", "check the path")
    if not path.is_file():
        raise CheckpointError(f"a {what} file", f"{path} is a directory", "pass the file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"a {what} file", f"{path} is empty (0 bytes)",
                              "the download or copy was interrupted: fetch the file again")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel and torch.compile wrap names; the weights are the same.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _read_pickle(path: Path) -> Any:
    try:
        # argparse.Namespace is what official training checkpoints store under "args"; it is a
        # plain attribute bag, so allowing it executes no code of the file's choosing.
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: the tensors stay in the file's pages (a 7.65 GB FlowAR-H is not copied into memory;
            # the model takes them as they are, see load_model); a file in the legacy (pre-zip) format
            # cannot be mapped: read into memory (it was refused as corrupt)
            legacy = not zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except Exception as e:   # noqa: BLE001 - every failure here is the file's fault
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError("a checkpoint holding tensors only (loaded with weights_only=True)",
                                  f"{path} asks to run pickled code ({msg[:160]})",
                                  "refused for safety; convert it to safetensors in a trusted environment") from e
        raise CheckpointError("a readable PyTorch checkpoint", f"{path} cannot be read ({type(e).__name__}: {msg[:160]})",
                              "the file is truncated or corrupt: fetch it again") from e


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError("a readable safetensors file", f"{path} cannot be read ({msg[:160]})",
                              "the file is truncated or corrupt: fetch or export it again") from e
    return sd, meta


def _no_raw(p: Path) -> None:
    """``--raw-weights`` on a file of one set of weights: refused, not ignored."""
    raise CheckpointError("--raw-weights with a training checkpoint (one holding 'model' and EMA weights)",
                          f"{p.name} holds one set of weights", "drop --raw-weights")


def read_checkpoint(path: str | Path, use_ema: bool = True) -> LoadedCheckpoint:
    """Read a FlowAR checkpoint of any accepted format into a flat state dict."""
    p = Path(path)
    _require_file(p, "checkpoint")
    if p.suffix == ".safetensors":
        sd, meta = _read_safetensors(p)
        source = "safetensors"
        if meta.get(META_FORMAT) == TRAIN_FORMAT_TAG:
            # a flowar-train checkpoint: model.*, ema.*, optim.* in one file
            source = "model_ema" if use_ema else "model"
            prefix = "ema." if use_ema else "model."
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if source != "model" and not use_ema:
            _no_raw(p)
        ck = LoadedCheckpoint(_strip_prefix(sd), p, metadata=meta, source=source)
        if META_CONFIG in meta:
            ck.config = FlowARConfig.from_json(meta[META_CONFIG], f"the metadata of {p}")
        if META_CLASSES in meta:
            try:
                names = json.loads(meta[META_CLASSES])
            except ValueError:
                names = None
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise CheckpointError("class names in the metadata as a JSON list of strings",
                                      f"{meta[META_CLASSES][:60]!r} in {p.name}", "write the checkpoint again")
            ck.class_names = names
        return ck
    if p.suffix not in _PICKLE_SUFFIXES:
        raise CheckpointError("a checkpoint ending in .safetensors or " + "/".join(_PICKLE_SUFFIXES),
                              f"{p.name}", "rename or convert the file")
    obj = _read_pickle(p)
    if not isinstance(obj, dict):
        raise CheckpointError("a state dict (a mapping of names to tensors)", f"a {type(obj).__name__} in {p}",
                              "save model.state_dict(), not the model object")
    source = "flat"
    if "model_ema" in obj and use_ema:
        obj, source = obj["model_ema"], "model_ema"
    elif "model" in obj:
        obj, source = obj["model"], "model"
    elif "model_ema" in obj:
        obj, source = obj["model_ema"], "model_ema"
    if source != "model" and not use_ema:
        _no_raw(p)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("a flat state dict, or a training checkpoint with 'model'/'model_ema'",
                              f"{p} holds keys {sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__}",
                              "pass the released .pth or a checkpoint written by flowar-train")
    return LoadedCheckpoint(_strip_prefix(dict(obj)), p, source=source)


class skeleton(torch.overrides.TorchFunctionMode):
    """Modules built inside have their tensors allocated (on the CPU) but never written: their
    initialisation is skipped, because they are given a checkpoint's (or a weights file's) tensors
    right after, and any buffer no file carries is rebuilt (``materialize_buffers``). So building
    the structure of FlowAR-S costs 0.02 s and no resident memory. Not the meta device: there
    ``normal_``, and even a division, run Python decompositions that import ``torch._dynamo``,
    0.9 s of a fresh process."""

    SKIP = {"normal_", "uniform_", "trunc_normal_", "erfinv_", "exponential_", "kaiming_uniform_", "kaiming_normal_",
            "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "fill_", "zero_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")         # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in self.SKIP and isinstance(target, torch.Tensor):
            return target
        return func(*args, **kwargs)


def expected_shapes(config: FlowARConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a config (built as a :class:`skeleton`: no memory written)."""
    from flowar.model.ar import FlowAR
    with skeleton():
        model = FlowAR(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def differences(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], limit: int = 3) -> list[str]:
    """First differing keys/shapes between a state dict and the expected layout."""
    out = []
    for k, shape in expected.items():
        if k not in sd:
            out.append(f"missing {k} {list(shape)}")
        elif tuple(sd[k].shape) != shape:
            out.append(f"{k} is {list(sd[k].shape)}, the config needs {list(shape)}")
        if len(out) >= limit:
            return out
    for k in sd:
        if k not in expected:
            out.append(f"unexpected {k} {list(sd[k].shape)}")
            if len(out) >= limit:
                break
    return out


def fitting_presets(sd: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, cfg in PRESETS.items() if not differences(sd, expected_shapes(cfg), limit=1)]


def check_fits(sd: dict[str, torch.Tensor], config: FlowARConfig, path: Path | str) -> None:
    diffs = differences(sd, expected_shapes(config))
    if diffs:
        fits = fitting_presets(sd)
        fix = (f"this file fits the preset {fits[0]}: pass --preset {fits[0]}" if fits else
               "no preset fits this file either: pass the --config it was trained with")
        raise CheckpointError("a checkpoint matching the chosen config", f"{path}: " + "; ".join(diffs), fix)


def resolve_config(ck: LoadedCheckpoint, preset: str | None = None, config_path: str | Path | None = None,
                   config: FlowARConfig | None = None) -> FlowARConfig:
    """The config to build: named by the user (or the caller), else stored in the file; never guessed."""
    if sum(x is not None for x in (preset, config_path, config)) > 1:
        raise ConfigError("either --preset or --config", "both", "pass only one of them")
    named = (get_preset(preset) if preset else FlowARConfig.load(config_path) if config_path else config)
    if named is not None:
        if ck.config is not None and named != ck.config:
            raise ConfigError(f"a config equal to the one stored in {ck.path.name}",
                              "a different --preset/--config", "drop --preset/--config: the file describes itself")
        return named
    if ck.config is not None:
        return ck.config
    fits = fitting_presets(ck.state_dict)
    hint = f"this file fits --preset {fits[0]}" if fits else "pass the --config JSON it was trained with"
    raise ConfigError("a config for this checkpoint (official files carry none)",
                      f"no --preset/--config for {ck.path.name}", hint)


def load_model(path: str | Path, preset: str | None = None, config_path: str | Path | None = None,
               use_ema: bool = True, device: str | torch.device = "cpu", config: FlowARConfig | None = None):
    """Build the reference model and load a checkpoint into it strictly. Returns (model, checkpoint)."""
    from flowar.model.ar import FlowAR
    ck = read_checkpoint(path, use_ema=use_ema)
    config = resolve_config(ck, preset, config_path, config)
    check_fits(ck.state_dict, config, ck.path)
    # Built as a skeleton and given the checkpoint's tensors themselves (assign): one copy of the
    # weights in memory, not two (for a .pth, none: its tensors are the file's mapped pages).
    with skeleton():
        model = FlowAR(config)
    model.load_state_dict(ck.state_dict, strict=True, assign=True)
    model.materialize_buffers()
    ck.config = config
    return model.to(device).eval(), ck


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: FlowARConfig,
                    class_names: list[str] | None = None, extra: dict[str, str] | None = None) -> None:
    """Write a self-describing safetensors checkpoint (config and class names in the metadata)."""
    from safetensors.torch import save_file
    meta = {META_FORMAT: FORMAT_TAG, META_CONFIG: config.to_json()}
    if class_names is not None:
        meta[META_CLASSES] = json.dumps(list(class_names))
    meta.update(extra or {})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
