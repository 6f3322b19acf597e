"""Train a small diffusers ``AutoencoderKL`` for the default model (``flowar-train-vae``).

Reconstruction (MSE + L1) plus a small KL term, Adam, cosine learning rate, a fixed seed.
The result is a diffusers folder (``config.json`` + safetensors), written to a temporary
folder and renamed into place.
"""

from __future__ import annotations

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
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-5
    seed: int = 0


VAE_MARKER = "config.json"      # what save_pretrained writes beside the weights


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
    check_replaceable(a.out, VAE_MARKER, "--out")            # before any training: never over a folder of other files
    from flowar.train.memory import require_batch_memory, vae_image_bytes
    require_batch_memory(a.batch, vae_image_bytes(a.size), "flowar-train-vae")      # (it was killed: exit 137)
    data = load_dataset(a.data, a.size)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    vae = build_vae(a).train()
    opt = torch.optim.Adam(vae.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    N = data.images.shape[0]
    bar = None
    if progress:
        from flowar.io.progress import progress_bar
        bar = progress_bar(total=a.steps, desc="vae", unit="step")
    t0, rec = time.perf_counter(), float("nan")
    for step in range(a.steps):
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
        rec = rec_loss.item()
        if not math.isfinite(loss.item()):                 # (NaN weights were written, exit 0)
            raise FlowARError("a finite training loss", f"{loss.item()} at step {step}", "lower --lr; nothing was written")
        if bar is not None:
            bar.set_postfix(rec=f"{rec:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    vae.eval()
    out = Path(a.out)
    from flowar.io.files import staged_directory
    with staged_directory(out, VAE_MARKER) as tmp:      # the previous folder stays until the new one is complete
        vae.save_pretrained(tmp, safe_serialization=True)
    return {"final_reconstruction_loss": rec, "seconds": time.perf_counter() - t0, "out": str(out)}
