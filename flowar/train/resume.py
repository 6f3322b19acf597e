"""A run's training checkpoint (``checkpoint-last.safetensors``: model, EMA, optimizer, losses and the
settings), written and read; and what a resumed run takes from it: the settings it began with, where the command left
them at their defaults. ``flowar-train --out RUN --vae VAE --resume`` was refused unless every
setting was typed again ("batch 64, began with 16": the default compared with the run's own); a
setting given with another value than the run's is still refused (:func:`~flowar.train.trainer.check_args`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flowar.io.files import as_file
from flowar.model.checkpoint import TRAIN_FORMAT_TAG, save_checkpoint

STEPS = 2000          # flowar-train's optimizer steps where --steps is not given (a resumed run: its own)

if TYPE_CHECKING:
    from flowar.model.ar import FlowAR
    from flowar.train.trainer import Run, TrainArgs, TrainState


def with_recorded_settings(args, defining: tuple[str, ...], say: bool = True):
    """``args`` (a :class:`~flowar.train.trainer.TrainArgs`) with each of ``defining`` that is at its
    default taken from the run's checkpoint where the run began with another value; a note names them.
    Unchanged when not resuming or when the checkpoint cannot be read (the checks say why); ``steps``
    not given (None): the run's own, else :data:`STEPS`."""
    ckpt = Path(args.out) / "checkpoint-last.safetensors"
    if args.resume and ckpt.is_file():
        try:
            from safetensors import safe_open
            with safe_open(str(ckpt), framework="pt") as f:
                began = json.loads(f.metadata()["train_args"])
        except Exception:   # noqa: BLE001 - refused with its reason where the run is checked
            began = None
        args = args if began is None else take_recorded(args, began, defining, say)
    return args if args.steps is not None else dataclasses.replace(args, steps=STEPS)


def take_recorded(args, began: dict, defining: tuple[str, ...], say: bool = True):
    """``args`` (a dataclass: flowar-train's or flowar-train-vae's) with each of ``defining`` that is
    None or at its default taken from ``began``, the settings the run began with, where those differ
    (paths compared as the files they name); a note names them."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    taken = {k: began[k] for k in defining if k in began and (getattr(args, k) is None or getattr(args, k) == defaults.get(
             k, dataclasses.MISSING)) and as_file(began[k]) != as_file(getattr(args, k))}     # (None: --vae not given)
    if taken and say:
        print("note: --resume takes the run's own " + ", ".join(f"{k} {v!r}" for k, v in taken.items())
              + " (not given here, or given at their defaults)", file=sys.stderr)
    return dataclasses.replace(args, **taken)


def save_training_checkpoint(path: Path, run: Run, args: TrainArgs, class_names: list[str]) -> None:
    tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in run.ema.state_dict().items()})
    osd = run.opt.state_dict()
    for i, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in osd["param_groups"]]
    save_checkpoint(path, tensors, run.model.config, class_names, extra={
        "format": TRAIN_FORMAT_TAG, "step": str(run.state.step), "losses": json.dumps(run.state.losses),
        "optimizer_groups": json.dumps(groups), "train_args": json.dumps({k: as_file(v) for k, v in asdict(args).items()}),
        "data": str(args.data), "inputs": json.dumps(run.inputs),
        "vae": str(args.vae), "vae_sha256": run.inputs.get("vae") or ""})    # (as model.safetensors: another VAE is said)


def load_training_checkpoint(path: Path, model: FlowAR, ema: FlowAR, opt: torch.optim.Optimizer) -> TrainState:
    from safetensors import safe_open

    from flowar.train.trainer import TrainState
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["optimizer_groups"])})
    return TrainState(int(meta["step"]), json.loads(meta["losses"]))
