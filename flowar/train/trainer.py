"""Training FlowAR "as usual" (``flowar-train``): the official multi-scale flow-matching loss.

For a latent x (the VAE posterior sample times ``latent_scale``) and class label y:

* y is replaced by the null class with probability ``label_drop`` (for guidance later);
* the target of scale k is x area-downsampled to s_k x s_k; the AR input of scale k >= 1 is the target of scale
  k-1 resized bicubic to the final size, then area to s_k (the sampler's ``hand_off``: training feeds it alike);
* the AR runs once over all scales under the block-causal mask;
* each scale draws fresh t ~ U(0, 1) and noise e, forms x_t = (1 - t) x + t e, and the head
  regresses e - x; the scale's mean squared error is weighted by s_k^2 / s_max^2.

AdamW (0.9, 0.95) with weight decay on matrices only (not biases, norms or 1-D tensors), linear warm-up then cosine
decay, gradient clipping and an EMA of the weights.

Determinism and exact resume: every random draw comes from a generator seeded by (seed, step, rank) or (seed, epoch), so
a run stopped and resumed from its checkpoint repeats the same loss sequence as an uninterrupted one. Under ``torchrun``
each rank takes its slice of the global batch and DDP averages gradients (gloo: the trainer computes on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowar.config import FlowARConfig, get_preset
from flowar.model.ar import FlowAR
from flowar.model.checkpoint import META_CLASSES, META_CONFIG, save_checkpoint
from flowar.train.data import DatasetIndex, Latents, index_dataset, load_latents
from flowar.train.pictures import Progress, own_grids, plot_losses, sample_grid
from flowar.train.resume import load_training_checkpoint, save_training_checkpoint
from flowar.errors import FlowARError, stop_answered, stopped, stops_held
from flowar.io.digests import vae_sha256
from flowar.io.files import as_file
from flowar.sampling.labels import check_names, names_changed
from flowar.sampling.sampler import hand_off


@dataclass(slots=True)
class TrainArgs:
    out: str                                  # run folder: checkpoints, loss.png, samples/
    vae: str                                  # VAE the latents come from
    data: str = "animal-mnist"
    size: int = 32                            # image side
    preset: str | None = None                 # config widths; default: tiny widths on the data's latent grid
    config: str | None = None
    steps: int | None = None                  # None: 2000, or a resumed run's own (given: the run extends to it)
    batch: int = 64                           # global batch (split over ranks)
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_drop: float = 0.1
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    resume: bool = False
    cache_dir: str | None = None           # encoded latents, kept [default: the user's cache, flowar/latents]
    sample_cfg: float = 3.0
    sample_steps: int = 25


@dataclass(slots=True)
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Run:                                    # what the loop updates
    model: FlowAR
    ema: FlowAR
    opt: torch.optim.Optimizer
    objective: nn.Module                      # FlowLoss, wrapped in DDP under torchrun
    state: TrainState
    inputs: dict = field(default_factory=dict)    # sha256 of what it trains on: {data, vae} (a resume compares them)


def _gen(*key: int) -> torch.Generator:
    # One independent stream per (seed, step, rank): resume needs no generator state. The seed is
    # a hash of the key that no Python version or process changes (not the built-in hash()).
    digest = hashlib.blake2b(("flowar-train:" + ":".join(str(int(k)) for k in key)).encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


def default_config(latent_side: int, latent_channels: int, num_classes: int, latent_scale: float,
                   base: FlowARConfig | None = None) -> FlowARConfig:
    """Widths of ``base`` (default: the tiny preset) on scales 1, 2, 4, ... up to the latent side."""
    scales = tuple(2 ** i for i in range((latent_side - 1).bit_length())) + (latent_side,)
    return (base or get_preset("tiny")).replace(scales=scales, latent_channels=latent_channels,
                                                num_classes=num_classes, latent_scale=round(latent_scale, 4))


def build_config(args: TrainArgs, lat: Latents, began: FlowARConfig | None = None) -> FlowARConfig:
    """--config as given, or --preset's (default tiny) widths on the data's latent grid, or a resumed
    run's own (``began``: its latent_scale derived again could differ in the last digit); it must fit."""
    side, C, n_cls = lat.mean.shape[-1], lat.mean.shape[1], len(lat.class_names)
    if side < 2:                       # (--size 7 trained a model of one 1x1 scale)
        raise FlowARError("--size giving a latent map of at least 2x2 through the VAE (two scales or more)",
                          f"--size {args.size}: {side}x{side}", "use e.g. --size 32")
    # Unit variance for the model's input: measured on one posterior draw of the whole data (not for a resumed run)
    draw = None if began is not None else lat.mean + lat.std * torch.randn(lat.mean.shape, generator=_gen(args.seed, -1))
    latent_scale = None if draw is None else 1.0 / float(draw.std())
    if began is not None or args.config:
        config = began or FlowARConfig.load(args.config)
        if began is None and not 0.8 < config.latent_scale / latent_scale < 1.25 and os.environ.get("RANK", "0") == "0":
            print(f"note: --config's latent_scale {config.latent_scale:.4g} is not this data's through this VAE, "
                  f"{latent_scale:.4g} (measured): the model's inputs are not of unit variance", file=sys.stderr)   # (a
            # --config's scale was taken on trust: another VAE's 1.07 where this one's is 0.61 trained at loss 4.8, not 2.4)
    else:
        config = default_config(side, C, n_cls, latent_scale, get_preset(args.preset) if args.preset else None)
    if config.latent_size != side or config.latent_channels != C or config.num_classes != n_cls:
        raise FlowARError(f"a config with latent side {side}, {C} channels and {n_cls} classes (the data "
                          f"through this VAE)", f"side {config.latent_size}, {config.latent_channels} channels, "
                          f"{config.num_classes} classes", "fix --config, or omit it to derive one")
    return config


