"""Bridges from our models to ComfyUI's native types."""

from __future__ import annotations

from . import _host as host


class ZImageDiTToModel:
    TITLE = "Z-Image DiT → MODEL"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Hands a DiT loaded by this pack (e.g. an official sharded release, or fp8) to ComfyUI as a native "
                   "MODEL: KSampler, SamplerCustom, LoraLoaderModelOnly and the other MODEL nodes take it. The weights "
                   "are shared, not copied.")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "From Z-Image DiT Loader. The MODEL samples with ComfyUI's Z-Image "
                                                 "settings (flow matching, shift 3; change it with "
                                                 "ModelSamplingAuraFlow). Use cfg 1 for Turbo."}),
        }}

    def convert(self, dit):
        return (dit.patcher.clone(),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageDiTToModel,)}
