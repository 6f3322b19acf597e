"""The VAE loaders against MAR's recorded numbers and a diffusers round trip."""

import pytest
import torch
from safetensors.torch import load_file

from flowar.errors import FlowARError
from flowar.model.vae import load_vae


def test_mar_checkpoint_converts_with_the_same_numbers(fixtures_dir):
    """Recorded on one CPU only: the official float32 noise is taken to be the size of ours
    (own = |float32 - float64| of the converted VAE here), so |ours - official| <= 4 x own
    (measured on an AVX-512 Xeon: decode 5.8e-6 with own 4.4e-6; mean 3.1e-6 / 3.7e-6)."""
    from parity import max_abs
    vae = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16)
    vae64 = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16).double()
    io = load_file(str(fixtures_dir / "mar_vae_tiny_io.safetensors"))
    with torch.no_grad():
        img = vae.decode(io["decode.latent"])
        mean, logvar = vae.encode(io["encode.image"])
        img64 = vae64.decode(io["decode.latent"].double())
        mean64, logvar64 = vae64.encode(io["encode.image"].double())
    for ours, ours64, key in ((img, img64, "decode.image"), (mean, mean64, "encode.mean"),
                              (logvar, logvar64, "encode.logvar")):
        assert max_abs(ours, io[key]) <= 4 * max_abs(ours, ours64), (key, max_abs(ours, io[key]), max_abs(ours, ours64))


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


@pytest.mark.parametrize("source", ["mar", "sd"])
def test_the_decoder_without_diffusers_gives_the_reference_numbers(fixtures_dir, source):
    """flowar.model.decoder against diffusers' AutoencoderKL (the reference), built from its config
    and given its decoder's tensors by name, as an engine directory does: float64 within float64
    rounding on MAR's KL layout (attention in the mid block, a 1x1 shortcut where the width changes)
    and an SD-style VAE (4 levels, 2 layers), and in bf16 the same numbers bit for bit (the same
    operations in the same order). Fails with a layer dropped, reordered or misnamed."""
    from diffusers import AutoencoderKL

    from flowar.model.decoder import KLDecoder
    from flowar.runtime.bf16 import bf16_throughout
    torch.manual_seed(0)
    if source == "mar":
        ak = load_vae(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=16).autoencoder
    else:
        ak = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                           layers_per_block=2, sample_size=32).eval()
        with torch.no_grad():                                  # away from the init's zero biases and unit norms
            for p in ak.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    ours = KLDecoder(dict(ak.config))
    ref_sd = {k: v for k, v in ak.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert set(ours.state_dict()) == set(ref_sd)
    ours.load_state_dict(ref_sd)
    z = torch.randn(2, ak.config.latent_channels, 4, 4)
    with torch.no_grad():
        want = ak.double().decode(z.double()).sample
        got = ours.double().decode(z.double()).sample
        assert (got - want).abs().max() <= 1e-12 * want.abs().max(), (got - want).abs().max()
        b_ref, b_ours = bf16_throughout(ak.float()), bf16_throughout(ours.float())
        assert torch.equal(b_ours.decode(z.bfloat16()).sample, b_ref.decode(z.bfloat16()).sample)


def test_a_decoder_of_another_kind_is_refused_in_one_line():
    from flowar.model.decoder import KLDecoder
    with pytest.raises(FlowARError, match="UpDecoderBlock2D"):
        KLDecoder({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "block_out_channels": [32, 64],
                   "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32})
