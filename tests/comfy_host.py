"""The real ComfyUI 0.3.75 host that scripts/setup.sh installs under .host/ (shared/docs/COMFY_HOST.md).

Tests import this as `comfy_host` (pytest's pythonpath includes `tests/`). A missing host raises instead of
skipping: the host is part of the test environment, and a skipped integration test would hide a broken setup.
Run as a script, it is setup.sh's smoke check and exits 1 unless ComfyUI imports this pack cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
HOST_ROOT = REPO / ".host"
HOST_DIR = Path(os.environ.get("ZIMAGE_COMFY_HOST", HOST_ROOT / "ComfyUI")).resolve()
EXTRA_PATHS = HOST_ROOT / "extra_paths.yaml"  # lists HOST_ROOT/custom_nodes as a custom_nodes folder
PACK_PATH = HOST_ROOT / "custom_nodes" / "comfyui_zimage"  # symlink to REPO; ComfyUI logs this path
BASE_DIR = HOST_ROOT / "base"  # --base-directory: models, input, output, user
TEXT_EVENT = 3  # the websocket's binary BinaryEventTypes.TEXT frames (PromptServer.send_progress_text)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_paths(path: Path, models_dir: Path) -> Path:
    """An --extra-model-paths-config file: this pack (via HOST_ROOT/custom_nodes) plus models under `models_dir`."""
    kinds = ("diffusion_models", "text_encoders", "vae", "diffusers", "loras")
    folders = "".join(f"    {key}: {key}\n" for key in kinds)
    head = f"zimage_test_models:\n    base_path: {models_dir}\n    custom_nodes: {HOST_ROOT / 'custom_nodes'}\n"
    path.write_text(head + folders)
    return path


# RSS figures should show live memory: glibc's adaptive mmap threshold (up to 32 MiB) otherwise keeps freed
# tensor blocks of a tiny test model in its arenas for reuse, and RSS would not fall when a model is freed.
# A fixed 128 KiB threshold maps every tensor-sized block on its own and unmaps it on free.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class Server:
    """A real ComfyUI server on 127.0.0.1 (`main.py --cpu`), started and stopped by PID; stdlib HTTP only.

    `base_dir` is --base-directory (input/output/user); models come from `extra_paths` (write_extra_paths).
    """

    def __init__(self, base_dir: Path, extra_paths: Path, log_path: Path):
        _require(HOST_DIR / "main.py")
        self.base_dir, self.extra_paths, self.log_path = Path(base_dir), Path(extra_paths), Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Server:
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
            "--base-directory", str(self.base_dir), "--extra-model-paths-config", str(self.extra_paths),
        ]  # fmt: skip
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)  # main.py lists it; absent = crash
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=HOST_DIR, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=os.environ | _MALLOC_ENV)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} before serving:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def watch(self, client_id: str) -> Watcher:
        return Watcher(self.url, client_id)

    def images(self, entry: dict, node: str) -> list:
        """The RGB arrays (H, W, 3) uint8 of the images a finished prompt's output `node` saved (output/ or temp/)."""
        import numpy as np
        from PIL import Image

        return [np.asarray(Image.open(self.base_dir / ("output" if saved["type"] == "output" else "temp")
                                      / saved["subfolder"] / saved["filename"]).convert("RGB"))
                for saved in entry["outputs"][node]["images"]]

    def image(self, entry: dict, node: str):
        """The one image `node` saved (`images`, which must hold exactly one)."""
        (one,) = self.images(entry, node)
        return one

    def rss_bytes(self) -> int:
        """The server process's resident set (VmRSS)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON body); a 4xx answer (e.g. a prompt that fails validation) is returned, not raised."""
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict, client_id: str = "zimage-tests") -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise AssertionError(f"POST /prompt answered {status}: {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """The /history entry of a finished prompt (`status.status_str` is "success" or "error")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log()[-4000:]}")


class Watcher:
    """The server's websocket messages for one client id (progress, executing, …), collected on a thread:
    `with server.watch("id") as w: ...; w.messages` (each message as (monotonic time, decoded JSON)), `w.texts`."""

    def __init__(self, url: str, client_id: str):
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.messages: list[tuple[float, dict]] = []
        self.texts: list[tuple[str, str]] = []  # progress texts (PromptServer.send_progress_text): (node id, text)
        self._connected = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp  # ComfyUI's own dependency, in the test venv

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._connected.set()
            while not self._stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append((time.monotonic(), json.loads(msg.data)))
                elif msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == TEXT_EVENT:
                    (n,) = struct.unpack(">I", msg.data[4:8])  # event, node id length, node id, text
                    self.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def of_type(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, m["data"]) for t, m in list(self.messages) if m.get("type") == kind]

    def __enter__(self) -> Watcher:
        self._thread.start()
        if not self._connected.wait(15):
            raise TimeoutError(f"no websocket connection to {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


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
