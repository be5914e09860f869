"""The Z-Image DiT ("S3-DiT"), ZIMAGE_SPEC §1. Attribute names are the ComfyUI single-file keys.

Call convention (the whole pack relies on it; the sampler's convention docstring builds on it):

    v = dit(x, t, cap_feats)

- x: (B, 16, H, W) latents in the DiT's latent space (Flux VAE latent, scaled and shifted), H and W
  even. Any float dtype; the DiT computes in its own dtype and returns v in x's dtype.
- t: (B,) model time t = 1 − σ in [0, 1]: t = 0 is pure noise, t = 1 is clean data.
- cap_feats: one (L_i, cap_feat_dim) tensor per item (valid text-encoder tokens only; lengths may
  differ), or a (B, L, cap_feat_dim) tensor when every item has L valid tokens.
- v: (B, 16, H, W), the raw output, v ≈ x0 − ε (it points from noise to data). A flow-matching
  Euler step is x_{σ'} = x_σ + (σ' − σ)·(−v).

Training: `dit.gradient_checkpointing = True` runs every transformer block (refiners and main layers) under
`torch.utils.checkpoint` while grad is enabled: a block keeps only its input for backward and recomputes the
rest, so activation memory is one block's plus an (B, L, D) tensor per block. Inference (no grad) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .math import apply_rope, attention, clamp_fp16, inplace_ok, rms_norm, rope_lookup, rope_tables, timestep_embedding


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype than the activations.

    Weights in another dtype (bf16 under fp32 compute, or float8 with `scale_weight`) are upcast per
    call, never kept upcast. `scale_weight` is a float32 scalar or (out_features, 1) buffer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("scale_weight", None)
        # runtime LoRAs: delta(x, outs) adds their change into the output (or its column blocks) in place
        self.delta: Callable[[torch.Tensor, Sequence[torch.Tensor]], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self._weight_as(x.dtype), self.bias)
        if self.delta is not None:
            self.delta(x, (y,))
        return y

    def forward_parts(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """The output's `parts` equal column blocks, one matmul per row block of the weight (views, no copy).

        For the fused qkv projection: three (D → D) GEMMs beat one (D → 3D) GEMM on CPU BLAS
        (bench/dit_forward.py), and q, k, v come out contiguous. Bias-free layers only.
        """
        ys = tuple(F.linear(x, w) for w in self._weight_as(x.dtype).chunk(parts))
        if self.delta is not None:
            self.delta(x, ys)
        return ys

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if w.dtype != dtype:
            w = w.to(dtype)
            if self.scale_weight is not None:
                w = w * self.scale_weight.to(dtype)
        return w


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention with fused q/k/v rows, per-head RMSNorm on q and k before RoPE, no biases."""

    def __init__(self, dim: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.out = Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // n_heads, eps)
        self.k_norm = RMSNorm(dim // n_heads, eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (h.unflatten(-1, (self.n_heads, -1)) for h in self.qkv.forward_parts(x, 3))  # (B, L, H, Dh)
        q = apply_rope(self.q_norm(q), freqs[:, :, None])
        k = apply_rope(self.k_norm(k), freqs[:, :, None])
        return self.out(attention(q, k, v, key_mask))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inplace_ok():
            return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-normed block; with `modulation`, tanh-gated and scaled by the timestep embedding c.

    x ← x + tanh(g_a) · norm2(Attn(norm1(x) · (1 + s_a)));  x ← x + tanh(g_f) · norm2(FFN(norm1(x) · (1 + s_f)))
    (c enters adaLN_modulation without a SiLU). Unmodulated blocks drop the scales and gates.
    """

    def __init__(self, cfg: DiTConfig, modulation: bool) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, key_mask: torch.Tensor | None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        w_a1, w_a2 = self.attention_norm1.weight, self.attention_norm2.weight
        w_f1, w_f2 = self.ffn_norm1.weight, self.ffn_norm2.weight
        if c is not None:
            # The per-item scales and gates fold into the norm weights: one broadcast multiply each.
            scale_a, gate_a, scale_f, gate_f = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
            w_a1, w_f1 = w_a1 * (1 + scale_a), w_f1 * (1 + scale_f)
            w_a2, w_f2 = w_a2 * gate_a.tanh(), w_f2 * gate_f.tanh()
        h = clamp_fp16(self.attention(rms_norm(x, w_a1, self.eps), freqs, key_mask))
        x = torch.addcmul(x, rms_norm(h, None, self.eps), w_a2)
        h = clamp_fp16(self.feed_forward(rms_norm(x, w_f1, self.eps)))
        if inplace_ok():  # x is this block's own tensor by now (the caller's input was not modified)
            return x.addcmul_(rms_norm(h, None, self.eps), w_f2)
        return torch.addcmul(x, rms_norm(h, None, self.eps), w_f2)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.mlp = nn.Sequential(
            Linear(cfg.freq_dim, cfg.t_embed_dim), nn.SiLU(), Linear(cfg.t_embed_dim, cfg.adaln_dim)
        )

    def forward(self, t_scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t_scaled, self.freq_dim).to(dtype))


class FinalLayer(nn.Module):
    """out = linear(LayerNorm(x) · (1 + adaLN(c))); unlike the blocks, c passes a SiLU first."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(cfg.adaln_dim, cfg.dim))
        self.linear = Linear(cfg.dim, cfg.patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(c).unsqueeze(1)
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return self.linear(x * scale)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ZImageDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.x_embedder = Linear(cfg.patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False  # a run-time switch (see the module docstring), not a checkpoint key
        self._rope: dict[torch.device, list[torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The compute (activation) dtype; block weights may be stored narrower (see `Linear`)."""
        return self.x_pad_token.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cap_feats: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        cfg, dtype = self.cfg, self.dtype
        B, C, H, W = x.shape
        if H % 2 or W % 2 or C != cfg.in_channels:
            raise ValueError(f"ZImageDiT: latents must be (B, {cfg.in_channels}, even H, even W), got {tuple(x.shape)}")
        if len(cap_feats) != B:
            raise ValueError(f"ZImageDiT: {len(cap_feats)} caption feature tensors for a batch of {B}")
        c = self.t_embedder(t.float().reshape(-1).expand(B) * cfg.t_scale, dtype)  # (B, adaln_dim)

        cap_lens = [len(f) for f in cap_feats]
        if min(cap_lens) < 1:
            raise ValueError("ZImageDiT: every caption needs at least one token")
        cap_padded = [_ceil_to(n, cfg.seq_multiple) for n in cap_lens]  # each stream pads to a multiple of 32
        cap, cap_mask = self._embed_captions(cap_feats, cap_lens, cap_padded, dtype)  # (B, Lc, D)
        img = self._embed_image(x.to(dtype))  # (B, Li, D)
        cap_freqs, img_freqs = self._positions(cap_padded, H // 2, W // 2, img.shape[1], x.device)

        for block in self.noise_refiner:
            img = self._block(block, img, img_freqs, None, c)
        for block in self.context_refiner:
            cap = self._block(block, cap, cap_freqs, cap_mask)
        # Joint stream [image, caption] as in the official code; batch padding sits at the end.
        h = torch.cat([img, cap], dim=1)
        freqs = torch.cat([img_freqs, cap_freqs], dim=1)
        mask = None if cap_mask is None else F.pad(cap_mask, (img.shape[1], 0), value=True)
        for block in self.layers:
            h = self._block(block, h, freqs, mask, c)

        n_img = (H // 2) * (W // 2)
        out = self.final_layer(h[:, :n_img], c)  # (B, n_img, 4·C), token features in (pH, pW, C) order
        out = out.view(B, H // 2, W // 2, 2, 2, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return out.to(x.dtype)

    def _block(self, block: TransformerBlock, *args) -> torch.Tensor:
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args)
        # The block itself is checkpointed, so its module hooks (block swap, offload.py) run again in the
        # recomputation. The blocks draw no random numbers: no RNG state is stashed.
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)

    def _embed_image(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        patches = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, 4 * C)
        img = self.x_embedder(patches)
        pad = _ceil_to(img.shape[1], self.cfg.seq_multiple) - img.shape[1]
        return torch.cat([img, self.x_pad_token.expand(B, pad, -1)], dim=1)

    def _embed_captions(self, feats, lens: list[int], padded: list[int], dtype: torch.dtype):
        """Embed valid tokens, pad each item to its padded length with cap_pad_token, then the batch with zeros.

        Returns (B, Lmax, D) and a (B, Lmax) key mask (None when every item has the same padded length).
        """
        emb = self.cap_embedder(torch.cat([f.to(dtype) for f in feats]))  # (ΣL, D)
        cap = emb.new_zeros(len(lens), max(padded), emb.shape[-1])
        for i, (item, n, p) in enumerate(zip(emb.split(lens), lens, padded, strict=True)):
            cap[i, :n] = item
            cap[i, n:p] = self.cap_pad_token
        if len(set(padded)) == 1:
            return cap, None
        key_mask = torch.arange(max(padded), device=cap.device)[None] < torch.tensor(padded, device=cap.device)[:, None]
        return cap, key_mask

    def _positions(self, padded: list[int], Ht: int, Wt: int, n_img_padded: int, device):
        """RoPE rotations. Caption token j sits at (1 + j, 0, 0), pads included; image token (h, w) at
        (Lp + 1, h, w) with Lp the item's padded caption length; image pad tokens at (0, 0, 0)."""
        cfg = self.cfg
        n_cap = max(padded)
        if n_cap + 1 >= cfg.axes_lens[0] or Ht >= cfg.axes_lens[1] or Wt >= cfg.axes_lens[2]:
            raise ValueError(f"ZImageDiT: a caption padded to {n_cap} tokens or {Ht}x{Wt} image tokens exceed "
                             f"the RoPE range {cfg.axes_lens}")
        if device not in self._rope:
            self._rope[device] = rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta, device)
        tables = self._rope[device]
        cap_ids = torch.zeros(n_cap, 3, dtype=torch.long, device=device)
        cap_ids[:, 0] = torch.arange(1, n_cap + 1, device=device)
        hw = torch.stack(torch.meshgrid(torch.arange(Ht, device=device), torch.arange(Wt, device=device),
                                        indexing="ij"), dim=-1).reshape(-1, 2)
        img_ids = torch.zeros(len(padded), n_img_padded, 3, dtype=torch.long, device=device)
        img_ids[:, : Ht * Wt, 0] = torch.tensor(padded, device=device)[:, None] + 1
        img_ids[:, : Ht * Wt, 1:] = hw
        cap_freqs = rope_lookup(tables, cap_ids).expand(len(padded), -1, -1)
        return cap_freqs, rope_lookup(tables, img_ids)
