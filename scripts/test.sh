#!/usr/bin/env bash
# The test command of the README: sets up .venv on first use, runs ruff, then pytest (slow cases
# excluded unless extra pytest arguments say otherwise, e.g. `scripts/test.sh -m slow`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DIRECTOR_JAX_ROOT"
ruff check .
exec python -m pytest "$@"
