"""LoRA nodes: a thin adapter over zimage_core.lora (reading every trainer's format, runtime application)."""

from __future__ import annotations

import folder_paths

from ..zimage_core.lora import read_lora
from . import _host as host
from ._hosting import with_loras


class ZImageLoraLoader:
    TITLE = "Z-Image LoRA"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Applies a Z-Image LoRA of any trainer's format (musubi-tuner, AI Toolkit, DiffSynth, "
                   "diffusion-pipe, ComfyUI's trainer, LyCORIS LoHa/LoKr, DoRA) to a Z-Image DiT, without changing "
                   "the base weights. Chain several; the report lists what matched.")
    RETURN_TYPES = (host.ZIMAGE_DIT, "STRING")
    RETURN_NAMES = ("dit", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "From Z-Image DiT Loader or another Z-Image LoRA node (they stack)."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {
                "tooltip": "models/loras: any Z-Image LoRA file; q/k/v and fused qkv layouts both apply exactly. "
                           "A LoRA for another model (Flux, SDXL, Lumina-2) is refused with a clear error."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplies the LoRA's change. Several LoRAs at 1.0 can overcook Turbo; "
                                              "lower each (e.g. 0.6–0.8)."}),
        }}

    def apply(self, dit, lora_name: str, strength: float):
        lora = read_lora(folder_paths.get_full_path_or_raise("loras", lora_name))
        hosted, reports = with_loras(dit, (*dit.loras, (lora, strength)))
        return (hosted, "\n".join(r.text() for r in reports))


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageLoraLoader,)}
