"""``manifest.json``: what an engine directory was built from. Written here, read by engines
and runtime; the format is defined once, in this module.

A directory is trusted only if its manifest parses, names this format, holds every record the runtime reads
with its fields and types (:data:`_SCHEMA`), keeps every path inside the directory, and every file the chosen
engines use hashes to its recorded sha256 (once: a file found whole, by the export or an open, is recorded in
:data:`VERIFIED` with its state and hashed again only where that changed; one ONNX graph is used through ONNX
Runtime's optimized copy of it, checked against the hash written beside the copy when it was made; the graph
itself is read again whenever its file's size or time differ). Anything else is refused, saying how to rebuild.
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
from flowar.io.digests import MADE_FOR, edited_parts, seal_broken, sealed, sha256_file, strict_json, vae_sha256  # noqa: F401
from flowar.io.files import file_state

if TYPE_CHECKING:
    from flowar.export.specs import StageSpec

MANIFEST = "manifest.json"
FORMAT = "flowar-engine-dir-v1"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")      # what flowar-export --precision writes
# The engines a stage may run on, by the name `auto.choice` records (flowar.runtime.candidates
# builds them; named here, with the format, so that reading a manifest imports no PyTorch), and what
# each opens: nothing (the stage's graph), a compiled package (`engines.<stage>.file`) or
# weights (`engines.<stage>.weights`, a key of `weights`).
STAGES = ("ar", "head_prep", "velocity", "decode")     # (stage_specs' names, the last with a VAE only)
CANDIDATE_OPENS = {"ort-fp32": None, "torch-fp32": "weights", "torch-bf16": "weights", "aoti-fp32": "file",
                   "aoti-bf16": "file"}
VERIFIED = ".verified.json"     # members found to hash to their sha256 here, by file state (Manifest.checked)


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


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an engine directory was built from: ``manifest.json``, parsed and checked.

    The JSON holds these fields by the same names (``config`` as its dict); ``root`` is where
    the directory was read from and is not written.
    """
    root: Path
    config: FlowARConfig
    stages: dict[str, dict]         # stage -> {file, sha256[, data, data_sha256], inputs, outputs, tolerance, max_rows,
                                    #           peak_rss_gb, seconds[, verified_max_abs_diff (fp32) | verified_max_rel_diff (fp16)]}
    precision: str                  # fp32, fp16, bf16, auto; with `auto` set, engines chosen per stage on a CPU
    max_batch: int                  # samples per call the engines serve
    checkpoint: dict                # {file, source, sha256, weights, data, config}: what was exported (config: how given)
    class_names: list[str] | None = None
    schedule_defaults: dict = field(default_factory=dict)   # what flowar-run samples with unless told otherwise
    vae: dict | None = None         # {source, sha256, latent_channels, downsample, image_size, config}; None: tokens
    tensorrt: dict | None = None    # {flavour, version, plans: stage -> record, compute_capability}
    auto: dict | None = None        # --precision auto|bf16 on a CPU: what was measured and chosen (flowar.commands.precision)
    engines: dict | None = None     # stage -> {candidate, file, sha256, cpu} (compiled) or {candidate, weights} (PyTorch)
    weights: dict | None = None     # "<group>.<candidate>" -> {file, sha256}: weights in the precision they run
    call_plan: dict | None = None   # rows per call per (stage, scale), seconds per image by batch (flowar.commands.plan)
    meta: dict = field(default_factory=dict)   # opset, scales, versions, created: for people, not read back

    def require_decoder(self) -> None:
        """Refuse, before any work, to make images from a directory exported without a VAE."""
        if self.vae is None:
            raise FlowARError("an engine directory with a decode stage (images)", "one exported without --vae",
                              "re-export with --vae, or ask for tokens only (flowar-run --save-tokens without --out or --save-images)")

    @property
    def rebuild(self) -> str:
        """How to make this directory again: the flowar-export command its record implies (its
        checkpoint and VAE where they were, its config, precision, limit, TensorRT target and
        recorded sampling defaults), so that following it gives the same kind of directory, not a
        tokens-only fp32 one."""
        import shlex
        from flowar.config import PRESETS, SAMPLING_DEFAULTS
        c, trt = self.checkpoint, self.tensorrt or {}
        preset = next((n for n, p in PRESETS.items() if p == self.config), None)
        args = [f"--ckpt {shlex.quote(c['source']) if c.get('source') else 'CKPT'}"]
        if c.get("config"):                           # (recorded since 2026-12-06)
            args += [c["config"]] * (c["config"] != "in the file")
        elif preset:                                  # (before, guessed: a matching preset is taken by any file)
            args.append(f"--preset {preset}")
        elif c.get("weights") != "safetensors":       # (and a .safetensors file likely describes itself)
            args.append("--config CONFIG.json (its manifest's config)")
        args += ["--raw-weights"] if c.get("weights") == "model" else []
        args += [f"--vae {shlex.quote(self.vae['source'])}"] if self.vae else []
        args += ["--backend trt"] if trt else []
        args += [f"--precision {self.precision}"] if self.precision != "fp32" else []
        asked = {k: (self.auto or {}).get(k) for k in ("candidates", "max_memory_gb")}   # (recorded since 2026-12-06)
        if isinstance(asked["candidates"], list):
            args.append(f"--auto-candidates {shlex.quote(','.join(map(str, asked['candidates'])))}")
        limit = asked["max_memory_gb"]
        args += [f"--max-memory {limit!r}"] if isinstance(limit, (int, float)) and not isinstance(limit, bool) else []
        args += [f"--max-batch {self.max_batch}"] if self.max_batch != 8 else []
        if trt.get("flavour") == "tensorrt-rtx" and trt.get("compute_capability"):
            args.append(f"--compute-capability {trt['compute_capability']}")
        args += [f"--{k} {v}" for k, v in (self.schedule_defaults or {}).items()     # (flowar-export's options only)
                 if k in ("schedule", "steps", "cfg", "guidance") and v is not None and v != SAMPLING_DEFAULTS.get(k)]
        return f"rebuild it: flowar-export {' '.join(args)} --out {shlex.quote(str(self.root))}"

    def specs(self) -> dict[str, StageSpec]:
        from flowar.export.specs import stage_specs
        return stage_specs(self.config, self.vae["downsample"] if self.vae else None)

    def members(self) -> list[tuple[str, str]]:
        """(path in the directory, sha256) of every file the manifest lists."""
        files = [(info["file"], info["sha256"]) for info in self.stages.values()]
        files += [(info["data"], info["data_sha256"]) for info in self.stages.values() if info.get("data")]
        files += [(plan["file"], plan["sha256"]) for plan in (self.tensorrt or {}).get("plans", {}).values()]
        files += [(e["file"], e["sha256"]) for e in (self.engines or {}).values() if e.get("file")]
        return files + [(w["file"], w["sha256"]) for w in (self.weights or {}).values()]

    def member(self, rel: str) -> Path:
        """``root / rel`` if it stays inside the directory (no '..', not absolute, no symbolic link out),
        else refused."""
        if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise EngineDirError("manifest paths relative to the engine directory", repr(rel), self.rebuild)
        p = self.root / rel
        real_root, real = self.root.resolve(), p.resolve()
        if real != real_root and real_root not in real.parents:
            raise EngineDirError("manifest paths that stay inside the engine directory",
                                 f"{rel!r} resolves to {real}", self.rebuild)
        return p

    def graph(self, stage: str) -> tuple[Path, str]:
        """(path, sha256) of a stage's ONNX graph."""
        info = self.stages[stage]
        return self.member(info["file"]), info["sha256"]

    def checked(self, rel: str, sha256: str) -> Path:
        """A member file, refused unless it hashes to ``sha256`` (:meth:`hashes_to`)."""
        p = self.member(rel)
        if not self.hashes_to(p, sha256, rel):
            raise EngineDirError(f"{rel} with the sha256 recorded at export", "a different file (modified or corrupt)",
                                 self.rebuild)
        return p

    def changed(self, progress: bool = False) -> list[tuple[str, str, str]]:
        """(path, its sha256 now, the recorded one) of every listed file that differs from its record:
        each read whole, whatever the open path's record of files found whole says (``progress``: a bar
        over the bytes)."""
        from flowar.io.progress import progress_bar
        files = [(rel, digest, self.member(rel)) for rel, digest in sorted(set(self.members()))]
        sizes = [p.stat().st_size for _, _, p in files]
        bar = progress_bar(sum(sizes), "hashing", "B", unit_scale=True, leave=False, disable=None if progress else True)
        out = []
        for (rel, digest, p), size in zip(files, sizes):
            got = sha256_file(p)
            out += [(rel, got, digest)] if got != digest else []
            bar.update(size)
        bar.close()
        return out

    def hashes_to(self, path: Path, sha256: str, key: str) -> bool:
        """Whether the file at ``path`` hashes to ``sha256`` (one streaming read), or was found to here before
        and is unchanged since: its device, inode, size, modification and change times (which cannot be set
        back) are what :data:`VERIFIED` recorded then, under ``key`` (a member's path in the directory; a file
        outside it, such as the checkpoint ``--backend torch`` opens, its kind and absolute path)."""
        state = [sha256, *file_state(path)]
        if self._known().get(key) == state:
            return True
        if sha256_file(path) != sha256:
            return False
        self.remember({key: state})
        return True

    def _known(self) -> dict:
        try:
            known = json.loads((self.root / VERIFIED).read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def remember(self, found: dict[str, list]) -> None:
        """Record files found whole in :data:`VERIFIED`, ``{key: [sha256, *their state taken before they were
        hashed]}`` (the export its own: the first open hashes none; a 2.2 GB graph took it 2.4 s). A
        directory this user cannot write records nothing (its files are hashed on every open). A file outside
        it, ``"<kind> <absolute path>"``, replaces its kind's last one (no paths of checkpoints passed before)."""
        record = self.root / VERIFIED
        if found and os.access(self.root, os.W_OK) and not record.is_symlink():
            from flowar.io.files import atomic_write_bytes
            kinds = tuple(k for k in ("checkpoint /", "vae /") if any(key.startswith(k) for key in found))
            kept = {k: v for k, v in self._known().items() if not (kinds and k.startswith(kinds))}
            try:
                atomic_write_bytes(record, lambda t: Path(t).write_text(json.dumps(kept | found) + "\n"))
            except (OSError, FlowARError):        # (a record is an optimisation: the file was hashed)
                pass

    def read_checked(self, rel: str, sha256: str) -> bytes:
        """A member file's bytes, refused unless they hash to ``sha256`` (the one read that uses them)."""
        data = self.member(rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise EngineDirError(f"{rel} with the sha256 recorded at export", "a different file (modified or corrupt)",
                                 self.rebuild)
        return data

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


# What a field holds (the third item of a :data:`_SCHEMA` row), and how a refusal says it; a tuple
# of names: one of them.
_KINDS = {"map": "a mapping", "file": "a non-empty string", "str": "a string", "size": "a positive integer",
          "names": "a list of strings", "batch": "an integer in 1..1024"}


_CANDIDATE = tuple(CANDIDATE_OPENS)

# The fields the runtime reads, checked when the manifest is read (a missing one or one of the wrong
# type ended in a KeyError or TypeError deep in the runtime, or after sampling): (field, required,
# kind). `*` is each entry of a mapping; required: True, False (may be absent or null) or the
# sibling whose presence requires it; nothing is looked at under an absent or null record.
_SCHEMA = (
    ("config", True, "map"), ("max_batch", True, "batch"), ("precision", True, PRECISIONS),
    ("schedule_defaults", False, "map"),
    ("stages", True, "map"), ("stages.*", True, "map"),
    ("stages.*.file", True, "file"), ("stages.*.sha256", True, "file"),
    ("stages.*.data", False, "file"), ("stages.*.data_sha256", "data", "file"),
    ("stages.*.inputs", True, "names"), ("stages.*.outputs", True, "names"),
    ("checkpoint", True, "map"), ("checkpoint.sha256", True, "file"),
    *((f"checkpoint.{k}", False, "str") for k in ("file", "source", "weights", "data", "config", "vae_sha256")),
    ("vae", False, "map"), ("vae.source", True, "file"),
    ("vae.sha256", False, "file"),          # (a manifest written before the VAE's hash was recorded has none)
    *((f"vae.{k}", True, "size") for k in ("latent_channels", "downsample", "image_size")),
    ("vae.config", False, "map"),
    ("auto", False, "map"), ("auto.choice", False, "map"), ("auto.choice.*", True, _CANDIDATE),
    ("auto.machine", False, "map"), ("auto.measured", False, "map"), ("auto.measured.*", True, "map"),
    ("auto.measured.*.*", True, "map"),
    ("engines", False, "map"), ("engines.*", True, "map"), ("engines.*.candidate", True, _CANDIDATE),
    ("engines.*.file", False, "file"), ("engines.*.sha256", "file", "file"), ("engines.*.weights", False, "file"),
    ("engines.*.cpu", False, "map"),
    ("weights", False, "map"), ("weights.*", True, "map"), ("weights.*.file", True, "file"),
    ("weights.*.sha256", True, "file"),
    ("tensorrt", False, "map"), ("tensorrt.flavour", True, "file"), ("tensorrt.version", True, "file"),
    ("tensorrt.plans", True, "map"), ("tensorrt.plans.*", True, "map"),
    ("tensorrt.plans.*.file", True, "file"), ("tensorrt.plans.*.sha256", True, "file"),
    ("call_plan", False, "map"),
)


def _check_fields(m: dict, rebuild: str) -> None:
    """Every field of :data:`_SCHEMA` present where required and of its type, else one line naming it."""
    for path, required, kind in _SCHEMA:
        *parents, last = path.split(".")
        records = [("", m)]         # (dotted name so far, record): the records the path walks, mappings only
        for part in parents:
            records = [(f"{name}{k}.", rec[k]) for name, rec in records for k in (rec if part == "*" else [part])
                       if isinstance(rec.get(k), dict)]
        for name, rec, key in [(f"{name}{k}", rec, k) for name, rec in records for k in (rec if last == "*" else [last])]:
            v = rec.get(key)
            needed = required is True or (isinstance(required, str) and rec.get(required) is not None)
            holds = v is not None and (isinstance(v, str) and v in kind if isinstance(kind, tuple) else {
                "map": isinstance(v, dict), "file": isinstance(v, str) and v != "", "str": isinstance(v, str),
                "size": type(v) is int and v >= 1, "batch": type(v) is int and 1 <= v <= 1024,
                "names": isinstance(v, list) and all(isinstance(n, str) for n in v)}[kind])
            if (v is None and needed) or (v is not None and not holds):
                expected = f"one of {', '.join(kind)}" if isinstance(kind, tuple) else _KINDS[kind]
                raise EngineDirError(f"{name} {expected} in {MANIFEST}",
                                     "none (the field is missing)" if key not in rec else repr(v)[:60], rebuild)


def _check_choice(m: dict, rebuild: str) -> None:
    """Each engine ``auto.choice`` names opens what the directory holds: a stage of it, and the
    stage's ``engines`` record of that candidate (a compiled package, or a key of ``weights``)."""
    engines, weights = m.get("engines") or {}, m.get("weights") or {}
    for stage, cand in ((m.get("auto") or {}).get("choice") or {}).items():
        rec, opens = engines.get(stage) or {}, CANDIDATE_OPENS[cand]
        if stage not in m["stages"]:
            raise EngineDirError(f"auto.choice of the directory's stages ({', '.join(m['stages'])}) in {MANIFEST}",
                                 repr(stage), rebuild)
        if opens and (rec.get("candidate") != cand or rec.get(opens) is None
                      or (opens == "weights" and rec["weights"] not in weights)):
            raise EngineDirError(f"engines.{stage} the {cand} record auto.choice.{stage} names, with its {opens}"
                                 + (" (a key of weights)" if opens == "weights" else "") + f" in {MANIFEST}",
                                 repr(rec)[:80] if rec else "none", rebuild)


def read_manifest(root: str | Path, verify_hashes: bool = False, note_edits: bool = False) -> Manifest:
    """The manifest of an engine directory, checked: its format, its fields, every listed file
    present and inside the directory. The files' hashes are checked where they are read (by the
    engines that use them: :mod:`flowar.runtime.directory`), or here with ``verify_hashes``.
    ``note_edits``: a manifest edited since the export sealed it is said on stderr (it runs as edited)."""
    if isinstance(root, str) and not root.strip():     # (Path("") is the working directory: it was opened as one)
        raise EngineDirError("an engine directory made by flowar-export", "an empty path", "pass the folder it wrote")
    root = Path(root)
    try:
        str(root).encode("utf-8")
    except UnicodeEncodeError:
        raise EngineDirError("an engine directory path that is valid UTF-8 (ONNX Runtime takes no other)",
                             repr(os.fsencode(root)), "rename it") from None
    if root.is_file() and (root.parent / MANIFEST).is_file():     # (one of an engine directory's files)
        raise EngineDirError("an engine directory made by flowar-export", f"{root}, a file in the engine directory "
                             f"{root.parent}", f"pass the folder it is in: --engine-dir {root.parent}")
    if root.is_file():          # (the preset only for a file that does not describe itself, as ours do)
        from flowar.model.checkpoint import carries_config
        own = carries_config(root)
        raise EngineDirError("an engine directory made by flowar-export", f"{root}, a file, not an engine directory",
                             f"pass the folder flowar-export wrote (flowar-export --ckpt {root} --vae VAE --out DIR makes "
                             "one" + ("" if own else "; an official file also needs its --preset: flowar-s, flowar-l or "
                             "flowar-h") + f"), or sample the checkpoint itself: flowar-run or flowar-judge --ckpt {root}"
                             + ("" if own else " (with that --preset)"))
    if not root.is_dir():
        raise EngineDirError("an engine directory made by flowar-export", f"no directory at {root}",
                             f"check the path (the folder flowar-export wrote), or make one there: flowar-export --ckpt "
                             f"CKPT --vae VAE --out {root}")
    rebuild = f"rebuild it: flowar-export --ckpt CKPT --vae VAE --out {root} (leave out --vae for tokens only)"  # (no VAE named)
    mpath = root / MANIFEST
    if not mpath.is_file():
        try:    # a model's folder (a checkpoint and its VAE beside it, as models/default): the file to open in it
            ckpts = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".pth", ".pt") and p.is_file()
                           and p.stem != "diffusion_pytorch_model")     # (a VAE's, as in a diffusers VAE's folder)
        except OSError:
            ckpts = []
        vae = root / "vae" if (root / "vae").is_dir() else None
        opens = (f"it holds a checkpoint: open the file itself, flowar-run --ckpt {ckpts[0]}"
                 f"{f' --vae {vae}' if vae else ''} (Python: FlowARPipeline.from_pretrained({str(ckpts[0])!r}"
                 f"{f', vae={str(vae)!r}' if vae else ''}))"
                 if ckpts else "flowar-run and flowar-judge also open a checkpoint file itself: --ckpt")
        raise EngineDirError(f"{MANIFEST} in the engine directory", f"none in {root} (not a folder flowar-export wrote)",
                             "pass the folder flowar-export wrote, or export one: flowar-export --ckpt CKPT --vae VAE --out "
                             f"A_NEW_FOLDER ({opens})")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineDirError(f"a valid {MANIFEST}", f"unreadable JSON ({e})", rebuild) from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineDirError(f"manifest format {FORMAT}", repr(m.get("format") if isinstance(m, dict) else m), rebuild)
    _check_fields(m, rebuild)
    if m.get("auto"):
        _check_choice(m, rebuild)
    config = FlowARConfig.from_dict(m["config"], f"{mpath}")
    names = m.get("class_names")
    if not (names is None or (isinstance(names, list) and len(names) == config.num_classes
                              and all(isinstance(n, str) for n in names))):
        raise EngineDirError(f"class_names a list of {config.num_classes} strings (or none) in {MANIFEST}",
                             repr(names)[:60], rebuild)
    known = {k: m[k] for k in _FIELDS if k in m and k not in ("root", "config", "meta")}
    manifest = Manifest(root=root, config=config, **known,
                        meta={k: v for k, v in m.items() if k not in _FIELDS and k != "format"})
    every = STAGES[:3] + STAGES[3:] * bool(manifest.vae)                    # (specs(): no PyTorch imported here)
    if missing := [s for s in every if s not in manifest.stages]:            # (flowar-check: "opens nowhere", exit 0)
        raise EngineDirError(f"graphs for every stage ({', '.join(every)})", f"missing {missing}", manifest.rebuild)
    for rel, digest in manifest.members():
        p = manifest.member(rel)
        if not p.is_file():
            raise EngineDirError(f"{rel} listed in {MANIFEST}", "the file is missing (partial directory)",
                                 manifest.rebuild)
    changed = manifest.changed() if verify_hashes else []
    if changed:
        raise EngineDirError(f"{changed[0][0]} with the sha256 recorded at export", "a different file (modified or "
                             "corrupt)", manifest.rebuild)
    if note_edits and seal_broken(m):                                      # (flowar-check refuses such a directory)
        import sys
        if made_for := [p for p in edited_parts(m) if p.startswith(MADE_FOR) and p != "config.latent_scale"]:
            raise EngineDirError(f"{MANIFEST}'s config and decoder shape as exported (its graphs were made for them)",
                                 f"{', '.join(made_for[:4])} edited since", f"restore it (flowar-check --engine-dir "
                                 f"{root} names the change), or {manifest.rebuild}")
        print(f"note: {mpath} was edited since its export ({', '.join(edited_parts(m)[:4]) or 'its fields'}): it runs as "
              f"edited, not as exported and verified; flowar-check --engine-dir {root} names the change, a re-export undoes it",
              file=sys.stderr, flush=True)
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(sealed(json.loads(json.dumps(strict_json(manifest.to_json())))), indent=1, allow_nan=False))
    os.replace(tmp, root / MANIFEST)
