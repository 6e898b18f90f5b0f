#!/usr/bin/env bash
# The README's first command: the CPU demo on its embedded default config. Sets up .venv on first
# use. Extra arguments go to the demo (e.g. --workdir DIR, --config.train.steps 100).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DIRECTOR_JAX_ROOT"
# The CPU demo: keep jax off libtpu / GPU plugins a test install may have (JAX_PLATFORMS=... overrides).
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m director_jax.demo --config configs/demo.py --workdir runs/demo "$@"
