"""Reading a checkpoint file without running its code: PyTorch's pickles with ``weights_only``
(a global the file names is refused, a pickled model object told apart from a corrupt file) and
safetensors; what went wrong as one line (:mod:`flowar.model.checkpoint` reads through these)."""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from flowar.errors import CheckpointError


def os_error(path: Path, e: OSError) -> CheckpointError:
    """What the OS said when the file could not be opened (permissions, removed meanwhile)."""
    return CheckpointError("a checkpoint file this process can read", f"{path}: {e.strerror or e}",
                           "check the path and its permissions")


def error_detail(e: Exception) -> str:
    """The informative line of a reader's error: torch's weights-only failures put theirs after
    paragraphs of boilerplate, behind 'WeightsUnpickler error:'."""
    tail = str(e).split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line[:160]}" if line else type(e).__name__


def is_module_class(name: str) -> bool:
    """Whether a pickled global names an ``nn.Module`` class, looked up only among the modules
    already imported (nothing of the file's choosing is imported)."""
    module, _, attr = name.rpartition(".")
    obj = getattr(sys.modules.get(module), attr, None)
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def pickle_error(path: Path, e: Exception) -> CheckpointError:
    """A weights-only refusal of a global (code the file wants run) apart from a corrupt pickle."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found is None:
        return CheckpointError("a readable PyTorch checkpoint", f"{path} cannot be read ({error_detail(e)})",
                               "the file is truncated or corrupt: fetch it again")
    name = found.group(1).rstrip(".")
    if is_module_class(name):
        return CheckpointError("a state dict (a mapping of names to tensors)",
                               f"{path} holds a pickled model object ({name})",
                               "save model.state_dict(), not the model object")
    return CheckpointError("a checkpoint holding tensors only (loaded with weights_only=True)",
                           f"{path} asks to run pickled code (the global {name})",
                           "refused for safety; convert it to safetensors in a trusted environment")


def read_pickle(path: Path, pick: Callable[[Any], Any] = lambda obj: obj, mapped: bool = False) -> Any:
    """``pick`` of the object a PyTorch pickle holds, with only the tensors ``pick`` keeps read from
    the file: a training checkpoint's EMA weights alone, its raw weights and optimizer state (three
    times their size) left on disk. The structure is unpickled first with every tensor on the meta
    device (no data read), then each kept tensor's storage is read from its record into memory of
    its own. Not mapped: the official trainer rewrites checkpoint-last.pth in place (torch.save),
    and a mapped model then computed with the new or half-written weights, or died of SIGBUS where
    the file was cut. ``mapped``: the kept storages are views of the file's pages instead (copy on
    write), for a reader that checks the file is unchanged when it is done (flowar-export: FlowAR-H's
    7.65 GB of weights then stay page cache the export's own memory may push out). A file this cannot
    read so (the legacy non-zip format, a compressed or big-endian record) is read whole, as
    ``torch.load`` reads it."""
    try:
        with open(path, "rb") as f:
            try:
                records = _stored_records(f)
            except zipfile.BadZipFile:
                records = None                          # (the legacy format: read whole below)
            if records is not None:
                try:
                    obj = _load(f, "meta")
                except Exception:  # noqa: BLE001 - whatever fails here fails the same read whole below, with its line
                    obj = None
                if obj is not None:
                    try:
                        return _read_kept(f, obj, pick(obj), records, path, mapped)
                    except _ReadWhole:
                        pass
            return pick(_load(f, "cpu"))
    except OSError as e:
        raise os_error(path, e) from e
    except CheckpointError:
        raise
    except Exception as e:   # noqa: BLE001 - every other failure here is the file's fault
        raise pickle_error(path, e) from e


class _ReadWhole(Exception):
    """This reader cannot tell where a tensor's bytes are: the file is read whole."""


def _load(f: BinaryIO, where: str) -> Any:
    # argparse.Namespace is what official training checkpoints store under "args"; it is a
    # plain attribute bag, so allowing it executes no code of the file's choosing.
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        # (torch warns about a legacy file's pickle protocol before any error: not the user's business)
        warnings.simplefilter("ignore")
        f.seek(0)
        return torch.load(f, map_location=where, weights_only=True)


def _stored_records(f: BinaryIO) -> dict[int, int] | None:
    """Where each storage record's bytes begin in the file, and how many there are; None where a
    record is compressed or the data big-endian (torch.load then reads and converts them)."""
    records = {}
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.filename.endswith("/byteorder") and z.read(info) != b"little":
                return None
            if "/data/" not in info.filename:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            head = f.read(30)                            # the local header: its name and extra field lengths
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def _read_kept(f: BinaryIO, obj: Any, kept: Any, records: dict[int, int], path: Path, mapped: bool) -> Any:
    """``kept`` (a part of ``obj``, the file's structure on the meta device) with each tensor in it read
    from its record. Where torch's offsets (computed as its own zip writer lays records out) are not
    the records' own, as in a file another zip tool wrote: read whole."""
    where = {}
    for t in _leaves(obj):
        s = t.untyped_storage()
        where[getattr(s, "_checkpoint_offset", None)] = s.nbytes()
    if set(where) != set(records):
        raise _ReadWhole
    if (at := next((at for at, size in where.items() if size != records[at]), None)) is not None:   # (as torch.load)
        raise CheckpointError("a readable PyTorch checkpoint", f"{path} cannot be read (a tensor of {where[at]} "
                              f"bytes where its record holds {records[at]})", "the file is truncated or corrupt: fetch it again")
    storages: dict[int, torch.UntypedStorage] = {}
    whole = torch.UntypedStorage.from_file(str(path), False, os.fstat(f.fileno()).st_size) if mapped else None

    def real(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        at, size = s._checkpoint_offset, s.nbytes()
        if whole is not None and at not in storages:
            storages[at] = whole[at:at + size]
        if at not in storages:
            buf = torch.empty(size, dtype=torch.uint8)
            f.seek(at)
            if f.readinto(memoryview(buf.numpy())) != size:
                raise CheckpointError("a readable PyTorch checkpoint", f"{path} ended inside a tensor's record",
                                      "the file is truncated or corrupt: fetch it again")
            storages[at] = buf.untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(storages[at], t.storage_offset(), t.shape, t.stride())

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return real(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return type(o)(walk(v) for v in o) if type(o) in (list, tuple) else o

    return walk(kept)


def _leaves(o: Any) -> Iterator[torch.Tensor]:
    """The tensors in mappings, lists and tuples."""
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _leaves(v)
    elif type(o) in (list, tuple):
        for v in o:
            yield from _leaves(v)


def read_safetensors(path: Path, pick: Callable[[dict[str, str], list[str]], list[str]] = lambda meta, names: names,
                     mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``pick(metadata, names)`` names (all by default) and the metadata; only those are
    read, into memory of their own (a flowar-train checkpoint's EMA weights, not its raw weights and
    optimizer state; see :func:`flowar.io.tensors.read_tensors`)."""
    from flowar.io.tensors import read_tensors
    try:
        return read_tensors(path, pick, mapped)
    except OSError as e:     # (removed since _require_file, or unreadable)
        raise os_error(path, e) from e
    except CheckpointError:
        raise
    except Exception as e:   # noqa: BLE001 - every other failure here is the file's fault
        raise CheckpointError("a readable safetensors file", f"{path} cannot be read ({error_detail(e)})",
                              "the file is truncated or corrupt: fetch or export it again") from e
