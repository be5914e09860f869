"""zimage_core: a plain-PyTorch Z-Image implementation (no ComfyUI import anywhere in this package).

Public API (see README "Python API"):
    load_dit(path, device, dtype, weight_format) -> ZImageDiT    # any layout, streamed, strict
    ZImageDiT(cfg)(x, t, cap_feats) -> v                          # t = 1 − σ, v ≈ x0 − ε
    DiTConfig, Z_IMAGE_6B, WeightFormat, DiTLayout, plan_dit, inspect
"""

from .checkpoint import DiTPlan, QuantFormat, load_dit, plan_dit
from .config import Z_IMAGE_6B, DiTConfig, WeightFormat
from .dit import ZImageDiT
from .inspection import inspect
from .keymaps import DiTLayout

__all__ = ["DiTConfig", "DiTLayout", "DiTPlan", "QuantFormat", "WeightFormat", "Z_IMAGE_6B", "ZImageDiT",
           "inspect", "load_dit", "plan_dit"]
