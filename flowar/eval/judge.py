"""An independent judge of class fidelity for the Animal-MNIST default model.

A small CNN is trained on real Animal-MNIST images only (a fixed stratified split: 800 training
and 200 held-out images per class), and its held-out accuracy is reported. Generated samples
are then classified by it; the score is the share assigned to the class that was asked for.
The judge never sees generated images while training, and nothing about it is tuned on them.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowar.errors import FlowARError
from flowar.train.data import load_animal_mnist


class JudgeNet(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def forward(self, x_B1HW: Tensor) -> Tensor:
        return self.net(x_B1HW)


def to_judge_input(images_B3HW: Tensor) -> Tensor:
    """RGB in [-1, 1] -> grey (B, 1, 32, 32) in [-1, 1]."""
    x = images_B3HW.float().mean(1, keepdim=True)
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)


def split(labels: Tensor, held_out_per_class: int = 200) -> tuple[Tensor, Tensor]:
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        test.append(idx[:held_out_per_class])
        train.append(idx[held_out_per_class:])
    return torch.cat(train), torch.cat(test)


@dataclass(slots=True)
class Judge:
    net: JudgeNet
    held_out_accuracy: float
    real_stats: tuple | None = None      # (mu, sigma) of the judge's features of the held-out real images

    @torch.no_grad()
    def classify(self, images_B3HW: Tensor, batch: int = 256) -> Tensor:
        self.net.eval()
        return torch.cat([self.net(to_judge_input(images_B3HW[i:i + batch])).argmax(1)
                          for i in range(0, len(images_B3HW), batch)])

    @torch.no_grad()
    def features(self, images_B3HW: Tensor, batch: int = 256) -> Tensor:
        """(B, 128) penultimate activations: the feature space of the domain Frechet distance."""
        self.net.eval()
        body = self.net.net[:-1]
        return torch.cat([body(to_judge_input(images_B3HW[i:i + batch])) for i in range(0, len(images_B3HW), batch)])


def _read_cache(path: Path, key: dict) -> dict | None:
    """The cached judge's weights if ``path`` holds a judge trained with ``key``; else None (retrain)."""
    from safetensors import safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if dict(f.metadata() or {}) != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:   # noqa: BLE001 - an unreadable cache is retrained, not trusted
        return None


def _a_judge(path: Path) -> bool:
    """Whether ``path`` may be replaced by a judge's cache: a judge's of any settings or version (those
    written before the cache recorded its format hold the judge's tensors alone), or an empty file."""
    from safetensors import safe_open
    try:
        if path.stat().st_size == 0:
            return True
        with safe_open(str(path), framework="pt") as f:
            return (str((f.metadata() or {}).get("format", "")).startswith("flowar-judge")
                    or set(f.keys()) == set(JudgeNet(10).state_dict()))
    except Exception:   # noqa: BLE001 - not a safetensors file: not a judge's
        return False


def train_judge(epochs: int = 6, seed: int = 0, cache: Path | None = None, progress: bool = False) -> Judge:
    """The Animal-MNIST judge, from ``cache`` where it was trained with these settings on these
    images, else trained now (about a minute on 2 cores; ``progress``: a bar per epoch) and cached."""
    from safetensors.torch import save_file
    if cache is not None and cache.is_file() and not _a_judge(cache):
        # (it was replaced by the judge trained, without a word: a FlowAR checkpoint given as --judge-cache was lost)
        raise FlowARError("a judge's cache at --judge-cache, or no file there yet (it is written once the judge is trained)",
                          f"{cache}, a file that is no judge's", f"pass another --judge-cache path, or remove {cache} "
                          "if it is a judge's cache that was damaged")
    data = load_animal_mnist(32)
    tr, te = split(data.labels)
    net = JudgeNet(len(data.class_names))
    # the cache is used only when it says it was trained here, with these settings, on these images
    key = {"format": "flowar-judge-v1", "epochs": str(epochs), "seed": str(seed),
           "data": hashlib.sha256(data.images.numpy().tobytes() + data.labels.numpy().tobytes()).hexdigest()}
    cached = _read_cache(cache, key) if cache is not None else None
    # two processes that find no judge train one each, and the cache kept the last: one judged the images
    # with a judge the cache no longer holds (Frechet distances 2589 and 2825 for the same images). The
    # second waits for the first's and uses it
    waiting = contextlib.nullcontext()
    if cached is None and cache is not None:
        from flowar.io.files import used_alone
        waiting = used_alone(cache, "training the judge", wait=True)     # (it makes the folders on the way)
    with waiting:
        if cached is None and cache is not None:
            cached = _read_cache(cache, key)     # (trained meanwhile by the process waited for)
        if cached is not None:
            net.load_state_dict(cached)
        else:
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
            x_all = to_judge_input(data.images)
            bar = None
            if progress:
                from flowar.io.progress import progress_bar
                bar = progress_bar(total=epochs, desc="training the judge (once; cached)", unit="epoch", leave=False)
            for _ in range(epochs):
                net.train()
                perm = tr[torch.randperm(len(tr), generator=gen)]
                for i in range(0, len(perm), 128):
                    idx = perm[i:i + 128]
                    x = x_all[idx]
                    # small shifts so the judge does not hinge on exact placement
                    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
                    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                    loss = F.cross_entropy(net(x), data.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            if cache is not None:
                from flowar.io.files import atomic_write_bytes
                try:
                    atomic_write_bytes(cache, lambda t: save_file(net.state_dict(), t, metadata=key))
                except OSError as e:           # (a cache of another version on a read-only volume: trained, not kept)
                    import sys
                    print(f"note: the judge is not cached at {cache} ({e.strerror or e}): it is trained again next time",
                          file=sys.stderr)
    judge = Judge(net, 0.0)
    pred = judge.classify(data.images[te])
    judge.held_out_accuracy = float((pred == data.labels[te]).float().mean())
    from flowar.eval.quality import feature_stats
    judge.real_stats = feature_stats(judge.features(data.images[te]))
    return judge
