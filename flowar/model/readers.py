"""Reading a checkpoint file without running its code: PyTorch's pickles with ``weights_only``
(a global the file names is refused, a pickled model object told apart from a corrupt file) and
safetensors; what went wrong as one line (:mod:`flowar.model.checkpoint` reads through these)."""

from __future__ import annotations

import argparse
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
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError:
            head = b"PK"
        if not head.startswith((b"PK", b"\x80")):   # (a text file was "truncated or corrupt": KeyError: 101)
            return CheckpointError("a PyTorch checkpoint (torch.save's zip, or its older pickle)", f"{path}, a file "
                                   f"beginning {head!r}", "pass the checkpoint file (.pth, .pt, .ckpt or .safetensors); if "
                                   "it is one, it is damaged: fetch it again")
        return CheckpointError("a readable PyTorch checkpoint", f"{path} cannot be read ({error_detail(e)})",
                               "the file is truncated or corrupt, or not one torch.save wrote: fetch it again")
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
    times their size) left on disk. torch.load maps the file (each storage at its record, found by
    name), the records are checked against the zip's own, and each kept storage is read from its
    record into memory of its own: not left mapped, since the official trainer rewrites checkpoint-last.pth in
    place (torch.save) and a mapped model then computed with the new or half-written weights, or died
    of SIGBUS where the file was cut. ``mapped``: left mapped (copy on write), for a reader that
    checks the file is unchanged when it is done (flowar-export: FlowAR-H's 7.65 GB of weights then
    stay page cache its own memory may push out). A file this cannot read so (the legacy non-zip
    format, a compressed or big-endian record, a structure it cannot walk) is read whole, as
    ``torch.load`` reads it."""
    try:
        with open(path, "rb") as f:
            try:
                records = _stored_records(f)
            except OSError:
                raise
            except Exception:  # noqa: BLE001 - not a zip this reader knows (the legacy format): read whole below
                records = None
            if records is not None:
                try:
                    obj = _load(path, mmap=True)
                except Exception:  # noqa: BLE001 - whatever fails here fails the same read whole below, with its line
                    obj = None
                if obj is not None:
                    kept = pick(obj)
                    try:
                        return _own_storages(f, obj, kept, records, path, mapped)
                    except _ReadWhole:
                        pass
        return pick(_load(path, mmap=False))
    except OSError as e:
        raise os_error(path, e) from e
    except CheckpointError:
        raise
    except Exception as e:   # noqa: BLE001 - every other failure here is the file's fault
        raise pickle_error(path, e) from e


class _ReadWhole(Exception):
    """This reader cannot tell where a tensor's bytes are: the file is read whole."""


def _load(path: Path, mmap: bool) -> Any:
    # argparse.Namespace is what official training checkpoints store under "args"; it is a
    # plain attribute bag, so allowing it executes no code of the file's choosing.
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        # (torch warns about a legacy file's pickle protocol before any error: not the user's business)
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _stored_records(f: BinaryIO) -> dict[int, int] | None:
    """Where each storage record's bytes begin in the file, and how many there are (those of at
    least one byte); None where a record is compressed or the data big-endian (torch.load then
    reads and converts them)."""
    records = {}
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.filename.endswith("/byteorder") and z.read(info) != b"little":
                return None
            if "/data/" not in info.filename or not info.file_size:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            head = f.read(30)                            # the local header: its name and extra field lengths
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def _own_storages(f: BinaryIO, obj: Any, kept: Any, records: dict[int, int], path: Path, mapped: bool) -> Any:
    """``kept`` (a part of ``obj``, the file's structure with every storage a view of the mapped file)
    with each storage it holds read from ``f`` into memory of its own (``mapped``: left as it is; read,
    not copied from the mapping, whose pages would count twice), once the storages are found to lie on
    the file's records, one each, of their sizes. Where they cannot be (a structure it cannot walk, a
    storage it cannot place): read whole."""
    try:
        at = {}
        for t in _leaves(obj):
            if s := t.untyped_storage().nbytes():
                at[t.untyped_storage().data_ptr()] = s
    except Exception as e:  # noqa: BLE001 - (a sparse tensor beside the weights, a nesting deeper than the stack)
        raise _ReadWhole from e
    base = min(at, default=0) - min(records, default=0)         # where the mapping begins, if they match
    if {p - base for p in at} != set(records):
        raise _ReadWhole
    if bad := next((p for p, size in at.items() if size != records[p - base]), None):       # (as torch.load refuses it)
        raise CheckpointError("a readable PyTorch checkpoint", f"{path} cannot be read (a tensor of {at[bad]} bytes "
                              f"where its record holds {records[bad - base]})", "the file is truncated or corrupt: fetch it again")
    if mapped:
        return kept
    own: dict[int, torch.UntypedStorage] = {}
    with torch.no_grad():
        for t in {id(t): t for t in _leaves(kept)}.values():       # (once each: tied weights are one tensor twice)
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                buf = torch.empty(s.nbytes(), dtype=torch.uint8)
                if s.nbytes():
                    f.seek(s.data_ptr() - base)
                    if f.readinto(memoryview(buf.numpy())) != s.nbytes():
                        raise CheckpointError("a readable PyTorch checkpoint", f"{path} ended inside a tensor's "
                                              "record", "the file is truncated or corrupt: fetch it again")
                own[s.data_ptr()] = buf.untyped_storage()
            # (in place: the tensor keeps its kind, requires_grad and its negation or conjugation bits)
            t.set_(own[s.data_ptr()], t.storage_offset(), t.size(), t.stride())
    return kept


def _leaves(o: Any) -> Iterator[torch.Tensor]:
    """The tensors in mappings, lists and tuples."""
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _leaves(v)
    elif isinstance(o, (list, tuple)):
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
