"""Shared fixtures. Tiny checkpoint writers live in zimage_fixtures.py; the ComfyUI host in comfy_host.py."""

import pytest

from zimage_core import checkpoint, safetensors_file


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every tensor the core reads, as TensorInfo (all reads go through safetensors_file.read_into)."""
    seen = []
    real = safetensors_file.read_into

    def spy(f, info, out):
        seen.append(info)
        return real(f, info, out)

    monkeypatch.setattr(safetensors_file, "read_into", spy)
    monkeypatch.setattr(checkpoint, "read_into", spy)
    return seen
