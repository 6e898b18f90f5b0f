#!/usr/bin/env bash
# The test command of the README: sets up .venv on first use, runs ruff, then pytest (slow cases
# excluded unless extra pytest arguments say otherwise, e.g. `scripts/test.sh -m slow`).
# The test files run in parallel, one worker per core up to 4 (DJ_TEST_WORKERS overrides; 0 = in this
# process), each file's tests in one worker so its module fixtures are built once: most of a test's time
# is XLA compiling on one thread, so two workers on two cores finish well before one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DIRECTOR_JAX_ROOT"
ruff check .
workers="${DJ_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
if [ "$workers" -gt 0 ]; then
  exec python -m pytest -n "$workers" --dist loadfile "$@"
fi
exec python -m pytest "$@"