# ---- the objective -----------------------------------------------------------------------------

def scale_targets_and_inputs(x_BCSS: Tensor, config: FlowARConfig) -> tuple[list[Tensor], Tensor | None]:
    """Per-scale targets (B, s^2, C) and the AR input tokens of scales 1.. (B, L-1, C)."""
    S, sc = config.latent_size, config.scales
    gts = [(x_BCSS if s == S else F.interpolate(x_BCSS, size=(s, s), mode="area")).flatten(2).transpose(1, 2)
           for s in sc]                                                                     # (B, s^2, C) each
    ins = [hand_off(gts[k - 1], sc[k - 1], S, sc[k]) for k in range(1, len(sc))]           # (B, s_k^2, C) each
    return gts, (torch.cat(ins, dim=1) if ins else None)


class FlowLoss(nn.Module):
    """The training objective as a module, so DDP sees one forward per step."""

    def __init__(self, model: FlowAR):
        super().__init__()
        self.model = model

    def forward(self, x_BCSS: Tensor, labels_B: Tensor, t_KB: Tensor, noise: list[Tensor]) -> Tensor:
        c = self.model.config
        gts, x_in = scale_targets_and_inputs(x_BCSS, c)
        sem = self.model.semantics(labels_B, x_in)                               # (B, L, D)
        total = x_BCSS.new_zeros(())
        for k, side in enumerate(c.scales):
            x0, e, t = gts[k], noise[k], t_KB[k]
            xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * e
            v = self.model.flownet(xt, t, sem[:, c.scale_begin[k]:c.scale_end[k]])
            total = total + (v - (e - x0)).pow(2).mean() * (side * side) / (c.latent_size ** 2)
        return total


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---- the loop ----------------------------------------------------------------------------------

