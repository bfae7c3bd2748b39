#!/usr/bin/env bash
# The test command: prepares the Python environment the end-to-end tests drive Tollgate with
# (the real `openai` SDK), then runs every Rust test in the workspace.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/requirements.txt"
fi
export TOLLGATE_TEST_PYTHON="$venv/bin/python"
cargo test --workspace --locked "$@"
