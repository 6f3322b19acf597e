"""Checkpoint formats, and refusal of what must not load."""

import argparse
import importlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowar.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from flowar.config import PRESETS, FlowARConfig
from flowar.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def official_sd(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny_v1.safetensors"))


def _same(model, sd):
    msd = model.state_dict()
    return all(torch.equal(msd[k], sd[k]) for k in sd)


def test_official_flat_pth(tmp_path, official_sd):
    p = tmp_path / "flowar_tiny.pth"
    torch.save(official_sd, p)
    model, ck = load_model(p, preset="tiny")
    assert ck.source == "flat" and _same(model, official_sd)
    # the legacy (pre-zip) format (it was refused as corrupt)
    torch.save(official_sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model, ck = load_model(tmp_path / "legacy.pth", preset="tiny")
    assert ck.source == "flat" and _same(model, official_sd)


def _write(path, fmt, weights):
    """A training checkpoint of ``weights`` (EMA, raw, optimizer state) at ``path``, written in place
    when the file is there (as torch.save, cp or a save to the same path write it)."""
    tmp = path.with_name("new." + fmt)
    if fmt == "pth":
        torch.save(weights, tmp)
    else:
        save_file({f"{part}.{k}": v.contiguous() for part, sd in weights.items() for k, v in sd.items()}, tmp,
                  metadata={"format": "flowar-train-v1"})
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(tmp.read_bytes())
        f.truncate()
    tmp.unlink()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_checkpoint_read_mapped_is_a_view_of_its_file(tmp_path, official_sd, fmt):
    """mapped=True (flowar-export, which checks the file unchanged at its end) leaves the weights in the
    file's pages: a write to the file in place shows through (read into memory, it does not: below)."""
    p = tmp_path / f"checkpoint-last.{fmt}"
    ema = "model_ema" if fmt == "pth" else "ema"
    _write(p, fmt, {ema: official_sd})
    sd = read_checkpoint(p, mapped=True).state_dict
    _write(p, fmt, {ema: {k: v + 1 if v.is_floating_point() else v for k, v in official_sd.items()}})
    k = next(k for k, v in official_sd.items() if v.is_floating_point())
    assert torch.equal(sd[k], official_sd[k] + 1)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_loaded_checkpoint_is_not_tied_to_its_file(tmp_path, official_sd, fmt):
    """The official trainer rewrites checkpoint-last.pth in place (torch.save), as cp or a save to the same
    path rewrites any file: a model loaded from it keeps its weights (mapped, it read the new ones, or
    died of SIGBUS where the file was cut)."""
    p = tmp_path / f"checkpoint-last.{fmt}"
    ema = "model_ema" if fmt == "pth" else "ema"
    _write(p, fmt, {ema: official_sd})
    model, _ = load_model(p, preset="tiny")
    _write(p, fmt, {ema: {k: v + 1 if v.is_floating_point() else v for k, v in official_sd.items()}})
    assert _same(model, official_sd)
    with open(p, "r+b") as f:
        f.truncate(100)
    assert _same(model, official_sd)          # (mapped: the process dies here)


_PEAK = """import sys
from pathlib import Path
from flowar.model.checkpoint import load_model
kb = lambda key: int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key)))
try:
    Path("/proc/self/clear_refs").write_text("5")      # (the peak from here: Linux's high-water mark, reset)
except OSError:
    print("unsupported -"); sys.exit(0)
before = kb("VmRSS:")
model, ck = load_model(sys.argv[1], preset="tiny", use_ema=sys.argv[2] == "ema")
print(kb("VmHWM:") - before, ck.source)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's resettable peak of resident memory")
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_training_checkpoint_reads_the_weights_it_loads_alone(tmp_path, official_sd, fmt):
    """Of a training checkpoint (raw weights, EMA weights, optimizer state: four times the model's
    size) only the weights asked for are read: the peak memory of a fresh process loading it grows by
    those weights, not by the file (all of it was read: FlowAR-S's 2.9 GB at the peak against 0.9,
    FlowAR-H's 31 GB where 7.65 fit)."""
    import subprocess
    import sys
    p = tmp_path / f"checkpoint-last.{fmt}"
    raw = {k: v + 1 if v.is_floating_point() else v for k, v in official_sd.items()}
    state = {"exp_avg": torch.randn(8 << 20), "exp_avg_sq": torch.rand(8 << 20)}          # 64 MB
    if fmt == "pth":
        _write(p, fmt, {"model": raw, "model_ema": official_sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4),
                        "optimizer": {"state": {0: state}, "param_groups": [{"lr": 1e-4, "params": [0]}]}})
    else:
        _write(p, fmt, {"model": raw, "ema": official_sd, "optim": state})
    flat = tmp_path / f"flat.{fmt}"                   # the same weights alone: what loading them costs here
    torch.save(official_sd, flat) if fmt == "pth" else save_file({k: v.contiguous() for k, v in official_sd.items()}, flat)

    def grown(path, which):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path), which], capture_output=True, text=True,
                             check=True).stdout.split()
        if out[0] == "unsupported":
            pytest.skip("this kernel does not reset the peak of resident memory")
        return int(out[0]) * 1024
    alone = grown(flat, "ema")
    for use_ema, want in ((True, official_sd), (False, raw)):
        model, ck = load_model(p, preset="tiny", use_ema=use_ema)
        assert ck.source == ("model_ema" if use_ema else "model") and _same(model, want)
        got = grown(p, "ema" if use_ema else "raw")
        assert got < alone + (16 << 20), (got, alone, p.stat().st_size)      # (the file: 64 MB more)


