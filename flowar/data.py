"""Training data: an image folder (one sub-folder per class) or the built-in Animal-MNIST.

Animal-MNIST ships inside the PyPI package ``animal-mnist==0.4`` (install it with ``--no-deps``:
its declared dependencies, TensorFlow among them, are not needed to read the data). Its two
gzip files hold numpy arrays as pickles; they are read with an unpickler that only admits the
numpy array constructors, so no code from the file runs.

Images come out as float tensors (N, 3, H, W) in [-1, 1]; Animal-MNIST's 28x28 silhouettes are
padded to 32x32 so the VAE's down-sampling divides them.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowar.errors import FlowARError

ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass(slots=True)
class ImageSet:
    images: Tensor              # (N, 3, H, W) float32 in [-1, 1]
    labels: Tensor              # (N,) int64
    class_names: list[str]


class _NumpyOnly(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are accepted")
        return super().find_class(module, name)


def _load_numpy_pickle_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        arr = _NumpyOnly(io.BytesIO(f.read())).load()
    if not isinstance(arr, np.ndarray):
        raise FlowARError("a numpy array", f"{type(arr).__name__} in {path}", "reinstall animal-mnist==0.4")
    return arr


def animal_mnist_files() -> tuple[Path, Path]:
    import importlib.util
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FlowARError("the animal-mnist package (Animal-MNIST data)", "it is not installed",
                          "pip install --no-deps animal-mnist==0.4")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    return root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"


def pad_to(x_NHW: Tensor, size: int) -> Tensor:
    h, w = x_NHW.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x_NHW, (left, size - w - left, top, size - h - top))


def load_animal_mnist(size: int = 32) -> ImageSet:
    """All 10,000 silhouettes, grey replicated to RGB, padded with background to size x size."""
    data_path, label_path = animal_mnist_files()
    data = _load_numpy_pickle_gz(data_path)              # (10000, 28, 28) uint8
    labels = _load_numpy_pickle_gz(label_path)           # (10000,) int64
    x = torch.from_numpy(data.astype(np.float32) / 127.5 - 1.0)
    x = pad_to(x + 1.0, size) - 1.0                      # pad with black (-1)
    return ImageSet(x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64)),
                    list(ANIMAL_MNIST_CLASSES))


def load_image_folder(root: str | Path, size: int) -> ImageSet:
    """root/<class>/<image>: classes sorted by name, images resized (bicubic) and centre-cropped."""
    from PIL import Image
    root = Path(root)
    if not root.is_dir():
        raise FlowARError("an image folder with one sub-folder per class", f"no folder at {root}", "check --data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FlowARError("class sub-folders inside the image folder", f"none in {root}",
                          "arrange images as ROOT/<class>/<image>.png")
    xs, ys = [], []
    for ci, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            img = Image.open(p).convert("RGB")
            s = size / min(img.size)
            img = img.resize((max(size, round(img.size[0] * s)), max(size, round(img.size[1] * s))), Image.BICUBIC)
            left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
            xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            ys.append(ci)
    if not xs:
        raise FlowARError("images (png/jpg/bmp/webp) in the class folders", f"none under {root}", "add images")
    return ImageSet(torch.stack(xs), torch.tensor(ys), classes)


def load_dataset(spec: str, size: int) -> ImageSet:
    """``animal-mnist`` or a folder path."""
    if spec == "animal-mnist":
        return load_animal_mnist(size)
    return load_image_folder(spec, size)
