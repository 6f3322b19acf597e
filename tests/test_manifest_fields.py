"""The manifest's records checked when read: one line naming the field, never a traceback from
deep in the runtime; the VAE's sha256 recorded at export and checked where ``--backend torch``
reopens it; engine directory paths that are not UTF-8, or not directories."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowar.errors import EngineDirError, FlowARError
from flowar.export.manifest import read_manifest, sha256_file, vae_sha256

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "default" / "flowar.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(engine directory, its VAE folder): the shipped tiny model exported from a copy of its VAE."""
    from flowar.commands.build import build_engine_dir
    base = tmp_path_factory.mktemp("manifest_fields")
    vae = base / "vae"
    shutil.copytree(ROOT / "models" / "default" / "vae", vae)
    build_engine_dir(CKPT, base / "eng", vae_path=vae, max_batch=1, verify=False)
    return base / "eng", vae


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of an engine directory with ``edit(manifest)`` applied to its manifest."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    if edit:
        edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


_DEL = object()                 # (a value for _set: delete the field)


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        if value is _DEL:
            del m[last]
        else:
            m[last] = value
    return edit


_TORCH_AR = {"auto": {"choice": {"ar": "torch-bf16"}}}
ROWS = [   # (edit, what the one line says)
    (_set("vae", "x"), "vae a mapping"),
    (_set("vae.downsample", _DEL), "vae.downsample a positive integer in manifest.json; got none (the field is missing)"),
    (_set("vae.downsample", "4"), "vae.downsample a positive integer in manifest.json; got '4'"),
    (_set("vae.image_size", "32"), "vae.image_size a positive integer"),
    (_set("vae.image_size", 0), "vae.image_size a positive integer in manifest.json; got 0"),
    (_set("max_batch", 2000), "max_batch an integer in 1..1024 in manifest.json; got 2000"),
    (_set("max_batch", True), "max_batch an integer in 1..1024 in manifest.json; got True"),
    (_set("stages.ar.file", ""), "stages.ar.file a non-empty string in manifest.json; got ''"),
    (_set("checkpoint", "x"), "checkpoint a mapping"),
    (_set("checkpoint.sha256", _DEL), "checkpoint.sha256 a non-empty string in manifest.json; got none (the field is missing)"),
    (_set("stages.ar.sha256", 5), "stages.ar.sha256 a non-empty string in manifest.json; got 5"),
    (_set("stages.ar.data", "ar.onnx"), "stages.ar.data_sha256 a non-empty string"),
    (_set("stages.ar.inputs", "labels"), "stages.ar.inputs a list of strings"),
    (_set("stages.velocity.outputs", [1]), "stages.velocity.outputs a list of strings"),
    (_set("precision", "fp8"), "precision one of auto, fp32, fp16, bf16 in manifest.json; got 'fp8'"),
    (_set("precision", 32), "precision one of auto, fp32, fp16, bf16 in manifest.json; got 32"),
    (_set("auto", "x"), "auto a mapping"),
    (_set("auto", {"choice": {"ar": "nope"}}), "auto.choice.ar one of ort-fp32, torch-fp32"),
    (_set("auto", {"choice": {"nope": "ort-fp32"}}),
     "auto.choice of the directory's stages (ar, head_prep, velocity, decode) in manifest.json; got 'nope'"),
    (_set("auto", _TORCH_AR["auto"]), "engines.ar the torch-bf16 record auto.choice.ar names, with its weights"),
    (lambda m: m.update(_TORCH_AR, engines={"ar": {"candidate": "torch-bf16", "weights": "ar.torch-bf16"}}),
     "engines.ar the torch-bf16 record auto.choice.ar names, with its weights (a key of weights) in manifest.json; "
     "got {"),
    (lambda m: m.update({"auto": {"choice": {"ar": "aoti-fp32"}}}, engines={"ar": {"candidate": "aoti-fp32"}}),
     "engines.ar the aoti-fp32 record auto.choice.ar names, with its file in manifest.json; got {"),
    (_set("engines", {"ar": {"candidate": "aoti-fp32", "file": "ar.onnx"}}), "engines.ar.sha256 a non-empty string"),
    (_set("weights", {"ar.torch-fp32": {"file": "ar.onnx", "sha256": 3}}), "weights.ar.torch-fp32.sha256"),
]


