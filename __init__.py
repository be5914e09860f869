"""Z-Image node pack for ComfyUI.

Inside ComfyUI this module exports the node mappings; anywhere else (pytest, plain Python)
it imports without ComfyUI and exports empty mappings, so `zimage_core` stays usable alone.
"""

try:
    import folder_paths  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
