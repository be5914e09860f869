"""Resolve what a user points at into a set of safetensors files, with every header validated.

Accepted: a single `.safetensors` file; a sharded folder with its `*.safetensors.index.json`; the
index itself; the first (or any) shard of a sharded set, as musubi-tuner users pass it; a model root
holding a component folder (`transformer/`, `text_encoder/`, `vae/`). An index may only name files in
its own folder, and every shard it names must be there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .safetensors_file import Header, TensorInfo, read_header

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


@dataclass(frozen=True)
class Source:
    """A checkpoint on disk: the path given, its files in order and their headers."""

    path: Path
    headers: tuple[Header, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(h.path for h in self.headers)

    def tensors(self) -> dict[str, tuple[Header, TensorInfo]]:
        return {k: (h, info) for h in self.headers for k, info in h.tensors.items()}

    @property
    def metadata(self) -> dict[str, str]:
        return self.headers[0].metadata


def open_source(path: str | Path, component: str | None = None) -> Source:
    """Find and validate the safetensors files at `path` (a `component` subfolder of a model root first)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if component and (path / component).is_dir():
            path = path / component
        return _from_folder(path)
    if path.name.endswith(".index.json"):
        return _from_index(path)
    if m := _SHARD.match(path.name):
        index = path.parent / f"{m['stem']}.safetensors.index.json"
        if index.is_file():
            return _from_index(index, given=path)
        n = int(m["n"])
        files = [path.parent / f"{m['stem']}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) {missing} of this {n}-shard set are missing from {path.parent}")
        return _checked(path, [read_header(f) for f in files])
    return _checked(path, [read_header(path)])


def _from_folder(folder: Path) -> Source:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _from_index(indexes[0], given=folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(indexes) > 1 or not files:
        what = f"{len(indexes)} index files" if indexes else "no .safetensors file"
        raise ValueError(f"{folder}: expected one checkpoint, found {what}; pass the file or index to load")
    if len(files) == 1:
        return _checked(folder, [read_header(files[0])])
    if all(_SHARD.match(f.name) for f in files):
        return open_source(files[0])
    raise ValueError(f"{folder}: holds {len(files)} unrelated .safetensors files {[f.name for f in files]}; "
                     "pass the one to load")


def _from_index(index: Path, given: Path | None = None) -> Source:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: not a safetensors index (no 'weight_map' object)")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{index}: names {name!r}, which is outside the index's folder; shards must sit beside it")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: shard(s) {missing} named in the index are missing from {index.parent}")
    headers = [read_header(index.parent / n) for n in names]
    for h in headers:
        listed = {k for k, n in weight_map.items() if n == h.path.name}
        if listed != set(h.tensors):
            odd = sorted(listed ^ set(h.tensors))[:5]
            raise ValueError(f"{index}: disagrees with shard {h.path.name} about keys such as {odd}")
    return _checked(given or index, headers)


def _checked(path: Path, headers: list[Header]) -> Source:
    seen: dict[str, Path] = {}
    for h in headers:
        for k in h.tensors:
            if k in seen:
                raise ValueError(f"{path}: key {k!r} appears in both {seen[k].name} and {h.path.name}")
            seen[k] = h.path
    return Source(path, tuple(headers))
