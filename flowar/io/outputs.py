"""A sampling's files: the tokens, the grid and the numbered PNGs a command was asked for
(``flowar-run``, ``flowar-decode``), each written whole and said as it is put in place."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from flowar.errors import FlowARError


def check_requested(save_tokens: str | Path | None, out: str | Path | None, save_images: str | Path | None,
                    inputs: list) -> None:
    """Refuse, before any work, outputs that could not be written (or would write over an input or
    each other, :func:`~flowar.io.files.check_outputs`) or are of the wrong kind: the grid a .png,
    the tokens a .safetensors file."""
    from flowar.io.files import check_outputs, check_writable
    check_outputs([("--save-tokens", save_tokens), ("--out", out), ("--save-images", save_images)], inputs)
    for p, is_dir, option in ((save_tokens, False, "--save-tokens"), (out, False, "--out"),
                              (save_images, True, "--save-images")):
        check_writable(p, is_dir, option)
    for path, suffix, option, why in ((out, ".png", "--out", "the grid is a PNG"),
                                      (save_tokens, ".safetensors", "--save-tokens", "tokens and labels as safetensors")):
        if path and Path(path).suffix.lower() != suffix:
            raise FlowARError(f"{option} a {suffix} file ({why})", path, f"use {option} {Path(path).with_suffix(suffix)}")
    if save_tokens and Path(save_tokens).is_file() and ((held := _tensor_names(save_tokens)) is None
                                                        or held - {"tokens", "labels"}):
        # (an engine directory's checkpoint or VAE, which that run does not read, was replaced by 1 KB of tokens)
        raise FlowARError("--save-tokens a new file, or a token file to replace", f"{save_tokens}, which holds "
                          + (f"other tensors ({', '.join(sorted(held)[:3])}{', ...' * (len(held) > 3)}: a checkpoint "
                             "or a VAE?)" if held is not None else "no safetensors"), "choose another path (or remove that file first)")


def check_json_output(path: str | Path | None, option: str = "--json") -> None:
    """Refuse a JSON output path that holds a file other than a JSON object (a report to replace): flowar-judge
    --json replaced the checkpoint an engine directory was exported from, and its VAE's weights."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return
    try:
        ok = p.stat().st_size < 64 << 20 and isinstance(json.loads(p.read_bytes().decode("utf-8")), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise FlowARError(f"{option} a new file, or a JSON report to replace", f"{path}, which is not one (a checkpoint "
                          "or a VAE's weights?)", "choose another path (or remove that file first)")


def _tensor_names(path: str | Path) -> set[str] | None:
    """The tensors a safetensors file holds (its header only), None where it is not one."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception:  # noqa: BLE001 - any unreadable file is "not one"
        return None


def write_outputs(result, class_names: list[str] | None, save_tokens: str | Path | None,
                  out: str | Path | None, save_images: str | Path | None, columns: int | None = None,
                  latent_scale: float | None = None) -> list[str]:
    """Write the requested files of ``result`` (a :class:`~flowar.sampling.batches.SampleResult`: its
    tokens, images and labels) atomically; returns a line per file for the user (each noted as its
    file is put in place: a stop then still finds it said). ``columns``: the grid's, also recorded
    in the tokens file (flowar-decode lays out the same grid), as are the class names and ``latent_scale``
    of the model that sampled them (flowar-decode refuses another model's)."""
    from flowar.io.files import atomic_write_bytes
    lines = []
    try:
        if save_tokens:
            import json

            from safetensors.torch import save_file
            made = {"columns": columns, "class_names": class_names,
                    "latent_scale": None if latent_scale is None else float(latent_scale)}
            # (one key: safetensors writes several in no fixed order, and the same run gave other bytes)
            meta = {"flowar_tokens": json.dumps({k: v for k, v in made.items() if v is not None})}
            atomic_write_bytes(save_tokens, lambda tmp: save_file({"tokens": result.tokens.contiguous(),
                                                                  "labels": torch.tensor(result.labels)}, tmp,
                                                                 metadata=meta),
                               partial(lines.append, f"tokens {tuple(result.tokens.shape)} -> {save_tokens}"))
        if result.images is not None:
            from flowar.io.images import save_grid, save_images as save_each
            if out:
                caps = [class_names[i] if class_names and i < len(class_names) else str(i) for i in result.labels]
                n = len(result.labels)
                save_grid(result.images, caps, out, columns=columns,
                          placed=partial(lines.append, f"grid of {n} image{'s' * (n != 1)} -> {out}"))
            if save_images:
                save_each(result.images, save_images,
                          placed=partial(lines.append, f"{len(result.labels)} PNG{'s' * (len(result.labels) != 1)} -> {Path(save_images)}/"))
    except KeyboardInterrupt as e:         # (each file is whole, old or new: say which outputs are new)
        raise KeyboardInterrupt(f"{e}: " * bool(str(e)) + "while writing; written: " + ("; ".join(lines) or "none")
                                + "; the other outputs hold what they held before") from None
    return lines
