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


ARGS = ("--config", "configs/gen_tiny.py", "--config.vae.init_from=random", "--config.train.steps=2",
        "--config.checkpoint.every=1", "--noprogress")


def test_training_logs_one_line_per_stage_and_no_library_chatter(tmp_path):
    env = _env_without_platforms()
    quiet = _train(*ARGS, f"--workdir={tmp_path / 'quiet'}", env=env)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert all(" director_jax." in line for line in lines), lines  # nothing from Orbax, absl, JAX or libtpu
    assert len(lines) <= 3, lines
    assert "TPU" not in quiet.stderr and "libtpu" not in quiet.stderr
    assert quiet.stdout.strip() == "done at step 2; non-finite updates skipped: 0"


@pytest.mark.slow
def test_verbose_shows_the_libraries_logs(tmp_path):
    verbose = _train(*ARGS, f"--workdir={tmp_path / 'verbose'}", "--verbose", env=_env_without_platforms())
    assert verbose.returncode == 0, verbose.stderr
    libraries = [line for line in verbose.stderr.splitlines() if " INFO " in line and " director_jax." not in line]
    assert libraries, "--verbose shows the libraries' INFO logs"


@pytest.mark.parametrize(("args", "says"), [
    (("--bogus",), "Unknown command line flag 'bogus'"),
    (("--config", "configs/gen_tiny.py", "--config.train.no_such_field=1"), "no_such_field"),
    pytest.param(("--config", "configs/gen_tiny.py", "--config.train.steps=many"), "--config.train.steps=many",
                 marks=pytest.mark.slow),
    pytest.param(("--config", "configs/no_such_config.py", "--workdir=x"), "no_such_config.py", marks=pytest.mark.slow),
    pytest.param(("--config", "configs/gen_tiny.py", "--workdir=x", "--config.mesh.rules=(('embed', 'nope'),)"),
                 "unknown mesh axis 'nope'", marks=pytest.mark.slow),
    pytest.param(("--config", "configs/gen_tiny.py", "--workdir=x", "extra"), "unexpected arguments",
                 marks=pytest.mark.slow),
])
def test_user_mistakes_are_one_line_and_exit_code_2(args, says, tmp_path):
    result = subprocess.run([sys.executable, "-m", "director_jax.train", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (ROOT / "x").exists()


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:  # the real exception the library raises
        return e
    raise AssertionError("expected an exception")


def test_library_errors_caused_by_input_map_to_one_line_and_bugs_do_not(tmp_path):
    import pickle

    from safetensors.numpy import load_file

    from director_jax.cli import user_error_message

    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    missing = tmp_path / "missing.png"
    cases = {
        "safetensors file is damaged": _raised(lambda: load_file(garbage)),
        ".pth file is damaged": _raised(lambda: pickle.loads(b"\x80\x04garbage")),
        "check the path": _raised(lambda: open(missing)),  # noqa: SIM115
    }
    for says, error in cases.items():
        message = user_error_message(error)
        assert message is not None and says in message and "\n" not in message, (type(error), message)
    assert user_error_message(_raised(lambda: [][1])) is None  # a bug keeps its traceback
    assert user_error_message(_raised(lambda: int("x"))) is None