@pytest.mark.parametrize("mapped", [False, True])
def test_a_checkpoint_read_in_parts_gives_what_torch_load_gives(tmp_path, mapped, monkeypatch):
    """Tensors that share a storage (views at an offset, transposed), bf16, int64, empty and 0-d ones, a
    negated view (the imaginary part of a conjugate), a Parameter, one tensor under two names: read from their records (or mapped,
    as the export reads them), each equals torch.load's (kind, dtype, shape, strides, values); so in a
    file another zip tool wrote, and in one whose pickle names its equal-sized storages in another order
    than their records (each was read from the record of another: weights swapped in silence); a
    sparse tensor beside the weights leaves them readable. A safetensors file's: safetensors' own."""
    import zipfile
    base = torch.randn(6, 5)
    sd = {"w": base, "wt": base[2:].t(), "row": base[3], "h": torch.randn(3, 4).bfloat16(), "i": torch.arange(7),
          "e": torch.empty(0, 3), "s": torch.tensor(2.5), "neg": torch.tensor([1 + 2j, 3 + 4j]).conj().imag,
          "p": torch.nn.Parameter(torch.randn(3))}
    sd["tied"] = sd["h"]                                   # (one tensor under two names, as tied weights are)
    torch.save({"model_ema": sd, "optimizer": {"state": {0: {"exp_avg": torch.randn(100)}}}}, tmp_path / "c.pth")
    torch.save({"model_ema": sd, "optimizer": {"sparse": torch.eye(3).to_sparse()}}, tmp_path / "sparse.pth")
    with zipfile.ZipFile(tmp_path / "c.pth") as src, zipfile.ZipFile(tmp_path / "z.pth", "w") as dst:
        for info in src.infolist():                      # (written again by another zip tool: its records elsewhere)
            dst.writestr(info.filename, src.read(info.filename))
    torch.save({"model_ema": {f"a{i}": torch.full((4,), float(i)) for i in range(3)}}, tmp_path / "s.pth")
    raw = (tmp_path / "s.pth").read_bytes()
    with zipfile.ZipFile(tmp_path / "s.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    k1, k2 = pkl.index(b"X\x01\x00\x00\x001"), pkl.index(b"X\x01\x00\x00\x002")    # the keys of a1's and a2's storages
    swapped = bytearray(pkl)
    swapped[k1 + 5], swapped[k2 + 5] = ord("2"), ord("1")
    at = raw.find(pkl)
    (tmp_path / "s.pth").write_bytes(raw[:at] + bytes(swapped) + raw[at + len(pkl):])
    import flowar.model.readers as readers
    real, whole = readers._load, []
    monkeypatch.setattr(readers, "_load", lambda path, mmap: (whole.append(path.name) if not mmap else None,
                                                               real(path, mmap))[1])
    for name in ("c.pth", "z.pth", "sparse.pth", "s.pth"):
        got = read_checkpoint(tmp_path / name, mapped=mapped).state_dict
        assert (name in whole) == (name == "sparse.pth"), (name, whole)   # (read in parts: the path under test)
        want = torch.load(tmp_path / name, weights_only=True)["model_ema"]
        assert set(got) == set(want)
        for k in want:
            assert type(got[k]) is type(want[k]) and got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            assert got[k].stride() == want[k].stride() and torch.equal(got[k], want[k]), (name, k)
        assert name == "s.pth" or got["wt"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    assert got["a1"][0] == 2 and got["a2"][0] == 1                          # (s.pth: the pickle names them so)
    flat = {k: v.detach().clone(memory_format=torch.contiguous_format).resolve_neg().resolve_conj() for k, v in sd.items()}
    flat["u16"] = torch.arange(5).to(torch.uint16)
    save_file(flat, tmp_path / "c.safetensors")
    got, want = read_checkpoint(tmp_path / "c.safetensors", mapped=mapped).state_dict, load_file(tmp_path / "c.safetensors")
    assert set(got) == set(want) and all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
                                         and torch.equal(got[k], want[k]) for k in want)


def test_what_a_checkpoint_reader_does_not_take_is_named(tmp_path):
    """A state dict with int keys was an AttributeError; a safetensors dtype the reader does not take was
    "a header entry that does not describe its bytes", and one in the optimizer state (never read)
    refused the whole file."""
    torch.save({0: torch.ones(2), 1: torch.ones(2)}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="a flat state dict.*int.pth holds keys"):
        read_checkpoint(tmp_path / "int.pth")
    (tmp_path / "notes.pth").write_text("hello world\n")        # (it was "truncated or corrupt: KeyError: 101")
    with pytest.raises(CheckpointError, match=r"torch.save's zip, or its older pickle\); got .*notes.pth, a file "
                                              r"beginning b'hello wo'. Fix: pass the checkpoint file"):
        read_checkpoint(tmp_path / "notes.pth")
    import struct
    for name, other in (("ema", "optim"), ("optim", "ema")):
        header = json.dumps({"__metadata__": {"format": "flowar-train-v1"},
                             f"{name}.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             f"{other}.x": {"dtype": "C128", "shape": [1], "data_offsets": [8, 24]}}).encode()
        (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
        if name == "ema":
            assert torch.equal(read_checkpoint(tmp_path / "t.safetensors").state_dict["w"], torch.zeros(2))
            continue
        with pytest.raises(CheckpointError, match="tensor 'ema.x' of dtype C128, which this reader does not take"):
            read_checkpoint(tmp_path / "t.safetensors")


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_tensor_larger_than_its_record_is_refused_as_corrupt(tmp_path, which):
    """A .pth whose pickle gives a tensor more elements than its storage's record holds (a damaged or
    crafted file): refused in one line, not loaded with the bytes that follow the record (the last
    record: the records' places are as torch.save wrote them; the first: every later one moves)."""
    import zipfile
    six = torch.arange(6, dtype=torch.float32)
    sd = {"a": six, "b": torch.full((4,), 7.0)} if which == "first" else {"b": torch.full((4,), 7.0), "a": six}
    torch.save(sd | {"c": torch.zeros(256)} if which == "first" else sd, tmp_path / "ok.pth")
    raw = (tmp_path / "ok.pth").read_bytes()
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    bad = pkl.replace(b"K\x06t", b"K\x07t").replace(b"K\x06\x85", b"K\x07\x85")   # a's storage and shape: 6 -> 7
    assert len(bad) == len(pkl) and bad.count(b"K\x07") == 2
    at = raw.find(pkl)
    (tmp_path / "bad.pth").write_bytes(raw[:at] + bad + raw[at + len(pkl):])         # (in place: torch checks no CRC)
    with pytest.raises(CheckpointError, match="bad.pth cannot be read .*truncated or corrupt"):
        read_checkpoint(tmp_path / "bad.pth")


def test_training_checkpoint_prefers_ema(tmp_path, official_sd):
    raw = {k: v + 1 for k, v in official_sd.items()}
    p = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": official_sd, "epoch": 3,
                "args": argparse.Namespace(model="flowar_small", lr=1e-4)}, p)
    model, ck = load_model(p, preset="tiny")
    assert ck.source == "model_ema" and _same(model, official_sd)
    model, ck = load_model(p, preset="tiny", use_ema=False)
    assert ck.source == "model" and _same(model, raw)
    # --raw-weights on a file of one set of weights is refused, not ignored (it loaded those weights)
    flat, ema_only, st = tmp_path / "flat.pth", tmp_path / "ema.pth", tmp_path / "w.safetensors"
    torch.save(official_sd, flat)
    torch.save({"model_ema": official_sd}, ema_only)
    save_file({k: v.contiguous() for k, v in official_sd.items()}, st)
    for f, source in ((flat, "flat"), (ema_only, "model_ema"), (st, "safetensors")):
        with pytest.raises(CheckpointError, match="--raw-weights with a training checkpoint"):
            load_model(f, preset="tiny", use_ema=False)
        model, ck = load_model(f, preset="tiny")
        assert ck.source == source and _same(model, official_sd), f


def test_ddp_prefix_is_stripped(tmp_path, official_sd):
    p = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in official_sd.items()}}, p)
    model, _ = load_model(p, preset="tiny")
    assert _same(model, official_sd)


