"""Helpers shared by the bench scripts: paths, the ComfyUI import, JSON output and plain-text tables."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"  # git-ignored
COMFY_DIR = REPO / ".host" / "ComfyUI"


def add_repo_paths() -> None:
    """Make `zimage_core` (repo root) and the test helpers (`tests/`) importable from a bench script."""
    for p in (REPO / "tests", REPO):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def import_comfy() -> ModuleType:
    """ComfyUI's `comfy` package from .host/ComfyUI, forced onto the CPU (COMFY_HOST.md trap 6)."""
    add_repo_paths()
    try:
        from comfy_host import import_comfy as host_import
    except ImportError:  # tests/comfy_host.py not there: the same steps inline
        sys.path.insert(0, str(COMFY_DIR))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401

        return comfy
    return host_import()


def write_json(name: str, data: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned plain-text table; floats are printed as given (format them first)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def read_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakStatus(threading.Thread):
    """The peaks of some read_status() fields, sampled every 20 ms while running (a context manager, or start/stop).

    VmHWM counts mapped file pages too; sampling RssAnon beside RssFile tells them apart."""

    def __init__(self, fields: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.peak = dict.fromkeys(fields, 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            st = read_status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], st[k])

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peak

    def __enter__(self) -> PeakStatus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def disk_read_kib() -> int:
    """KiB read from block devices since boot, machine-wide (/proc/vmstat pgpgin)."""
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("pgpgin "))
