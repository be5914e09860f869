"""A minimal PNG writer (8-bit RGB, tEXt metadata) so the CLI needs no imaging library.

Files are written to a temporary name in the target folder and renamed, so a failed save leaves none.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .safetensors_file import replaced_atomically

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) uint8, rounded as ComfyUI's SaveImage does (clip(255·x))."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3, H, W), got shape {list(image.shape)}")
    return np.clip(image.float().permute(1, 2, 0).cpu().numpy() * 255.0, 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """PNG bytes for an (H, W, 3) uint8 array; `text` becomes tEXt chunks (Latin-1 keys, UTF-8 values as iTXt)."""
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter type 0 per row
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        # iTXt: keyword, NUL, compression flag 0, method 0, empty language tag, NUL, empty translated keyword, NUL
        chunks.append(_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    chunks.append(_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
    chunks.append(_chunk(b"IEND", b""))
    return _SIGNATURE + b"".join(chunks)


def read_png_text(path: str | Path) -> dict[str, str]:
    """The tEXt/iTXt entries of a PNG (what `encode_png` wrote), for tests and tools."""
    data = Path(path).read_bytes()
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    out, pos = {}, len(_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            out[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[2].decode("utf-8")
        pos += 12 + length
    return out


def save_png(path: str | Path, image: torch.Tensor, text: Mapping[str, str] | None = None) -> Path:
    """Write one (3, H, W) [0, 1] image atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    data = encode_png(to_uint8(image), text)
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
