"""A request in batches: recorded or per-sample noise, the sampler called per batch.

Every command and the pipeline reach this through :meth:`flowar.runtime.runtime.Runtime.sample`
(the bench's solver study and the judge's reference runs call it directly).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from flowar.config import FlowARConfig, check_seed
from flowar.errors import FlowARError
from flowar.sampling.sampler import NoiseFn, ScaleTrace, Stages, injected_noise, noise_rows, per_sample_noise, sample
from flowar.sampling.schedule import Schedule


def read_noise(path: str | Path, config: FlowARConfig) -> list[Tensor]:
    """``noise0..noise{n-1}`` from a safetensors file (the official draw order)."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise FlowARError("a safetensors noise file", f"no file at {p}", "check the --noise path")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            names = [f"noise{k}" for k in range(config.n_scales)]
            missing = [n for n in names if n not in keys]
            if missing:
                raise FlowARError(f"tensors {names[0]}..{names[-1]} (one draw per scale)",
                                  f"{p.name} without {missing}", "write one tensor per scale")
            out = [f.get_tensor(n) for n in names]
        bad = [n for n, t in zip(names, out) if not t.is_floating_point() or not bool(t.isfinite().all())]
        if bad:                  # (int or bool noise was cast silently; NaN was blamed on the checkpoint)
            raise FlowARError("finite floating-point noise in every tensor", f"{p.name}: {', '.join(bad)} not",
                              "write the draws again (torch.randn)")
        return out
    except FlowARError:
        raise
    except Exception as e:   # noqa: BLE001
        raise FlowARError("a readable safetensors noise file", f"{p}: {str(e)[:160]}", "write the file again") from e


# What eager sampling holds beyond its weights, a sample (its activations and its share of the result),
# from the peak resident memory of flowar-run --ckpt at two batch sizes (Intel Xeon, PyTorch 2.13 on
# the CPU, 2026-12-06): FlowAR-S tokens only 1.22 GB at 2 samples and 1.94 GB at 8 (0.12 GB a sample:
# 8.5 bytes a unit of block_units); with its 256 px images from the KL-16 decoder 1.74 and 3.52 GB
# (0.18 GB more an image: 21.5 bytes a pixel and channel of the decoder's full-resolution width, 128);
# the tiny default model with its 32 px images 1.58 GB at 500 and 5.06 GB at 2000 (2.3 MB a sample:
# 12.4 bytes a unit with its images). The larger per-unit figure is taken.
UNIT_BYTES = 12.5
DECODE_PIXEL_BYTES = 21.5
KEPT_LOW = 0.75         # a batch is refused or cut only where a quarter less than its estimate would not fit
FILLS = 0.8             # and the batch suggested or taken instead fills this share of what is available


def block_units(c: FlowARConfig) -> int:
    """Tokens times the widths of the blocks they pass (AR encoder and decoder, head): what a model's
    activations per sample scale with."""
    return c.seq_len * ((c.ar_width + c.ar_mlp_hidden) * (c.ar_encoder_depth + c.ar_decoder_depth)
                        + (c.head_width + c.head_mlp_hidden) * c.head_depth)


