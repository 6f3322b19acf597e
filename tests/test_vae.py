"""The VAE loaders against MAR's recorded numbers and a diffusers round trip."""

import re
from pathlib import Path

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
    # a config.json that does not match its weights: the mismatch is in the line (it ended at the title,
    # "Error(s) in loading state_dict for AutoencoderKL:.")
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "default" / "vae", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"latent_channels": cfg["latent_channels"] * 2}))
    with pytest.raises(FlowARError, match="for AutoencoderKL: size mismatch for encoder") as e:
        load_vae(bad)
    assert "\n" not in str(e.value)


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


def test_a_checkpoint_opened_for_sampling_decodes_without_diffusers_with_its_numbers(fixtures_dir):
    """What sampling from a checkpoint decodes with (load_decoder: the decoder alone, no diffusers
    import, 1.4-2.4 s of a fresh process) against diffusers' AutoencoderKL (load_vae, the
    reference): the same float32 numbers bit for bit, for MAR's KL layout and the shipped default
    model's diffusers folder; and a fresh process that opens a checkpoint with its VAE and samples
    images never imports diffusers."""
    import subprocess
    import sys

    from conftest import DEFAULT_VAE
    from flowar.model.vae import load_decoder
    torch.manual_seed(0)
    for path, channels in ((fixtures_dir / "mar_vae_tiny.ckpt", 16), (DEFAULT_VAE, None)):
        ours, ref = load_decoder(path, channels), load_vae(path, channels)
        assert type(ours.autoencoder).__name__ == "KLDecoder"
        assert (ours.latent_channels, ours.downsample) == (ref.latent_channels, ref.downsample)
        z = torch.randn(2, ref.latent_channels, 4, 4)
        with torch.no_grad():
            assert torch.equal(ours.decode(z), ref.decode(z)), path
    with pytest.raises(FlowARError, match="latent channels"):
        load_decoder(fixtures_dir / "mar_vae_tiny.ckpt", expect_channels=4)
    code = (f"import sys; from flowar.runtime.runtime import Runtime\n"
            f"with Runtime.open_checkpoint({str(fixtures_dir / 'tiny_v1.safetensors')!r}, "
            f"config={str(fixtures_dir / 'tiny_v1.config.json')!r}, vae={str(fixtures_dir / 'mar_vae_tiny.ckpt')!r}) as rt:\n"
            f"    r = rt.sample([0, 1], rt.schedule(), seed=0)\n"
            f"print(tuple(r.images.shape), sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.endswith("[]") and out.startswith("(2, 3, "), out


def test_the_weights_file_of_a_vae_folder_is_told_to_pass_the_folder(tmp_path):
    """--vae .../vae/diffusion_pytorch_model.safetensors (the file, not its folder) was a traceback in
    flowar-train and flowar-export (IndexError: its names were taken as MAR's, with no levels) and, in
    flowar-run, a line about up blocks and --auto-candidates: now one line naming the folder."""
    from click.testing import CliRunner

    from flowar.commands.cli import export_cmd, run, train_cmd
    from flowar.model.vae import load_decoder
    folder = Path(__file__).resolve().parents[1] / "models" / "default" / "vae"
    ckpt = folder.parent / "flowar.safetensors"
    weights = folder / "diffusion_pytorch_model.safetensors"
    for load in (load_vae, load_decoder):
        with pytest.raises(FlowARError, match=rf"the weights of a diffusers folder\. Fix: pass the folder it is in: "
                                              rf"--vae {re.escape(str(folder))}$"):
            load(weights)
    from PIL import Image
    for name in ("a", "b"):                 # (a data folder of its own: CI installs no Animal-MNIST)
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 200, 0, 0)).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "out"
    for cmd, args in ((run, ["--ckpt", str(ckpt), "--labels", "1", "--out", str(out / "a.png")]),
                      (export_cmd, ["--ckpt", str(ckpt), "--out", str(out / "e")]),
                      (train_cmd, ["--out", str(out / "t"), "--steps", "2", "--data", str(tmp_path / "data"),
                                   "--batch", "2"])):
        res = CliRunner().invoke(cmd, args + ["--vae", str(weights)])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and f"--vae {folder}" in res.output, res.output
    assert not out.exists()                                              # nothing written
