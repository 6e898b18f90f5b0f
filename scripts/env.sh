#!/usr/bin/env bash
# Creates (first use) or refreshes (requirements changed) the project's virtual environment in .venv,
# then installs director_jax in editable mode, and puts .venv/bin first on the PATH. Sourced by
# scripts/demo.sh and scripts/test.sh, and by users (`source scripts/env.sh`): the set-up runs in a
# subshell with its own strict options, so the caller's shell options are left as they were and a
# failed set-up returns 1 instead of closing an interactive shell.
_director_jax_setup() (
set -euo pipefail
ROOT="$1"
VENV="$2"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "director_jax needs Python 3.11 (found: $("$PY" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
}
STAMP="$VENV/.director_jax_requirements"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[env] setting up $VENV (first use or requirements changed) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  # torch first, pinned, so that diffusers or anything else cannot pull a CUDA build.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$ROOT/requirements-test.txt" -c "$ROOT/requirements.lock" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" >&2
  echo "$WANT" > "$STAMP"
  echo "[env] ready" >&2
fi
)
_DJ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_DJ_VENV="${DIRECTOR_JAX_VENV:-$_DJ_ROOT/.venv}"
# Called as a plain command (not in an `if` or `||`, where bash would ignore the subshell's `set -e`): in a
# script with `set -e` a failed set-up stops the script; in an interactive shell its status is kept.
_director_jax_setup "$_DJ_ROOT" "$_DJ_VENV"
_DJ_STATUS=$?
unset -f _director_jax_setup
if [ "$_DJ_STATUS" -eq 0 ]; then
  export PATH="$_DJ_VENV/bin:$PATH"
  export DIRECTOR_JAX_ROOT="$_DJ_ROOT"
fi
unset _DJ_ROOT _DJ_VENV
[ "$_DJ_STATUS" -eq 0 ] || { unset _DJ_STATUS; return 1 2>/dev/null || exit 1; }
unset _DJ_STATUS
