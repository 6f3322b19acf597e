"""``flowar-decode``: images from token maps saved earlier (``flowar-run --save-tokens``), decoded by
the engine directory's decode stage or a checkpoint's VAE: the images the run would have written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from flowar.commands.options import command
from flowar.errors import FlowARError


def read_tokens(path: str | Path):
    """(tokens (B, C, S, S) float, labels: B ints or None, the grid's columns or None, the metadata) of a
    ``--save-tokens`` file, read without executing anything (safetensors); anything else is one line."""
    import torch
    from safetensors import SafetensorError, safe_open
    want = "a safetensors file of token maps from flowar-run --save-tokens (tensors 'tokens' (B, C, S, S), 'labels' (B,))"
    p = Path(path)
    if not p.is_file():
        raise FlowARError(want, f"no file at {path}", "check the --tokens path")
    try:
        with safe_open(p, "pt") as f:       # (those two alone: a checkpoint passed by mistake was read whole)
            names, meta = sorted(f.keys()), f.metadata() or {}
            found = {k: f.get_tensor(k) for k in ("tokens", "labels") if k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise FlowARError(want, f"{path}: {(str(e).splitlines() or ['unreadable'])[0]}",
                          "pass the file flowar-run --save-tokens wrote") from None
    tokens, labels = found.get("tokens"), found.get("labels")
    if tokens is None or not tokens.is_floating_point() or tokens.dim() != 4 or not len(tokens):
        got = "no 'tokens'" if tokens is None else f"'tokens' of {tokens.dtype} {tuple(tokens.shape)}"
        raise FlowARError(want, f"{path} with {got} (it holds {', '.join(names[:4]) or 'nothing'}"
                          f"{f', ... {len(names)} tensors' * (len(names) > 4)})",
                          "pass the file flowar-run --save-tokens wrote")
    if not bool(torch.isfinite(tokens).all()):
        bad = int((~torch.isfinite(tokens)).flatten(1).any(1).nonzero()[0])
        raise FlowARError(want + ", finite", f"{path} with NaN or infinite values in token map {bad}",
                          "sample them again (a run that diverged)")
    if labels is not None and (labels.is_floating_point() or labels.dim() != 1 or len(labels) != len(tokens)):
        raise FlowARError(want, f"{path} with 'labels' of {labels.dtype} {tuple(labels.shape)} beside {len(tokens)} "
                          "token maps", "pass the file flowar-run --save-tokens wrote")
    try:                                    # (what flowar-run recorded; a file of before: its "columns" alone)
        made = json.loads(meta.get("flowar_tokens", "{}"))
    except ValueError:
        made = None
    if not isinstance(made, dict):
        raise FlowARError(want, f"{path} whose record of what made it is not JSON", "pass the file flowar-run --save-tokens wrote")
    columns = made.get("columns", int(meta["columns"]) if meta.get("columns", "").isdigit() else None)
    return tokens.float(), (labels.tolist() if labels is not None else None), columns if type(columns) is int else None, made


def sampled_by(meta: dict, rt, path) -> None:
    """Refuse token maps that their file says another model sampled: other class names (its images were
    captioned with this model's: a bear called "circle"), or another latent scale (decoded off scale).
    A file written before these were recorded is decoded as it was."""
    import math
    names = meta.get("class_names") if isinstance(meta.get("class_names"), list) else None
    if names is not None and rt.class_names is not None and names != list(rt.class_names):
        differ = next((f"{a!r} where this one has {b!r}" for a, b in zip(names, rt.class_names) if a != b),
                      f"{len(names)} classes where this one has {len(rt.class_names)}")
        raise FlowARError("token maps this model sampled (its class names)", f"{path}, sampled by a model with {differ}",
                          "decode them with the model that sampled them")
    scale = meta.get("latent_scale")
    if type(scale) in (int, float) and not math.isclose(scale, rt.config.latent_scale, rel_tol=1e-6):
        raise FlowARError("token maps this model sampled (its latent scale)", f"{path}, sampled at latent scale "
                          f"{float(scale):g} where this model's is {rt.config.latent_scale:g}",
                          "decode them with the model that sampled them")


@command("flowar-decode")
@click.option("--tokens", "tokens_file", required=True, type=click.Path(dir_okay=False),
              help="Token maps to decode: the file flowar-run --save-tokens wrote.")
@click.option("--engine-dir", type=click.Path(), help="Engine directory whose decode stage decodes them (exported "
              "with --vae).")
@click.option("--ckpt", type=click.Path(dir_okay=False), help="Or the checkpoint that sampled them, with --vae.")
@click.option("--vae", type=click.Path(), help="With --ckpt: MAR kl16.ckpt or a diffusers folder.")
@click.option("--preset", help="With --ckpt, for files that carry no config: flowar-s, flowar-l, flowar-h, tiny.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="With --ckpt: config JSON for files "
              "that carry none.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a labelled PNG grid here.")
@click.option("--save-images", type=click.Path(file_okay=False), help="Write one PNG per token map into this folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (--ckpt).")
@click.option("--threads", type=int, help="CPU cores to compute on [default: every core this process may use].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def decode_cmd(tokens_file, engine_dir, ckpt, vae, preset, config_path, out, save_images, device, threads, debug):
    """Decode token maps saved by flowar-run --save-tokens into images (a grid and/or one PNG each)."""
    from flowar.io.images import check_image_folder
    from flowar.io.memory import require_memory
    from flowar.io.outputs import check_requested, write_outputs
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.batches import SampleResult
    if bool(engine_dir) == bool(ckpt):
        raise FlowARError("exactly one of --engine-dir or --ckpt (with --vae)", "both" if ckpt else "neither",
                          "pass --engine-dir DIR (exported with --vae)")
    if ckpt and not vae:
        raise FlowARError("--vae with --ckpt (the VAE decodes the token maps)", "none",
                          "pass --vae PATH: the VAE the model was trained with (or --engine-dir DIR exported with --vae)")
    check_requested(None, out, save_images, [tokens_file, engine_dir, ckpt, vae, config_path])
    if not (out or save_images):
        raise FlowARError("--out grid.png and/or --save-images DIR", "neither", "pass --out grid.png")
    tokens, labels, columns, meta = read_tokens(tokens_file)
    if save_images:
        check_image_folder(save_images, len(tokens), out)
    t0 = time.perf_counter()
    with Runtime.open(engine_dir or ckpt, bool(engine_dir), preset=preset, config=config_path, vae=vae, device=device,
                      threads=threads, only=("decode",)) as rt:      # (a directory's decoder alone)
        rt.require_decoder()
        c, side = rt.config, rt.image_size
        want = (c.latent_channels, c.latent_size, c.latent_size)
        if tuple(tokens.shape[1:]) != want:
            raise FlowARError(f"token maps of this model: (B, {', '.join(map(str, want))})",
                              f"{tuple(tokens.shape)} in {tokens_file}", "decode them with the model that sampled "
                              "them (its engine directory, or its checkpoint and VAE)")
        sampled_by(meta, rt, tokens_file)
        outside = [i for i in labels or [] if not 0 <= i < c.num_classes]
        if outside:
            raise FlowARError(f"labels of this model's classes (0..{c.num_classes - 1})", f"{outside[:8]} in {tokens_file}",
                              "decode them with the model that sampled them")
        require_memory(len(tokens) * side ** 2 * 3 * 4 * 2, f"{len(tokens)} images of {side}x{side}, kept until "
                       "written", "decode fewer at a time")
        click.echo(f"opened {engine_dir or ckpt} in {time.perf_counter() - t0:.2f} s", err=True)
        t1 = time.perf_counter()
        images = rt.decode(tokens)
        seconds = time.perf_counter() - t1
    ids = labels if labels is not None else list(range(len(tokens)))
    lines = write_outputs(SampleResult(tokens, images, ids, seconds), rt.class_names if labels is not None else None,
                          None, out, save_images, columns)     # (the run's grid: --n-per-class columns)
    click.echo(f"decoded {len(tokens)} token map{'s' * (len(tokens) != 1)} with {rt.detail} in {seconds:.2f} s")
    for line in lines:
        click.echo("  " + line)
