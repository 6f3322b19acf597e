"""The pictures a training run writes: its loss curve (``loss.png``) and sample grids
(``samples/stepNNNNNNN.png``); and its progress. See :mod:`flowar.train.trainer`."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowar.io.files import atomic_write_bytes
from flowar.io.progress import LINE_EVERY_S

if TYPE_CHECKING:
    from flowar.model.ar import FlowAR
    from flowar.train.trainer import TrainArgs, TrainState


def own_grids(folder: Path) -> list[Path]:
    """The sample grids a run wrote in ``folder`` (``stepNNNNNNN.png``, :func:`sample_grid`'s names)."""
    return [p for p in folder.glob("step*.png") if re.fullmatch(r"step\d{7}\.png", p.name)] if folder.is_dir() else []


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(losses, lw=0.5, alpha=0.4, label="loss")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        sm = torch.tensor(losses).unfold(0, w, 1).mean(1).tolist()
        ax.plot(range(w - 1, len(losses)), sm, lw=1.5, label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


@torch.no_grad()
def sample_grid(ema: FlowAR, args: TrainArgs, class_names: list[str], path: Path) -> None:
    from flowar.io.images import save_grid
    from flowar.sampling.sampler import per_sample_noise, sample
    from flowar.sampling.schedule import Settings
    from flowar.sampling.eager import EagerStages
    from flowar.model.vae import load_vae
    c = ema.config
    vae = load_vae(args.vae, expect_channels=c.latent_channels)
    n = c.num_classes   # 40 images: classes repeated where fewer, 40 spread where more (1000 classes sampled 1000)
    labels = torch.arange(n).repeat_interleave(max(1, 40 // n))[:40] if n <= 40 else torch.linspace(0, n - 1, 40).long()
    ema.eval()
    sched = Settings(steps=args.sample_steps, cfg=args.sample_cfg).resolve(c.n_scales)
    _, images = sample(EagerStages(ema, vae.decode), c, sched, labels, per_sample_noise(0, range(len(labels))),
                       decode=True)
    save_grid(images, [class_names[i] for i in labels.tolist()], path, columns=max(1, 40 // n) if n <= 40 else 8)


class Progress:
    """A tqdm bar on a terminal (when ``progress``), else a line every --log-every steps."""

    def __init__(self, args: TrainArgs, state: TrainState, progress: bool):
        from tqdm import tqdm
        self.args, self.t0, self.first, self.state = args, time.perf_counter(), state.step, state
        self.last = self.t0                 # the last line's time: a line at least every LINE_EVERY_S in a log
        self.saved = state.step or None     # the step checkpoint-last.safetensors holds (a resumed run's, or none yet)
        self.bar = tqdm(total=args.steps, initial=state.step, desc="train", unit="step",
                        disable=None if progress else True)            # None: off when not on a terminal

    def log(self, state: TrainState, lr: float) -> None:
        self.bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        self.bar.update(1)
        n, now = self.args.log_every, time.perf_counter()
        # every --log-every steps, and at least every 30 s (a slow run said nothing for minutes before its first)
        if self.bar.disable and (state.step % n == 0 or now - self.last >= LINE_EVERY_S):
            self.last, took, k = now, now - self.t0, min(n, len(state.losses))
            rate = (state.step - self.first) / max(1e-9, took)     # (and the time: a log had neither elapsed nor left)
            print(f"step {state.step}/{self.args.steps} loss {sum(state.losses[-k:]) / k:.4f} lr {lr:.2e} "
                  f"{rate:.1f} step/s, {took:.0f} s, {(self.args.steps - state.step) / max(rate, 1e-9) / 60:.1f} min left",
                  file=sys.stderr, flush=True)    # (the bar's place: stdout left it out of a log)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, e, tb) -> None:
        self.close()
        if kind is KeyboardInterrupt:       # (Ctrl-C or SIGTERM said "interrupted" alone: what the run can resume)
            ckpt = Path(self.args.out) / "checkpoint-last.safetensors"   # (a write a stop cut short: not in place)
            raise KeyboardInterrupt(f"{e}: " * bool(str(e)) + f"at step {self.state.step}; " + (
                f"{ckpt} holds step {self.saved}: the same command with --resume continues from there" if self.saved
                else f"no checkpoint yet (the first at step {self.args.ckpt_every}): run the command again to start "
                "afresh")) from None
