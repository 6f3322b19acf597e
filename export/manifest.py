"""``manifest.json``: what an engine directory was built from. Written here, read by engines
and runtime; the format is defined once, in this module.

A directory is trusted only if its manifest parses, names this format, keeps every path inside
the directory, and every file the chosen engines use hashes to its recorded sha256 (one ONNX
graph is used through ONNX Runtime's optimized copy of it, checked against the hash written beside
the copy when it was made; the graph itself is read and checked again whenever its file's size or
time differ from what was recorded then). Anything else is refused with a message that says how
to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowar.config import FlowARConfig
from flowar.errors import EngineDirError, FlowARError

if TYPE_CHECKING:
    from flowar.export.specs import StageSpec

MANIFEST = "manifest.json"
FORMAT = "flowar-engine-dir-v1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "flowar-deploy", "diffusers",
                 "tensorrt", "tensorrt-rtx-cu13-bindings"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def safe_member(root: Path, rel: str) -> Path:
    """``root / rel`` if it stays inside root (no '..', not absolute, no symlink out), else refuse."""
    rebuild = f"re-export the directory with flowar-export --out {root}"
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise EngineDirError("manifest paths relative to the engine directory", repr(rel), rebuild)
    p = root / rel
    real_root = root.resolve()
    real = p.resolve()
    if real != real_root and real_root not in real.parents:
        raise EngineDirError("manifest paths that stay inside the engine directory",
                             f"{rel!r} resolves to {real}", rebuild)
    return p


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an engine directory was built from: ``manifest.json``, parsed and checked.

    The JSON holds these fields by the same names (``config`` as its dict); ``root`` is where
    the directory was read from and is not written.
    """
    root: Path
    config: FlowARConfig
    stages: dict[str, dict]         # stage -> {file, sha256[, data, data_sha256], inputs, outputs, tolerance, max_rows,
                                    #           peak_rss_gb, seconds[, verified_max_abs_diff]}
    precision: str                  # fp32, fp16, bf16, auto; with `auto` set, engines chosen per stage on a CPU
    max_batch: int                  # samples per call the engines serve
    checkpoint: dict                # {file, source, sha256, weights}: what was exported
    class_names: list[str] | None = None
    schedule_defaults: dict = field(default_factory=dict)   # what flowar-run samples with unless told otherwise
    vae: dict | None = None         # {source, latent_channels, downsample, image_size}; None: tokens only
    tensorrt: dict | None = None    # {flavour, version, plans: stage -> record, compute_capability}
    auto: dict | None = None        # --precision auto|bf16 on a CPU: what was measured and chosen (flowar.commands.precision)
    engines: dict | None = None     # stage -> {candidate, file, sha256, cpu} (compiled) or {candidate, weights} (PyTorch)
    weights: dict | None = None     # "<group>.<candidate>" -> {file, sha256}: weights in the precision they run
    call_plan: dict | None = None   # rows per call per (stage, scale), seconds per image by batch (flowar.commands.plan)
    meta: dict = field(default_factory=dict)   # opset, scales, versions, created: for people, not read back

    @property
    def decodes(self) -> bool:
        """Whether the directory has a decode stage (images, not only tokens)."""
        return self.vae is not None

    def specs(self) -> dict[str, StageSpec]:
        from flowar.export.specs import stage_specs
        return stage_specs(self.config, self.vae["downsample"] if self.vae else None)

    def member(self, rel: str) -> Path:
        return safe_member(self.root, rel)

    def graph(self, stage: str) -> tuple[Path, str]:
        """(path, sha256) of a stage's ONNX graph."""
        info = self.stages[stage]
        return safe_member(self.root, info["file"]), info["sha256"]

    def checked(self, rel: str, sha256: str) -> Path:
        """A member file, refused unless its bytes hash to ``sha256`` (one streaming read)."""
        p = safe_member(self.root, rel)
        if sha256_file(p) != sha256:
            raise EngineDirError(f"{rel} with the sha256 recorded at export", "a different file (modified or corrupt)",
                                 f"rebuild it: flowar-export --ckpt CKPT --out {self.root}")
        return p

    def read_checked(self, rel: str, sha256: str) -> bytes:
        """A member file's bytes, refused unless they hash to ``sha256`` (the one read that uses them)."""
        data = safe_member(self.root, rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise EngineDirError(f"{rel} with the sha256 recorded at export", "a different file (modified or corrupt)",
                                 f"rebuild it: flowar-export --ckpt CKPT --out {self.root}")
        return data

    def plan(self, stage: str) -> Path:
        """A stage's TensorRT plan (the directory must have plans)."""
        return self.member(self.tensorrt["plans"][stage]["file"])

    @property
    def choice(self) -> dict[str, str]:
        """--precision auto|bf16 on a CPU: the engine chosen per stage (stages not named run ONNX Runtime fp32)."""
        return dict((self.auto or {}).get("choice", {}))

    @property
    def exported_checkpoint(self) -> tuple[Path, str, bool]:
        """(path, sha256, EMA weights?) of the checkpoint the directory was exported from."""
        c = self.checkpoint
        return Path(c.get("source", "")), c["sha256"], c.get("weights") != "model"

    def to_json(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in _FIELDS if f not in ("root", "meta")}
        d["config"] = self.config.to_dict()
        return {"format": FORMAT} | d | self.meta


_FIELDS = tuple(f.name for f in fields(Manifest))


def read_manifest(root: str | Path, verify_hashes: bool = False) -> Manifest:
    """The manifest of an engine directory, checked: its format, its fields, every listed file
    present and inside the directory. The files' hashes are checked where they are read (by the
    engines that use them: :mod:`flowar.runtime.directory`), or here with ``verify_hashes``."""
    root = Path(root)
    rebuild = f"rebuild it: flowar-export --ckpt CKPT --out {root}"
    if not root.is_dir():
        raise EngineDirError("an engine directory made by flowar-export", f"no directory at {root}", rebuild)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise EngineDirError(f"{MANIFEST} in the engine directory", f"none in {root} (not a folder flowar-export wrote)",
                             "pass the folder flowar-export wrote, or export one: flowar-export --ckpt CKPT --out "
                             "A_NEW_FOLDER (a checkpoint file opens with --ckpt)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineDirError(f"a valid {MANIFEST}", f"unreadable JSON ({e})", rebuild) from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineDirError(f"manifest format {FORMAT}", repr(m.get("format") if isinstance(m, dict) else m), rebuild)
    for key in ("config", "stages", "precision", "max_batch", "checkpoint"):
        if key not in m:
            raise EngineDirError(f"'{key}' in {MANIFEST}", "it is missing", rebuild)
    config = FlowARConfig.from_dict(m["config"], f"{mpath}")
    # (fields of the wrong type ended in a TypeError deep in the runtime, or after sampling)
    names = m.get("class_names")
    for ok, what, got in (
            (type(m["max_batch"]) is int and 1 <= m["max_batch"] <= 1024, "max_batch an integer in 1..1024",
             repr(m["max_batch"])),
            (isinstance(m["stages"], dict), "stages a mapping of stage records", type(m["stages"]).__name__),
            (names is None or (isinstance(names, list) and len(names) == config.num_classes
                               and all(isinstance(n, str) for n in names)),
             f"class_names a list of {config.num_classes} strings (or none)", repr(names)[:60]),
            (isinstance(m.get("schedule_defaults") or {}, dict), "schedule_defaults a mapping",
             repr(m.get("schedule_defaults"))[:60])):
        if not ok:
            raise EngineDirError(f"{what} in {MANIFEST}", got, rebuild)
    known = {k: m[k] for k in _FIELDS if k in m and k not in ("root", "config", "meta")}
    manifest = Manifest(root=root, config=config, **known,
                        meta={k: v for k, v in m.items() if k not in _FIELDS and k != "format"})
    try:                                   # (a record of the wrong shape: one line, not a traceback)
        files = [(s, info["file"], info["sha256"]) for s, info in manifest.stages.items()]
        files += [(f"{s} weights", info["data"], info["data_sha256"]) for s, info in manifest.stages.items()
                  if "data" in info]
        for name, plan in (manifest.tensorrt or {}).get("plans", {}).items():
            files.append((f"tensorrt plan {name}", plan["file"], plan["sha256"]))
        files += [(f"{s} engine", e["file"], e["sha256"]) for s, e in (manifest.engines or {}).items() if "file" in e]
        files += [(key, w["file"], w["sha256"]) for key, w in (manifest.weights or {}).items()]
    except (KeyError, TypeError, AttributeError) as e:
        raise EngineDirError(f"a valid {MANIFEST} (file records with file and sha256)",
                             f"a malformed record ({type(e).__name__}: {e})", rebuild) from None
    for what, rel, digest in files:
        p = safe_member(root, rel)
        if not p.is_file():
            raise EngineDirError(f"{rel} listed in {MANIFEST}", "the file is missing (partial directory)", rebuild)
        if verify_hashes and sha256_file(p) != digest:
            raise EngineDirError(f"{rel} with the sha256 recorded at export", "a different file (modified or corrupt)",
                                 rebuild)
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=False))
    os.replace(tmp, root / MANIFEST)
