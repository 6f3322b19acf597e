"""Reading a checkpoint file without running its code: PyTorch's pickles with ``weights_only``
(a global the file names is refused, a pickled model object told apart from a corrupt file) and
safetensors; what went wrong as one line (:mod:`flowar.model.checkpoint` reads through these)."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Any

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


def read_pickle(path: Path) -> Any:
    try:
        # argparse.Namespace is what official training checkpoints store under "args"; it is a
        # plain attribute bag, so allowing it executes no code of the file's choosing.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # (torch warns about a legacy file's pickle protocol before any error: not the user's business)
            warnings.simplefilter("ignore")
            # Read into memory, not mapped: the official trainer rewrites checkpoint-last.pth in place
            # (torch.save), and a mapped model then computed with the new or half-written weights, or died
            # of SIGBUS where the file was cut; mapped, torch also took a tensor larger than its record (the
            # bytes after it) where it refuses one read. (FlowAR-S read and touched: 1.1 s against 0.8.)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise os_error(path, e) from e
    except Exception as e:   # noqa: BLE001 - every other failure here is the file's fault
        raise pickle_error(path, e) from e


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:     # (removed since _require_file; safetensors says "No such file" for permissions too)
        raise os_error(path, e) from e
    except Exception as e:   # noqa: BLE001
        raise CheckpointError("a readable safetensors file", f"{path} cannot be read ({error_detail(e)})",
                              "the file is truncated or corrupt: fetch or export it again") from e
    return sd, meta
