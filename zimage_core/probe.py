"""What a checkpoint is, told from its key names alone (header-only).

Used by the loaders to refuse the wrong kind of file with a clear message (a Flux DiT or a LoRA given
as a Z-Image DiT) and by `python -m zimage_core inspect`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from enum import Enum


class ModelKind(str, Enum):
    ZIMAGE_DIT = "zimage_dit"
    TEXT_ENCODER = "text_encoder"  # Qwen3 (Z-Image's "Lumina2-type" text encoder)
    VAE = "vae"
    LORA = "lora"
    FLUX_DIT = "flux_dit"
    SDXL_UNET = "sdxl_unet"
    LUMINA2_DIT = "lumina2_dit"
    UNKNOWN = "unknown"


FOREIGN_NAMES = {
    ModelKind.FLUX_DIT: "a Flux transformer",
    ModelKind.SDXL_UNET: "an SD/SDXL UNet",
    ModelKind.LUMINA2_DIT: "a Lumina-2 DiT",
    ModelKind.LORA: "a LoRA (load it with the LoRA loader, on top of a Z-Image DiT)",
    ModelKind.TEXT_ENCODER: "a text encoder",
    ModelKind.VAE: "a VAE",
}

_LORA = re.compile(
    r"(^|\.)(lora_(A|B|up|down|mid)|hada_w[12]_[ab]|lokr_w[12](_[ab])?|lora\.(up|down))(\.|$)|^lora_(unet|te)"
)
_PREFIX = re.compile(r"^(model\.diffusion_model\.|diffusion_model\.|transformer\.|text_encoders\.\w+\.transformer\.)")


def classify(keys: Collection[str]) -> ModelKind:
    """The kind of model whose state dict has these keys."""
    if any(_LORA.search(k) for k in keys):
        return ModelKind.LORA
    bare = {_PREFIX.sub("", k) for k in keys}

    def has(*names: str) -> bool:
        return any(n in bare for n in names)

    if has("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
           "single_transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_q_proj.weight"):
        return ModelKind.FLUX_DIT
    if has("input_blocks.0.0.weight", "down_blocks.0.resnets.0.time_emb_proj.weight"):
        return ModelKind.SDXL_UNET
    if has("cap_embedder.1.weight"):
        if has("layers.0.adaLN_modulation.1.weight", "noise_refiner.0.adaLN_modulation.1.weight"):
            return ModelKind.LUMINA2_DIT  # Lumina-2 modulates through SiLU + Linear(1024 → 4·dim)
        return ModelKind.ZIMAGE_DIT
    if has("model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"):
        return ModelKind.TEXT_ENCODER
    if has("decoder.conv_in.weight", "encoder.conv_in.weight"):
        return ModelKind.VAE
    return ModelKind.UNKNOWN
