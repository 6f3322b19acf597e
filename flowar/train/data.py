"""Training data: an image folder (one sub-folder per class) or the built-in Animal-MNIST.

Animal-MNIST ships inside the PyPI package ``animal-mnist==0.4`` (install it with ``--no-deps``:
its declared dependencies, TensorFlow among them, are not needed to read the data). Its two
gzip files hold numpy arrays as pickles; they are read with an unpickler that only admits the
numpy array constructors, so no code from the file runs.

Images come out as float tensors (N, 3, H, W) in [-1, 1]; Animal-MNIST's 28x28 silhouettes are
padded to 32x32 so the VAE's down-sampling divides them.

Training reads their VAE latents through :func:`load_latents`, cached under a key made of the
data's contents (:func:`index_dataset`: names and bytes, never the folder's path), the VAE's
file hashes and the image size: a changed image is re-encoded, a copied folder is not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowar.errors import FlowARError
from flowar.io.digests import hasher, vae_sha256

ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass(frozen=True, slots=True)
class DatasetIndex:
    digest: str                 # sha256 over class names, image names and bytes (never the folder's path)
    count: int                  # number of images
    classes: tuple[str, ...] = ()   # the class names, in id order


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
    if size < 28:                   # (padding by a negative amount cropped their edges, in silence)
        raise FlowARError("--size at least 28 for Animal-MNIST (its 28x28 silhouettes are padded to it)", str(size),
                          "use --size 32 (the default), or an image folder as --data (its images are resized)")
    data_path, label_path = animal_mnist_files()
    data = _load_numpy_pickle_gz(data_path)              # (10000, 28, 28) uint8
    labels = _load_numpy_pickle_gz(label_path)           # (10000,) int64
    _require_room(len(labels), size)
    x = torch.from_numpy(data.astype(np.float32) / 127.5 - 1.0)
    x = pad_to(x + 1.0, size) - 1.0                      # pad with black (-1)
    return ImageSet(x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64)),
                    list(ANIMAL_MNIST_CLASSES))


def _folder_items(root: str | Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """Class names (sorted) and (class index, image path) pairs in load order, for root/<class>/<image>."""
    root = Path(root)
    if not root.is_dir():
        raise FlowARError("an image folder with one sub-folder per class", f"{root}, a file, not a folder" if
                          root.is_file() else f"no folder at {root}", "check --data")
    # hidden and system folders (.ipynb_checkpoints, __MACOSX) are no classes: one became class 0 and
    # shifted every label; so are files such as macOS's ._x.png beside the images
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    if not classes:
        raise FlowARError("class sub-folders inside the image folder", f"none in {root}",
                          "arrange images as ROOT/<class>/<image>.png")
    items = [(ci, p) for ci, name in enumerate(classes) for p in sorted((root / name).iterdir())
             if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")]
    empty = sorted(set(classes) - {classes[ci] for ci, _ in items})
    if empty:                                  # (a class without images: a label no image teaches)
        raise FlowARError("images (png/jpg/bmp/webp) in every class folder", f"none in {', '.join(empty[:5])}",
                          "add images to those folders, or move them out of the image folder")
    return classes, items


def load_image_folder(root: str | Path, size: int) -> ImageSet:
    """root/<class>/<image>: classes sorted by name, images resized (bicubic) and centre-cropped."""
    from PIL import Image
    classes, items = _folder_items(root)
    _require_room(len(items), size)
    xs = []
    for _, p in items:
        try:
            img = Image.open(p).convert("RGB")
        except (OSError, ValueError) as e:    # (PIL's UnidentifiedImageError is an OSError)
            raise FlowARError("image files PIL can read in the class folders", f"{p}: {e}"[:200],
                              "remove or replace that file") from None
        s = size / min(img.size)
        img = img.resize((max(size, round(img.size[0] * s)), max(size, round(img.size[1] * s))), Image.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return ImageSet(torch.stack(xs), torch.tensor([ci for ci, _ in items]), classes)


def _require_room(n: int, size: int) -> None:
    """Refuse, in one line before they are made, ``n`` images at ``size`` that would not fit in memory (float32, held
    twice while they are made: --size 2048 was PyTorch's traceback, 640 grew until the system killed it)."""
    from flowar.io.memory import require_memory
    require_memory(2 * n * 3 * size * size * 4, f"the {n} images of --data at --size {size} (float32, twice while "
                   "they are made)", "use a smaller --size, or fewer images")


def load_dataset(spec: str, size: int) -> ImageSet:
    """``animal-mnist`` or a folder path."""
    if spec == "animal-mnist":
        return load_animal_mnist(size)
    return load_image_folder(spec, size)


def index_dataset(spec: str) -> DatasetIndex:
    """Digest and image count of ``spec`` (as :func:`load_dataset` reads it), without decoding images.

    The digest covers the class names, each image's class/file name (they fix labels and order)
    and its bytes; not the folder's path or file times, so a copied folder keeps its digest.
    """
    h, add = hasher()
    if spec == "animal-mnist":
        data_path, label_path = animal_mnist_files()
        add(b"animal-mnist", data_path.read_bytes(), label_path.read_bytes())
        return DatasetIndex(h.hexdigest(), len(_load_numpy_pickle_gz(label_path)), tuple(ANIMAL_MNIST_CLASSES))
    classes, items = _folder_items(spec)
    add(b"folder", *(c.encode() for c in classes))
    for ci, p in items:
        add(str(ci).encode(), p.name.encode(), p.read_bytes())
    return DatasetIndex(h.hexdigest(), len(items), tuple(classes))


# ---- latents (flowar-train encodes the data once per VAE and caches it) -------------------------

@dataclass(slots=True)
class Latents:
    mean: Tensor                # (N, C, h, w) VAE posterior mean of every image
    std: Tensor                 # (N, C, h, w) its standard deviation
    labels: Tensor              # (N,) int64
    class_names: list[str]


def latent_cache_path(cache_dir: str | Path, index: DatasetIndex, vae: str | Path, size: int) -> Path:
    """The cache file of (data contents, VAE weights, image size): one changed image, another file. The
    VAE by the hash a model and an engine directory record of it (its file, or a folder's config and
    weights: a README beside them changes nothing)."""
    if not Path(vae).exists():
        raise FlowARError("a VAE: MAR's kl16.ckpt or a diffusers folder with config.json", f"nothing at {vae}",
                          "check the --vae path")
    key = hashlib.sha256(f"latents-v3|{index.digest}|{vae_sha256(vae)}|{size}".encode()).hexdigest()
    return Path(cache_dir) / f"{key[:16]}.safetensors"


@torch.no_grad()
def encode_latents(images_N3HW: Tensor, vae) -> tuple[Tensor, Tensor]:
    """Posterior mean and std (N, C, h, w) of every image through ``vae`` (a loaded flowar VAE)."""
    means, stds = [], []
    for i in range(0, images_N3HW.shape[0], 500):
        dist = vae.autoencoder.encode(images_N3HW[i:i + 500]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def load_latents(spec: str, size: int, vae: str | Path, cache_dir: str | Path, index: DatasetIndex) -> Latents:
    """``spec``'s latents from the cache, or encoded through ``vae`` and cached (``index`` names the data)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from flowar.io.files import atomic_write_bytes
    cache = latent_cache_path(cache_dir, index, vae, size)
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            return Latents(f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("labels"),
                           json.loads(f.metadata()["class_names"]))
    from flowar.model.vae import load_vae
    data = load_dataset(spec, size)
    lat = Latents(*encode_latents(data.images, load_vae(vae)), data.labels, data.class_names)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, lambda t: save_file({"mean": lat.mean, "std": lat.std, "labels": lat.labels}, t,
                                                  metadata={"class_names": json.dumps(lat.class_names)}))
    return lat