def test_a_lightning_checkpoint_loads_its_state_dict(tmp_path, official_sd):
    """PyTorch Lightning's {"state_dict": {"model.<name>": ...}, "epoch": ...} was refused ("holds keys
    ['epoch', 'global_step', 'state_dict']") with no way to convert named: its weights load as they are."""
    p = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in official_sd.items()}, "epoch": 3, "global_step": 9}, p)
    model, ck = load_model(p, preset="tiny")
    assert ck.source == "state_dict" and _same(model, official_sd)
    torch.save({"state_dict": {"model._orig_mod." + k: v for k, v in official_sd.items()}}, p)   # (compiled inside)
    assert _same(load_model(p, preset="tiny")[0], official_sd)
    assert load_model(p, preset="tiny", use_ema=False)[1].source == "state_dict"      # (its one set: not refused)


def test_a_file_without_a_config_is_told_what_to_pass(tmp_path, official_sd):
    """A state dict saved alone said "official files carry none" of the user's own file; a VAE's weights
    given as the model were told to pass the config it was trained with."""
    p = tmp_path / "mine.pth"
    torch.save({k: v[..., :1] if v.ndim else v for k, v in official_sd.items()}, p)      # (fits no preset)
    with pytest.raises(ConfigError, match=r"an official file or a state dict saved alone carries none.*Fix: pass the "
                                          r"--config JSON it was trained with$"):
        load_model(p)
    vae = tmp_path / "vae.safetensors"
    save_file({"post_quant_conv.weight": torch.zeros(4, 4, 1, 1), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
              str(vae))
    with pytest.raises(ConfigError, match=r"Fix: it holds a VAE: pass it as --vae$"):
        load_model(vae)


def test_own_safetensors_describes_itself(tmp_path, official_sd):
    p = tmp_path / "mine.safetensors"
    save_checkpoint(p, official_sd, PRESETS["tiny"], class_names=[f"c{i}" for i in range(1000)])
    model, ck = load_model(p)                       # no preset, no config
    assert ck.config == PRESETS["tiny"] and ck.class_names[3] == "c3" and _same(model, official_sd)
    with pytest.raises(ConfigError, match="describes itself"):
        load_model(p, preset="flowar-s")


def test_official_file_without_config_names_the_fitting_preset(fixtures_dir):
    with pytest.raises(ConfigError, match="--preset tiny"):
        load_model(fixtures_dir / "tiny_v1.safetensors")


def test_wrong_preset_names_keys_and_the_preset_that_fits(fixtures_dir):
    with pytest.raises(CheckpointError) as e:
        load_model(fixtures_dir / "tiny_v1.safetensors", preset="flowar-s")
    msg = str(e.value)
    assert "encoder_pos_embed_learned is [1, 341, 64]" in msg and "[1, 341, 768]" in msg and "--preset tiny" in msg


def test_other_architecture_is_refused(tmp_path):
    p = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, str(p))
    with pytest.raises(CheckpointError, match="missing encoder_pos_embed_learned"):
        load_model(p, preset="tiny")


