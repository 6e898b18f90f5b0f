"""The commands' shared prologue (``director_jax/cli.py``), through a real command: quiet logs, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "director_jax.train", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def _env_without_platforms() -> dict:
    """The user's environment: no JAX_PLATFORMS (the tests' conftest sets one), 2 CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def test_training_logs_one_line_per_stage_and_library_chatter_only_with_verbose(tmp_path):
    env = _env_without_platforms()
    args = ("--config", "configs/gen_tiny.py", "--config.train.steps=2", "--config.checkpoint.every=1",
            "--noprogress")
    quiet = _train(*args, f"--workdir={tmp_path / 'quiet'}", env=env)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert all(" director_jax." in line for line in lines), lines  # nothing from Orbax, absl, JAX or libtpu
    assert len(lines) <= 3, lines
    assert "TPU" not in quiet.stderr and "libtpu" not in quiet.stderr
    assert quiet.stdout.strip() == "done at step 2; non-finite updates skipped: 0"

    verbose = _train(*args, f"--workdir={tmp_path / 'verbose'}", "--verbose", env=env)
    assert verbose.returncode == 0, verbose.stderr
    libraries = [line for line in verbose.stderr.splitlines() if " INFO " in line and " director_jax." not in line]
    assert libraries, "--verbose shows the libraries' INFO logs"


@pytest.mark.parametrize(("args", "says"), [
    (("--bogus",), "Unknown command line flag 'bogus'"),
    (("--config", "configs/gen_tiny.py", "--config.train.steps=many"), "--config.train.steps=many"),
    (("--config", "configs/gen_tiny.py", "--config.train.no_such_field=1"), "no_such_field"),
    (("--config", "configs/no_such_config.py", "--workdir=x"), "no_such_config.py"),
    (("--config", "configs/gen_tiny.py", "--workdir=x", "--config.mesh.rules=(('embed', 'nope'),)"),
     "unknown mesh axis 'nope'"),
    (("--config", "configs/gen_tiny.py", "--workdir=x", "extra"), "unexpected arguments"),
])
def test_user_mistakes_are_one_line_and_exit_code_2(args, says, tmp_path):
    result = subprocess.run([sys.executable, "-m", "director_jax.train", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (ROOT / "x").exists()
