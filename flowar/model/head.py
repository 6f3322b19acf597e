"""The flow-matching head ("flownet"): a small transformer that predicts the velocity
v = noise - data at time t for every token of one scale, conditioned per position on the AR
semantics (Spatial-adaLN; Block v2 adds cross-attention to those semantics).

Work that is constant within a scale (the condition embedding, RoPE tables, and for v2 the
cross-attention keys and values) is done once by :meth:`FlowHead.prepare`; each ODE step
then calls :meth:`FlowHead.velocity` with that context. ``forward(x, t, cond)`` composes the
two, as the official ``flownet(x, t, cond)`` call does.

Time runs from 1 (noise) to 0 (data). The time embedder sees ``(t * 1000).long()`` computed in
float32: the released models were trained on those integers, and truncating in float64
instead would shift steps such as t = 0.68 from 680 to 679.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowar.config import FlowARConfig
from flowar.model.layers import (RMSNorm, RopeFreqs, SelfAttention, SwiGLU, apply_rope, grid_positions, modulate,
                           rope_tables_from_pos)


def timestep_integers(t_R: Tensor) -> Tensor:
    """(t * 1000) truncated to int64, computed in float32 like the official flownet.

    ``floor`` before the cast: equal to truncation for t >= 0, and exact whatever rounding
    mode an exported graph's Cast uses.
    """
    return (t_R.float() * 1000).floor().long()


class TimestepEmbedder(nn.Module):
    """256-dim sinusoid of the integer timestep (cos half first, max period 10000), then MLP.

    The timestep is an integer in 0..1000, so the sinusoid is a table computed once (with the
    official float32 formula) and gathered. That also keeps exported graphs exact: runtimes
    evaluate cos/sin of arguments near 1000 rad with different float32 range reductions (seen:
    ONNX Runtime vs PyTorch moved the velocity by 1e-4).
    """

    MAX_T = 1000

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.register_buffer("table", self.sinusoid(torch.arange(self.MAX_T + 1), freq_dim), persistent=False)

    @staticmethod
    def sinusoid(t_int: Tensor, freq_dim: int) -> Tensor:
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t_int.device) / half)
        args = t_int[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)              # (T, 256)

    def reset_table(self) -> None:
        """The sinusoid table, recomputed (it is not in state dicts; after a meta-device build)."""
        device = self.mlp[0].weight.device
        self.table = self.sinusoid(torch.arange(self.MAX_T + 1, device=device), self.freq_dim)

    def forward(self, t_int_R: Tensor) -> Tensor:
        return self.mlp(self.table[t_int_R.clamp(0, self.MAX_T)])                  # (R, W)


class CrossAttention(nn.Module):
    """Queries from the head's tokens, keys/values from the AR semantics of the same positions."""

    def __init__(self, dim: int, semantic_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(semantic_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rope = RopeFreqs(self.head_dim)

    def keys_values(self, sem_RNS: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        R, N, _ = sem_RNS.shape
        k, v = self.kv(sem_RNS).view(R, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return apply_rope(k, cos, sin), v                                            # (R, H, N, d)

    def forward(self, x_RNW: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        R, N, W = x_RNW.shape
        q = apply_rope(self.q(x_RNW).view(R, N, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(R, N, W))


class BlockV1(nn.Module):
    """Self-attention + MLP, both modulated per position by ada_lin(SiLU(t + c))."""

    def __init__(self, c: FlowARConfig):
        super().__init__()
        W = self.dim = c.head_width
        self.norm1 = RMSNorm(W)
        self.attn = SelfAttention(W, c.head_heads, qkv_bias=False)
        self.norm2 = RMSNorm(W)
        self.mlp = SwiGLU(W, c.head_mlp_hidden)
        self.ada_lin = nn.Linear(W, 6 * W)

    def forward(self, x: Tensor, t_R1W: Tensor, c_RNW: Tensor, ctx: "HeadContext", i: int) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(F.silu(t_R1W + c_RNW)).chunk(6, dim=-1)
        cos, sin = ctx.rope[i]
        x = x + self.attn(modulate(self.norm1(x), b1, s1), cos, sin) * g1
        return x + self.mlp(modulate(self.norm2(x), b2, s2)) * g2


class BlockV2(nn.Module):
    """Self-attention modulated by t alone, cross-attention to the semantics, MLP modulated by t + c."""

    def __init__(self, c: FlowARConfig):
        super().__init__()
        W = self.dim = c.head_width
        self.norm1 = RMSNorm(W)
        self.attn = SelfAttention(W, c.head_heads, qkv_bias=False)
        self.crossattn = CrossAttention(W, c.ar_width, c.head_heads)
        self.norm2_1 = RMSNorm(W, weight=True)
        self.norm2_2 = RMSNorm(c.ar_width, weight=True)
        self.norm3 = RMSNorm(W)
        self.mlp = SwiGLU(W, c.head_mlp_hidden)
        self.ada_lin_attn = nn.Linear(W, 3 * W)
        self.ada_lin_mlp = nn.Linear(W, 3 * W)

    def forward(self, x: Tensor, t_R1W: Tensor, c_RNW: Tensor, ctx: "HeadContext", i: int) -> Tensor:
        g1, s1, b1 = self.ada_lin_attn(F.silu(t_R1W)).chunk(3, dim=-1)
        g2, s2, b2 = self.ada_lin_mlp(F.silu(c_RNW + t_R1W)).chunk(3, dim=-1)
        cos, sin = ctx.rope[i]
        ccos, csin = ctx.cross_rope[i]
        x = x + self.attn(modulate(self.norm1(x), b1, s1), cos, sin) * g1
        r = x.shape[0]
        x = x + self.crossattn(self.norm2_1(x), ctx.cross_k[i][:r], ctx.cross_v[i][:r], ccos, csin)
        return x + self.mlp(modulate(self.norm3(x), b2, s2)) * g2


@dataclass(slots=True)
class HeadContext:
    """Per-scale constants of the head, computed once by :meth:`FlowHead.prepare`.

    ``c`` is the condition embedding (R, N, W); ``rope``/``cross_rope`` are per-block
    (cos, sin) tables (N, d); ``cross_k``/``cross_v`` (v2 only) are per-block (R, H, N, d).
    Velocity calls may use the first r <= R rows.
    """
    c: Tensor
    rope: list[tuple[Tensor, Tensor]]
    cross_rope: list[tuple[Tensor, Tensor]]
    cross_k: list[Tensor]
    cross_v: list[Tensor]


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowHead(nn.Module):
    def __init__(self, c: FlowARConfig):
        super().__init__()
        self.config = c
        self.time_embed = TimestepEmbedder(c.head_width)
        self.cond_embed = nn.Linear(c.ar_width, c.head_width)
        self.input_proj = nn.Linear(c.latent_channels, c.head_width)
        block = BlockV2 if c.head_block == "v2" else BlockV1
        self.res_blocks = nn.ModuleList(block(c) for _ in range(c.head_depth))
        self.final_layer = FinalLayer(c.head_width, c.latent_channels)

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            if lin.weight.device.type != "meta":
                nn.init.normal_(lin.weight, std=0.02)
        if self.final_layer.linear.weight.device.type != "meta":
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def prepare(self, cond_RNS: Tensor, side: int) -> HeadContext:
        """Per-scale constants for an s x s token map; cond_RNS: (R, N=s*s, ar_width)."""
        return self.prepare_at(cond_RNS, grid_positions(side, cond_RNS.device))

    def prepare_at(self, cond_RNS: Tensor, pos_N2: Tensor) -> HeadContext:
        """As :meth:`prepare`, with the RoPE positions (N, 2) given (see ``grid_positions``)."""
        rope = [rope_tables_from_pos(b.attn.rope.freqs, pos_N2) for b in self.res_blocks]
        ctx = HeadContext(self.cond_embed(cond_RNS), rope, [], [], [])
        if self.config.head_block == "v2":
            for b in self.res_blocks:
                cs = rope_tables_from_pos(b.crossattn.rope.freqs, pos_N2)
                k, v = b.crossattn.keys_values(b.norm2_2(cond_RNS), *cs)
                ctx.cross_rope.append(cs)
                ctx.cross_k.append(k)
                ctx.cross_v.append(v)
        return ctx

    def velocity(self, x_rNC: Tensor, t_r: Tensor, ctx: HeadContext) -> Tensor:
        """v (r, N, C) for state x (r, N, C) at float32 times t (r,), using the first r rows of ctx."""
        r = x_rNC.shape[0]
        t_r1W = self.time_embed(timestep_integers(t_r))[:, None]
        c = ctx.c[:r]
        h = self.input_proj(x_rNC)
        for i, blk in enumerate(self.res_blocks):
            h = blk(h, t_r1W, c, ctx, i)
        return self.final_layer(h, c + t_r1W)

    def forward(self, x_RNC: Tensor, t_R: Tensor, cond_RNS: Tensor) -> Tensor:
        side = math.isqrt(x_RNC.shape[1])
        return self.velocity(x_RNC, t_R, self.prepare(cond_RNS, side))
