"""Checkpoint formats, and refusal of what must not load."""

import argparse
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowar.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from flowar.config import PRESETS
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
    # the legacy (pre-zip) format, which cannot be memory-mapped: read into memory (it was refused as corrupt)
    torch.save(official_sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model, ck = load_model(tmp_path / "legacy.pth", preset="tiny")
    assert ck.source == "flat" and _same(model, official_sd)


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
    for f in (flat, ema_only, st):
        with pytest.raises(CheckpointError, match="--raw-weights with a training checkpoint"):
            load_model(f, preset="tiny", use_ema=False)
        assert load_model(f, preset="tiny")[1].source in ("flat", "model_ema", "safetensors")


def test_ddp_prefix_is_stripped(tmp_path, official_sd):
    p = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in official_sd.items()}}, p)
    model, _ = load_model(p, preset="tiny")
    assert _same(model, official_sd)


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
