"""Checkpoint I/O: the one place that knows the file formats and their quirks.

Accepted, always without executing pickled code:

* the official released ``.pth`` files (a flat state dict, buffers included);
* official training checkpoints (``{"model": ..., "model_ema": ..., "args": Namespace, ...}``):
  EMA weights by default, ``use_ema=False`` for the raw ones;
* a PyTorch Lightning checkpoint (``{"state_dict": {"model.<name>": ...}, "epoch": ...}``);
* this project's ``.safetensors``, whose metadata carries the config JSON (self-describing);
* a flat ``.safetensors`` state dict without metadata (the config must then be named).

Official files carry no config: the caller names a preset or a config file. A state dict that
does not fit the config is refused with the first differing keys/shapes and the preset whose
shapes it does fit, if any.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowar.config import PRESETS, FlowARConfig, get_preset
from flowar.errors import CheckpointError, ConfigError
from flowar.io.files import atomic_write_bytes
from flowar.model.readers import os_error, read_pickle, read_safetensors

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
    source: str = "flat"                                # flat | model | model_ema | state_dict | safetensors


def _require_file(path: Path, what: str) -> None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise CheckpointError(f"a {what} path in UTF-8", f"{shown!r}, a path that is not valid UTF-8",
                              "rename the file (or its folder) to a UTF-8 name") from None
    if not path.exists():
        raise CheckpointError(f"a {what} file", f"no file at {path}", "check the path")
    if path.is_dir():
        raise CheckpointError(f"a {what} file", f"{path} is a directory", "pass the file inside it")
    if not path.is_file():
        raise CheckpointError(f"a {what} file", f"{path} is not a regular file (a device, pipe or socket)",
                              "pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise CheckpointError(f"a {what} file", f"{path} is empty (0 bytes)",
                              "the download or copy was interrupted: fetch the file again")
    try:
        open(path, "rb").close()      # (safetensors reports a file it may not open as "No such file")
    except OSError as e:
        raise os_error(path, e) from e


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel and torch.compile wrap names; the weights are the same.
    prefixes = ("module.", "_orig_mod.", "model.")          # (and a Lightning module's attribute: model.)
    while sd and (prefix := next((p for p in prefixes if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(prefix):]: v for k, v in sd.items()}    # (in any order: model._orig_mod.<name>)
    return sd


def _no_raw(p: Path) -> None:
    """``--raw-weights`` on a file of one set of weights: refused, not ignored."""
    raise CheckpointError("--raw-weights with a training checkpoint (one holding 'model' and EMA weights)",
                          f"{p.name} holds one set of weights", "drop --raw-weights")


def _train_names(meta: dict[str, str], names: list[str], p: Path, use_ema: bool) -> list[str]:
    """The tensors to read of a safetensors checkpoint: of a flowar-train checkpoint (model.*, ema.*,
    optim.* in one file) the EMA (or, ``use_ema=False``, the raw) weights alone; else all."""
    if meta.get(META_FORMAT) != TRAIN_FORMAT_TAG:
        return names
    prefix, other = ("ema.", "model.") if use_ema else ("model.", "ema.")
    picked = [k for k in names if k.startswith(prefix)]
    if not picked:
        fix = ("write the checkpoint again with flowar-train" if not any(k.startswith(other) for k in names)
               else "pass --raw-weights (its model.* weights)" if use_ema else "drop --raw-weights")
        raise CheckpointError(f"{prefix}* weights in a {TRAIN_FORMAT_TAG} checkpoint",
                              f"no {prefix}* weights in {p.name}", fix)
    return picked


def read_checkpoint(path: str | Path, use_ema: bool = True, mapped: bool = False) -> LoadedCheckpoint:
    """Read a FlowAR checkpoint of any accepted format into a flat state dict (``mapped``: views of the
    file's pages, for a reader that checks the file is unchanged at its end; see :func:`read_pickle`)."""
    p = Path(path)
    _require_file(p, "checkpoint")
    if p.suffix == ".safetensors":
        sd, meta = read_safetensors(p, lambda meta, names: _train_names(meta, names, p, use_ema), mapped)
        source = "safetensors"
        if meta.get(META_FORMAT) == TRAIN_FORMAT_TAG:          # (ema.* or model.* alone were read)
            sd, source = {k.split(".", 1)[1]: v for k, v in sd.items()}, "model_ema" if use_ema else "model"
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
        raise CheckpointError("a checkpoint ending in .safetensors or " + "/".join(_PICKLE_SUFFIXES), f"{p.name}",
                              f"pass the folder it is in, {p.parent}, as --engine-dir"      # (a file of an engine directory)
                              if (p.parent / "manifest.json").is_file() else "rename or convert the file")
    sd, source = read_pickle(p, lambda obj: _pick(obj, p, use_ema), mapped)      # (only the weights picked are read)
    return LoadedCheckpoint(_strip_prefix(sd), p, source=source)


def _pick(obj: object, p: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict a pickled checkpoint holds (a training checkpoint's EMA weights by default), and where
    it was; run on the file's structure before any tensor is read (see :func:`read_pickle`)."""
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
    elif isinstance(obj.get("state_dict"), dict):     # (PyTorch Lightning's: it was refused, "holds keys epoch, ...")
        obj, source = obj["state_dict"], "state_dict"
    if source not in ("model", "state_dict") and not use_ema:
        _no_raw(p)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):          # (int keys: AttributeError)
        raise CheckpointError("a flat state dict, or a training checkpoint with 'model'/'model_ema'/'state_dict'",
                              f"{p} holds keys {sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__}",
                              "pass the released .pth or a checkpoint written by flowar-train")
    # (weights-only loading takes sparse and quantized tensors; the model then failed in its first layer, a traceback)
    if odd := next((k for k, v in obj.items() if v.layout != torch.strided or v.is_quantized), None):
        raise CheckpointError("dense tensors (plain weights)", f"{odd} in {p} is a "
                              f"{'quantized' if obj[odd].is_quantized else str(obj[odd].layout)} tensor",
                              "save the model's dense float weights (tensor.to_dense(), .dequantize())")
    return dict(obj), source


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


def check_fits(sd: dict[str, torch.Tensor], config: FlowARConfig, path: Path | str,
               from_metadata: bool = False) -> None:
    """Refuse a state dict whose keys/shapes differ from ``config``'s (``from_metadata``: the config
    is the one the file stores about itself, so the file contradicts itself)."""
    expected = expected_shapes(config)
    diffs = differences(sd, expected)
    if not diffs:
        return
    L = config.seq_len
    counts = sorted({sd[k].shape[i] for k, shape in expected.items() if k in sd and sd[k].ndim == len(shape)
                     for i, n in enumerate(shape) if n == L != sd[k].shape[i]})
    if counts:          # position tables trained for other scales: where the config's token count comes from
        fit = [f"scales {', '.join(map(str, d))} make {n}" for n in counts if (d := _doubling(n))]
        diffs.append(f"{' or '.join(map(str, counts))} positions where the config's scales {', '.join(map(str, config.scales))} "
                     f"make {L} (the sum of each side squared: {' + '.join(str(s * s) for s in config.scales)}): "
                     "the file was trained with other scales" + (f" ({'; '.join(fit)})" if fit else ""))
    if from_metadata:       # (a --preset or --config would be refused: the file describes itself)
        fix = ("the file's weights do not match the config in its metadata (keys missing or extra, or shapes): save "
               "the model's own state_dict again with the config it was trained with (save_checkpoint)")
    else:
        fits = fitting_presets(sd)
        fix = (f"this file fits the preset {fits[0]}: pass --preset {fits[0]}" if fits else
               "no preset fits this file either: pass the --config it was trained with")
    raise CheckpointError("a checkpoint matching the chosen config", f"{path}: " + "; ".join(diffs), fix)


def carries_config(path: str | Path) -> bool:
    """Whether a checkpoint file describes itself (this project's .safetensors record their config):
    it needs no --preset. Read from its header only; False for anything else or unreadable."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return META_CONFIG in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - (a pickle, a damaged file: the file's own refusal comes where it is read)
        return False


def _doubling(n: int) -> list[int] | None:
    """The sides 1, 2, 4, ... whose squares sum to ``n`` positions (FlowAR's scales), or None."""
    sides = [1]
    while sum(x * x for x in sides) < n:
        sides.append(2 * sides[-1])
    return sides if sum(x * x for x in sides) == n else None


def as_model_dtypes(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor],
                    path: Path | str) -> dict[str, torch.Tensor]:
    """``sd`` in the model's dtypes. The model computes in float32: weights saved in another
    floating-point precision (fp16/bf16 checkpoints are common, float64 happens) are cast to it
    (exactly, from fp16/bf16); a non-floating tensor where the model has a floating one is refused."""
    out = {}
    for k, v in sd.items():
        want = model_sd[k].dtype
        if v.dtype != want and not (v.is_floating_point() and want.is_floating_point):
            raise CheckpointError(f"floating-point weights ({want}, or fp16/bf16/float64 cast to it)",
                                  f"{k} is {v.dtype} in {path}",
                                  "this is not a FlowAR checkpoint's weights: save the model's float weights again")
        out[k] = v if v.dtype == want else v.to(want)
    return out


def check_class_names(ck: LoadedCheckpoint, config: FlowARConfig) -> None:
    """Class names in the metadata name every class, or there are none."""
    if ck.class_names is not None and len(ck.class_names) != config.num_classes:
        raise CheckpointError(f"class_names in the metadata: one per class ({config.num_classes} of them)",
                              f"{len(ck.class_names)} names in {ck.path.name}",
                              "save the checkpoint again with one name per class, or with none")


def check_vae(ck: LoadedCheckpoint, vae: str | Path) -> None:
    """flowar-train records the sha256 of the VAE a model was trained with (``vae_sha256``, the hash an
    engine directory records: its file, or a folder's config and weights): another VAE (of the same
    channels it decoded noise, exit 0) is said on stderr, not refused (a VAE converted to another
    format has other bytes, the same weights)."""
    from flowar.io.digests import vae_sha256         # (hashed only for a model that records its VAE's)
    want = ck.metadata.get("vae_sha256")
    if want and vae_sha256(vae) != want:
        print(f"note: the VAE {vae} is not the one {ck.path.name} was trained with ({ck.metadata.get('vae', '?')}, "
              "by its sha256): its images may be noise; pass that VAE", file=sys.stderr, flush=True)


def trained_vae(ck: LoadedCheckpoint) -> str:
    """What follows "pass --vae" for a flowar-train model opened without one: the VAE it records (the
    path its training was given), looked for from the checkpoint's folder, beside it by its last name
    (the shipped model records models/default/vae and lies beside it), then as given; "" without one."""
    rec = ck.metadata.get("vae")
    for p in (ck.path.parent / rec, ck.path.parent / Path(rec).name, Path(rec)) if rec else ():
        if p.exists():
            return f" {p.resolve()} (the VAE it was trained with)"
    return f" (it was trained with {rec}, not found from here)" if rec else ""


def resolve_config(ck: LoadedCheckpoint, preset: str | None = None, config_path: str | Path | None = None,
                   config: FlowARConfig | None = None) -> FlowARConfig:
    """The config to build: named by the user (or the caller), else stored in the file; never guessed."""
    if sum(x is not None for x in (preset, config_path, config)) > 1:
        raise ConfigError("either --preset or --config", "both", "pass only one of them")
    if isinstance(config_path, FlowARConfig):           # (the Python API's config=, given as the config itself)
        config_path, config = None, config_path
    elif not (config_path is None or isinstance(config_path, (str, os.PathLike))):
        raise ConfigError("config: a config JSON's path or a FlowARConfig", repr(config_path)[:60],
                          "pass e.g. config='my.json' or config=FlowARConfig.load('my.json')")
    named = (get_preset(preset) if preset else FlowARConfig.load(config_path) if config_path else config)
    if named is not None:
        if ck.config is not None and named != ck.config:
            mine, theirs = named.to_dict(), ck.config.to_dict()
            raise ConfigError(f"a config equal to the one stored in {ck.path.name}", "a different --preset/--config ("
                              + "; ".join(f"{k} {v!r}, the file's {theirs[k]!r}" for k, v in mine.items() if v != theirs[k])
                              + ")", "drop --preset/--config: the file describes itself")
        return named
    if ck.config is not None:
        return ck.config
    fits = fitting_presets(ck.state_dict)
    hint = (f"this file fits --preset {fits[0]}" if fits else "it holds a VAE: pass it as --vae"
            if "post_quant_conv.weight" in ck.state_dict else "pass the --config JSON it was trained with")
    raise ConfigError("a config for this checkpoint (an official file or a state dict saved alone carries none)",
                      f"no --preset/--config for {ck.path.name}", hint)


def load_model(path: str | Path, preset: str | None = None, config_path: str | Path | None = None,
               use_ema: bool = True, device: str | torch.device = "cpu", config: FlowARConfig | None = None,
               mapped: bool = False):
    """Build the reference model and load a checkpoint into it strictly. Returns (model, checkpoint)."""
    from flowar.model.ar import FlowAR
    ck = read_checkpoint(path, use_ema=use_ema, mapped=mapped)
    config = resolve_config(ck, preset, config_path, config)
    check_fits(ck.state_dict, config, ck.path, from_metadata=ck.config is not None)
    check_class_names(ck, config)
    # Built as a skeleton and given the checkpoint's tensors themselves (assign): one copy of the
    # weights in memory, not two.
    with skeleton():
        model = FlowAR(config)
    ck.state_dict = as_model_dtypes(ck.state_dict, model.state_dict(), ck.path)
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
        empty = [n for n in class_names if not isinstance(n, str) or not n.replace("_", " ").strip()]
        if empty:                       # (a name no request could give; a name two classes share is told as such)
            raise CheckpointError(f"class names that are non-empty strings (to save in {Path(path).name})",
                                  repr(empty[0])[:60], "name every class (e.g. its folder's name)")
        meta[META_CLASSES] = json.dumps(list(class_names))
    meta.update(extra or {})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
