"""Pure tensor functions of the DiT: timestep features, 3-axis RoPE, RMSNorm, attention.

fp32 islands (ZIMAGE_SPEC §1.3): RMSNorm statistics, RoPE application and the timestep features are
computed in float32 whatever the activation dtype, then cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of `t` (already multiplied by t_scale), cos first: (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(axes_dims: tuple[int, ...], axes_lens: tuple[int, ...], theta: float,
                device: torch.device) -> list[torch.Tensor]:
    """Per-axis rotation tables, (len_a, d_a/2) complex64, ω_j = θ^(−2j/d_a).

    The angle p·ω is formed in float64 and rounded to float32 before cos/sin, as the official code does.
    """
    tables = []
    for d, n in zip(axes_dims, axes_lens, strict=True):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = torch.outer(torch.arange(n, dtype=torch.float64), omega).float()
        tables.append(torch.polar(torch.ones_like(angle), angle).to(device))
    return tables


def rope_lookup(tables: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rotations for position ids (..., 3) -> (..., head_dim/2) complex64."""
    return torch.cat([table[ids[..., a]] for a, table in enumerate(tables)], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2k], x[2k+1]) of each head vector (last dim) by complex `freqs`,
    which broadcasts against x's (..., Dh/2) complex view."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


def inplace_ok() -> bool:
    """Whether fresh temporaries may be updated in place: only when autograd records nothing.

    Inference then allocates fewer activation-sized tensors (new pages are costly to fault in);
    training keeps every intermediate its backward needs.
    """
    return not torch.is_grad_enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight, statistics in fp32, result in x's dtype.

    The mean square comes from one fused 2-norm reduction (no x² temporary); `weight` may be any
    tensor broadcasting against x (per-item modulation is folded into it by the caller).
    """
    xf = x.float()
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    y = (xf * torch.rsqrt(ms + eps)).to(x.dtype)  # a fresh tensor, never x itself
    if weight is None:
        return y
    return y.mul_(weight) if inplace_ok() else y * weight


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """In fp16, map ±inf (overflowed matmul outputs) and NaN to finite values; other dtypes pass through.

    Used on residual-branch outputs just before their post-norm, which is scale-invariant, so values
    that fit are untouched and an overflow saturates instead of poisoning the stream (ComfyUI did
    the same for Lumina-type models; see ZIMAGE_SPEC §1.3 fp16 note).
    """
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Non-causal SDPA. q, k, v (B, L, H, Dh); key_mask (B, L) bool, True = attend; -> (B, L, H·Dh)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