def test_missing_empty_truncated_corrupt(tmp_path, fixtures_dir):
    with pytest.raises(CheckpointError, match="no file"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pth")
    data = (fixtures_dir / "tiny_v1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.safetensors")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pth")
    raw = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "junk.pth")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, p)
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert not marker.exists()
    for f in (p, tmp_path / "legacy.pth"):
        with pytest.raises(CheckpointError, match="pickled code"):
            read_checkpoint(f)
    assert not marker.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask, mode):
    from flowar.io.files import atomic_write_bytes
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out.bin", lambda tmp: open(tmp, "wb").write(b"x"))
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == mode


# ---- precisions, malformed inputs and the messages that name their cause ----------------------

def _tokens(path, **kw):
    from flowar import FlowARPipeline
    with FlowARPipeline.from_pretrained(path, preset="tiny", **kw) as pipe:
        pipe.set_progress_bar_config(disable=True)
        return pipe([0, 7], seed=1, num_inference_steps=4, output_type="latent").images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_precisions_sample_as_their_values_in_float32(tmp_path, official_sd, dtype):
    """A checkpoint saved in fp16/bf16/float64 samples exactly as float32 weights holding the same
    values (rounded through that precision here, not by the loader)."""
    low = {k: v.to(dtype).contiguous() for k, v in official_sd.items()}
    rounded = {k: v.to(dtype).to(torch.float32).contiguous() for k, v in official_sd.items()}
    save_file(low, str(tmp_path / "low.safetensors"))
    save_file(rounded, str(tmp_path / "rounded.safetensors"))
    torch.save(low, tmp_path / "low.pth")
    want = _tokens(tmp_path / "rounded.safetensors")
    assert torch.equal(_tokens(tmp_path / "low.safetensors"), want)
    assert torch.equal(_tokens(tmp_path / "low.pth"), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_non_float_tensor_is_one_line_naming_it(tmp_path, official_sd, dtype):
    sd = dict(official_sd, **{"class_emb.weight": official_sd["class_emb.weight"].to(dtype)})
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=f"class_emb.weight is {dtype}") as e:
        load_model(tmp_path / "w.safetensors", preset="tiny")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "quantized"])
