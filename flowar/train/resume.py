"""What a resumed run takes from its checkpoint: the settings it began with, where the command left
them at their defaults. ``flowar-train --out RUN --vae VAE --resume`` was refused unless every
setting was typed again ("batch 64, began with 16": the default compared with the run's own); a
setting given with another value than the run's is still refused (:func:`~flowar.train.trainer.check_args`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from flowar.io.files import as_file


def with_recorded_settings(args, defining: tuple[str, ...], say: bool = True):
    """``args`` (a :class:`~flowar.train.trainer.TrainArgs`) with each of ``defining`` that is at its
    default taken from the run's checkpoint where the run began with another value; a note names them.
    Unchanged when not resuming or when the checkpoint cannot be read (the checks say why)."""
    ckpt = Path(args.out) / "checkpoint-last.safetensors"
    if not args.resume or not ckpt.is_file():
        return args
    try:
        from safetensors import safe_open
        with safe_open(str(ckpt), framework="pt") as f:
            began = json.loads(f.metadata()["train_args"])
    except Exception:   # noqa: BLE001 - refused with its reason where the run is checked
        return args
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    taken = {k: began[k] for k in defining if k in began and getattr(args, k) == defaults.get(k, dataclasses.MISSING)
             and as_file(began[k]) != as_file(getattr(args, k))}
    if taken and say:
        print("note: --resume takes the run's own " + ", ".join(f"{k} {v!r}" for k, v in taken.items())
              + " (left at their defaults here)", file=sys.stderr)
    return dataclasses.replace(args, **taken)
