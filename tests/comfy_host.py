"""The real ComfyUI 0.3.75 host that scripts/setup.sh installs under .host/ (shared/docs/COMFY_HOST.md).

Tests import this as `comfy_host` (pytest's pythonpath includes `tests/`). A missing host raises instead of
skipping: the host is part of the test environment, and a skipped integration test would hide a broken setup.
Run as a script, it is setup.sh's smoke check and exits 1 unless ComfyUI imports this pack cleanly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
HOST_ROOT = REPO / ".host"
HOST_DIR = Path(os.environ.get("ZIMAGE_COMFY_HOST", HOST_ROOT / "ComfyUI")).resolve()
EXTRA_PATHS = HOST_ROOT / "extra_paths.yaml"  # lists HOST_ROOT/custom_nodes as a custom_nodes folder
PACK_PATH = HOST_ROOT / "custom_nodes" / "comfyui_zimage"  # symlink to REPO; ComfyUI logs this path
BASE_DIR = HOST_ROOT / "base"  # --base-directory: models, input, output, user
EXPECTED_BUILTIN_FAILURES = {"nodes_audio.py", "nodes_audio_encoder.py"}  # need torchaudio


def _require(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(
            f"ComfyUI test host incomplete, missing {missing}. Run `bash scripts/setup.sh` "
            "(or point ZIMAGE_COMFY_HOST at a ComfyUI 0.3.75 folder)."
        )


def import_comfy() -> ModuleType:
    """Import ComfyUI's `comfy` package from HOST_DIR as a library, forced onto the CPU; return it.

    HOST_DIR goes first on sys.path, so ComfyUI's generic top-level names (`nodes`, `utils`, `server`)
    shadow same-named modules for the rest of the process; tests reach this pack through its own
    package name, never as a top-level `nodes`.
    """
    _require(HOST_DIR / "comfy")
    if str(HOST_DIR) not in sys.path:
        sys.path.insert(0, str(HOST_DIR))
    import comfy.cli_args

    where = [Path(p).resolve() for p in comfy.__path__]  # a namespace package: no __init__.py, no __file__
    if where != [HOST_DIR / "comfy"]:
        raise RuntimeError(f"`comfy` was imported from {where}, not from {HOST_DIR}")
    # COMFY_HOST.md trap 6: without --cpu, comfy.model_management calls torch.cuda at import time
    # and crashes on CPU-only torch.
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401

    return comfy


def run_quick_test(extra_args: Sequence[str] = (), timeout: float = 600) -> tuple[int, str]:
    """Run `main.py --quick-test-for-ci` (import all nodes and custom nodes, then exit); return (rc, log)."""
    _require(HOST_DIR / "main.py", EXTRA_PATHS)
    cmd = [
        sys.executable, "main.py", "--cpu", "--quick-test-for-ci",
        "--database-url", "sqlite:///:memory:",  # the default writes a db file inside HOST_DIR
        "--extra-model-paths-config", str(EXTRA_PATHS),
        "--base-directory", str(BASE_DIR),
        *extra_args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=HOST_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )  # fmt: skip
    return proc.returncode, proc.stdout


def pack_import_problems(log: str) -> list[str]:
    """What in a run_quick_test log shows that this pack or the host did not import cleanly; [] if all did.

    `--quick-test-for-ci` exits 0 even when a custom node pack raises at import, so only the log tells.
    Custom-node failures read `0.0 seconds (IMPORT FAILED): <path>`; built-in ones `IMPORT FAILED: <file>`,
    of which only the two torchaudio modules are expected (torchaudio is not installable, COMFY_HOST.md).
    """
    problems = []
    for line in log.splitlines():
        builtin = re.match(r"IMPORT FAILED: (\S+)$", line.strip())
        if builtin and builtin[1] not in EXPECTED_BUILTIN_FAILURES:
            problems.append(f"built-in {line.strip()}")
        if "seconds (IMPORT FAILED)" in line or "Unable to parse pyproject.toml" in line:
            problems.append(line.strip())
    if not re.search(rf"seconds: {re.escape(str(PACK_PATH))}\s*$", log, re.MULTILINE):
        problems.append(f"no successful import of {PACK_PATH} in 'Import times for custom nodes'")
    return problems


def main() -> int:
    rc, log = run_quick_test()
    problems = pack_import_problems(log) + ([f"main.py exited with {rc}"] if rc else [])
    if problems:
        print(log)
        print("ComfyUI smoke check FAILED:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"ComfyUI ({HOST_DIR}) imported {PACK_PATH} cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