def test_a_sparse_or_quantized_tensor_is_one_line_naming_it(tmp_path, official_sd, kind):
    """Weights-only loading takes them, and the model failed in its first layer with a traceback."""
    w = official_sd["class_emb.weight"]
    odd = {"sparse_coo": w.to_sparse(), "sparse_csr": w.to_sparse_csr(),
           "quantized": torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)}[kind]
    torch.save(dict(official_sd, **{"class_emb.weight": odd}), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=f"class_emb.weight in .*w.pth is a (torch.)?{kind} tensor") as e:
        load_model(tmp_path / "w.pth", preset="tiny")
    assert "\n" not in str(e.value) and "dense" in str(e.value)


def test_class_names_must_name_every_class(tmp_path, official_sd):
    p = tmp_path / "named.safetensors"
    save_checkpoint(p, official_sd, PRESETS["tiny"], class_names=["a", "b"])
    with pytest.raises(CheckpointError, match=r"one per class \(1000 of them\); got 2 names"):
        load_model(p)



def test_class_names_no_request_could_name_are_not_saved(tmp_path, official_sd):
    """A checkpoint's names are how requests name classes: an empty one is refused where one is
    written; a name two classes share is kept (ImageNet's own hold "crane" twice, and "Cardigan",
    the corgi, and "cardigan", the sweater), and a request that matches both is told both ids."""
    from flowar.errors import FlowARError
    from flowar.sampling.labels import ClassNames, imagenet
    three = PRESETS["tiny"].replace(num_classes=3)
    for names, got in ((["a", " ", "b"], "' '"), (["a", "", "b"], "''"), (["a", None, "b"], "None")):
        with pytest.raises(FlowARError, match="expected class names") as e:
            save_checkpoint(tmp_path / "n.safetensors", official_sd, three, class_names=names)
        assert got in str(e.value) and not (tmp_path / "n.safetensors").exists()
    save_checkpoint(tmp_path / "in1k.safetensors", official_sd, PRESETS["tiny"], class_names=list(imagenet().display))
    assert load_model(tmp_path / "in1k.safetensors")[1].class_names[264] == "Cardigan"
    # (the fix named "a longer name", which ImageNet's two cranes do not have: the ids it takes)
    with pytest.raises(FlowARError, match="names one class; got 'Dog', which names 1 \\(dog\\); 2 \\(Dog\\). Fix: pass "
                                          "its class id: 1 or 2$"):
        ClassNames(["cat, big", "dog", "Dog"]).lookup("Dog")


