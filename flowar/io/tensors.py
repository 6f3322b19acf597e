"""Tensors in safetensors files: an engine directory's memory-mapped (opening a file costs one read,
its hash, no copy); a checkpoint's read (:func:`read_tensors`).

:func:`map_safetensors` maps the file, hashes it in that one pass (which also brings its pages
into the page cache) and returns tensors that are views of the mapped pages: the weights are in
memory once, shared with the page cache, however many processes map them. The tensors are read-
only (an engine never writes its weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from flowar.errors import EngineDirError, FlowARError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
          "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64, "I16": torch.int16, "I8": torch.int8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def map_safetensors(path: str | Path, sha256: str | None = None, what: str = "weights") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of its mapped pages; with ``sha256``, the
    file is refused (one line) unless its bytes hash to it."""
    p = Path(path)
    with open(p, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:          # (mmap refuses an empty file with a bare ValueError)
            raise FlowARError(f"{what} in the safetensors format", f"{p} is empty", "write the file again")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if sha256 is not None and hashlib.sha256(mm).hexdigest() != sha256:
        raise EngineDirError(f"{p.name} with the sha256 recorded at export", "a different file (modified or corrupt)",
                             f"re-export the directory with flowar-export --out {p.parent}")
    try:
        header, _, start = _header(lambda at, n: mm[at:at + n], len(mm))
        out = {}
        with warnings.catch_warnings():        # the mapping is read-only, and so are the weights
            warnings.simplefilter("ignore", UserWarning)
            for name, info in header.items():
                dtype, begin, end, shape = _entry(name, info, len(mm) - start)
                count = (end - begin) // torch.empty((), dtype=dtype).element_size()
                t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin) if count else \
                    torch.empty(0, dtype=dtype)
                out[name] = t.view(shape)
    except (ValueError, KeyError, struct.error) as e:
        raise FlowARError(f"{what} in the safetensors format", f"{p}: {e}", "write the file again") from e
    return out


def read_tensors(path: str | Path, pick=lambda meta, names: names, mapped: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file that ``pick(metadata, names)`` names (all by default), each
    read into memory of its own, and the file's metadata. Not mapped (as a checkpoint's weights
    were through the safetensors library): a file written over in place (``cp``, a save to the same
    path) changed the weights of a model opened on it, or killed its process (SIGBUS) where the
    file was cut. ``mapped``: views of the file's pages (copy on write) instead, for a reader that checks
    the file is unchanged when it is done (see :func:`flowar.model.readers.read_pickle`). ValueError
    naming what is wrong with a file that is not one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, meta, start = _header(lambda at, n: (f.seek(at), f.read(n))[1], size)
        out = {}
        whole = torch.UntypedStorage.from_file(str(path), False, size) if mapped else None
        for name in pick(meta, list(header)):            # (the entries read, checked: not the optimizer's)
            dtype, begin, end, shape = _entry(name, header[name], size - start)
            if whole is not None:
                buf = torch.empty(0, dtype=torch.uint8).set_(whole[start + begin:start + end])
            else:
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                if f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise ValueError(f"the file ended inside tensor {name!r}")
            out[name] = buf.view(dtype).view(shape) if end > begin else torch.empty(shape, dtype=dtype)
    return out, meta


def _header(read, size: int) -> tuple[dict, dict[str, str], int]:
    """(the tensors' entries, the metadata, where the data begins) of a safetensors file of ``size``
    bytes, ``read(at, n)`` giving its bytes; ValueError naming what is wrong with it."""
    if size < 8:
        raise ValueError(f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > size - 8:
        raise ValueError(f"a header of {n} bytes in a file of {size}")
    header = json.loads(read(8, n))
    meta = (header.pop("__metadata__", None) or {}) if isinstance(header, dict) else None
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("a header that is not a mapping of names to tensors and metadata strings")
    return header, meta, 8 + n


def _entry(name: str, info, size: int) -> tuple[torch.dtype, int, int, list[int]]:
    """A header entry's dtype, byte range and shape, checked against each other and the data's ``size``
    (a range past the data, or backwards, was read to the end of the file; a shape of another size
    was PyTorch's traceback); ValueError naming the tensor otherwise."""
    if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in DTYPES:
        raise ValueError(f"tensor {name!r} of dtype {info['dtype']}, which this reader does not take")
    ok = isinstance(info, dict) and info.get("dtype") in DTYPES and isinstance(info.get("shape"), list) and \
        all(type(d) is int and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list) and \
        len(info["data_offsets"]) == 2 and all(type(o) is int for o in info["data_offsets"])
    if ok:
        dtype, (begin, end) = DTYPES[info["dtype"]], info["data_offsets"]
        if 0 <= begin <= end <= size and end - begin == math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size():
            return dtype, begin, end, info["shape"]
    raise ValueError(f"tensor {name!r} has a header entry that does not describe its bytes ({str(info)[:80]})")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (contiguous copies where needed) atomically as safetensors."""
    from safetensors.torch import save_file

    from flowar.io.files import atomic_write_bytes
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, lambda tmp: save_file(flat, tmp))
