"""The VAE loaders against MAR's recorded numbers and a diffusers round trip."""

import pytest
import torch
from safetensors.torch import load_file

from flowar.errors import FlowARError
from flowar.vae import load_vae


def test_mar_checkpoint_converts_with_the_same_numbers(fixtures_dir):
    vae = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16)
    io = load_file(str(fixtures_dir / "mar_vae_tiny_io.safetensors"))
    with torch.no_grad():
        img = vae.decode(io["decode.latent"])
        mean, logvar = vae.encode(io["encode.image"])
    assert (img - io["decode.image"]).abs().max().item() <= 1e-5
    assert (mean - io["encode.mean"]).abs().max().item() <= 1e-5
    assert (logvar - io["encode.logvar"]).abs().max().item() <= 1e-5


def test_wrong_latent_channels_are_refused(fixtures_dir):
    with pytest.raises(FlowARError, match="4 latent channels"):
        load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=4)


def test_diffusers_folder_round_trip(tmp_path):
    """An SD-style VAE folder (4 latent channels, 8x down) saved by diffusers loads with the same outputs."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        sample_size=32).eval()
    ref.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae", expect_channels=4)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
        assert torch.equal(vae.encode(x)[0], z)
        assert torch.equal(vae.decode(z), ref.decode(z).sample)
    assert vae.downsample == 8


def test_missing_and_wrong_vae_paths(tmp_path, fixtures_dir):
    with pytest.raises(FlowARError, match="nothing at"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FlowARError, match="config.json"):
        load_vae(tmp_path / "empty_dir")
    with pytest.raises(FlowARError, match="MAR/LDM layout"):
        load_vae(fixtures_dir / "tiny_v1.safetensors")
