"""The scale-wise autoregressive transformer of FlowAR, with the flow head attached.

Attribute names follow the official checkpoints exactly (``encoder_blocks.0.attn.qkv.weight``,
``flownet.res_blocks.1.ada_lin.weight``, the ``mask`` buffer, ...), so released files load with a
strict ``load_state_dict``.

The AR reads a sequence made of scale segments: the class embedding (scale 0, one token)
followed by the projected input tokens of scales 1..k (each the previous scale's sample,
resized to this scale). A block-causal mask lets every scale see earlier scales and itself.
It emits one semantic vector per position; those of scale k condition the flow head that
samples scale k. Two equivalent ways to run it:

* :meth:`FlowAR.semantics` runs a whole prefix at once under the mask (training, export);
* :meth:`FlowAR.ar_step` runs one scale against a :class:`~flowar.model.layers.KVCache`, as the
  official sampler does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowar.config import FlowARConfig
from flowar.model.head import FlowHead
from flowar.model.layers import KVCache, RMSNorm, SelfAttention, SwiGLU, modulate, rope_tables_for


class ARBlock(nn.Module):
    """adaLN transformer block driven by the class embedding.

    ``ada_lin`` gives six (B, D) vectors in the official order gamma1, gamma2, scale1, scale2,
    shift1, shift2.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, heads, qkv_bias=True)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BLD: Tensor, cls_BD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, begin: int = 0) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cls_BD)[:, None].chunk(6, dim=-1)   # (B, 1, D) each
        x_BLD = x_BLD + self.attn(modulate(self.norm1(x_BLD), b1, s1), cos, sin, mask, cache, begin) * g1
        return x_BLD + self.mlp(modulate(self.norm2(x_BLD), b2, s2)) * g2


def block_causal_mask(tokens_per_scale: tuple[int, ...]) -> Tensor:
    """Additive mask (1, 1, L, L): 0 where a token may attend (its own and earlier scales), -inf elsewhere."""
    L = sum(tokens_per_scale)
    scale_of = torch.tensor([k for k, n in enumerate(tokens_per_scale) for _ in range(n)])   # (L,)
    allowed = scale_of[None, :] <= scale_of[:, None]                       # (L, L) query row, key column
    mask = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


class FlowAR(nn.Module):
    """FlowAR: scale-wise AR transformer (``class_emb`` ... ``decoder_norm``) plus ``flownet``."""

    def __init__(self, config: FlowARConfig):
        super().__init__()
        self.config = c = config
        D, L = c.ar_width, c.seq_len
        self.class_emb = nn.Embedding(c.num_classes + 1, D)            # the last row is the null class
        self.z_proj = nn.Linear(c.latent_channels, D)
        self.z_proj_ln = RMSNorm(D, weight=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.encoder_blocks = nn.ModuleList(ARBlock(D, c.ar_heads, c.ar_mlp_hidden) for _ in range(c.ar_encoder_depth))
        self.encoder_norm = RMSNorm(D, weight=True)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.decoder_blocks = nn.ModuleList(ARBlock(D, c.ar_heads, c.ar_mlp_hidden) for _ in range(c.ar_decoder_depth))
        self.decoder_norm = RMSNorm(D, weight=True)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.flownet = FlowHead(c)
        self.register_buffer("mask", block_causal_mask(c.tokens_per_scale))   # (1, 1, L, L), in official state dicts
        self.initialize_weights()

    # ---- init (the official scheme, so that training from scratch starts where theirs does) ----
    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.flownet.initialize_weights()

    def materialize_buffers(self) -> None:
        """Rebuild the buffers no state dict carries (after building as a skeleton: see flowar.model.checkpoint)."""
        self.flownet.time_embed.reset_table()

    # ---- the transformer over a span [begin, end) of the sequence --------------------------
    def blocks(self) -> list[ARBlock]:
        return [*self.encoder_blocks, *self.decoder_blocks]

    def rope(self, first_scale: int, last_scale: int) -> list[tuple[Tensor, Tensor]]:
        """Per-block (cos, sin) tables (L, d) for the segments of scales first..last."""
        sides = self.config.scales[first_scale:last_scale + 1]
        return [rope_tables_for(b.attn.rope.freqs, sides) for b in self.blocks()]

    def transformer(self, h_BLD: Tensor, cls_BD: Tensor, begin: int, end, rope: list[tuple[Tensor, Tensor]],
                    mask: Tensor | None, caches: list[KVCache] | None = None) -> Tensor:
        """Encoder and decoder stacks over sequence positions [begin, end); h_BLD is already embedded.

        ``narrow`` rather than slicing: the same numbers, and an exported graph with a symbolic
        ``end`` gets no guard for the case where the slice would be clipped at the table's end."""
        n_enc, n = len(self.encoder_blocks), end - begin
        h = self.z_proj_ln(h_BLD + self.encoder_pos_embed_learned.narrow(1, begin, n))
        for i, blk in enumerate(self.encoder_blocks):
            h = blk(h, cls_BD, *rope[i], mask, caches[i] if caches else None, begin)
        h = self.decoder_embed(self.encoder_norm(h)) + self.decoder_pos_embed_learned.narrow(1, begin, n)
        for i, blk in enumerate(self.decoder_blocks):
            h = blk(h, cls_BD, *rope[n_enc + i], mask, caches[n_enc + i] if caches else None, begin)
        return self.decoder_norm(h) + self.diffusion_pos_embed_learned.narrow(1, begin, n)

    def input_sequence(self, cls_BD: Tensor, x_in_BLC: Tensor | None) -> Tensor:
        """[class token; z_proj(inputs of scales 1..k)] -> (B, L_k, D)."""
        if x_in_BLC is None or x_in_BLC.shape[1] == 0:
            return cls_BD[:, None]
        return torch.cat([cls_BD[:, None], self.z_proj(x_in_BLC)], dim=1)

    def semantics(self, labels_B: Tensor, x_in_BLC: Tensor | None, last_scale: int | None = None) -> Tensor:
        """Semantics of scales 0..last_scale in one pass under the block-causal mask.

        labels_B: (B,) int64 class ids (null class allowed); x_in_BLC: (B, L_k - 1, C) the AR
        inputs of scales 1..last_scale before ``z_proj``. Returns (B, L_k, D).
        """
        c = self.config
        k = c.n_scales - 1 if last_scale is None else last_scale
        L = c.scale_end[k]
        cls_BD = self.class_emb(labels_B)
        h = self.input_sequence(cls_BD, x_in_BLC)
        assert h.shape[1] == L, f"AR input has {h.shape[1]} tokens, scales 0..{k} need {L}"
        return self.transformer(h, cls_BD, 0, L, self.rope(0, k), self.mask[:, :, :L, :L])

    def new_caches(self, rows: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        c, p = self.config, self.class_emb.weight
        n = len(self.encoder_blocks) + len(self.decoder_blocks)
        return [KVCache(rows, c.ar_heads, c.seq_len, c.ar_head_dim, dtype or p.dtype, p.device) for _ in range(n)]

    def ar_step(self, k: int, cls_BD: Tensor, x_in_BNC: Tensor | None, caches: list[KVCache]) -> Tensor:
        """Semantics (B, n_k, D) of scale k given its input tokens (None for k = 0) and the caches."""
        c = self.config
        h = cls_BD[:, None] if k == 0 else self.z_proj(x_in_BNC)
        return self.transformer(h, cls_BD, c.scale_begin[k], c.scale_end[k], self.rope(k, k), None, caches)
