"""Configs (frozen dataclasses), presets and option Enums. Real values are written down once, here.

Sources: ../shared/docs/ZIMAGE_SPEC.md §1.1 (TM `src/config/model.py`, diffusers
`ZImageTransformer2DModel`, the Turbo `transformer/config.json`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch


class WeightFormat(str, Enum):
    """How the large Linear weights of the transformer blocks are stored in memory."""

    COMPUTE = "default"  # the compute dtype given to the loader (bf16, fp16 or fp32)
    FP8 = "fp8_e4m3fn"  # float8_e4m3fn with a float32 scale, upcast to the compute dtype per matmul


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

Shapes = Mapping[str, Sequence[int]]  # checkpoint key -> tensor shape, what configs are read back from


def shape_dim(shapes: Shapes, key: str, axis: int) -> int | None:
    """`shapes[key][axis]`, or None if the key is absent or has fewer axes."""
    shape = shapes.get(key)
    return int(shape[axis]) if shape is not None and len(shape) > axis else None


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the Z-Image single-stream DiT (S3-DiT).

    Field names follow the official implementation. `ffn_dim`, `t_embed_dim` and `adaln_dim` are
    derived there (`int(dim/3*8)`, 1024, `min(dim, 256)`); they are explicit here so that a
    checkpoint's shapes fully determine the model (ComfyUI's NextDiT derives them differently at
    small widths).
    """

    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    cap_feat_dim: int
    ffn_dim: int
    t_embed_dim: int
    adaln_dim: int
    in_channels: int = 16
    patch_size: int = 2
    f_patch_size: int = 1
    freq_dim: int = 256  # sinusoidal timestep features
    axes_dims: tuple[int, int, int] = (32, 48, 48)  # RoPE split of head_dim: (caption/frame, H, W)
    axes_lens: tuple[int, int, int] = (1536, 512, 512)  # largest position + 1 on each axis
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    norm_eps: float = 1e-5
    seq_multiple: int = 32  # each stream is padded to a multiple of this with a learned pad token

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"DiTConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"DiTConfig: axes_dims {self.axes_dims} must be even and sum to head_dim {self.head_dim}"
            )
        if self.adaln_dim != min(self.dim, 256):
            raise ValueError(f"DiTConfig: adaln_dim {self.adaln_dim} must be min(dim, 256) = {min(self.dim, 256)}")
        if (self.patch_size, self.f_patch_size) != (2, 1):
            raise ValueError("DiTConfig: only the '2-1' patchification of Z-Image is supported")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size**2 * self.in_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_key_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> DiTConfig:
        """Infer the config from canonical (ComfyUI-named) key → shape, as ComfyUI's model detection does.

        RoPE axes are not stored in a checkpoint: Z-Image splits head_dim 128 as (32, 48, 48); other
        head sizes (tiny test models) get the same proportions (1/4, 3/8, 3/8).
        """
        need = ("x_embedder.weight", "cap_embedder.1.weight", "t_embedder.mlp.0.weight",
                "final_layer.adaLN_modulation.1.weight")
        missing = [k for k in need if k not in shapes]
        if missing:
            raise ValueError(f"not a Z-Image DiT: missing {missing}")

        def count(prefix: str) -> int:
            pattern = re.compile(rf"^{prefix}\.(\d+)\.")
            return len({m.group(1) for k in shapes if (m := pattern.match(k))})

        dim, patch_dim = shapes["x_embedder.weight"]
        block = "layers.0" if count("layers") else "noise_refiner.0"
        head_dim = shapes[f"{block}.attention.q_norm.weight"][0]
        if head_dim % 8:
            raise ValueError(f"DiT head_dim {head_dim} cannot take the Z-Image RoPE split")
        n_refiner = count("noise_refiner")
        if count("context_refiner") != n_refiner:
            raise ValueError(
                f"DiT has {n_refiner} noise_refiner but {count('context_refiner')} context_refiner blocks"
            )
        return cls(
            dim=dim,
            n_layers=count("layers"),
            n_refiner_layers=n_refiner,
            n_heads=dim // head_dim,
            cap_feat_dim=shapes["cap_embedder.1.weight"][1],
            ffn_dim=shapes[f"{block}.feed_forward.w1.weight"][0],
            t_embed_dim=shapes["t_embedder.mlp.0.weight"][0],
            adaln_dim=shapes["final_layer.adaLN_modulation.1.weight"][1],
            in_channels=patch_dim // 4,
            freq_dim=shapes["t_embedder.mlp.0.weight"][1],
            axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
        )


# The 6B DiT shared by Z-Image-Turbo, Z-Image (base) and ostris' De-Turbo.
Z_IMAGE_6B = DiTConfig(
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    cap_feat_dim=2560,
    ffn_dim=10240,
    t_embed_dim=1024,
    adaln_dim=256,
)
