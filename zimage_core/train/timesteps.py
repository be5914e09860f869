"""Noise levels σ for training steps, and the per-sample loss weights that go with them (ZIMAGE_SPEC §7.2).

Every method starts from one uniform draw u ~ U(0, 1) per sample (from the caller's generator, never the
global RNG). The noise bias reshapes u first (AI Toolkit's `content_or_style`: `content` indexes its
descending timestep list with u³, `style` with 1 − u³):
    BALANCED: u        HIGH_NOISE: 1 − u³ (σ → 1, composition/content)        LOW_NOISE: u³ (σ → 0, style/detail)
then the method maps u to σ:
    UNIFORM       σ = u                                                  (diffusion-pipe `uniform`)
    WEIGHTED      σ = u, loss × `loss_weights` (DiffSynth's bell)        (AI Toolkit's Z-Image default `weighted`)
    LOGIT_NORMAL  σ = sigmoid(sigmoid_scale · Φ⁻¹(u))                    (diffusion-pipe default)
    SHIFT         σ = shift_sigma(sigmoid(sigmoid_scale · Φ⁻¹(u)), shift) (musubi `--timestep_sampling shift`)
Φ⁻¹(u) for a uniform u is an N(0, 1) draw, so with BALANCED the logit-normal methods are exactly musubi's and
diffusion-pipe's distributions. `shift` is used by SHIFT only (the other tools apply no shift in training for
these methods). σ is clamped to [SIGMA_MIN, 1 − SIGMA_MIN] (AI Toolkit's smallest σ is 1/1000 as well), so it
is always inside (0, 1).
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from ..sampling import shift_sigma


class TimestepSampling(str, Enum):
    SHIFT = "shift"
    LOGIT_NORMAL = "logit_normal"
    UNIFORM = "uniform"
    WEIGHTED = "weighted"


class NoiseBias(str, Enum):
    BALANCED = "balanced"
    HIGH_NOISE = "high_noise"
    LOW_NOISE = "low_noise"


SIGMA_MIN = 1e-3
_BELL_GRID = 1000  # DiffSynth normalises its bell over a 1000-step schedule


def _enum(cls: type[Enum], value: object, what: str) -> Enum:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; one of {[m.value for m in cls]}") from None


def sample_sigmas(n: int, method: TimestepSampling, generator: torch.Generator, shift: float = 3.0,
                  bias: NoiseBias = NoiseBias.BALANCED, sigmoid_scale: float = 1.0) -> torch.Tensor:
    """n noise levels, float32 (n,) on the generator's device, each in (0, 1) (see the module docstring)."""
    method = _enum(TimestepSampling, method, "timestep sampling")
    bias = _enum(NoiseBias, bias, "noise bias")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_sigmas: n must be a positive int, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"sample_sigmas: generator must be a torch.Generator, got {type(generator).__name__}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"sample_sigmas: shift must be a finite number > 0, got {shift}")
    if not (math.isfinite(sigmoid_scale) and sigmoid_scale > 0):
        raise ValueError(f"sample_sigmas: sigmoid_scale must be a finite number > 0, got {sigmoid_scale}")
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)
    if bias is NoiseBias.HIGH_NOISE:
        u = 1 - u**3
    elif bias is NoiseBias.LOW_NOISE:
        u = u**3
    if method in (TimestepSampling.SHIFT, TimestepSampling.LOGIT_NORMAL):
        eps = torch.finfo(torch.float32).eps
        z = math.sqrt(2) * torch.erfinv(2 * u.clamp(eps, 1 - eps) - 1)  # Φ⁻¹(u): an N(0, 1) draw
        u = torch.sigmoid(sigmoid_scale * z)
        if method is TimestepSampling.SHIFT:
            u = shift_sigma(u, shift)
    return u.clamp(SIGMA_MIN, 1 - SIGMA_MIN)


def loss_weights(sigmas: torch.Tensor, method: TimestepSampling) -> torch.Tensor:
    """Per-sample loss weights for `sigmas` (n,), float32: ones, except for WEIGHTED.

    WEIGHTED is DiffSynth's `set_training_weight` rule on σ: w = exp(−2(σ − ½)²) − its minimum over a uniform
    1000-step grid of σ, divided by its grid mean, so uniform σ get weights of mean 1 (a bell peaking at σ = ½,
    near 0 at the ends)."""
    method = _enum(TimestepSampling, method, "timestep sampling")
    sigmas = sigmas.float()
    if method is not TimestepSampling.WEIGHTED:
        return torch.ones_like(sigmas)
    grid = torch.linspace(1, 1 / _BELL_GRID, _BELL_GRID, dtype=torch.float64)
    bell = torch.exp(-2 * (grid - 0.5) ** 2)
    low, mean = bell.min().item(), (bell - bell.min()).mean().item()
    return ((torch.exp(-2 * (sigmas - 0.5) ** 2) - low) / mean).clamp_min(0)
