"""Locks in how the pack imports, with and without ComfyUI, and the core/host boundary.

- The pack root imports in plain Python (no ComfyUI) and exports empty node mappings; if it imported
  ComfyUI unguarded, pytest and standalone `zimage_core` users would break.
- A real ComfyUI 0.3.75 (`--quick-test-for-ci`, installed by scripts/setup.sh) imports the pack without
  `IMPORT FAILED`; that flag exits 0 even when a pack fails, so only its log can tell.
- `zimage_core/` never imports ComfyUI's modules (STYLE.md 9.2: adapters live in `nodes/`) and never uses
  pickle, torch.load, eval or exec (code execution on load; the Comfy registry flags or bans these).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

import comfy_host

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "zimage_core"
HOST_MODULES = {
    "comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "node_helpers", "server", "latent_preview",
}  # fmt: skip
UNSAFE_CALLS = {"eval", "exec"}


def test_pack_root_imports_without_comfyui(monkeypatch: pytest.MonkeyPatch) -> None:
    # Absent, even if another test has put ComfyUI on sys.path.
    monkeypatch.setitem(sys.modules, "folder_paths", None)
    spec = importlib.util.spec_from_file_location(
        "comfyui_zimage", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "comfyui_zimage", pack)
    spec.loader.exec_module(pack)

    assert pack.NODE_CLASS_MAPPINGS == {}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert "comfyui_zimage.nodes" not in sys.modules


def test_real_comfyui_imports_pack() -> None:
    rc, log = comfy_host.run_quick_test()
    assert rc == 0, log
    assert comfy_host.pack_import_problems(log) == [], log


def boundary_violations(source: str) -> list[str]:
    """Host imports and unsafe calls in one module's source, as 'line: what' strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules, line = [], getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports stay inside the core
            modules = [node.module]
            if node.module == "torch" and any(alias.name == "load" for alias in node.names):
                found.append(f"{line}: imports torch.load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_CALLS:
            found.append(f"{line}: {node.func.id}()")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            found.append(f"{line}: torch.load()")
        for module in modules:
            top = module.split(".")[0]
            if top in HOST_MODULES:
                found.append(f"{line}: imports host module {module}")
            if top == "pickle":
                found.append(f"{line}: imports {module}")
    return found


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import comfy.model_management", ["1: imports host module comfy.model_management"]),
        ("from folder_paths import get_full_path", ["1: imports host module folder_paths"]),
        ("import server as s", ["1: imports host module server"]),
        ("from . import nodes\nfrom .nodes import x\nimport torch.nn", []),
        ("import pickle", ["1: imports pickle"]),
        ("from torch import load", ["1: imports torch.load"]),
        ("import torch\nsd = torch.load(p)", ["2: torch.load()"]),
        ("eval('1')\nexec('x = 1')", ["1: eval()", "2: exec()"]),
        ("from safetensors.torch import load_file\nsd = load_file(p)", []),
    ],
    ids=lambda case: case.replace("\n", "; ") if isinstance(case, str) else "",
)
def test_boundary_scanner(source: str, expected: list[str]) -> None:
    assert boundary_violations(source) == expected


@pytest.mark.parametrize(
    "path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)  # fmt: skip
def test_core_has_no_host_imports_or_unsafe_calls(path: Path) -> None:
    assert boundary_violations(path.read_text(encoding="utf-8")) == []
