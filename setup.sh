#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 (jax 0.12 needs it) and installs requirements.txt.
# Usage: bash setup.sh   (set PYTHON=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -rV); do
      echo "$(pyenv prefix "$v")/bin/python3"; return 0
    done
  fi
  return 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (set PYTHON=...)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $py ($("$py" --version))"
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The repository on the venv's import path: scripts anywhere run by .venv/bin/python import w2x_jax.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/w2x_jax_repo.pth"