def init_process_group() -> tuple[int, int]:
    """(world size, rank); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")     # the trainer computes on the CPU (NCCL takes CUDA tensors)
    return world, (torch.distributed.get_rank() if world > 1 else 0)


def check_args(args: TrainArgs, world: int, data: DatasetIndex) -> tuple[Path, FlowARConfig | None]:
    """Every user error that needs no encoding, before any work; returns checkpoint-last's path and,
    resuming, the config the run began with."""
    n_images = data.count
    if not args.resume:          # (a run begun before this check resumes with its classes, compared below)
        check_names(data.classes, f"--data's class folders, {args.data}")
    if args.preset and args.config:
        raise FlowARError("either --preset or --config", "both", "pass only one")
    if args.config and not args.resume:     # (read now: a missing or malformed file was found after the encoding)
        FlowARConfig.load(args.config)
    if args.batch % world:
        raise FlowARError(f"--batch divisible by the {world} processes", str(args.batch), "change --batch")
    if args.batch > n_images:               # the global batch must fit in one epoch (each rank takes 1/world)
        raise FlowARError(f"--batch (global, over {world} process{'es' * (world > 1)}) at most the {n_images} "
                          f"images of --data", f"--batch {args.batch}",
                          f"pass --batch {n_images - n_images % world} or less, or add images")
    from flowar.model.vae import folder_downsample
    side, over = divmod(args.size, down := folder_downsample(args.vae))    # (--size 7 trained one 1x1 scale; 33 a
    if side < 2 or over:                                                   # model said to make 32 px images)
        raise FlowARError(f"--size a multiple of the VAE's down-sampling ({down}) giving a latent map of at least 2x2 "
                          "(two scales or more)", f"--size {args.size}: {side}x{side}" + f", {over} px over" * bool(over),
                          f"use e.g. --size {max(2, side) * down}")
    ckpt = Path(args.out) / "checkpoint-last.safetensors"
    if args.resume and not ckpt.is_file():
        raise FlowARError(f"a checkpoint to resume at {ckpt}", "none", "drop --resume to start afresh")
    if not args.resume and ckpt.is_file():
        raise FlowARError("an empty run folder (or --resume)", f"{ckpt} exists",
                          "pass --resume to continue it, or choose another --out")
    # (a folder of other files had its model.safetensors and loss.png replaced; a run's own grids and plot,
    # made before its first checkpoint, are not other files: it starts afresh there; a samples/ of other files is)
    out, grids = Path(args.out), Path(args.out) / "samples"
    held = sorted(p.name for p in out.iterdir() if p.name not in ("samples", "loss.png") and not p.name.startswith(".")
                  or p.name == "samples" and set(grids.iterdir()) != set(own_grids(grids))) \
        if out.is_dir() else []
    if not args.resume and held:
        raise FlowARError("an empty run folder (or --resume)", f"{args.out} holds {', '.join(held[:3])}"
                          + (", ..." if len(held) > 3 else ""), "choose a new --out")
    if args.resume:      # the settings the losses so far came from must stay (they carried on, or failed in a traceback)
        try:
            from safetensors import safe_open
            with safe_open(str(ckpt), framework="pt") as f:
                meta = f.metadata()
            step, began = int(meta["step"]), json.loads(meta["train_args"])
            names, stored = json.loads(meta.get(META_CLASSES, "null")), meta[META_CONFIG]
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one line
            raise FlowARError("a flowar-train checkpoint to resume", f"{ckpt}: {e!r:.120}", "start afresh elsewhere") from None
        config = FlowARConfig.from_json(stored, str(ckpt))          # (its own line where the stored config is bad)
        wrong = [f"{k} {getattr(args, k)!r}, began with {began.get(k)!r}" for k in RUN_DEFINING if as_file(began.get(
            k)) != as_file(getattr(args, k))] + [f"--steps {args.steps} below its step {step}"] * (args.steps < step)
        # what the names name, too: a --config file edited since (latent_scale: weights trained at one were written
        # with another; shapes: a traceback) and --data's class folders renamed (class 0 other images from here on)
        given, was = (FlowARConfig.load(args.config).to_dict() if args.config else {}), config.to_dict()
        wrong += [f"--config's {k} {v!r}, began with {was[k]!r}" for k, v in given.items() if v != was[k]]
        wrong += [f"--data's classes: {names_changed(data.classes, names)}"] * (names not in (None, list(data.classes)))
        # and what the paths hold: a VAE trained again in place, images changed (re-encoded: the loss jumped, in silence)
        now, inputs = {"data": data.digest, "vae": vae_sha256(args.vae)}, json.loads(meta.get("inputs", "{}"))
        wrong += [f"--{k}'s contents (sha256 {now[k][:12]}..., began with {inputs[k][:12]}...)" for k in now
                  if inputs.get(k) not in (None, now[k])]
        if wrong:
            raise FlowARError("the settings the run began with, and --steps at least its step, to resume it",
                              "; ".join(wrong), "run with the settings it began with (only --steps and the intervals "
                              "may change), or start afresh in another --out")
        return ckpt, config
    return ckpt, None


RUN_DEFINING = ("data", "vae", "size", "preset", "config", "batch", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip",
                "ema_decay", "label_drop", "seed")                  # what a resumed run keeps (a --steps below: no weights)


def build_run(args: TrainArgs, config: FlowARConfig, world: int, ckpt: Path) -> Run:
    """Model (seeded), EMA, AdamW and the objective; with --resume, all restored from ``ckpt``."""
    torch.manual_seed(args.seed)
    model = FlowAR(config)
    ema = FlowAR(config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    state = load_training_checkpoint(ckpt, model, ema, opt) if args.resume else TrainState()
    objective = FlowLoss(model)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    return Run(model, ema, opt, objective, state)


def batches(lat: Latents, config: FlowARConfig, args: TrainArgs, rank: int, world: int, start: int, end: int):
    """Yield (step, x (b, C, S, S), labels (b,), t (K, b), noise [(b, s_k^2, C)]) for steps start..end-1.

    Epoch orders come from (seed, epoch), draws from (seed, step, rank): resumed or not, the same batch.
    """
    N, B, b = lat.mean.shape[0], args.batch, args.batch // world
    steps_per_epoch = N // B                                  # >= 1: check_args keeps B <= N
    perm, perm_epoch = None, -1
    for step in range(start, end):
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            perm, perm_epoch = torch.randperm(N, generator=_gen(args.seed, epoch, 1 << 20)), epoch
        idx = perm[(step % steps_per_epoch) * B:][:B][rank * b:(rank + 1) * b]
        g = _gen(args.seed, step, rank)
        x = (lat.mean[idx] + lat.std[idx] * torch.randn(lat.mean[idx].shape, generator=g)) * config.latent_scale
        y = lat.labels[idx].clone()
        y[torch.rand(b, generator=g) < args.label_drop] = config.null_class
        t = torch.rand(config.n_scales, b, generator=g)
        noise = [torch.randn(b, n, config.latent_channels, generator=g) for n in config.tokens_per_scale]
        yield step, x, y, t, noise


def train_step(run: Run, x: Tensor, y: Tensor, t: Tensor, noise: list[Tensor], lr: float, grad_clip: float) -> Tensor:
    """One AdamW step at learning rate ``lr``; returns this rank's loss (detached)."""
    for grp in run.opt.param_groups:
        grp["lr"] = lr
    run.model.train()
    loss = run.objective(x, y, t, noise)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    run.opt.step()
    return loss.detach()


