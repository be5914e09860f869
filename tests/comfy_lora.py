"""ComfyUI 0.3.75's own LoRA loading, on tiny canonical state dicts (a second, independent reference).

`key_map(base)` is `comfy.lora.model_lora_keys_unet` of a real (weightless) ComfyUI Z-Image model of the
tiny size; `merged(...)` is what ModelPatcher does per weight, plus the keys ComfyUI logged as not loaded.
"""

from __future__ import annotations

import logging

import torch

from lora_fixtures import canonical_shapes
from zimage_fixtures import TINY


def key_map(base: dict[str, torch.Tensor]) -> dict:
    import comfy_host

    comfy_host.import_comfy()
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet({f"diffusion_model.{k}": v for k, v in base.items()},
                                                          "diffusion_model.")
    # detection fills the Z-Image settings only at dim 3840; the same settings at the tiny size
    config.unet_config.update(n_heads=TINY["n_heads"], n_kv_heads=TINY["n_kv_heads"], axes_dims=TINY["axes_dims"],
                              axes_lens=TINY["axes_lens"], rope_theta=256.0, ffn_dim_multiplier=8 / 3,
                              z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
    model = config.get_model({}, "")
    assert isinstance(model, comfy.model_base.Lumina2)
    native = {k.removeprefix("diffusion_model.") for k in model.state_dict()}
    assert set(canonical_shapes()) <= native, "the ComfyUI model must have every canonical tensor"
    return comfy.lora.model_lora_keys_unet(model, {})


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.missing: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.missing.append(msg.removeprefix("lora key not loaded: "))


def merged(lora_sd, key_map, base, strength) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's merge of `lora_sd` into the canonical `base`; and the sorted keys it did not load."""
    import comfy.lora

    handler = _Collect()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora_sd, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    out = {k: v.clone() for k, v in base.items()}
    for patch_key, adapter in patches.items():
        key, offset = patch_key if isinstance(patch_key, tuple) else (patch_key, None)
        canonical = key.removeprefix("diffusion_model.")
        # with an offset, calculate_weight changes the narrowed slice of `out[canonical]` in place
        result = comfy.lora.calculate_weight([(strength, adapter, 1.0, offset, None)], out[canonical], key)
        if offset is None:
            out[canonical] = result
    return out, sorted(handler.missing)
