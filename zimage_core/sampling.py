"""Flow-matching sampling. The one place the time and velocity convention is written down.

Convention (ZIMAGE_SPEC §5, §7.1; the training loss uses `model_velocity`, `noised` and `velocity_target` too):
    σ = 1 is pure noise, σ = 0 is data:            x_σ = (1 − σ)·x0 + σ·ε
    the DiT is called with model time t = 1 − σ and returns v ≈ x0 − ε
    the flow velocity is dx/dσ = ε − x0 = −v:      Euler step x_{σ'} = x_σ + (σ' − σ)·(−v)
    the clean estimate is x0 ≈ x_σ + σ·v; the training target for v is x0 − ε.
Training builds x_σ with `noised(x0, ε, σ)` and the target with `velocity_target(x0, ε)`.

Guidance g is diffusers' `guidance_scale`: pred = pos + g·(pos − neg). g = 0 means one conditional
forward per step and no negative prompt. ComfyUI's `cfg` is g + 1 (cfg 1 = no guidance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

Captions = Sequence[torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    steps: int
    guidance: float = 0.0  # g; ComfyUI cfg = g + 1
    shift: float = 3.0  # static shift of the flow-matching schedule
    cfg_normalization: float = 0.0  # > 0: cap ‖pred‖ at this multiple of ‖pos‖ (per item, whole latent)
    cfg_truncation: float = 1.0  # guidance is off on steps whose t = 1 − σ exceeds this

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0 or self.shift <= 0 or self.cfg_normalization < 0:
            raise ValueError(f"SamplerConfig: need steps ≥ 1, guidance ≥ 0, shift > 0, cfg_normalization ≥ 0; "
                             f"got {self}")


class Preset(str, Enum):
    TURBO = "turbo"  # Z-Image-Turbo: 8 DiT forwards, no guidance
    DE_TURBO = "de-turbo"  # ostris De-Turbo: sampled like a base model with CFG
    BASE = "base"  # Z-Image (base): model-card settings


PRESETS = {
    Preset.TURBO: SamplerConfig(steps=8, guidance=0.0, shift=3.0),
    Preset.DE_TURBO: SamplerConfig(steps=25, guidance=2.0, shift=3.0),  # AI Toolkit UI guidance 3 = g 2
    Preset.BASE: SamplerConfig(steps=50, guidance=4.0, shift=6.0, cfg_normalization=1.0),
}


def preset_config(preset: Preset, steps: int | None = None, guidance: float | None = None,
                  shift: float | None = None) -> SamplerConfig:
    """The preset's settings with each given (not None) field replacing its own; validated as any SamplerConfig."""
    overrides = {"steps": steps, "guidance": guidance, "shift": shift}
    return dataclasses.replace(PRESETS[Preset(preset)], **{k: v for k, v in overrides.items() if v is not None})


class SamplingInterrupted(RuntimeError):
    """Raised between steps when `should_stop()` says so."""


def shift_sigma(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def make_sigmas(steps: int, shift: float) -> list[float]:
    """σ for each of `steps` DiT forwards, then the final 0: shift(1 − i/steps) for i < steps.

    Turbo (8 steps, shift 3): [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0], the
    schedule of the official code and of diffusers 0.42.1 (`linspace(1, 1/N, N)`, shifted).
    """
    return [shift_sigma(1 - i / steps, shift) for i in range(steps)] + [0.0]


def make_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """ComfyUI's initial noise for `seed`: float32 N(0, 1) drawn on the CPU (the same on every device).

    Equal to `torch.randn(shape, generator=torch.manual_seed(seed))` without touching the global RNG.
    """
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def model_velocity(dit: Callable, x: torch.Tensor, sigma: torch.Tensor, cap_feats: Captions) -> torch.Tensor:
    """dx/dσ = −v at noise level σ (B,), in x's dtype: the only place σ becomes model time."""
    return -dit(x, 1 - sigma, cap_feats)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, σ (B,) broadcast over each item, in x0's dtype."""
    s = sigma.to(device=x0.device, dtype=x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise.to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the raw DiT output v should be for the pair (x0, ε): x0 − ε (the negated flow velocity)."""
    return x0 - noise.to(x0.dtype)


def guided_velocity(dit: Callable, x: torch.Tensor, sigma: float, cond: Captions, neg: Captions | None,
                    cfg: SamplerConfig) -> torch.Tensor:
    """The velocity for one step, with classifier-free guidance when it is on for this σ."""
    g = cfg.guidance if (1 - sigma) <= cfg.cfg_truncation else 0.0
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    if g == 0:
        return model_velocity(dit, x, s, cond)
    if neg is None:
        raise ValueError(f"guidance {cfg.guidance} needs negative caption features")
    pos, negative = model_velocity(dit, torch.cat([x, x]), torch.cat([s, s]), [*cond, *neg]).float().chunk(2)
    pred = pos + g * (pos - negative)
    if cfg.cfg_normalization > 0:
        pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
        pred_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
        ratio = (cfg.cfg_normalization * pos_norm / pred_norm).clamp(max=1.0)
        pred = pred * ratio.view(-1, *[1] * (pred.ndim - 1))
    return pred


def denoise(dit: Callable, x: torch.Tensor, cond: Captions, cfg: SamplerConfig, neg: Captions | None = None,
            sigmas: Sequence[float] | None = None, on_step: Callable[[int, int, torch.Tensor], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Euler-integrate x from sigmas[0] to sigmas[-1] (default `make_sigmas(cfg.steps, cfg.shift)`).

    x is the latent at sigmas[0] (pure noise for text-to-image) and stays float32 throughout.
    `on_step(i, n, x)` runs after each of the n steps; `should_stop()` is asked before each step.
    Exactly one DiT call per step (a doubled batch when guidance is on).
    """
    sigmas = list(make_sigmas(cfg.steps, cfg.shift) if sigmas is None else sigmas)
    x = x.float()
    n = len(sigmas) - 1
    for i in range(n):
        if should_stop is not None and should_stop():
            raise SamplingInterrupted(f"stopped before step {i + 1} of {n}")
        v = guided_velocity(dit, x, sigmas[i], cond, neg, cfg)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        if on_step is not None:
            on_step(i + 1, n, x)
    return x
