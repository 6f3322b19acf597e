"""Images out: [-1, 1] tensors to PNG files, one per sample or a labelled grid.

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a truncated PNG that a later step (an FID tool, say) would read.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowar.errors import FlowARError, raise_if_stopped, stops_held
from flowar.io.files import atomic_write_bytes, remove_stale


def to_uint8(images_B3HW: Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 from images in [-1, 1]: the rounding of every PNG written here."""
    return ((images_B3HW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(
        0, 2, 3, 1).numpy()


def save_images(images_B3HW: Tensor, folder: str | Path, first: int = 0, placed=None) -> list[Path]:
    """One unlabelled PNG per sample, in sample order: 000000.png, 000001.png, ... (from ``first``),
    all or none: written in a hidden folder inside, renamed into place once all are (Ctrl-C while
    200 were written left 11 of them; a folder this call made is removed again). A stop that comes
    while they are renamed waits for the last rename and for ``placed()`` (the caller's note that
    they are written), then is raised (raised at once, it left the first ones renamed and the
    caller said none were)."""
    import os
    import shutil
    import tempfile

    from PIL import Image
    folder = Path(folder)
    made = not folder.exists()
    paths = [folder / f"{first + i:06d}.png" for i in range(images_B3HW.shape[0])]
    staging = None
    try:
        with stops_held():          # (a stop raised with a folder made and not yet named here left it behind)
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale(folder, ".flowar-images-")          # (a write that was killed left its folder)
            staging = Path(tempfile.mkdtemp(prefix=f".flowar-images-{os.getpid()}-", dir=folder))
        for p, arr in zip(paths, to_uint8(images_B3HW)):
            Image.fromarray(arr).save(staging / p.name, format="PNG")
        raise_if_stopped()          # (a Ctrl-C that a library swallowed while they were written: none put in place)
        with stops_held():
            for p in paths:
                os.replace(staging / p.name, p)
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
            if placed is not None:
                placed()
            made = False            # (in place and said written: a stop raised as this block ends keeps them)
    except BaseException:           # (an error, or a second stop, before all are in place)
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return paths


def check_image_folder(folder: str | Path, n: int, grid: str | Path | None = None) -> None:
    """Refuse a --save-images folder that would mix runs or lose a file, before any sampling: numbered
    PNGs beyond the ``n`` this run writes (an earlier, larger run's: an evaluator reading the folder
    took them too), or a ``grid`` path that is one of the names it writes (the grid was overwritten by
    sample 0 while the command said it was written)."""
    folder, numbered = Path(folder), re.compile(r"(\d{6})\.png")
    g = Path(grid) if grid else None
    if g is not None and g.parent.resolve() == folder.resolve() and (m := numbered.fullmatch(g.name)) \
            and int(m.group(1)) < n:
        raise FlowARError("--out outside the numbered PNGs --save-images writes", f"--out {g}, which sample "
                          f"{int(m.group(1))} overwrites", "name the grid otherwise, e.g. grid.png")
    beyond = sorted(q.name for q in folder.glob("*.png") if (m := numbered.fullmatch(q.name)) and int(m.group(1)) >= n) \
        if folder.is_dir() else []
    if beyond:
        raise FlowARError(f"a --save-images folder without numbered PNGs beyond the {n} this run writes",
                          f"{len(beyond)} more in {folder} ({beyond[0]}, ...)", "choose an empty folder, or remove "
                          "them (a tool reading the folder would take them as this run's)")


def save_grid(images_B3HW: Tensor, captions: list[str], path: str | Path, columns: int | None = None,
              min_cell: int = 96, placed=None) -> Path:
    """A grid PNG with a caption under every image; small images are scaled up (nearest); ``placed``:
    see :func:`~flowar.io.files.atomic_write_bytes`."""
    from PIL import Image, ImageDraw
    arrs = to_uint8(images_B3HW)
    B, H, W, _ = arrs.shape
    cols = columns or min(B, max(1, math.ceil(math.sqrt(B))))
    rows = math.ceil(B / cols)
    zoom = max(1, math.ceil(min_cell / max(H, W)))
    cw, ch, text_h, pad = W * zoom, H * zoom, 14, 2
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, arr in enumerate(arrs):
        r, col = divmod(i, cols)
        x0, y0 = pad + col * (cw + pad), pad + r * (ch + text_h + pad)
        grid.paste(Image.fromarray(arr).resize((cw, ch), Image.NEAREST), (x0, y0))
        text = captions[i][: max(4, cw // 6)]
        draw.text((x0 + 1, y0 + ch + 1), text, fill="black", font=None if text.isascii() else _wide_font())
    p = Path(path)
    atomic_write_bytes(p, functools.partial(grid.save, format="PNG"), placed)
    return p


@functools.cache
def _wide_font():
    """A font with glyphs beyond ASCII for captions that need them (Pillow's default drew "chat ünï" as
    "chat" and boxes): DejaVu Sans where the system has it, else the default (ASCII captions keep it)."""
    from PIL import ImageFont
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 10)
    except OSError:
        return None


def _squared_error(a_B3HW: Tensor, b_B3HW: Tensor) -> Tensor:
    return (a_B3HW.float().clamp(-1, 1) - b_B3HW.float().clamp(-1, 1)).pow(2)


def _db(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)    # peak-to-peak 2: [-1, 1]


def psnr(a_B3HW: Tensor, b_B3HW: Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], over the whole batch."""
    return _db(float(_squared_error(a_B3HW, b_B3HW).mean()))


def psnr_each(a_B3HW: Tensor, b_B3HW: Tensor) -> list[float]:
    """PSNR in dB of each image pair in [-1, 1]."""
    return [_db(float(m)) for m in _squared_error(a_B3HW, b_B3HW).flatten(1).mean(1)]