def test_a_file_whose_metadata_contradicts_its_weights_says_so(tmp_path, official_sd):
    p = tmp_path / "self.safetensors"
    save_checkpoint(p, official_sd, PRESETS["tiny"].replace(num_classes=10))
    with pytest.raises(CheckpointError, match="do not match the config in its metadata") as e:
        load_model(p)
    assert "--preset" not in e.value.fix and "--config" not in e.value.fix


def test_raw_weights_of_a_training_file_without_them(tmp_path, official_sd):
    p = tmp_path / "train.safetensors"
    save_file({"ema." + k: v.contiguous() for k, v in official_sd.items()}, str(p),
              metadata={"format": "flowar-train-v1"})
    with pytest.raises(CheckpointError, match=r"no model\.\* weights in train.safetensors. Fix: drop --raw-weights"):
        read_checkpoint(p, use_ema=False)


def test_corrupt_pickles_unsafe_globals_and_whole_modules_are_told_apart(tmp_path):
    import random
    (tmp_path / "random.pth").write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(CheckpointError, match="a file beginning .*if it is one, it is damaged") as e:
        read_checkpoint(tmp_path / "random.pth")
    assert "pickled code" not in str(e.value)
    (tmp_path / "random.pth").write_bytes(b"\x80" + random.Random(0).randbytes(5000))     # (a pickle's first byte)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        read_checkpoint(tmp_path / "random.pth")
    assert "pickled code" not in str(e.value) and "Unsupported operand" in str(e.value)
    torch.save({"x": _Payload(str(tmp_path / "pwned"))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"asks to run pickled code \(the global io.open\)"):
        read_checkpoint(tmp_path / "evil.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"torch.nn.modules.linear.Linear.*save model.state_dict\(\)"):
        read_checkpoint(tmp_path / "m.pth")


@pytest.mark.parametrize("suffix, reader", [(".pth", "torch.load"), (".safetensors", "flowar.io.tensors.open")])
def test_what_the_os_said_is_said(tmp_path, official_sd, monkeypatch, suffix, reader):
    """A file the OS will not open (as root, permissions do not stop a read: the OS's refusal is
    stood in for) is not called corrupt."""
    p = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(official_sd, str(p))
    else:
        torch.save(official_sd, p)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(p))
    module, name = reader.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, refuse, raising=False)   # (open: the reader's own)
    with pytest.raises(CheckpointError, match="Permission denied. Fix: check the path and its permissions"):
        read_checkpoint(p)


