"""The default model that ships in models/default: loads, exports, and the runtime matches eager."""

from pathlib import Path

import pytest
import torch

from flowar.build import build_engine_dir
from flowar.images import psnr
from flowar.run import run_sampling

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "default" / "flowar.safetensors"
VAE = ROOT / "models" / "default" / "vae"
CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@pytest.fixture(scope="module")
def eager():
    from flowar.checkpoint import load_model
    from flowar.stages import TorchStages
    from flowar.vae import load_vae
    model, ck = load_model(CKPT)
    vae = load_vae(VAE, expect_channels=ck.config.latent_channels)
    return model, ck, TorchStages(model, vae.decode)


def test_shipped_files_describe_themselves(eager):
    model, ck, _ = eager
    assert ck.class_names == CLASSES and ck.config.num_classes == 10
    assert ck.config.scales == (1, 2, 4, 8) and ck.config.latent_channels == 4
    assert CKPT.stat().st_size + sum(p.stat().st_size for p in VAE.iterdir()) < 30e6


@pytest.mark.slow
def test_onnx_runtime_matches_eager_at_45_db_and_fp16_runs(eager, tmp_path):
    model, ck, stages = eager
    labels = [0, 4, 6, 9]
    kw = dict(steps=25, cfg=4.3, guidance=0.9, seed=7, decode=True)
    with torch.inference_mode():
        ref = run_sampling(stages, ck.config, labels, **kw)
    from flowar.runtime.load import open_engine_dir
    rep = build_engine_dir(CKPT, tmp_path / "fp32", vae_path=VAE, max_batch=4)
    assert all(c.worst <= 1e-4 for c in rep.checks), rep.checks
    with open_engine_dir(tmp_path / "fp32", "ort") as rt:
        got = run_sampling(rt.stages, rt.config, labels, **kw)
    assert (got.tokens - ref.tokens).abs().max().item() <= 1e-3
    p32 = psnr(got.images, ref.images)
    assert p32 >= 45.0, p32
    build_engine_dir(CKPT, tmp_path / "fp16", vae_path=VAE, max_batch=4, precision="fp16", verify=False)
    with open_engine_dir(tmp_path / "fp16", "ort") as rt:
        half = run_sampling(rt.stages, rt.config, labels, **kw)
    p16 = psnr(half.images, got.images)
    print(f"\nPSNR ORT fp32 vs eager: {p32:.1f} dB; ORT fp16 vs ORT fp32: {p16:.1f} dB")
    assert torch.isfinite(half.images).all() and p16 > 15.0
