#!/usr/bin/env bash
# The test command: install or check the environment (scripts/setup.sh), then run pytest.
# Arguments go to pytest in place of the default `tests`. The exit code is pytest's, and "no tests
# collected" (5) is a failure too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

setup_log="$(mktemp)"
trap 'rm -f "$setup_log"' EXIT
if ! bash scripts/setup.sh >"$setup_log" 2>&1; then
  cat "$setup_log"
  echo "scripts/setup.sh failed" >&2
  exit 1
fi
grep '^\[setup\]' "$setup_log"

if (($# == 0)); then  # the full run also lints (ruff settings in pyproject.toml)
  .venv/bin/ruff check . || { echo "ruff found problems" >&2; exit 1; }
fi

test_rc=0
.venv/bin/python -m pytest -q "${@:-tests}" || test_rc=$?
if ((test_rc == 5)); then
  echo "pytest collected no tests: counted as a failure" >&2
  exit 5
fi
exit "$test_rc"