@pytest.mark.parametrize("edit, said", ROWS, ids=[s[:40] for _, s in ROWS])
def test_a_malformed_record_is_one_line_naming_its_field(exported, tmp_path, edit, said):
    """Each of these ended in a KeyError, TypeError or AttributeError in the runtime (or was
    accepted: an unknown precision or choice): flowar-run, the Python API and read_manifest now
    refuse it in one line that names the field."""
    from flowar.commands.cli import run
    from flowar.pipeline.pipeline import FlowARPipeline
    d = _copy(exported[0], tmp_path / "d", edit)
    with pytest.raises(EngineDirError, match=said.replace("(", r"\(").replace(")", r"\)")) as e:
        read_manifest(d)
    assert "\n" not in str(e.value)
    with pytest.raises(EngineDirError, match="manifest.json"):
        FlowARPipeline.from_pretrained(d)
    res = CliRunner().invoke(run, ["--engine-dir", str(d), "--labels", "0", "--out", str(tmp_path / "g.png"),
                                   "--backend", "torch"])
    assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output


def test_flowar_sample_refuses_a_malformed_record_before_writing(exported, tmp_path):
    """flowar-sample with `vae: "x"` ended in a traceback, with others in 'expected workers that
    sample their shards' after writing run.json."""
    from flowar.commands.cli_ray import sample_cmd
    for i, (edit, said) in enumerate([ROWS[0], ROWS[2], ROWS[15]]):
        d = _copy(exported[0], tmp_path / f"d{i}", edit)
        res = CliRunner().invoke(sample_cmd, ["--engine-dir", str(d), "--num-images", "2", "--out",
                                              str(tmp_path / f"s{i}")])
        assert res.exit_code != 0 and said in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / f"s{i}" / "run.json").exists()


def test_a_choice_with_the_records_it_opens_reads(exported, tmp_path):
    """What --precision auto|bf16 writes (a compiled package with its sha256, weights listed in
    `weights`) passes the checks; only the records' presence and types are checked here."""
    def edit(m):
        m.update(auto={"mode": "auto", "choice": {"ar": "aoti-fp32", "velocity": "torch-fp32", "decode": "ort-fp32"},
                       "machine": {"model": "x", "flags": []}, "measured": {"ar": {"aoti-fp32": {"setup_s": 0.1}}}},
                 engines={"ar": {"candidate": "aoti-fp32", "file": "ar.onnx", "sha256": "0" * 64, "cpu": {}},
                          "velocity": {"candidate": "torch-fp32", "weights": "head.torch-fp32"}},
                 weights={"head.torch-fp32": {"file": "velocity.onnx", "sha256": "0" * 64}})
    m = read_manifest(_copy(exported[0], tmp_path / "d", edit))
    assert m.choice == {"ar": "aoti-fp32", "velocity": "torch-fp32", "decode": "ort-fp32"}


def test_the_vae_sha256_is_recorded_and_checked_by_backend_torch(exported, tmp_path):
    """--backend torch reopened vae.source unchecked: a changed VAE gave other images, exit 0. Its
    sha256 is recorded at export and a different file refused; a manifest without it (written
    before it was recorded) opens as before."""
    from safetensors.torch import load_file, save_file

    from flowar.commands.cli import run
    from flowar.runtime.directory import exported_from
    eng, vae = exported
    assert read_manifest(eng).vae["sha256"] == vae_sha256(vae)
    vae2 = tmp_path / "vae"
    shutil.copytree(vae, vae2)
    d = _copy(eng, tmp_path / "d", _set("vae.source", str(vae2)))
    exported_from(d)                                                   # the same VAE: opens
    weights = vae2 / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"] + 0.5    # still loads, decodes other images
    save_file(sd, str(weights))
    with pytest.raises(FlowARError, match="the VAE the engine directory was exported from; got .*a different file"):
        exported_from(d)
    res = CliRunner().invoke(run, ["--engine-dir", str(d), "--labels", "0", "--out", str(tmp_path / "g.png"),
                                   "--backend", "torch"])
    assert res.exit_code == 2 and "the VAE the engine directory was exported from" in res.output, res.output
    old = _copy(d, tmp_path / "old", _set("vae.sha256", _DEL))
    assert exported_from(old)[1] is not None                          # no recorded hash: opened as before



