"""The loss curve of a training run as an image, drawn with torch alone (no matplotlib or Pillow at run time).

    image = loss_curve(result.losses)                  # (384, 768, 3) float32 in [0, 1]
    save_png("loss.png", image.permute(2, 0, 1))       # zimage_core.png takes (3, H, W)

White background, a grey frame around the plot area with three light horizontal grid lines (quarters of the
range), the raw per-step loss in light blue and its moving average (a centred window of about 1/25 of the
run) in dark blue. x is the step (first to last, left to right); y is linear from the smallest loss (bottom)
to the largest (top). There are no text labels (no font): the range is what the caller prints beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BACKGROUND = (1.0, 1.0, 1.0)
FRAME = (0.55, 0.55, 0.55)
GRID = (0.9, 0.9, 0.9)
RAW = (0.68, 0.80, 0.95)
SMOOTH = (0.05, 0.20, 0.55)
MARGIN = 12  # pixels between the image border and the frame
SMOOTHING_FRACTION = 25  # the moving-average window is len(losses) / this (at least 1)


def loss_curve(losses: Sequence[float], width: int = 768, height: int = 384) -> torch.Tensor:
    """(height, width, 3) float32 RGB in [0, 1] (see the module docstring); an empty list gives the bare frame."""
    if isinstance(width, bool) or isinstance(height, bool) or not (isinstance(width, int) and isinstance(height, int)):
        raise ValueError(f"loss_curve: width and height must be integers, got {width!r}, {height!r}")
    if width < 4 * MARGIN or height < 4 * MARGIN:
        raise ValueError(f"loss_curve: the image must be at least {4 * MARGIN}×{4 * MARGIN} px, got {width}×{height}")
    values = torch.tensor([float(v) for v in losses], dtype=torch.float64)
    if values.numel() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise ValueError(f"loss_curve: loss {bad} (0-based) is {values[bad].item()}; only finite losses can be drawn")
    image = torch.tensor(BACKGROUND, dtype=torch.float32).repeat(height, width, 1)
    left, top, right, bottom = MARGIN, MARGIN, width - 1 - MARGIN, height - 1 - MARGIN
    for q in (0.25, 0.5, 0.75):
        image[round(top + q * (bottom - top)), left:right + 1] = torch.tensor(GRID)
    _frame(image, left, top, right, bottom)
    if values.numel():
        lo, hi = values.min().item(), values.max().item()
        base, span = (lo, hi - lo) if hi > lo else (lo - 0.5, 1.0)  # a flat curve sits in the middle
        xs = _x_positions(values.numel(), left + 1, right - 1)
        _polyline(image, xs, _rows(values, base, span, top, bottom), RAW, thick=False)
        _polyline(image, xs, _rows(moving_average(values), base, span, top, bottom), SMOOTH, thick=True)
    return image


def moving_average(values: torch.Tensor) -> torch.Tensor:
    """Centred moving average with a window of about len/25 (shrinking at the ends), float64."""
    n = values.numel()
    half = max(0, math.ceil(n / SMOOTHING_FRACTION) // 2)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    idx = torch.arange(n)
    lo, hi = (idx - half).clamp(min=0), (idx + half + 1).clamp(max=n)
    return (csum[hi] - csum[lo]) / (hi - lo)


def _rows(values: torch.Tensor, base: float, span: float, top: int, bottom: int) -> torch.Tensor:
    """Image rows (fractional) of loss values: base at the bottom of the plot area, base + span at its top."""
    return bottom - 1 - (values - base) / span * (bottom - top - 3)


def _x_positions(n: int, left: int, right: int) -> torch.Tensor:
    if n == 1:
        return torch.tensor([(left + right) / 2], dtype=torch.float64)
    return left + torch.arange(n, dtype=torch.float64) / (n - 1) * (right - left)


def _frame(image: torch.Tensor, left: int, top: int, right: int, bottom: int) -> None:
    color = torch.tensor(FRAME)
    image[top, left:right + 1] = color
    image[bottom, left:right + 1] = color
    image[top:bottom + 1, left] = color
    image[top:bottom + 1, right] = color


def _polyline(image: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, color: tuple[float, float, float],
              thick: bool) -> None:
    """Join consecutive points with straight segments (one dot per pixel along the longer axis)."""
    if xs.numel() == 1:
        px, py = xs, ys
    else:
        x0, y0, x1, y1 = xs[:-1], ys[:-1], xs[1:], ys[1:]
        counts = (torch.maximum((x1 - x0).abs(), (y1 - y0).abs()).ceil().long() + 1).clamp(min=2)
        seg = torch.repeat_interleave(torch.arange(len(counts)), counts)
        start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        t = (torch.arange(int(counts.sum())) - start).double() / (counts[seg] - 1).double()
        px, py = x0[seg] + t * (x1 - x0)[seg], y0[seg] + t * (y1 - y0)[seg]
    h, w = image.shape[:2]
    cols, rows = px.round().long(), py.round().long()
    offsets = [(0, 0), (1, 0), (0, 1), (1, 1)] if thick else [(0, 0)]
    for dr, dc in offsets:
        image[(rows + dr).clamp(0, h - 1), (cols + dc).clamp(0, w - 1)] = torch.tensor(color)
