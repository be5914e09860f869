"""Reading safetensors files: a header-only probe, then each tensor mapped or read once, in place.

Only the safetensors format is read (never pickle). A tensor kept as stored on the CPU is a
copy-on-write view of the file mapping (`map_tensor`): its pages are the page cache's, so loading
allocates nothing and an in-place change (a merged LoRA) copies only the pages it writes, never the
file. Tensors that must be converted, fused or moved are read with plain reads into their final
storage (`read_into`). Either way the loaded model is the only copy of its weights.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2**20
SPLIT_READ_BYTES = 8 * 2**20
# First bytes of pickle checkpoints saved under a .safetensors name (told apart, never opened).
_PICKLE_LOOKS = {b"PK": "a PyTorch zip/pickle checkpoint, which is never opened",
                 **{bytes([0x80, v]): "a pickle file, which is never opened" for v in range(2, 6)}}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of a safetensors file; no tensor data is read."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a pickle checkpoint ({path.suffix}); only .safetensors files are read, "
                         "pickle files are never opened (convert it to safetensors first)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            looks = _PICKLE_LOOKS.get(head[:2], "no valid header")
            raise ValueError(f"{path}: not a safetensors file ({looks}; {size} bytes)")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {name: _tensor_info(path, name, spec, 8 + n, size) for name, spec in raw.items()}
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _tensor_info(path: Path, name: str, spec, base: int, size: int) -> TensorInfo:
    try:
        dtype = DTYPES[spec["dtype"]]
        shape = tuple(int(s) for s in spec["shape"])
        b, e = (int(o) for o in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {spec!r}") from None
    info = TensorInfo(dtype, shape, base + b, base + e)
    if e - b != info.numel * dtype.itemsize or b < 0:
        raise ValueError(f"{path}: tensor {name!r} claims {e - b} bytes for shape {list(shape)} {spec['dtype']}")
    if info.end > size:
        raise ValueError(f"{path}: truncated file: tensor {name!r} ends at byte {info.end}, "
                         f"but the file has only {size} bytes")
    return info


def read_into(f: BinaryIO, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Read one tensor's bytes into `out`, a contiguous CPU tensor of the same dtype and numel.

    Copying out of the page cache is CPU-bound, so a large tensor is read as two halves on two threads
    (positional reads release the GIL) where the OS has them.
    """
    buf = out.view(-1).view(torch.uint8).numpy()
    n = info.end - info.start
    if n >= SPLIT_READ_BYTES and hasattr(os, "preadv"):
        half = n // 2
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(_pread, f.fileno(), buf[half:], info.start + half)
            got = _pread(f.fileno(), buf[:half], info.start) + second.result()
    else:
        f.seek(info.start)
        got = f.readinto(buf)
    if got != n:
        raise ValueError(f"{getattr(f, 'name', '?')}: truncated file while reading bytes {info.start}..{info.end}")
    return out


def _pread(fd: int, view, offset: int) -> int:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def map_file(path: Path) -> mmap.mmap:
    """A private (copy-on-write) mapping of the whole file; it stays valid after the file is closed."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def release_mappings(mappings: Sequence[mmap.mmap]) -> bool:
    """Unmap the resident pages of unmodified file mappings (MADV_DONTNEED); they stay in the page cache.

    On a private mapping MADV_DONTNEED would also discard pages written to in place, so a mapping with
    any such page (counted as "Anonymous" in /proc/self/smaps) is left alone. (MADV_PAGEOUT would keep
    them, but it evicts the clean pages from the page cache too, so they come back from disk.) True if
    every mapping was released; Linux only. /proc/self/smaps is read once for all the mappings.
    """
    if not sys.platform.startswith("linux") or not mappings:
        return False
    ranges = []
    for mapping in mappings:
        view = np.frombuffer(mapping, dtype=np.uint8)
        ranges.append((view.ctypes.data, view.ctypes.data + len(mapping)))
        del view  # release the buffer export
    written = _anonymous_kib(ranges)
    for mapping, kib in zip(mappings, written, strict=True):
        if kib == 0:
            mapping.madvise(mmap.MADV_DONTNEED)
    return not any(written)


def _anonymous_kib(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Private (written-to) memory inside each [start, end) of this process's address space, from /proc/self/smaps."""
    totals, inside = [0] * len(ranges), []
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: "lo-hi perms ..."
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = [n for n, (start, end) in enumerate(ranges) if lo < end and hi > start]
            elif inside and first == "Anonymous:":
                for n in inside:
                    totals[n] += int(line.split()[1])
    return totals


def map_tensor(mapping: mmap.mmap, info: TensorInfo) -> torch.Tensor | None:
    """A zero-copy tensor over the mapped bytes, or None where they can't be viewed (misaligned, empty)."""
    if info.numel == 0 or info.start % info.dtype.itemsize:
        return None
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
    return raw.view(info.dtype).reshape(info.shape)


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    return read_into(f, info, torch.empty(info.shape, dtype=info.dtype))


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` when the block succeeds, removed when it
    fails, so a failed save leaves no partial file and the old file, if any, untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` through `replaced_atomically`."""
    from safetensors.torch import save_file

    with replaced_atomically(path) as tmp:
        save_file(dict(tensors), tmp, metadata=None if metadata is None else dict(metadata))
    return Path(path)