@torch.no_grad()
def ema_update(ema: FlowAR, model: FlowAR, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))                 # short runs: let the EMA catch up early
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def mean_over_ranks(loss: Tensor, world: int) -> tuple[float, bool]:
    """The step's loss averaged over the ranks, and whether a stop was asked of any of them."""
    both = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stopped() is not None))])
    if world > 1:
        torch.distributed.all_reduce(both)
    return float(both[0]) / world, bool(both[1] > 0)


def checkpoint_and_sample(run: Run, args: TrainArgs, class_names: list[str], ckpt: Path, due: bool, bar: Progress):
    """Rank 0 after each step: checkpoint + loss plot where ``due`` (every --ckpt-every, and at the end), sample grids."""
    step, out = run.state.step, ckpt.parent
    if due:
        save_training_checkpoint(ckpt, run, args, class_names)
        bar.saved = step                    # (in place: an interrupt now says this step resumes)
        plot_losses(run.state.losses, out / "loss.png")
    if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
        sample_grid(run.ema, args, class_names, out / "samples" / f"step{step:07d}.png")


def train(args: TrainArgs, progress: bool = True, max_steps_this_run: int | None = None) -> TrainState:
    """Train (or resume) into ``args.out``; returns the loss history. ``max_steps_this_run`` stops early (tests
    interrupt a run and resume it). The settings are checked before any encoding, the batch's memory before writing."""
    world, rank = init_process_group()
    from flowar.train.resume import with_recorded_settings     # (--resume alone: the run's own settings)
    args = with_recorded_settings(args, RUN_DEFINING + ("steps",), say=rank == 0)   # (its steps: it trained to 2000)
    data = index_dataset(args.data)
    ckpt, began = check_args(args, world, data)
    from flowar.io.files import user_cache
    from flowar.train.memory import flowar_image_bytes, require_batch_memory
    lat = load_latents(args.data, args.size, args.vae, args.cache_dir or user_cache("latents"), data)
    config = build_config(args, lat, began)
    require_batch_memory(args.batch, flowar_image_bytes(config), "flowar-train", args.resume)   # (it was killed: exit 137)
    run = build_run(args, config, world, ckpt)
    if rank == 0 and (args.resume or args.warmup > args.steps):     # (a resume said nothing of where it began)
        print(f"resuming {ckpt} at step {run.state.step} of {args.steps}" if args.resume else f"note: --warmup "
              f"{args.warmup} is more than --steps {args.steps}: the learning rate never reaches --lr", file=sys.stderr)
    run.inputs = {"data": data.digest, "vae": vae_sha256(args.vae)}
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not args.resume:       # an earlier start's grids and plot (stopped before its first checkpoint)
        for grid in own_grids(ckpt.parent / "samples"):
            grid.unlink()
        (ckpt.parent / "loss.png").unlink(missing_ok=True)
    end = args.steps if max_steps_this_run is None else min(args.steps, run.state.step + max_steps_this_run)
    # A stop (the command's Ctrl-C or SIGTERM) is taken at a step's end, by every rank at the same step, and
    # the checkpoint is written there: it lost every step since the last --ckpt-every (up to 500), and under
    # torchrun a rank that left alone hung the others in their all-reduce
    with Progress(args, run.state, progress and rank == 0) as bar, stops_held(rank == 0 and (
            "stopping at this step's end, with a checkpoint there (another Ctrl-C or SIGTERM: at once, without it)")):
        for step, x, y, t, noise in batches(lat, config, args, rank, world, run.state.step, end):
            loss = train_step(run, x, y, t, noise, lr_at(step, args), args.grad_clip)
            ema_update(run.ema, run.model, step, args.ema_decay)
            mean, stop = mean_over_ranks(loss, world)
            run.state.losses.append(mean)
            if not math.isfinite(mean):    # (NaN weights were written and the run said it trained)
                raise FlowARError("a finite training loss", f"{mean} at step {step}", "start afresh in a new --out "
                                  "with a lower --lr or --grad-clip (a resumed run keeps its settings)")
            run.state.step += 1
            if stop:
                try:
                    with stop_answered():
                        if rank == 0:
                            save_training_checkpoint(ckpt, run, args, lat.class_names)
                finally:                    # (every rank meets here, whatever became of rank 0's write)
                    if world > 1:
                        torch.distributed.barrier()
                bar.saved = run.state.step
                raise KeyboardInterrupt(stopped() or "")
            due = run.state.step % args.ckpt_every == 0 or run.state.step == end
            if rank == 0:
                bar.log(run.state, lr_at(step, args))
                with stop_answered():       # (its writes go through: a stop now is taken at the next step's end)
                    checkpoint_and_sample(run, args, lat.class_names, ckpt, due, bar)
            elif due:                       # (rank 0 wrote it: every rank's "interrupted" line says so)
                bar.saved = run.state.step
        try:    # the run's last outputs, still held: a stop now is taken once they are written and the ranks have met
            with stop_answered():
                if rank == 0 and run.state.step == args.steps:
                    last = ckpt.parent / "samples" / f"step{args.steps:07d}.png"
                    if args.sample_every and not last.is_file():      # (stopped after the last checkpoint, before its grid)
                        sample_grid(run.ema, args, lat.class_names, last)
                    # the last update's weights (not the buffers: the attention mask holds -inf by design)
                    if not all(bool(torch.isfinite(p).all()) for p in run.ema.parameters()):
                        raise FlowARError("finite weights at the end", "NaN or Inf in the EMA weights",
                                          "start afresh in a new --out with a lower --lr or --grad-clip")
                    save_checkpoint(Path(args.out) / "model.safetensors", run.ema.state_dict(), config, lat.class_names,
                                    extra={"step": str(run.state.step), "vae": str(args.vae), "data": str(args.data),
                                           "vae_sha256": vae_sha256(args.vae)})     # (the VAE: flowar-run notes another)
        finally:
            if world > 1:
                torch.distributed.barrier()
    return run.state