def test_backend_torch_hashes_its_checkpoint_and_vae_file_once_and_refuses_them_changed(exported, fixtures_dir, tmp_path,
                                                                                       monkeypatch):
    """--backend torch hashed the checkpoint and a VAE file on every open (FlowAR-H: 7.65 GB): now once,
    recorded with the file's state in the directory as its own files are; one changed since (same
    size, a byte flipped) is hashed again and refused."""
    import flowar.export.manifest as mf
    from flowar.runtime.directory import exported_from
    eng, _ = exported
    ck, kl = tmp_path / "ck.safetensors", tmp_path / "kl.ckpt"
    shutil.copy(read_manifest(eng).exported_checkpoint[0], ck)
    shutil.copy(fixtures_dir / "mar_vae_tiny.ckpt", kl)
    # a directory of the same checkpoint whose decoder is a VAE file (MAR's kind): its recorded hash and source
    d = _copy(eng, tmp_path / "d", lambda m: m["vae"].update(source=str(kl), sha256=sha256_file(kl)))
    hashed = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    import sys
    import flowar.model.vae  # noqa: F401 - (in sys.modules: test_export re-imports it, the package's attribute may be another)
    with monkeypatch.context() as m:       # (the fixture's VAE is not this model's: only its file is checked here)
        m.setattr(sys.modules["flowar.model.vae"], "load_decoder", lambda *a, **k: torch_stub())
        for _ in range(3):
            exported_from(d, ckpt=ck)
        assert hashed.count("ck.safetensors") == 1 and hashed.count("kl.ckpt") == 1, hashed
        for f, what in ((ck, "the checkpoint"), (kl, "the VAE")):
            data = bytearray(f.read_bytes())
            data[-1] ^= 1
            f.write_bytes(bytes(data))
            with pytest.raises(FlowARError, match=f"{what} the engine directory was exported from"):
                exported_from(d, ckpt=ck)
            data[-1] ^= 1
            f.write_bytes(bytes(data))         # (put back: the next file's check is reached)
        assert hashed.count("ck.safetensors") >= 2 and hashed.count("kl.ckpt") >= 2, hashed
        for i in range(3):                     # the checkpoint from other paths: the record keeps the last one's
            shutil.copy(ck, tmp_path / f"ck{i}.safetensors")
            exported_from(d, ckpt=tmp_path / f"ck{i}.safetensors")
        keys = json.loads((d / ".verified.json").read_text())
        assert [k for k in keys if k.startswith("checkpoint ")] == [f"checkpoint {(tmp_path / 'ck2.safetensors').resolve()}"]


def torch_stub():
    import torch
    return torch.nn.Identity()

def test_a_vae_folder_hash_covers_its_config_and_weights(exported, tmp_path):
    """One sha256 over a diffusers folder's config and weights files; other files (a README) not."""
    vae = tmp_path / "vae"
    shutil.copytree(exported[1], vae)
    first = vae_sha256(vae)
    (vae / "README.md").write_text("notes")
    assert vae_sha256(vae) == first
    (vae / "config.json").write_text((vae / "config.json").read_text() + " ")
    assert vae_sha256(vae) != first
    assert vae_sha256(CKPT) == sha256_file(CKPT)                       # a file (MAR's kl16.ckpt): its own hash


