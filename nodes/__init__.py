"""ComfyUI adapters over `zimage_core`. Only this folder may import ComfyUI modules.

The mappings are public API (node ids are stored in every saved workflow): merged here from the
per-file tables; display names come from each class's TITLE.
"""

from . import loaders, lora, native, sampling, train

NODE_CLASS_MAPPINGS: dict = {**loaders.NODE_CLASS_MAPPINGS, **sampling.NODE_CLASS_MAPPINGS,
                             **native.NODE_CLASS_MAPPINGS, **lora.NODE_CLASS_MAPPINGS, **train.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    node_id: getattr(cls, "TITLE", node_id) for node_id, cls in NODE_CLASS_MAPPINGS.items()
}
