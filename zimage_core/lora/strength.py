"""Strength normaliser for stacking LoRAs on a distilled model (Turbo): keep the summed change bounded.

Users report that two LoRAs at 1.0 break Z-Image-Turbo (USERS.md pain point 13): the step-distilled model
tolerates about one LoRA's worth of weight change. Both functions return the strengths multiplied by one common
factor k ≤ 1, so the user's mix (the ratios between strengths, and their signs) is kept:

- `normalised_strengths(strengths, budget)`: k = min(1, budget / Σ|sᵢ|). Knows nothing of the files, so it
  assumes every LoRA changes the same modules by the same amount (the worst case).
- `normalised_for(loras, budget)`: measures it. For every DiT parameter m, eᵢₘ = ‖ΔWᵢₘ‖_F at strength 1, and
  k = min(1, minₘ budget·maxᵢ eᵢₘ / Σᵢ|sᵢ|·eᵢₘ): the triangle bound on ‖Σ sᵢ·ΔWᵢₘ‖ never exceeds what the
  strongest LoRA alone does to m at strength `budget`. LoRAs on disjoint modules (a style LoRA on attention and a
  character LoRA on the FFN) keep their strengths; identical ones are scaled as by `normalised_strengths`; a weak
  LoRA beside a strong one costs the strong one little.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from .adapters import Adapter, AdapterKind
from .read import LoraFile


def normalised_strengths(strengths: Sequence[float], budget: float = 1.0) -> list[float]:
    """`strengths` unchanged if Σ|sᵢ| ≤ budget, else all scaled by budget / Σ|sᵢ| (signs kept)."""
    budget = _checked_budget(budget)
    values = _checked_strengths(strengths)
    total = sum(abs(s) for s in values)
    return values if total <= budget else [s * budget / total for s in values]


def normalised_for(loras: Sequence[tuple[LoraFile, float]], budget: float = 1.0) -> list[float]:
    """The strengths of `(lora, strength)` pairs scaled so that, on every DiT parameter, the summed change is at
    most `budget` times the largest single LoRA's change there (module docstring). Needs only the files."""
    budget = _checked_budget(budget)
    values = _checked_strengths([s for _, s in loras])
    stacked: dict[str, float] = defaultdict(float)  # Σ|sᵢ|·eᵢₘ
    largest: dict[str, float] = defaultdict(float)  # maxᵢ eᵢₘ
    for (lora, _), s in zip(loras, values, strict=True):
        for param, e in effect_norms(lora).items():
            stacked[param] += abs(s) * e
            largest[param] = max(largest[param], e)
    k = min((budget * largest[m] / stacked[m] for m in stacked if stacked[m] > 0), default=1.0)
    return values if k >= 1 else [s * k for s in values]


def effect_norms(lora: LoraFile) -> dict[str, float]:
    """‖ΔW‖_F at strength 1 per canonical DiT parameter ('layers.0.attention.qkv.weight'), its patches' row
    blocks combined as √Σ‖·‖² (exact for disjoint blocks such as q/k/v). DoRA counts its low-rank part."""
    squares: dict[str, float] = defaultdict(float)
    for patch in lora.patches:
        leaf = "bias" if patch.adapter.kind is AdapterKind.DIFF_BIAS else "weight"
        squares[f"{patch.target.module}.{leaf}"] += _frobenius(patch.adapter) ** 2
    return {param: math.sqrt(sq) for param, sq in squares.items()}


def _frobenius(adapter: Adapter) -> float:
    """‖ΔW‖_F without forming a low-rank ΔW: ‖U·D‖² = Σ (UᵀU) ⊙ (D·Dᵀ), all r × r (float64)."""
    low = adapter.low_rank(torch.float64)
    if low is None:  # LoHa, LoKr, diff, DoRA (whose `delta` is its low-rank part): dense
        return float(adapter.delta(torch.float64).norm())
    down, up = low
    return math.sqrt(max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0))


def _checked_budget(budget: float) -> float:
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"LoRA strength budget must be a finite number > 0, got {budget}")
    return budget


def _checked_strengths(strengths: Sequence[float]) -> list[float]:
    values = [float(s) for s in strengths]
    for i, s in enumerate(values):
        if not math.isfinite(s):
            raise ValueError(f"LoRA strength {i} is {s}; strengths must be finite numbers")
    return values
