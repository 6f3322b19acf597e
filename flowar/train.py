"""Training FlowAR "as usual" (``flowar-train``): the official multi-scale flow-matching loss.

For a latent x (the VAE posterior sample times ``latent_scale``) and class label y:

* y is replaced by the null class with probability ``label_drop`` (for guidance later);
* the target of scale k is x area-downsampled to s_k x s_k; the AR input of scale k >= 1 is
  the target of scale k-1 resized bicubic to the final size, then area to s_k;
* the AR runs once over all scales under the block-causal mask;
* each scale draws fresh t ~ U(0, 1) and noise e, forms x_t = (1 - t) x + t e, and the head
  regresses e - x; the scale's mean squared error is weighted by s_k^2 / s_max^2.

AdamW (0.9, 0.95) with weight decay on matrices only (not biases, norms or 1-D tensors),
linear warm-up then cosine decay, gradient clipping and an EMA of the weights.

Determinism and exact resume: every random draw comes from a generator seeded by
(seed, step, rank) or (seed, epoch), so a run stopped and resumed from its checkpoint repeats
the same loss sequence as an uninterrupted one. Under ``torchrun`` each rank takes its slice of
the global batch and DDP averages gradients (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowar.checkpoint import TRAIN_FORMAT_TAG, save_checkpoint
from flowar.outputs import atomic_write_bytes
from flowar.config import FlowARConfig, get_preset
from flowar.errors import FlowARError
from flowar.model import FlowAR



@dataclass(slots=True)
class TrainArgs:
    out: str                                  # run folder: checkpoints, loss.png, samples/
    vae: str                                  # VAE the latents come from
    data: str = "animal-mnist"
    size: int = 32                            # image side
    preset: str | None = None                 # config widths; default: tiny widths on the data's latent grid
    config: str | None = None
    steps: int = 2000
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
    cache_dir: str = ".cache/flowar-latents"
    sample_cfg: float = 3.0
    sample_steps: int = 25


@dataclass(slots=True)
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


# ---- latents ---------------------------------------------------------------------------------

def encode_latents(args: TrainArgs, progress: bool = True):
    """Posterior mean and std of every training image, cached by (data, size, VAE file hashes)."""
    import hashlib
    from flowar.data import load_dataset
    from flowar.vae import load_vae
    vae_path = Path(args.vae)
    h = hashlib.sha256(f"{args.data}|{args.size}".encode())
    files = sorted(vae_path.rglob("*")) if vae_path.is_dir() else [vae_path]
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    cache = Path(args.cache_dir) / f"{h.hexdigest()[:16]}.safetensors"
    from safetensors.torch import load_file, save_file
    if cache.is_file():
        d = load_file(str(cache))
        meta_classes = json.loads((cache.with_suffix(".json")).read_text())
        return d["mean"], d["std"], d["labels"], meta_classes
    data = load_dataset(args.data, args.size)
    vae = load_vae(vae_path)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, data.images.shape[0], 500):
            dist = vae.autoencoder.encode(data.images[i:i + 500]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(data.class_names)))
    atomic_write_bytes(cache, lambda t: save_file({"mean": mean.contiguous(), "std": std.contiguous(),
                                                   "labels": data.labels}, t))
    return mean, std, data.labels, data.class_names


def default_config(latent_side: int, latent_channels: int, num_classes: int, latent_scale: float,
                   base: FlowARConfig | None = None) -> FlowARConfig:
    """Widths of ``base`` (default: the tiny preset) on scales 1, 2, 4, ... up to the latent side."""
    base = base or get_preset("tiny")
    scales = []
    s = 1
    while s < latent_side:
        scales.append(s)
        s *= 2
    scales.append(latent_side)
    return base.replace(scales=tuple(scales), latent_channels=latent_channels, num_classes=num_classes,
                        latent_scale=round(latent_scale, 4))


# ---- the objective -----------------------------------------------------------------------------

def scale_targets_and_inputs(x_BCSS: Tensor, config: FlowARConfig) -> tuple[list[Tensor], Tensor | None]:
    """Per-scale targets (B, s^2, C) and the AR input tokens of scales 1.. (B, L-1, C)."""
    S = config.latent_size
    gts = [x_BCSS if s == S else F.interpolate(x_BCSS, size=(s, s), mode="area") for s in config.scales]
    ins = [F.interpolate(F.interpolate(gts[k - 1], size=(S, S), mode="bicubic"), size=(s, s), mode="area")
           for k, s in enumerate(config.scales) if k > 0]
    tok = lambda t: t.flatten(2).transpose(1, 2)
    return [tok(g) for g in gts], (torch.cat([tok(i) for i in ins], dim=1) if ins else None)


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
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---- checkpoints -------------------------------------------------------------------------------

def save_training_checkpoint(path: Path, model: FlowAR, ema: FlowAR, opt: torch.optim.Optimizer,
                             state: TrainState, args: TrainArgs, class_names: list[str]) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in osd["param_groups"]]
    save_checkpoint(path, tensors, model.config, class_names, extra={
        "format": TRAIN_FORMAT_TAG, "step": str(state.step), "losses": json.dumps(state.losses),
        "optimizer_groups": json.dumps(groups), "train_args": json.dumps(asdict(args))})


def load_training_checkpoint(path: Path, model: FlowAR, ema: FlowAR, opt: torch.optim.Optimizer) -> TrainState:
    from safetensors import safe_open
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


# ---- the loop ----------------------------------------------------------------------------------

def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return world, rank


def _gen(*key: int) -> torch.Generator:
    # One independent stream per (seed, step, rank): resume needs no generator state.
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)


def train(args: TrainArgs, progress: bool = True, max_steps_this_run: int | None = None) -> TrainState:
    """Train (or resume) into ``args.out``; returns the loss history.

    ``max_steps_this_run`` stops early (tests use it to interrupt a run and resume it).
    """
    world, rank = _dist()
    out = Path(args.out)
    if args.batch % world:
        raise FlowARError(f"--batch divisible by the {world} processes", str(args.batch), "change --batch")
    if args.preset and args.config:
        raise FlowARError("either --preset or --config", "both", "pass only one")
    mean, std, labels, class_names = encode_latents(args, progress)
    side, C = mean.shape[-1], mean.shape[1]
    latent_scale = 1.0 / float((mean + std * torch.randn(mean.shape, generator=_gen(args.seed, -1))).std())
    if args.config:
        config = FlowARConfig.load(args.config)
    else:
        config = default_config(side, C, len(class_names), latent_scale, get_preset(args.preset) if args.preset else None)
    if config.latent_size != side or config.latent_channels != C or config.num_classes != len(class_names):
        raise FlowARError(f"a config with latent side {side}, {C} channels and {len(class_names)} classes (the data "
                          f"through this VAE)", f"side {config.latent_size}, {config.latent_channels} channels, "
                          f"{config.num_classes} classes", "fix --config, or omit it to derive one")

    torch.manual_seed(args.seed)
    model = FlowAR(config)
    ema = FlowAR(config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    ckpt_path = out / "checkpoint-last.safetensors"
    state = TrainState()
    if args.resume:
        if not ckpt_path.is_file():
            raise FlowARError(f"a checkpoint to resume at {ckpt_path}", "none", "drop --resume to start afresh")
        state = load_training_checkpoint(ckpt_path, model, ema, opt)
    elif ckpt_path.is_file():
        raise FlowARError("an empty run folder (or --resume)", f"{ckpt_path} exists",
                          "pass --resume to continue it, or choose another --out")
    objective = FlowLoss(model)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    out.mkdir(parents=True, exist_ok=True)

    N, B, b = mean.shape[0], args.batch, args.batch // world
    steps_per_epoch = N // B
    end = args.steps if max_steps_this_run is None else min(args.steps, state.step + max_steps_this_run)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=state.step, desc="train", unit="step", disable=None)
    t0, first_step = time.perf_counter(), state.step
    perm, perm_epoch = None, -1
    while state.step < end:
        step = state.step
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            perm, perm_epoch = torch.randperm(N, generator=_gen(args.seed, epoch, 1 << 20)), epoch
        idx = perm[(step % steps_per_epoch) * B:][:B][rank * b:(rank + 1) * b]
        g = _gen(args.seed, step, rank)
        x = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * config.latent_scale
        y = labels[idx].clone()
        y[torch.rand(b, generator=g) < args.label_drop] = config.null_class
        t = torch.rand(config.n_scales, b, generator=g)
        noise = [torch.randn(b, n, C, generator=g) for n in config.tokens_per_scale]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args)
        model.train()
        loss = objective(x, y, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))       # short runs: let the EMA catch up early
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        lv = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(lv)
            lv /= world
        state.losses.append(float(lv))
        state.step += 1
        if rank == 0:
            if bar is not None:
                bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
                bar.update(1)
            if state.step % args.log_every == 0 and (bar is None or bar.disable):
                rate = (state.step - first_step) / max(1e-9, time.perf_counter() - t0)
                print(f"step {state.step}/{args.steps} loss {sum(state.losses[-args.log_every:]) / args.log_every:.4f}"
                      f" lr {lr_at(step, args):.2e} {rate:.1f} step/s", flush=True)
            if state.step % args.ckpt_every == 0 or state.step == end:
                save_training_checkpoint(ckpt_path, model, ema, opt, state, args, class_names)
                plot_losses(state.losses, out / "loss.png")
            if args.sample_every and (state.step % args.sample_every == 0 or state.step == args.steps):
                sample_grid(ema, args, class_names, out / "samples" / f"step{state.step:07d}.png")
    if bar is not None:
        bar.close()
    if rank == 0 and state.step == args.steps:
        save_checkpoint(out / "model.safetensors", ema.state_dict(), config, class_names,
                        extra={"step": str(state.step), "vae": str(args.vae)})
    if world > 1:
        torch.distributed.barrier()
    return state


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
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


@torch.no_grad()
def sample_grid(ema: FlowAR, args: TrainArgs, class_names: list[str], path: Path) -> None:
    from flowar.images import save_grid
    from flowar.sampler import per_sample_noise, sample
    from flowar.schedule import build_schedule
    from flowar.stages import TorchStages
    from flowar.vae import load_vae
    c = ema.config
    vae = load_vae(args.vae, expect_channels=c.latent_channels)
    labels = torch.arange(c.num_classes).repeat_interleave(max(1, 40 // c.num_classes))[:max(c.num_classes, 40)]
    ema.eval()
    _, images = sample(TorchStages(ema, vae.decode), c, build_schedule(args.sample_steps, args.sample_cfg, 0.9,
                       c.n_scales), labels, per_sample_noise(0, range(len(labels))), decode=True)
    save_grid(images, [class_names[i] for i in labels.tolist()], path, columns=max(1, 40 // c.num_classes))
