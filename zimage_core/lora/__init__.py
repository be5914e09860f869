"""LoRAs for the Z-Image DiT: read any trainer's format, apply (runtime or merged), report what matched.

    lora = read_lora("my_lora.safetensors")            # LoraFile: format, patches, unmatched keys, metadata
    applied = apply_loras(dit, [(lora, 0.8)], ApplyMode.RUNTIME)
    print(applied.text()); applied.remove()            # the base DiT, bit for bit
"""

from .adapters import Adapter, AdapterKind
from .apply import AppliedLoras, ApplyMode, LoraReport, apply_loras, runtime_patches
from .convert import ConvertedLora, TargetFormat, convert_lora, save_lora
from .merge import MergedDtype, save_merged_dit
from .read import LoraFile, LoraFormat, LoraPatch, lora_from_state_dict, read_lora
from .strength import effect_norms, normalised_for, normalised_strengths

__all__ = ["Adapter", "AdapterKind", "AppliedLoras", "ApplyMode", "ConvertedLora", "LoraFile", "LoraFormat",
           "LoraPatch", "LoraReport", "TargetFormat", "apply_loras", "convert_lora", "lora_from_state_dict",
           "read_lora", "runtime_patches", "save_lora"]
__all__ += ["effect_norms", "normalised_for", "normalised_strengths"]
__all__ += ["MergedDtype", "save_merged_dit"]
