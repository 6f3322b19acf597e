"""The VAE behind FlowAR's latents, on diffusers' ``AutoencoderKL``.

Two sources:

* MAR's KL-16 checkpoint (``kl16.ckpt``: LDM key layout under ``model``): converted key by
  key into an ``AutoencoderKL`` with the same numbers. The layout (base width, channel
  multipliers, which encoder levels carry attention, latent channels) is read from the tensor
  shapes and key names, so the tiny fixture (width 32) and the real file (width 128) both load;
* any diffusers-format folder (``config.json`` + weights), e.g. Stable Diffusion's VAE.

FlowAR tokens are ``latent * latent_scale``; :meth:`VAE.decode` takes the VAE-space latent
(tokens / latent_scale), as the official evaluation does.

diffusers is imported here only, and with the hub switched off: nothing is downloaded. Sampling
does not need it (:func:`load_decoder`: the decoder alone, :mod:`flowar.model.decoder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

from torch import Tensor, nn

from flowar.errors import FlowARError


def diffusers_module():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


@contextlib.contextmanager
def _quiet(diffusers):
    """diffusers' warnings and log lines off around a load: a failure comes back as one line (it
    logged 'An error occurred while trying to fetch ...' before raising, and warned before that)."""
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _key_problems(missing: list[str], unexpected: list[str]) -> str:
    """The first missing and unexpected tensor names (of how many), for a refusal."""
    def first(keys: list[str]) -> str:
        return ", ".join(sorted(keys)[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    return "; ".join(f"{what} {first(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                     if keys)


class VAE(nn.Module):
    """A diffusers ``AutoencoderKL``; ``decode``/``encode`` in [-1, 1] image space."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval()

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def decode(self, latent_BCHW: Tensor) -> Tensor:
        """Image (B, 3, 16h, 16w) from a VAE-space latent (B, C, h, w), in the latent's dtype; the
        decoder computes in its weights' dtype (bf16 for the bf16 engines)."""
        dtype = self.autoencoder.decoder.conv_in.weight.dtype
        return self.autoencoder.decode(latent_BCHW.to(dtype)).sample.to(latent_BCHW.dtype)

    def encode(self, image_B3HW: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of an image in [-1, 1]."""
        dist = self.autoencoder.encode(image_B3HW).latent_dist
        return dist.mean, dist.logvar

    def forward(self, latent_BCHW: Tensor) -> Tensor:
        return self.decode(latent_BCHW)


# ---- MAR / LDM checkpoint conversion ---------------------------------------------------------

def _ldm_layout(sd: dict[str, Tensor]) -> dict:
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    width = sd["encoder.conv_in.weight"].shape[0]
    outs = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    n_res = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    attn_levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))})
    dec_attn = [k for k in sd if re.match(r"decoder\.up\.\d+\.attn\.", k)]
    if dec_attn:
        raise FlowARError("an LDM VAE without attention in the decoder up path (MAR KL-16 layout)",
                          f"decoder attention keys such as {dec_attn[0]}", "convert it to a diffusers folder first")
    return dict(width=width, outs=outs, layers=n_res, attn_levels=attn_levels,
                latent=sd["post_quant_conv.weight"].shape[0], groups=32)


def _convert_ldm(sd: dict[str, Tensor], n_levels: int) -> dict[str, Tensor]:
    """Rename LDM keys to diffusers keys; 1x1-conv attention weights become linear."""
    out = {}
    for k, v in sd.items():
        nk = k
        nk = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", nk)
        nk = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", nk)
        nk = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", nk)
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", nk)
        if m:
            j = n_levels - 1 - int(m.group(1))
            nk = (f"decoder.up_blocks.{j}.resnets.{m.group(3)}" if m.group(2) == "block"
                  else f"decoder.up_blocks.{j}.upsamplers.0.{m.group(3)}")
        nk = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", nk)
        nk = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", nk)
        nk = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", nk)
        nk = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", nk)
        nk = nk.replace(".nin_shortcut.", ".conv_shortcut.")
        if ".attentions." in nk:
            nk = (nk.replace(".norm.", ".group_norm.").replace(".q.", ".to_q.").replace(".k.", ".to_k.")
                  .replace(".v.", ".to_v.").replace(".proj_out.", ".to_out.0."))
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[nk] = v
    return out


def _is_ldm(sd: dict[str, Tensor]) -> bool:
    """Whether a state dict has MAR/LDM's names (``encoder.down.0...``), not diffusers' (``encoder.down_blocks.0...``:
    the weights file of a diffusers folder, whose names it shares otherwise: taken as LDM, it had no levels)."""
    return "encoder.conv_in.weight" in sd and "post_quant_conv.weight" in sd and any(k.startswith("encoder.down.") for k in sd)


def _read_vae_file(p: Path) -> dict:
    """The tensors of a VAE checkpoint file; a file of another kind (a diffusers folder's config.json) is
    refused as a VAE, with the folder to pass (it was "a checkpoint ending in .safetensors ...; rename
    or convert the file")."""
    from flowar.model.checkpoint import _PICKLE_SUFFIXES, read_checkpoint
    if p.suffix not in (".safetensors", *_PICKLE_SUFFIXES):
        folder = p.parent if (p.parent / "config.json").is_file() else None
        raise FlowARError("a VAE: MAR's kl16.ckpt or a diffusers folder with config.json", f"{p}, a file of neither",
                          f"pass the folder it is in: --vae {folder}" if folder else "pass MAR's kl16.ckpt or a "
                          "diffusers VAE folder to --vae")
    return read_checkpoint(p).state_dict


def convert_mar_checkpoint(path: str | Path) -> VAE:
    """An ``AutoencoderKL`` with the numbers of a MAR/LDM KL checkpoint (weights under ``model``)."""
    sd = _read_vae_file(Path(path))
    if not _is_ldm(sd):
        folder = Path(path).parent if (Path(path).parent / "config.json").is_file() else None
        raise FlowARError("a VAE checkpoint in the MAR/LDM layout (encoder.*, decoder.*, quant_conv, post_quant_conv)",
                          f"{Path(path).name} with keys such as {sorted(sd)[:3]}" + (", the weights of a diffusers "
                          "folder" if folder else ""), f"pass the folder it is in: --vae {folder}" if folder else
                          "pass MAR's kl16.ckpt or a diffusers VAE folder to --vae")
    lay = _ldm_layout(sd)
    n = len(lay["outs"])
    down = tuple("AttnDownEncoderBlock2D" if i in lay["attn_levels"] else "DownEncoderBlock2D" for i in range(n))
    ak = diffusers_module().AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=down, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(lay["outs"]), layers_per_block=lay["layers"], latent_channels=lay["latent"],
        norm_num_groups=lay["groups"], sample_size=256)
    conv = _convert_ldm(sd, n)
    try:
        missing, unexpected = ak.load_state_dict(conv, strict=False)
    except RuntimeError as e:               # (same names, other shapes)
        raise FlowARError("a VAE checkpoint whose tensors fit AutoencoderKL's shapes",
                          str(e).splitlines()[-1].strip()[:160], "pass MAR's kl16.ckpt layout") from None
    if missing or unexpected:
        raise FlowARError("a VAE checkpoint whose keys map one to one onto AutoencoderKL",
                          _key_problems(missing, unexpected), "pass MAR's kl16.ckpt layout")
    return VAE(ak)


def load_decoder(path: str | Path, expect_channels: int | None = None) -> VAE:
    """The VAE's decoder alone (what sampling needs), for a KL-16-family VAE without importing
    diffusers (1.4-2.4 s of a fresh process, more than FlowAR-S's decode): MAR's ``kl16.ckpt``, or
    a diffusers folder with safetensors weights, built as :class:`flowar.model.decoder.KLDecoder`
    (the reference's numbers; tests/test_vae.py). ``decode`` only; any other VAE through
    :func:`load_vae`."""
    from flowar.model.checkpoint import skeleton
    from flowar.model.decoder import KLDecoder
    p = Path(path)
    weights = p / "diffusion_pytorch_model.safetensors"
    if p.is_file():
        sd = _read_vae_file(p)
        if not _is_ldm(sd):
            return load_vae(p, expect_channels, decode_only=True)             # (its one-line refusal)
        lay = _ldm_layout(sd)
        n = len(lay["outs"])
        with skeleton():                                     # (its weights come from the file below)
            dec = KLDecoder({"up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": lay["outs"],
                             "layers_per_block": lay["layers"], "latent_channels": lay["latent"],
                             "norm_num_groups": lay["groups"], "out_channels": 3})
        tensors = _convert_ldm(sd, n)
    elif (p / "config.json").is_file() and weights.is_file():
        from safetensors.torch import load_file
        try:
            with skeleton():
                dec = KLDecoder(json.loads((p / "config.json").read_text()))   # another kind: refused
            tensors = load_file(str(weights))
        except Exception:   # noqa: BLE001 - then diffusers' loader (and its error)
            return load_vae(p, expect_channels, decode_only=True)
    else:
        return load_vae(p, expect_channels, decode_only=True)
    want = {k: v for k, v in tensors.items() if k.startswith(("decoder.", "post_quant_conv."))}
    have = dec.state_dict()
    if set(want) != set(have) or any(v.shape != have[k].shape for k, v in want.items()):
        return load_vae(p, expect_channels, decode_only=True)                 # (other names or shapes: diffusers' loader and its error)
    dec.load_state_dict(want, strict=True)
    return _check_channels(VAE(dec), expect_channels, p)


def _check_channels(vae: VAE, expect_channels: int | None, p: Path) -> VAE:
    if expect_channels is not None and vae.latent_channels != expect_channels:
        raise FlowARError(f"a VAE with {expect_channels} latent channels (the FlowAR config's latent_channels)",
                          f"{vae.latent_channels} in {p}", "pass the VAE the model was trained with")
    return vae


def folder_downsample(vae: str | Path) -> int:
    """How much a VAE shrinks an image's side, from a diffusers folder's config.json, read alone (1
    where it does not say, such as MAR's file: its weights say it)."""
    try:
        return 2 ** (len(json.loads((Path(vae) / "config.json").read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def _folder_config(p: Path) -> dict:
    """A diffusers folder's config.json, refused unless it is a JSON object before diffusers reads it
    (it takes anything else for a model name to fetch from the hub)."""
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FlowARError("a diffusers VAE folder (config.json + weights)", f"{p} without config.json",
                          "pass the folder that holds config.json (for SD: the 'vae' subfolder)")
    try:
        d = json.loads(cfg.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:          # (not UTF-8, not JSON, unreadable)
        raise FlowARError("a diffusers VAE folder whose config.json is readable UTF-8 JSON",
                          f"{cfg}: {str(e)[:160]}", "restore the folder's config.json") from None
    if not isinstance(d, dict):
        raise FlowARError("a diffusers VAE folder whose config.json holds a JSON object (AutoencoderKL's settings)",
                          f"a JSON {type(d).__name__} in {cfg}", "restore the folder's config.json")
    return d


def _load_folder(p: Path, decode_only: bool = False) -> VAE:
    """An ``AutoencoderKL`` from a diffusers folder whose weights file holds every one of its tensors
    (``decode_only``: every one the decoder reads): diffusers fills a missing one with its initial
    value, which decodes wrong images."""
    _folder_config(p)
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    if not any((p / w).is_file() for w in weights):      # (diffusers named the .bin alone, for a .safetensors lost)
        raise FlowARError(f"a diffusers VAE folder with its weights ({weights[0]})", f"{p} holds "
                          f"{', '.join(sorted(q.name for q in p.iterdir())[:6])} without them",
                          "restore the weights file (or export the VAE again)")
    diffusers = diffusers_module()
    try:
        with _quiet(diffusers):
            ak, info = diffusers.AutoencoderKL.from_pretrained(str(p), local_files_only=True, output_loading_info=True)
    except Exception as e:   # noqa: BLE001
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]   # (a state_dict error's first line
        msg = " ".join(lines[:2]) or type(e).__name__                      # is its title, the detail below)
        raise FlowARError("a loadable diffusers AutoencoderKL folder", f"{p}: {msg[:240]}",
                          "check that the folder holds config.json and the weights file it describes") from e
    missing = [k for k in info.get("missing_keys") or [] if not decode_only or k.startswith(DECODER_KEYS)]
    problems = _key_problems(missing, info.get("unexpected_keys") or [])
    if problems:
        raise FlowARError(f"a diffusers VAE folder whose weights hold every {'decoder' if decode_only else 'AutoencoderKL'}"
                          " tensor and no other",
                          f"{p}: {problems}", "restore the folder's weights file (or export the VAE again)")
    return VAE(ak)


DECODER_KEYS = ("decoder.", "post_quant_conv.")      # what decoding reads (a folder may ship the decoder alone)


def load_vae(path: str | Path, expect_channels: int | None = None, decode_only: bool = False) -> VAE:
    """Load a VAE from a MAR/LDM checkpoint file or a diffusers folder (the whole AutoencoderKL:
    every encoder and decoder tensor must be in the file; ``decode_only``: every decoder tensor, for
    an export or a bench that only decodes)."""
    p = Path(path)
    if not p.exists():
        raise FlowARError("a VAE: MAR's kl16.ckpt or a diffusers folder with config.json",
                          f"nothing at {p}", "check the --vae path")
    vae = _load_folder(p, decode_only) if p.is_dir() else convert_mar_checkpoint(p)
    return _check_channels(vae, expect_channels, p)
