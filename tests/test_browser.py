"""The pack's UI workflows in the real ComfyUI frontend, driven in headless Chromium as a user drives it.

The host (ComfyUI 0.3.75 with this pack, tiny random models under the real file names) serves the real web UI
(`comfyui-frontend-package`, pinned in requirements/test.txt). For every `workflows/*.json` that is not
`.api.json`, `tests/browser/drop_and_queue.mjs` (playwright-core + Debian's chromium, both installed by
scripts/setup.sh) opens the page, drops the file unchanged onto the canvas as a desktop drag does (a `drop`
event with a File), shrinks the image size in the loaded graph to 64×64 (1024² is too slow on CPU), clicks
Run and waits for the image in the SaveImage node and in the Queue panel (a workflow without an image output,
e.g. LoRA inspect/convert, for its text in each Preview Any node instead). Screenshots after the drop and after
the image go to `test-artifacts/browser/` (kept, ignored by git), with the script's JSON result beside them.

Locks in: each UI workflow loads with exactly its node types and the same widget values as in the file (a
node whose inputs were reordered or gained a widget shifts them), shows no missing-node/missing-model
dialog, no error toast, no red node (unknown type, node_errors, execution error), runs to `success` in
/history, and the UI shows that very output file; the page logs no console error or uncaught exception beyond
the known noise listed in BENIGN. A control run drops a workflow with an unknown node type and must see the
missing-node dialog, so the checks cannot pass vacuously. Breaks on: a renamed node id or a node that fails
to import (missing-node dialog), a changed INPUT_TYPES order or widget set, a default model name the host
does not list (missing-models dialog), a workflow that fails validation or execution, a frontend upgrade
that moves the Run button or the Queue panel (fix the script then).

A missing chromium or playwright-core is a setup error, never a skip: run `bash scripts/setup.sh`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from host_models import serving

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json"))
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
SCRIPT = BROWSER_DIR / "drop_and_queue.mjs"
PLAYWRIGHT = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
CHROMIUM = Path(os.environ.get("ZIMAGE_CHROMIUM", "/usr/bin/chromium"))
NODE = Path(os.environ.get("ZIMAGE_NODE", "/usr/bin/node"))
ARTIFACTS = REPO / "test-artifacts" / "browser"
SIZE = 64
IMAGE_NODES = {"SaveImage", "PreviewImage"}

# Console errors and uncaught exceptions that are not ours, each with why (matched on the message text, plus
# the URL for network errors). Anything else the page logs as an error fails the test.
BENIGN = [
    # The missing-models dialog asks the model's download URL for its size (the dialog itself fails the test).
    (r"^Error fetching file size: TypeError: Failed to fetch", r""),
    # No network in the tests: the frontend asks api.comfy.org for release notes and for registry info on
    # every node type it shows (ours included), and gets no DNS answer.
    (r"^Failed to load resource: net::ERR_", r"^https?://(?!127\.0\.0\.1[:/])"),
    # Optional per-user files the frontend probes for on a fresh user folder; 404 is the "none yet" answer:
    # user.css (custom stylesheet), saved workflows and subgraphs, saved templates, and the favicon.
    (r"^Failed to load resource: the server responded with a status of 404",
     r"/(api/userdata/user\.css|user\.css|favicon\.ico|api/userdata/comfy\.templates\.json"
     r"|api/userdata\?dir=(workflows|subgraphs)\b.*)$"),
    # Frontend 1.32.9 bug at start-up, before any workflow: useRenderModeSetting sets a setting that is not
    # registered yet, and settingStore's onChange reads `.id` of undefined (stack: onChange <- Proxy.set <- load).
    (r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange \(.*\s+at Proxy\.set \(",
     r""),
]


def benign(text: str, url: str = "") -> bool:
    return any(re.search(t, text, re.DOTALL) and re.search(u, url) for t, u in BENIGN)


@pytest.fixture(scope="module")
def browser_deps():
    missing = [str(p) for p in (NODE, CHROMIUM, PLAYWRIGHT) if not p.exists()]
    if missing:
        raise RuntimeError(f"browser test dependencies missing: {missing}. Run `bash scripts/setup.sh` (it installs "
                           "Debian's chromium and tests/browser/node_modules from tests/browser/package-lock.json).")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory, browser_deps):
    with serving(tmp_path_factory.mktemp("browser_host")) as (server, _):
        yield server


def drive(server, workflow: Path, *extra: str, timeout: float = 150) -> dict:
    """Run drop_and_queue.mjs on one workflow file; its JSON result (also saved as <stem>.json beside the shots)."""
    stem = workflow.name.removesuffix(".json")
    for old in ARTIFACTS.glob(f"{stem}-*.png"):
        old.unlink()
    cmd = [str(NODE), str(SCRIPT), "--url", server.url, "--workflow", str(workflow), "--out", str(ARTIFACTS),
           "--size", str(SIZE), "--chromium", str(CHROMIUM), "--timeout-s", "90", *extra]
    proc = subprocess.run(cmd, cwd=BROWSER_DIR, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    (ARTIFACTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    for shot in result["screenshots"]:
        print(f"screenshot: {shot}")
    return result


def page_errors(result: dict) -> list[str]:
    """Console errors and uncaught exceptions not listed in BENIGN."""
    return ([f"console: {c['text']} ({c['url']})" for c in result["console_errors"] if not benign(c["text"], c["url"])]
            + [f"exception: {e}" for e in result["page_errors"] if not benign(e)])


def test_there_are_ui_workflows():
    assert UI_FILES, f"no UI workflow (*.json, not *.api.json) in {WORKFLOWS}"


@pytest.mark.parametrize("workflow", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_drops_runs_and_shows_its_image(host, workflow):
    server = host
    r = drive(server, workflow)
    if r["dismissed_dialogs"]:
        print("closed before the drop:", [d["text"][:80] for d in r["dismissed_dialogs"]])
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    check(r.get("error") is None, f"script stopped at stage {r['stage']!r}: {r.get('error')}")
    check(r.get("frontend_version") == version("comfyui-frontend-package"), f"frontend {r.get('frontend_version')}")
    check(r.get("loaded_as") == workflow.stem, f"active workflow after the drop: {r.get('loaded_as')}")
    check(r.get("loaded_types") == r["expected_types"],
          f"graph after the drop has {r.get('loaded_types')}, the file {r['expected_types']}")
    check(r.get("widget_mismatches") == [], f"widget values changed by loading: {r.get('widget_mismatches')}")
    for when in ("after_drop", "after_run"):
        seen = r.get(when) or {}
        check(seen.get("dialogs") == [], f"{when}: dialogs/toasts {seen.get('dialogs')}")
        check(seen.get("nodes") == [], f"{when}: node errors {seen.get('nodes')}")
    images = any(n["type"] in IMAGE_NODES for n in json.loads(workflow.read_text())["nodes"])
    if images:
        check(r.get("resized"), "no width/height widget to shrink (EmptySD3LatentImage, ImageScale, ...)")
        check(r.get("sent_sizes") and all(v == [SIZE, SIZE] for v in r["sent_sizes"].values()),
              f"sizes in the queued prompt: {r.get('sent_sizes')}")
    check(r.get("prompt_status") == 200 and not r.get("prompt_node_errors"),
          f"POST /prompt {r.get('prompt_status')}: {r.get('prompt_node_errors')}")
    if r.get("widget_extras"):
        print("widget values the frontend added:", r["widget_extras"])
    if r.get("prompt_id"):
        entry = server.wait(r["prompt_id"])
        check(entry["status"]["status_str"] == "success", f"/history status {entry['status']}")
        check(r.get("finished") == "success", f"the page heard {r.get('finished')}")
        if not images:
            check_texts(r, entry, check)
    if r.get("prompt_id") and images:
        saved = sorted((node, i["filename"]) for node, out in entry.get("outputs", {}).items()
                       for i in out.get("images", []))
        check(saved, f"/history lists no image: {entry.get('outputs')}")
        heard = sorted((o["node"], o["filename"]) for o in r.get("ui_outputs") or [])
        check(heard == saved, f"UI got outputs {heard}, /history has {saved}")
        shown = sorted((o["node"], o["filename"]) for o in r.get("node_images") or [])
        check(shown == saved, f"images drawn in nodes {shown}, /history has {saved}")
        for o in r.get("node_images") or []:
            check((o["width"], o["height"]) == (SIZE, SIZE), f"image in node {o['node']}: {o}")
            check((server.base_dir / "output" / o["filename"]).is_file(), f"{o['filename']} not in output/")
        check(r.get("filename") in [f for _, f in saved], f"Queue panel image {r.get('panel_image')}")
    check(len(r["screenshots"]) == 2 and all(Path(p).is_file() for p in r["screenshots"]),
          f"screenshots {r['screenshots']}")
    check(page_errors(r) == [], "page errors:\n  " + "\n  ".join(page_errors(r)))
    assert not problems, f"{workflow.name} in the browser ({ARTIFACTS}):\n- " + "\n- ".join(problems)


def check_texts(r: dict, entry: dict, check) -> None:
    """A text-output run: the page heard every text /history has, and each Preview Any node shows its own."""
    texts = sorted((node, t) for node, out in entry.get("outputs", {}).items() for t in out.get("text", []))
    check(texts, f"/history lists no text: {entry.get('outputs')}")
    heard = sorted((o["node"], o["text"]) for o in r.get("ui_texts") or [])
    check(heard == texts, f"UI got texts {heard}, /history has {texts}")
    shown = sorted((o["node"], o["text"]) for o in r.get("node_texts") or [])
    previews = [(node, t) for node, t in texts if node in {o["node"] for o in r.get("node_texts") or []}]
    check(shown and shown == previews, f"Preview Any nodes show {shown}, /history has {previews}")


def test_a_missing_node_is_seen(host, tmp_path):
    """Control: a workflow naming an unknown node type must show the missing-node dialog and a red node."""
    ui = json.loads(UI_FILES[0].read_text())
    ui["nodes"][0]["type"] = "ZImageNoSuchNode"
    broken = tmp_path / "zimage_missing_node_control.json"
    broken.write_text(json.dumps(ui))
    r = drive(host, broken, "--no-run")
    assert r.get("error") is None, r.get("error")
    dialogs = r["after_drop"]["dialogs"]
    assert any(d["kind"] == "missing-nodes" and "ZImageNoSuchNode" in d["text"] for d in dialogs), dialogs
    assert any("ZImageNoSuchNode" in p for p in r["after_drop"]["nodes"]), r["after_drop"]
