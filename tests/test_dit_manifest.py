"""The 6B preset builds, on the meta device, exactly the tensors of the real release files.

Locks in: every module name equals a ComfyUI single-file key (canonical names), the diffusers
names follow from the key-map table, shapes match, and the parameter count is 6,154,908,736.
Breaks if a module is renamed, a shape formula drifts, or the key-map table loses an entry.
"""


import torch

from zimage_core import Z_IMAGE_6B, DiTConfig, ZImageDiT
from zimage_core.keymaps import DiTLayout, from_canonical, join_key, split_key
from zimage_fixtures import manifest


def meta_6b() -> ZImageDiT:
    with torch.device("meta"):
        return ZImageDiT(Z_IMAGE_6B)


def test_6b_keys_and_shapes_equal_the_comfy_single_file():
    ours = {k: tuple(v.shape) for k, v in meta_6b().state_dict().items()}
    real = manifest("keys_dit_zimage_comfy.txt")
    assert set(real) - set(ours) == {"norm_final.weight"}  # unused Lumina-2 leftover, ignored on load
    assert ours == {k: v for k, v in real.items() if k != "norm_final.weight"}


def test_6b_diffusers_names_follow_from_the_key_map():
    real = manifest("keys_dit_zimage_diffusers.txt")
    mapped = {}
    for key, value in meta_6b().state_dict().items():
        module, leaf = split_key(key)
        for name, target in from_canonical(module, DiTLayout.DIFFUSERS):
            rows = value.shape[0] // target.parts
            mapped[join_key(name, leaf)] = (rows, *value.shape[1:]) if target.parts > 1 else tuple(value.shape)
    assert mapped == real


def test_6b_parameter_count():
    assert sum(p.numel() for p in meta_6b().parameters()) == 6_154_908_736


def test_config_inferred_from_the_real_key_shapes_is_the_preset():
    real = manifest("keys_dit_zimage_comfy.txt")
    assert DiTConfig.from_key_shapes(real) == Z_IMAGE_6B
