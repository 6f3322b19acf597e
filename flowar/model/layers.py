"""Building blocks shared by the AR transformer and the flow head.

Numerics follow the official FlowAR code (the fixtures check them): RMSNorm in float32 with
eps 1e-6, SwiGLU MLPs gated by exact (erf) GELU, and an axial 2-D RoPE whose pair layout is
interleaved (dims 2i and 2i+1 rotate together; the first half of the head dim follows the
row, the second half the column).

Tensor names carry their shape: B batch rows, N tokens, L sequence, D width, H heads,
d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official RoPE places an s x s token map on positions arange(s) / s * 16 whatever the
# latent size: 16 is a constant of the pretrained models, not the latent side.
ROPE_GRID = 16
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; a learned weight only where the official model has one."""

    def __init__(self, dim: int, weight: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


class SwiGLU(nn.Module):
    """fc2(gelu(fc1_g(x)) * fc1_x(x)); parameter names as timm's SwiGLU, which the checkpoints use."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class RopeFreqs(nn.Module):
    """Holds the inverse frequencies of the 2-D RoPE as the persistent buffer ``freqs``.

    The official checkpoints carry this buffer (``*.rope.freqs``), so it lives in the state dict;
    the cos/sin tables are derived from it per token map by :func:`rope_tables_from_pos`.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        half = head_dim // 2                       # rotary dims per axis
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        self.register_buffer("freqs", freqs)       # (d/4,)


def grid_positions(side: int, device=None) -> Tensor:
    """(side*side, 2) float32 (row, column) RoPE positions of an s x s map: arange(s) / s * 16."""
    p = torch.arange(side, device=device, dtype=torch.float32) / side * ROPE_GRID
    return torch.stack([p[:, None].expand(side, side), p[None, :].expand(side, side)], dim=-1).reshape(-1, 2)


def rope_tables_from_pos(freqs: Tensor, pos_N2: Tensor) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables (N, d) for token positions (N, 2); rows take the first half of d.

    The sin table carries the rotation's sign (-sin on even dims, +sin on odd ones), so that
    :func:`apply_rope` needs only a pair swap: negation is exact, so the numbers are
    those of the unsigned formula, with one elementwise pass fewer per rotation.
    """
    ang = (pos_N2[:, :, None] * freqs[None, None, :]).flatten(1)          # (N, d/2)
    cos, sin = ang.cos(), ang.sin()           # each frequency twice below; no table from host data (CUDA graphs)
    return torch.stack([cos, cos], dim=-1).flatten(1), torch.stack([-sin, sin], dim=-1).flatten(1)   # (N, d)


def rope_tables_for(freqs: Tensor, sides: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Tables for consecutive token maps (the AR sequence): one segment per scale."""
    pos = torch.cat([grid_positions(s, freqs.device) for s in sides])
    return rope_tables_from_pos(freqs, pos)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., N, d) rotated pairwise: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    ``sin`` is the signed table of :func:`rope_tables_from_pos`, so the rotation is
    x * cos + swap(x) * sin with swap (x0, x1) -> (x1, x0).
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class KVCache:
    """Keys and values preallocated at the full sequence length and written by index."""

    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.zeros(rows, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: Tensor, v: Tensor, begin: int) -> tuple[Tensor, Tensor]:
        end = begin + k.shape[2]
        self.k[:, :, begin:end] = k
        self.v[:, :, begin:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on queries and keys."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope = RopeFreqs(self.head_dim)

    def forward(self, x_BND: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None, begin: int = 0) -> Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)   # (3, B, H, N, d)
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)                    # one rotation for queries and keys
        v = qkv[2]
        if cache is not None:
            k, v = cache.update(k, v, begin)                              # (B, H, begin+N, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))
