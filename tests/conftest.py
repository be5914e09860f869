"""Shared fixtures. Tiny checkpoint writers live in zimage_fixtures.py; the ComfyUI host in comfy_host.py."""

import pytest
import torch

from zimage_core import checkpoint, safetensors_file


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every tensor whose data the core touches, as TensorInfo: all tensor data is either read
    (safetensors_file.read_into) or mapped (safetensors_file.map_tensor)."""
    seen = []
    real_read, real_map = safetensors_file.read_into, safetensors_file.map_tensor

    def read_spy(f, info, out):
        seen.append(info)
        return real_read(f, info, out)

    def map_spy(mapping, info):
        seen.append(info)
        return real_map(mapping, info)

    for module in (safetensors_file, checkpoint):
        monkeypatch.setattr(module, "read_into", read_spy)
    monkeypatch.setattr(checkpoint, "map_tensor", map_spy)
    return seen


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: on a shared 2-core machine torch's thread pool (OpenMP
    oversubscription) only costs time there, up to ~100× on a loaded machine. Use with autouse in the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