def test_paths_that_are_not_utf8_or_not_regular_files(tmp_path, fixtures_dir):
    p = tmp_path / os.fsdecode(b"bad\xffname.safetensors")
    p.write_bytes((fixtures_dir / "tiny_v1.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="not valid UTF-8. Fix: rename"):
        read_checkpoint(p)
    with pytest.raises(CheckpointError, match="/dev/null is not a regular file"):
        read_checkpoint("/dev/null")


def test_torch_and_diffusers_print_nothing_before_the_one_line(tmp_path, fixtures_dir, capfd):
    import pickle
    import warnings

    from flowar.errors import FlowARError
    from flowar.model.vae import convert_mar_checkpoint, load_vae
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"w": [1.0]}, f, protocol=4)
    folder = tmp_path / "vae"
    convert_mar_checkpoint(fixtures_dir / "mar_vae_tiny.ckpt").autoencoder.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_checkpoint(tmp_path / "plain.pth")
        # (diffusers' "no file named diffusion_pytorch_model.bin" named the other file)
        with pytest.raises(FlowARError, match=r"with its weights \(diffusion_pytorch_model.safetensors\); got .*vae holds "
                                              r"config.json without them"):
            load_vae(folder)
        bin_only = tmp_path / "vae_bin"                  # (a folder of diffusers' older weights file still loads)
        convert_mar_checkpoint(fixtures_dir / "mar_vae_tiny.ckpt").autoencoder.save_pretrained(bin_only,
                                                                                                safe_serialization=False)
        assert sorted(p.name for p in bin_only.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
        load_vae(bin_only)
        with pytest.raises(FlowARError, match="config.json holds a JSON object.*got a JSON list"):
            load_vae(listed)
    assert [str(w.message) for w in seen] == [] and capfd.readouterr() == ("", "")


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("decoder.conv_norm_out.bias"), "missing decoder.conv_norm_out.bias"),
    (lambda sd: sd.update({"decoder.extra": torch.zeros(1)}), "unexpected decoder.extra"),
])
def test_a_vae_folder_missing_a_tensor_is_refused(tmp_path, fixtures_dir, edit, needle):
    """diffusers fills a missing tensor with its initial value (wrong images, exit 0)."""
    from flowar.errors import FlowARError
    from flowar.model.vae import convert_mar_checkpoint, load_decoder, load_vae
    folder = tmp_path / "vae"
    convert_mar_checkpoint(fixtures_dir / "mar_vae_tiny.ckpt").autoencoder.save_pretrained(folder)
    weights = str(folder / "diffusion_pytorch_model.safetensors")
    sd = load_file(weights)
    edit(sd)
    save_file(sd, weights)
    for load in (load_vae, load_decoder):        # (load_decoder: what flowar-run --vae opens)
        with pytest.raises(FlowARError, match=needle):
            load(folder)
        # a file of the folder given for it: the folder is what to pass (it was "a checkpoint ending in ...")
        with pytest.raises(FlowARError) as e:
            load(folder / "config.json")
        assert str(e.value) == (f"expected a VAE: MAR's kl16.ckpt or a diffusers folder with config.json; got "
                                f"{folder / 'config.json'}, a file of neither. Fix: pass the folder it is in: --vae {folder}")


