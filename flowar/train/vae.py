"""Train a small diffusers ``AutoencoderKL`` for the default model (``flowar-train-vae``).

Reconstruction (MSE + L1) plus a small KL term, Adam, cosine learning rate, a fixed seed.
The result is a diffusers folder (``config.json`` + safetensors), written to a temporary
folder and renamed into place. A stop (the command's Ctrl-C or SIGTERM) is taken at a step's
end: the folder then holds the VAE at that step and :data:`STATE` (Adam's moments, the data
order's generator, the settings), from which ``resume`` continues as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowar.train.data import load_dataset
from flowar.errors import FlowARError


@dataclass(slots=True)
class VAETrainArgs:
    data: str = "animal-mnist"
    out: str = "vae"
    size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)     # 2 down-samplings: 32x32 -> 8x8 latents
    latent_channels: int = 4
    groups: int = 8
    steps: int | None = None                     # 1500; a resume: the run's own, or more
    batch: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-5
    seed: int = 0
    resume: bool = False


RECORD = "flowar-train-vae.json"        # what makes a folder one this command wrote (config.json: any diffusers VAE's)
STATE = "training-state.safetensors"    # beside the weights of a VAE whose training stopped: what resume continues
WRITTEN = {RECORD, STATE, "config.json", "diffusion_pytorch_model.safetensors"}    # (and save_pretrained's two)


def ours(out) -> str:
    """The name that makes ``out`` a folder this command wrote, to be replaced: its record; a stopped run's state where
    that run was written before the record was (a downloaded or shipped VAE was replaced in silence, having a
    config.json)."""
    return STATE if (Path(out) / STATE).is_file() and not (Path(out) / RECORD).is_file() else RECORD
_KEPT = ("data", "size", "channels", "latent_channels", "groups", "batch", "lr", "kl_weight", "seed")   # a run's own


def resumed(a: VAETrainArgs) -> tuple[VAETrainArgs, dict | None]:
    """(the settings a resume runs with, the stopped run's state; None where ``a`` does not resume):
    settings left at their defaults take the run's own (said), another value is refused, and
    ``steps`` may grow (the cosine schedule then runs to it)."""
    if not a.resume:
        return dataclasses.replace(a, steps=1500 if a.steps is None else a.steps), None
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file
    state = Path(a.out) / STATE
    if not state.is_file():
        raise FlowARError(f"--out a VAE folder whose training stopped (it holds {STATE}) for --resume",
                          f"{a.out}: " + ("a finished VAE" if (Path(a.out) / "config.json").is_file() else "no such run"),
                          "train a new one without --resume (a finished VAE trains no further: start again with more "
                          "--steps)")
    with safe_open(str(state), framework="pt") as f:
        began = json.loads(f.metadata()["args"])
    from flowar.io.files import as_file
    from flowar.train.resume import take_recorded
    began["channels"] = tuple(began["channels"])
    # (a data folder as the file it names: the run records it so, and a resume from another directory is the same run)
    a = take_recorded(dataclasses.replace(a, data=as_file(str(a.data))), began, _KEPT + ("steps",))
    if other := [f"{k}: here {getattr(a, k)!r}, there {began[k]!r}" for k in _KEPT if getattr(a, k) != began[k]]:
        raise FlowARError("the settings the run began with for --resume", "; ".join(other),
                          "leave them out (the run's own are taken), or train a new VAE into another --out")
    tensors = load_file(str(state))
    done = int(tensors.pop("step"))
    if a.steps <= done:
        raise FlowARError(f"--steps above the {done} the run has done, for --resume", str(a.steps),
                          f"use e.g. --steps {done + 500}, or use the VAE as it is (it holds step {done})")
    print(f"resuming at step {done} of {a.steps}", file=sys.stderr)
    return a, {"step": done, **tensors}


def build_vae(a: VAETrainArgs):
    from flowar.model.vae import diffusers_module
    n = len(a.channels)
    return diffusers_module().AutoencoderKL(
        block_out_channels=tuple(a.channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=a.latent_channels, layers_per_block=1,
        norm_num_groups=a.groups, sample_size=a.size, mid_block_add_attention=False)


def train_vae(a: VAETrainArgs, progress: bool = True) -> dict:
    if a.size % 2 ** (len(a.channels) - 1):
        raise FlowARError(f"--size divisible by {2 ** (len(a.channels) - 1)}", str(a.size), "use e.g. --size 32")
    from flowar.io.files import check_replaceable
    check_replaceable(a.out, ours(a.out), "--out", owned=lambda d: WRITTEN)   # before any training: never over others' files
    a, state = resumed(a)
    from flowar.train.memory import require_batch_memory, vae_image_bytes
    require_batch_memory(a.batch, vae_image_bytes(a.size), "flowar-train-vae")      # (it was killed: exit 137)
    data = load_dataset(a.data, a.size)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    vae = build_vae(a).train()
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=a.lr)
    done = 0
    if state is not None:           # the stopped run's weights, Adam's moments and the data order's generator
        from safetensors.torch import load_file
        vae.load_state_dict(load_file(str(Path(a.out) / "diffusion_pytorch_model.safetensors")))
        done = state["step"]
        opt.load_state_dict({"state": {i: {k: state[f"adam.{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                                       for i in range(len(params))}, "param_groups": opt.state_dict()["param_groups"]})
        gen.set_state(state["generator"])
    for g in opt.param_groups:
        g.setdefault("initial_lr", a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)),
                                              last_epoch=done - 1)
    N = data.images.shape[0]
    bar = None
    if progress:
        from flowar.io.progress import progress_bar
        bar = progress_bar(total=a.steps, initial=done, desc="vae", unit="step")
    from flowar.errors import stop_answered, stopped, stops_held
    t0, rec, losses = time.perf_counter(), float("nan"), []
    with stops_held("stopping at this step's end, with the VAE there (another Ctrl-C or SIGTERM: at once, without it)"):
        for step in range(done, a.steps):
            idx = torch.randint(0, N, (a.batch,), generator=gen)
            x = data.images[idx]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            r = vae.decode(z).sample
            rec_loss = (r - x).pow(2).mean() + 0.1 * (r - x).abs().mean()
            loss = rec_loss + a.kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            rec, total = rec_loss.item(), loss.item()
            losses.append(rec)
            if not math.isfinite(total):                 # (NaN weights were written, exit 0)
                raise FlowARError("a finite training loss", f"{total} at step {step}", "lower --lr; nothing was written")
            if bar is not None:
                bar.set_postfix(rec=f"{rec:.4f}")
                bar.update(1)
            if stopped() is not None and step + 1 < a.steps:      # (the work so far, with what continues it)
                with stop_answered():
                    _write(a, vae, {"step": torch.tensor(step + 1), "generator": gen.get_state(),
                                    **{f"adam.{i}.{k}": v for i, st in opt.state_dict()["state"].items()
                                       for k, v in st.items()}})
                raise KeyboardInterrupt(f"at step {step + 1} of {a.steps}; {a.out} holds the VAE at that step: the "
                                        "same command with --resume continues from there")
        if bar is not None:
            bar.close()
        with stop_answered():       # (a stop on the last step, or while it is written: the finished VAE first)
            _write(a, vae, None)
        if stopped() is not None:
            raise KeyboardInterrupt(f"at step {a.steps} of {a.steps}, the last; {a.out} holds the finished VAE")
    return {"final_reconstruction_loss": rec, "seconds": time.perf_counter() - t0, "out": str(Path(a.out)),
            "losses": losses}


def _write(a: VAETrainArgs, vae, state: dict | None) -> None:
    """The VAE into ``a.out`` (a diffusers folder), with the state a resume continues from where it stopped."""
    from flowar.io.files import as_file, staged_directory
    vae.eval()
    with staged_directory(Path(a.out), ours(a.out), owned=lambda d: WRITTEN) as tmp:   # (the previous folder stays until
        vae.save_pretrained(tmp, safe_serialization=True)                                # the new one is complete)
        (tmp / RECORD).write_text(json.dumps({"format": "flowar-train-vae", "size": a.size, "steps": a.steps}) + "\n")
        if state is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / STATE), metadata={"args": json.dumps(
                dataclasses.asdict(a) | {"resume": False, "data": as_file(str(a.data)), "out": str(a.out)})})
    vae.train()
