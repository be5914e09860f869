"""Decode the Flux VAE in horizontal bands with the result of a whole-image decode (up to float rounding).

Why not overlapping tiles (ComfyUI's VAE Decode (Tiled)): the decoder's mid block attends over the
whole latent and every GroupNorm normalises with statistics of the whole image, so independently
decoded tiles differ from the real decode (seams, shifted colours; with the tests' random weights,
bands decoded alone with 16 latent rows of overlap are off by 1.0 on [-1, 1] pixels). Here:

1. conv_in and the mid block (attention included) run on the whole latent, 8× smaller per side.
2. The up path then runs layer by layer on activations held as lists of full-width bands of rows
   (`rows` latent rows; 2×, 4×, 8× as many at the finer levels). A 3×3 conv makes band k from bands
   k−1, k, k+1 (a one-row halo, zero beyond the image), so temporaries are band-sized, and an input
   band is freed as soon as no later band needs it.
3. Every GroupNorm uses the statistics of its whole input, accumulated (per sample and group, Chan's
   parallel mean/variance in float64) while that input's bands are made, and applied band by band.

Peak memory, in elements of the VAE dtype, with P = B·H·W output pixels, W_B = B·W, t = tile_size
(the band height in output pixels), c0 = ch·ch_mult[0] and c1 = ch·ch_mult[1] the two finest widths:

- stored activations never exceed max(c1, 2·c0)·P (an input band is freed as soon as its last
  reader is made; a resnet holds its input, or its 1×1 shortcut, beside its middle activation);
- band temporaries (halo window, conv output, shortcut band, oneDNN's reordered copies) stay under
  about 8·c0·(t + 8)·W_B, and the output adds 2·3·P (its bands, then their concatenation);
- the latent-resolution part (conv_in, mid block, attention in query chunks of ≤ 2^26 scores) is
  small beside these.

For the Flux VAE (c0 = 128, c1 = 256) that is ≈ 256·P + 1024·(t + 8)·W_B: in fp32, 1 KiB per output
pixel plus 4 KiB per pixel of a band; e.g. 2048×2048 with tile_size 256: ≈ 4 + 2.1 GiB. A whole-image
decode peaks near 7·c0·P (≈ 3.5 KiB per pixel in fp32, 14 GiB at 2048×2048), at the first
full-resolution resnet. tests/test_vae.py measures both (peak RSS, CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class GroupStats:
    """Running mean and variance per (sample, group) of a tensor seen band by band, in float64."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean = self.m2 = torch.zeros(())

    def add(self, band: torch.Tensor) -> None:
        x = band.reshape(band.shape[0], self.groups, -1)
        x = x if x.dtype == torch.float32 else x.float()
        n = x.shape[2]
        mean = x.mean(2, keepdim=True)  # two passes: faster than var_mean on the CPU, and no cancellation
        m2 = torch.linalg.vector_norm(x - mean, dim=2).double().square()
        mean = mean.squeeze(2).double()
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def affine(self, norm: nn.GroupNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, C, 1, 1): `norm` of the whole tensor is x · scale + shift."""
        per_group = norm.num_channels // norm.num_groups
        rstd = (self.m2 / self.count + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)  # (B, C)
        scale = norm.weight.double() * rstd
        shift = norm.bias.double() - self.mean.repeat_interleave(per_group, dim=1) * scale
        return scale.to(dtype)[..., None, None], shift.to(dtype)[..., None, None]


@dataclass
class Bands:
    """A (B, C, H, W) activation as full-width bands of rows, top to bottom, with its GroupNorm statistics."""

    parts: list[torch.Tensor | None]
    stats: GroupStats | None = field(default=None)


def decode_in_bands(decoder: nn.Module, z: torch.Tensor, rows: int) -> torch.Tensor:
    """`decoder(z)` (a `vae.Decoder`), computed in bands of `rows` latent rows; see the module docstring."""
    h = decoder.mid(decoder.conv_in(z))  # (B, C, h, w): attention over the whole latent
    groups = decoder.norm_out.num_groups
    x = Bands([t.contiguous() for t in h.split(rows, dim=2)], GroupStats(groups))
    x.stats.add(h)
    del h
    for level in reversed(decoder.up):
        for block in level.block:
            x = _resnet(block, x, groups)
        if hasattr(level, "upsample"):
            x = _conv(x, None, level.upsample, groups, free=True)
    out = _conv(x, decoder.norm_out, decoder.conv_out, None, free=True)
    return torch.cat(out.parts, dim=2)


def _resnet(block: nn.Module, x: Bands, groups: int) -> Bands:
    """out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))), in two passes over the bands."""
    nin = block.nin_shortcut
    if nin is None:
        skip = x.parts  # kept whole through the first pass, consumed by the second
        h = _conv(x, block.norm1, block.conv1, groups, free=False)
    else:
        skip = []

        def shortcut(k: int, y: torch.Tensor) -> torch.Tensor:
            skip.append(F.conv2d(x.parts[k], nin.weight, nin.bias))  # before band k of x is freed
            return y

        h = _conv(x, block.norm1, block.conv1, groups, on_band=shortcut, free=True)

    def residual(k: int, y: torch.Tensor) -> torch.Tensor:
        y.add_(skip[k])
        skip[k] = None
        return y

    return _conv(h, block.norm2, block.conv2, groups, on_band=residual, free=True)


def _conv(x: Bands, norm: nn.GroupNorm | None, conv: nn.Module, groups: int | None, *,
          on_band: Callable[[int, torch.Tensor], torch.Tensor] | None = None, free: bool) -> Bands:
    """conv(act(norm(x))) band by band; `conv` is a 3×3 Conv2d or a `vae.Upsample`. `on_band(k, y)`
    post-processes output band k; `free` drops each input band once no later output band needs it;
    `groups` (or None) for the statistics of the output."""
    up = conv if hasattr(conv, "padded") else None
    phase_weight = None if up is None else up.phase_weight()
    affine = None if norm is None else x.stats.affine(norm, conv.weight.dtype)
    out = Bands([], None if groups is None else GroupStats(groups))
    for k in range(len(x.parts)):
        window = _window(x.parts, k, affine)  # rows and columns come with their halo / zero padding
        y = up.padded(window, phase_weight) if up is not None else F.conv2d(window, conv.weight, conv.bias)
        del window
        if on_band is not None:
            y = on_band(k, y)
        out.parts.append(y)
        if out.stats is not None:
            out.stats.add(y)
        if free and k > 0:
            x.parts[k - 1] = None
    if free:
        x.parts[-1] = None
    return out


def _window(parts: list[torch.Tensor], k: int, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Band k = rows [s, e) with rows s − 1, e and one column on each side, through norm and SiLU if `affine`;
    zero outside the image (a 3×3 conv's padding)."""
    band = parts[k]
    b, c, n, w = band.shape
    window = band.new_empty(b, c, n + 2, w + 2)
    window[..., 0].zero_()
    window[..., -1].zero_()
    above = parts[k - 1][:, :, -1:] if k > 0 else None
    below = parts[k + 1][:, :, :1] if k + 1 < len(parts) else None
    for start, src in ((0, above), (1, band), (n + 1, below)):
        dst = window[:, :, start:start + (1 if src is None else src.shape[2]), 1:-1]
        if src is None:
            dst.zero_()
        elif affine is None:
            dst.copy_(src)
        else:
            torch.addcmul(affine[1], src, affine[0], out=dst)
    return window if affine is None else F.silu(window, inplace=True)  # SiLU(0) = 0: the padding stays zero
