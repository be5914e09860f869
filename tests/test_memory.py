"""Handing a mapped model's pages back to the OS between pipeline stages.

Locks in: weights loaded on the CPU in their stored dtype are file mappings that `release_mapped_pages`
drops from this process's resident set (Linux), while the model stays usable and gives the same
output; a mapping with a weight edited in place is left resident, so the edit survives. Breaks if
the release is a no-op, or if it loses weights or in-place edits (MADV_DONTNEED alone reverts those).
"""

import copy
import sys

import pytest
import torch
from safetensors.torch import save_file

from zimage_core.checkpoint import load_dit, release_mapped_pages
from zimage_fixtures import comfy_state_dict, diffusers_dit, inputs


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux-only (a no-op elsewhere)")
def test_release_drops_resident_pages_and_keeps_the_model(tmp_path):
    """RssFile falls by most of the weight bytes; the output is bit-identical afterwards; edits survive."""
    dit = diffusers_dit(dim=512, n_heads=4, n_kv_heads=4)
    sd = {k: v.to(torch.bfloat16) for k, v in comfy_state_dict(dit.state_dict()).items()}
    path = tmp_path / "dit.safetensors"
    save_file(sd, path)
    weight_kib = sum(t.numel() * t.element_size() for t in sd.values()) // 1024
    dit = load_dit(path, dtype=torch.bfloat16)
    assert dit.mapped_files, "bf16 weights loaded as bf16 on the CPU should be file mappings"
    x, t, caps = inputs(1, [7], 8, 8)
    with torch.no_grad():
        before = dit(x, t, caps)
        touched = sum(float(p.float().sum()) for p in dit.parameters())  # fault every page in
    resident = rss_file_kib()
    assert release_mapped_pages(dit)
    assert resident - rss_file_kib() > 0.8 * weight_kib
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, caps), before, rtol=0, atol=0)
        assert sum(float(p.float().sum()) for p in dit.parameters()) == touched
        w = dit.layers[0].attention.out.weight
        w.mul_(2)  # an in-place edit (a merged LoRA) makes the page private: it must survive the release
        edited = w.clone()
    assert not release_mapped_pages(dit), "a mapping with pages written in place must be left resident"
    torch.testing.assert_close(dit.layers[0].attention.out.weight, edited, rtol=0, atol=0)
    assert copy.deepcopy(dit).mapped_files is dit.mapped_files
