"""The KL VAE's decoder without diffusers: what an engine directory's eager PyTorch decoder runs.

diffusers' ``AutoencoderKL`` is the reference (:mod:`flowar.model.vae` loads every VAE into it);
importing diffusers costs a fresh process 2.1-2.4 s (1.2 s of it ``torch._dynamo``, which its
utilities import), more than the decoder computes per image. This module builds the same decoding
path from the ``AutoencoderKL`` config an engine directory records: the same layers under the same
names (so the directory's weights file assigns onto it), the same operations in the same order
(so it gives the reference's numbers; tested against it in float64).

Only what the KL-16 family uses: ``UpDecoderBlock2D`` up blocks, the mid block's one attention,
GroupNorm + SiLU, no time embedding; anything else is refused with one line.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowar.errors import FlowARError

EPS = 1e-6


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice; the input (1x1-projected where the width changes) added."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x_BCHW) if self.conv_shortcut is not None else x_BCHW
        return skip + h              # (the reference then divides by its output scale, 1.0: exact, skipped)


class Attention(nn.Module):
    """One head over every pixel (the mid block's), GroupNorm first, the input added back."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        h_BLC = x_BCHW.view(B, C, H * W).transpose(1, 2)
        h_BLC = self.group_norm(h_BLC.transpose(1, 2)).transpose(1, 2)
        q, k, v = (lin(h_BLC).view(B, -1, 1, C).transpose(1, 2) for lin in (self.to_q, self.to_k, self.to_v))
        a_BLC = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)
        out = self.to_out[0](a_BLC.to(q.dtype)).transpose(-1, -2).reshape(B, C, H, W)
        return out + x_BCHW


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn, res in zip(self.attentions or [None], self.resnets[1:]):
            x = res(attn(x) if attn is not None else x)
        return x


class Upsampler(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsampler(cout)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Decoder(nn.Module):
    def __init__(self, widths: list[int], layers: int, latent: int, groups: int, out: int, attention: bool):
        super().__init__()
        rev = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention)
        self.up_blocks = nn.ModuleList([UpBlock(rev[max(i - 1, 0)], rev[i], layers + 1, groups, i < len(rev) - 1)
                                        for i in range(len(rev))])
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=EPS)
        self.conv_out = nn.Conv2d(widths[0], out, 3, padding=1)

    def forward(self, z_BCHW: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z_BCHW))
        for up in self.up_blocks:
            x = up(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class KLDecoder(nn.Module):
    """``post_quant_conv`` and ``decoder`` of an ``AutoencoderKL`` built from its config (a dict, as
    an engine directory records it); ``decode(z)`` gives the image, as the reference's ``.sample``."""

    def __init__(self, config: dict):
        super().__init__()
        c = dict(config)
        ups = tuple(c.get("up_block_types", ()))
        if (set(ups) != {"UpDecoderBlock2D"} or c.get("act_fn", "silu") != "silu"
                or c.get("norm_type", "group") != "group"):
            raise FlowARError("a KL VAE of UpDecoderBlock2D blocks with GroupNorm and SiLU (the KL-16 family)",
                              f"up blocks {ups}, act_fn {c.get('act_fn')}, norm_type {c.get('norm_type')}",
                              "export with --auto-candidates ort-fp32,aoti-bf16 (engines that need no eager decoder)")
        widths = list(c["block_out_channels"])
        self.config = SimpleNamespace(**c)
        self.post_quant_conv = (nn.Conv2d(c["latent_channels"], c["latent_channels"], 1)
                                if c.get("use_post_quant_conv", True) else None)
        self.decoder = Decoder(widths, c["layers_per_block"], c["latent_channels"], c["norm_num_groups"],
                               c.get("out_channels", 3), c.get("mid_block_add_attention", True))

    def decode(self, z_BCHW: Tensor) -> SimpleNamespace:
        z = self.post_quant_conv(z_BCHW) if self.post_quant_conv is not None else z_BCHW
        return SimpleNamespace(sample=self.decoder(z))