def test_a_path_that_is_not_utf8_is_one_line(exported, tmp_path):
    """ONNX Runtime took it with a TypeError traceback."""
    from flowar.commands.cli import run
    d = Path(os.fsdecode(os.fsencode(tmp_path) + b"/eng\xffdir"))
    shutil.copytree(exported[0], d)
    with pytest.raises(EngineDirError, match=r"path that is valid UTF-8 .*; got b'.*/eng\\xffdir'. Fix: rename it"):
        read_manifest(d)
    res = CliRunner().invoke(run, ["--engine-dir", str(d), "--labels", "0", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "valid UTF-8" in res.output and "Traceback" not in res.output, res.output


def test_a_file_passed_as_an_engine_directory_is_said_to_be_a_file(tmp_path):
    """The fix suggested exporting into the user's checkpoint ('flowar-export --ckpt CKPT --out
    some_file.safetensors'); the commands answered with their option parser's line ("Invalid value
    for '--engine-dir': Directory ... is a file. Fix: see flowar-run --help"), not this one."""
    from flowar.commands.cli import judge_cmd as judge, run
    from flowar.commands.cli_ray import sample_cmd as sample, serve_cmd as serve
    from flowar.runtime.runtime import Runtime
    said = "a file, not an engine directory. Fix: pass the folder flowar-export wrote"
    with pytest.raises(EngineDirError, match=said) as e:
        Runtime.open(CKPT, engine_dir=True)
    # (the export it suggests names the VAE, and no internal call; the preset only for a file that may need one:
    # this project's .safetensors carry their config)
    assert f"--out {CKPT}" not in str(e.value) and f"--ckpt {CKPT} --vae VAE --out DIR" in str(e.value)
    assert "--preset" not in str(e.value) and "Runtime.open" not in str(e.value)
    import torch
    from safetensors.torch import save_file
    (official := tmp_path / "FlowAR-S.pth").write_bytes(b"x")
    save_file({"w": torch.zeros(1)}, str(flat := tmp_path / "flat.safetensors"))     # (no config in its header)
    for f in (official, flat):
        with pytest.raises(EngineDirError, match=said) as e:
            Runtime.open(f, engine_dir=True)
        assert "an official file also needs its --preset: flowar-s, flowar-l or flowar-h" in str(e.value), f
    for command, more in ((run, ["--labels", "0"]), (judge, []), (sample, ["--out", "unused", "--num-images", "2"]), (serve, [])):
        res = CliRunner().invoke(command, ["--engine-dir", str(CKPT), *more])
        assert res.exit_code == 2 and said in res.output and "Invalid value" not in res.output, (command.name, res.output)
    # an empty --engine-dir was the working directory (its fix then named a file found there)
    from flowar.commands.check import check_cmd
    for command, more in ((check_cmd, []), (sample, ["--out", "unused", "--num-images", "2"])):    # (flowar-run: "neither")
        res = CliRunner().invoke(command, ["--engine-dir", "", *more])
        assert res.exit_code == 2 and res.output.startswith("error: expected an engine directory made by flowar-export; "
                                                            "got an empty path."), (command.name, res.output)


def test_a_member_found_whole_is_not_hashed_again_until_its_file_changes(exported, tmp_path, monkeypatch):
    """Every open hashed the chosen engines' files (FlowAR-S: 455 MB of compiled engines and decoder
    weights, 0.27 s of a 0.8 s open): a member found whole is recorded with its file's state and not
    hashed again while that holds. Its bytes changed in place, with the size and the modification time
    put back, are hashed again and refused (the change time gives it away)."""
    import flowar.export.manifest as manifest
    d = tmp_path / "eng"
    shutil.copytree(exported[0], d)
    rel, sha = read_manifest(d).stages["ar"]["file"], read_manifest(d).stages["ar"]["sha256"]
    hashed, real = [], manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert read_manifest(d).checked(rel, sha) == d / rel and len(hashed) == 1
    assert read_manifest(d).checked(rel, sha) == d / rel and len(hashed) == 1     # another open: not hashed
    p, st = d / rel, (d / rel).stat()
    with open(p, "r+b") as f:                        # (in place: the same inode and size)
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(EngineDirError, match="with the sha256 recorded at export; got a different file"):
        read_manifest(d).checked(rel, sha)
    assert len(hashed) == 2


def test_another_stage_s_graph_in_a_stage_s_place_is_one_line(exported, tmp_path):
    """ar.onnx replaced by velocity.onnx with its hash recorded too (the manifest edited, or written by
    other tools): ONNX Runtime's binding traceback ("Failed to find input name in the mapping:
    labels"). One line naming the stage, the tensors the graph lacks and what it has."""
    from click.testing import CliRunner

    from flowar.commands.cli import run

    def swap(m):
        m["stages"]["ar"]["sha256"] = m["stages"]["velocity"]["sha256"]
    d = _copy(exported[0], tmp_path / "eng", swap)
    shutil.copy(d / "velocity.onnx", d / "ar.onnx")
    res = CliRunner().invoke(run, ["--engine-dir", str(d), "--labels", "0", "--out", str(tmp_path / "g.png")])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("error: expected a graph of the ar stage (its inputs and outputs); got ar.onnx without "
                               "labels"), lines[0]
    assert not (tmp_path / "g.png").exists()


def test_a_manifest_missing_a_stage_or_unreadable_is_refused_with_a_fix_that_keeps_the_decoder(exported, tmp_path):
    """A manifest without a stage's record opens on no machine: flowar-check said "does not open on
    this machine" and exit 0 (the leniency meant for a GPU's directory checked on a CPU); now exit 2
    when read. Its fix was "re-export: flowar-export --out DIR" (no --ckpt: refused when followed);
    now the directory's own rebuild command, with its VAE. An unreadable manifest's fix names --vae
    (following "--ckpt CKPT --out DIR" made a tokens-only directory)."""
    from flowar.commands.check import check_cmd
    from flowar.export.manifest import STAGES
    from flowar.export.specs import stage_specs
    src, vae = exported
    m = read_manifest(src)                   # (the names read_manifest lists without PyTorch are the specs' own)
    assert tuple(stage_specs(m.config, 16)) == STAGES and tuple(stage_specs(m.config, None)) == STAGES[:3]
    d = _copy(src, tmp_path / "nodecode", lambda m: m["stages"].pop("decode"))
    res = CliRunner().invoke(check_cmd, ["--engine-dir", str(d)])
    assert res.exit_code == 2 and res.output.startswith("error: expected graphs for every stage (ar, head_prep, "
                                                        "velocity, decode); got missing ['decode']"), res.output
    assert f"Fix: rebuild it: flowar-export --ckpt {CKPT} --vae {vae} --max-batch 1 --out {d}" in res.output, res.output
    # exporting again into it keeps what it holds besides (its manifest refused, it was replaced whole: a grid lost)
    from flowar.commands.build import build_engine_dir
    (d / "grid.png").write_bytes(b"mine")
    with pytest.raises(FlowARError, match=r"also holds grid.png\. Fix"):
        build_engine_dir(CKPT, d, vae_path=vae, max_batch=1, verify=False)
    assert (d / "grid.png").read_bytes() == b"mine"
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(EngineDirError, match=r"Fix: rebuild it: flowar-export --ckpt CKPT --vae VAE --out .* \(leave "
                                             r"out --vae for tokens only\)"):
        read_manifest(d)


def test_the_manifest_is_strict_json_where_a_measure_is_not_finite(exported, tmp_path):
    """A candidate that could not run (no C++ compiler: its seconds inf) and a bf16 export's tolerance
    (inf) were written as Infinity, which strict parsers (jq, JavaScript) refuse. Written as "inf" now,
    sealed as read back: the directory reads, runs and checks intact."""
    from flowar.commands.check import check_cmd
    from flowar.export.manifest import write_manifest
    d = tmp_path / "d"
    shutil.copytree(exported[0], d)
    import dataclasses
    m = dataclasses.replace(read_manifest(d), auto={"choice": {}, "measured": {"ar": {"aoti-bf16": {
        "seconds": float("inf"), "tolerance": float("-inf")}}}})
    write_manifest(d, m)

    def refuse(name):
        raise ValueError(f"{name} is not strict JSON")
    rec = json.loads((d / "manifest.json").read_text(), parse_constant=refuse)
    assert rec["auto"]["measured"]["ar"]["aoti-bf16"] == {"seconds": "inf", "tolerance": "-inf"}
    res = CliRunner().invoke(check_cmd, ["--engine-dir", str(d), "--quiet"])
    assert res.exit_code == 0, res.output