def batch_that_fits(n: int, batch_size: int | None, config: FlowARConfig, image_size: int | None, vae=None) -> int:
    """The batch eager PyTorch samples ``n`` labels in (a checkpoint on a CPU: no batch limit): the
    ``batch_size`` given, refused where its sampling would not fit in the memory available (one line
    naming a batch that would); by default all at once where that fits, else the largest batch that
    does (images change by float rounding only). ``flowar-run --ckpt --n-per-class 10000`` sampled
    the 10000 at once and was killed at 23 GB. ``image_size``: decoded images of that side (None:
    tokens only), by ``vae`` (its full-resolution width; 128, KL-16's, where it does not say)."""
    from flowar.io.memory import available_bytes
    free, want = available_bytes(), min(batch_size or n, n)       # (a --batch above the request: the request)
    width = getattr(getattr(getattr(vae, "autoencoder", None), "config", None), "block_out_channels", [128])[0]
    per = UNIT_BYTES * block_units(config) + (DECODE_PIXEL_BYTES * width * image_size ** 2 if image_size else 0)
    held = n * 4 * (config.latent_channels * config.latent_size ** 2 + 3 * (image_size or 0) ** 2)  # the result
    if free is None or held + want * per * KEPT_LOW <= free:
        return want
    fits = int((FILLS * free - held) // per)
    if fits < 1 and held + per * KEPT_LOW > free:         # (not even one at a time: "pass --batch 1" was no help)
        raise FlowARError("memory for sampling with eager PyTorch, one sample at a time at least",
                          f"{n} samples: about {(held + per) / 2**30:.1f} GB with the results, and "
                          f"{free / 2**30:.1f} GB available", "sample fewer labels (or write them as they come with "
                          "flowar-sample), or free memory")
    fits = max(1, fits)
    if batch_size is not None and batch_size > fits:
        raise FlowARError(f"a --batch whose sampling fits in memory (eager PyTorch: about {per / 2**20:.0f} MB a "
                          "sample)", f"--batch {batch_size}: about {(held + want * per) / 2**30:.1f} GB with the "
                          f"results, and {free / 2**30:.1f} GB available", f"pass --batch {fits} or less")
    return min(fits, want)


@dataclass(slots=True)
class SampleResult:
    tokens: Tensor                      # (B, C, S, S) scaled latent space
    images: Tensor | None               # (B, 3, H, W) in [-1, 1]
    labels: list[int]
    seconds: float
    indices: list[int] = field(default_factory=list)   # the sample index (with the seed, its noise's name) of each image
    traces: list[ScaleTrace] = field(default_factory=list)


def run_sampling(stages: Stages, config: FlowARConfig, labels: list[int], schedule: Schedule,
                 seed: int | Sequence[int] = 0, noise_file: str | Path | None = None, decode: bool = False,
                 device: str | torch.device = "cpu", progress: bool | dict = False,
                 on_scale: Callable[[ScaleTrace], None] | None = None, batch_size: int | None = None,
                 indices: Sequence[int] | None = None, runner=None) -> SampleResult:
    """Sample ``labels`` in batches of at most ``batch_size`` (all at once by default).

    Sample i of the request gets the noise of (seed, i) (:func:`~flowar.sampling.sampler.per_sample_noise`),
    so its image is the same for every batch size and backend. ``indices`` names the samples
    otherwise (a shard of a larger request); ``seed`` may be one per sample (then sample i gets
    (seed[i], 0) by default: what that seed gives alone). ``progress``: a bar
    (a dict: its tqdm options). Recorded noise (``noise_file``,
    the official layout: one (R, n, C) draw per scale for the whole request) is split into the
    same batches row by row.
    """
    # ids of this model's classes: -1 and num_classes were the null class in a graph's gather, silently
    if not len(labels) or not all(hasattr(i, "__index__") and not isinstance(i, bool) and 0 <= i < config.num_classes
                                  for i in labels):
        raise FlowARError(f"at least one class id, each in 0..{config.num_classes - 1}", repr(list(labels))[:80],
                          "pass e.g. [3] (class names: FlowARPipeline.get_label_ids)")
    N = len(labels)
    bs = batch_size or N
    if hasattr(indices, "__iter__") and not isinstance(indices, (str, bytes)):
        indices = list(indices)             # (once: a generator was used up by the check below)
    if indices is not None and not (isinstance(indices, list) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in indices)):
        raise FlowARError("indices: one int >= 0 per image", repr(indices)[:80], "pass e.g. indices=[0, 1]")
    # (a NumPy integer is one seed: it was 'not iterable'; a str was split into one seed per character;
    # 3.5 and "12" reached the noise's int())
    seed = seed.tolist() if getattr(seed, "ndim", None) == 0 else seed      # (a 0-d array or tensor: one seed)
    one = isinstance(seed, numbers.Integral)
    # one seed: sample i is its sample i; a seed per image: its sample 0, what that seed gives alone (as the pipeline)
    idx = (list(range(N)) if one else [0] * N) if indices is None else [int(i) for i in indices]   # (1.7 was image 1)
    seeds = [seed] * N if one else list(seed) if hasattr(seed, "__iter__") and not isinstance(seed, (str, bytes)) else None
    if seeds is None or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
        raise FlowARError("seed an int, or one int per image", repr(seed)[:80], "pass e.g. seed=0")
    seeds = [check_seed(int(s)) for s in seeds]     # (each: a seed out of range failed when its batch came up)
    if len(seeds) != N:                     # (it said "2 indices, 1 seeds" of seed=[5] for two labels)
        raise FlowARError(f"seed: one, or one per label ({N})", f"a list of {len(seeds)}", f"pass one seed, or {N} seeds")
    if len(idx) != N:
        raise FlowARError(f"indices: one per label ({N})", f"a list of {len(idx)}", f"pass {N} indices")
    recorded = read_noise(noise_file, config) if noise_file else None
    if recorded is not None:
        R = schedule.rows(N)
        for k, d in enumerate(recorded):
            want = (R, config.tokens_per_scale[k], config.latent_channels)
            if tuple(d.shape) != want:
                raise FlowARError(f"noise{k} of shape {list(want)} for {N} samples ({'2B' if R > N else 'B'} rows, "
                                  "s^2 tokens, C)", f"{list(d.shape)}",
                                  "record the noise for the same number of labels, cfg and config")
    traces: list[ScaleTrace] = []
    starts = range(0, N, bs)
    bar = None
    if progress:
        from flowar.io.progress import progress_bar
        bar = progress_bar(**{"total": config.n_scales * len(starts), "desc": "scales", "unit": "scale",
                              "leave": False} | (progress if isinstance(progress, dict) else {}))

    def scale_done(tr: ScaleTrace) -> None:
        if tr.z is not None:
            tr.z = tr.z[:n]                 # this batch's samples, not the rows padding it to a captured size
        tr.first = start
        traces.append(tr)
        if bar is not None:
            bar.update(1)
        if on_scale is not None:
            on_scale(tr)

    t0 = time.perf_counter()
    toks, imgs = [], []
    try:
        for start in starts:
            chunk, end = labels[start:start + bs], min(start + bs, N)
            n = len(chunk)
            # a captured size at least n (CUDA graphs), the last sample repeated into the padding rows
            pad = (runner.bucket(n) - n) if runner is not None and recorded is None else 0
            noise: NoiseFn = (injected_noise(noise_rows(recorded, start, end, N)) if recorded is not None
                              else per_sample_noise(seeds[start:end] + seeds[end - 1:end] * pad,
                                                    idx[start:end] + idx[end - 1:end] * pad))
            labels_t = torch.tensor(chunk + chunk[-1:] * pad, dtype=torch.int64, device=device)
            tokens, images = sample(stages, config, schedule, labels_t, noise, decode=decode, device=device,
                                    on_scale=scale_done, runner=runner)
            toks.append(tokens[:n].cpu())
            if images is not None:
                imgs.append(images[:n].cpu())
    finally:                                # (an error's or a stop's line then starts a line of its own)
        if bar is not None:
            bar.close()
    with torch.inference_mode(False):       # (ordinary tensors, whatever mode it ran in: a caller's in-place op raised)
        tokens, images = torch.cat(toks), torch.cat(imgs) if imgs else None
    return SampleResult(tokens, images, labels, time.perf_counter() - t0, idx, traces)
