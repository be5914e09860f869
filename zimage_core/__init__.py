"""zimage_core: a plain-PyTorch Z-Image implementation (no ComfyUI import anywhere in this package).

Public API (see README "Python API"):
    load_dit(path, device, dtype, weight_format) -> ZImageDiT    # any layout, streamed, strict
    ZImageDiT(cfg)(x, t, cap_feats) -> v                          # t = 1 − σ, v ≈ x0 − ε
    denoise(dit, noise, cap_feats, SamplerConfig | PRESETS[...])  # flow-matching Euler (+ CFG)
    make_sigmas, make_noise, model_velocity, DiTConfig, Z_IMAGE_6B, WeightFormat, DiTLayout, plan_dit, inspect
"""

from .checkpoint import DiTPlan, QuantFormat, load_dit, plan_dit
from .config import Z_IMAGE_6B, DiTConfig, WeightFormat
from .dit import ZImageDiT
from .inspection import inspect
from .keymaps import DiTLayout
from .sampling import (
    PRESETS,
    Preset,
    SamplerConfig,
    SamplingInterrupted,
    denoise,
    make_noise,
    make_sigmas,
    model_velocity,
)

__all__ = ["PRESETS", "DiTConfig", "DiTLayout", "DiTPlan", "Preset", "QuantFormat", "SamplerConfig",
           "SamplingInterrupted", "WeightFormat", "Z_IMAGE_6B", "ZImageDiT", "denoise", "inspect", "load_dit",
           "make_noise", "make_sigmas", "model_velocity", "plan_dit"]
