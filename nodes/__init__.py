"""ComfyUI adapters over `zimage_core`. Only this folder may import ComfyUI modules.

The nodes themselves arrive with the node-pack issue; the mappings are public API (node ids are
stored in every saved workflow), so they are merged here from the per-file tables.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    node_id: getattr(cls, "TITLE", node_id) for node_id, cls in NODE_CLASS_MAPPINGS.items()
}