# ---- the config's fields --------------------------------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    (dict(ar_width=-64), "ar_width=-64"), (dict(ar_width=0), "ar_width=0"), (dict(head_depth=0), "head_depth=0"),
    (dict(ar_width=64.0), "ar_width=64.0"), (dict(num_classes=True), "num_classes=True"),
    (dict(latent_scale=float("inf")), "latent_scale=inf"), (dict(latent_scale=float("nan")), "latent_scale=nan"),
    (dict(scales=[1, 2, 4, 8.7]), r"scales=\[1, 2, 4, 8.7\]"), (dict(scales=(1, 2, 2)), "scales="),
    (dict(ar_width=1048576, ar_heads=4096), r"ar_width=1048576 \(needs an int in 1..8192\)"),
])
def test_config_fields_are_ints_and_numbers_in_range(bad, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        PRESETS["tiny"].replace(**bad)
    assert "\n" not in str(e.value)


def test_config_bounds_take_every_real_model():
    """The bounds refuse typos, not models: every preset reads back from its JSON, twice FlowAR-H's
    widths and depths build, and the trainer's config for 4096 px images (a 256x256 latent; refused
    by a first bound of 128) too."""
    from flowar.train.trainer import default_config
    for cfg in PRESETS.values():
        assert FlowARConfig.from_dict(cfg.to_dict()) == cfg
    h = PRESETS["flowar-h"]
    h.replace(**{f: 2 * getattr(h, f) for f in ("ar_width", "head_width", "ar_encoder_depth", "ar_decoder_depth",
                                                "head_depth", "ar_mlp_hidden", "head_mlp_hidden")})
    assert default_config(256, 16, 1000, 1.0).scales[-1] == 256
    text = json.dumps(PRESETS["tiny"].to_dict()).replace('"latent_scale": 0.2325', '"latent_scale": 1e400')
    with pytest.raises(ConfigError, match="latent_scale=inf"):            # (JSON's 1e400 reads as inf)
        FlowARConfig.from_json(text)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "c.json").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        FlowARConfig.load(tmp_path / "c.json")


def test_a_vae_folder_without_its_encoder_exports_and_decodes(tmp_path, fixtures_dir):
    """Decoding reads the decoder alone: a folder shipping only it loads for export and the bench
    (decode_only) as it did, and decodes what the whole VAE decodes; training (the encoder) refuses it."""
    from flowar.errors import FlowARError
    from flowar.model.vae import convert_mar_checkpoint, load_vae
    whole = convert_mar_checkpoint(fixtures_dir / "mar_vae_tiny.ckpt")
    folder = tmp_path / "vae"
    whole.autoencoder.save_pretrained(folder)
    weights = str(folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith(("encoder.", "quant_conv."))}, weights)
    z = torch.randn(1, whole.latent_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_vae(folder, decode_only=True).decode(z), whole.decode(z))
    with pytest.raises(FlowARError, match="missing encoder"):
        load_vae(folder)
    # ... and for sampling (load_decoder), also where it hands over to diffusers' loader (weights in .bin)
    from flowar.model.vae import load_decoder
    binned = tmp_path / "binned"
    load_vae(folder, decode_only=True).autoencoder.save_pretrained(binned, safe_serialization=False)
    sd = torch.load(binned / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))},
               binned / "diffusion_pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(load_decoder(binned).decode(z), whole.decode(z))
    sd = load_file(weights)
    del sd["decoder.conv_in.bias"]
    save_file(sd, weights)
    with pytest.raises(FlowARError, match="missing decoder.conv_in.bias"):
        load_vae(folder, decode_only=True)


def test_a_file_trained_with_other_scales_is_told_where_the_position_count_comes_from(fixtures_dir):
    """The official tiny file (scales 1, 2, 4, 8, 16: 341 positions) under a config with scales 1,
    2, 4, 16 (1 + 4 + 16 + 256 = 277): the refusal says where 277 comes from."""
    from dataclasses import replace
    cfg = replace(PRESETS["tiny"], scales=(1, 2, 4, 16))
    with pytest.raises(CheckpointError) as e:
        load_model(fixtures_dir / "tiny_v1.safetensors", config=cfg)
    msg = str(e.value)
    assert "341 positions where the config's scales 1, 2, 4, 16 make 277 (the sum of each side squared: " \
           "1 + 4 + 16 + 256): the file was trained with other scales (scales 1, 2, 4, 8, 16 make 341)" in msg, msg
    from flowar.model.checkpoint import _doubling      # (a count no doubling sides make: none named)
    assert _doubling(85) == [1, 2, 4, 8] and _doubling(1) == [1] and _doubling(35) is None and _doubling(340) is None
