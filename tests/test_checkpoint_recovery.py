"""Damaged or unfinished checkpoint steps never block or mislead: only committed steps count, a step
that does not restore (truncated or garbage array files, NaN weights) is reported in one warning line
and the previous complete step is used, by inference (``load_director_gen``) and by the trainer's resume.

Every checkpoint here is a real Orbax step written by the trainer's ``Checkpointer`` (or by ``train``
itself), damaged for real on disk: files truncated or overwritten, commit markers deleted, a save
killed while it is under way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.build import DamagedCheckpointError, flatten_state, load_director_gen, step_directory, unflatten_state
from director_jax.configs_common import load_config
from director_jax.train import state as state_lib
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.trainer import build_run, train

ROOT = Path(__file__).resolve().parents[1]
GEN_CONFIG = ROOT / "configs" / "gen_tiny.py"


def _cfg(steps: int = 10):
    cfg = load_config(GEN_CONFIG)
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.optim.decay_steps = 20
    cfg.checkpoint.update(dict(every=2, keep_last=10, keep_every=0))
    return cfg


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 10 and 20 of gen_tiny (two different train states), saved by the trainer's Checkpointer.

    Returns the workdir and, per step, the saved arrays on the host by their checkpoint names.
    """
    workdir = tmp_path_factory.mktemp("two_steps")
    cfg = _cfg()
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    first = jax.jit(run.init, out_shardings=run.shardings)()
    second = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, first)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    for step, state in ((10, first), (20, second)):
        ckpt.save(step, state, {}, {"config": cfg.to_json_best_effort(), "task": "gen", "step": step}, wait=True)
    ckpt.close()
    host = {step: {k: np.asarray(v) for k, v in flatten_state(s).items()} for step, s in ((10, first), (20, second))}
    return workdir, host, first


def _copy(saved, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(saved[0], workdir)
    return workdir


def _array_files(step_dir: Path) -> list[Path]:
    """The OCDBT data files of a step's train state (every array's bytes live in them)."""
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no array files under {step_dir}/state"
    return files


def _truncate(step_dir: Path) -> None:
    for p in _array_files(step_dir):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _garbage(step_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for p in _array_files(step_dir):
        p.write_bytes(rng.bytes(p.stat().st_size))


def _load(workdir: Path, **kw):
    return load_director_gen(_cfg(), workdir, sharding=_one_device(), **kw)


def _assert_weights_of(model, loaded, host: dict[str, np.ndarray]) -> None:
    ours = flatten_state(nnx.state(model))
    assert ours, "the model has no weights"
    for name, value in ours.items():
        np.testing.assert_array_equal(np.asarray(value), host[f"{loaded.weights}.{name}"], err_msg=name)


def _warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# ------------------------------------------------------------------------------------------------
# (a) only committed steps count, locally as on gs://

PARTIAL_SAVE = """
import os, sys
import jax.numpy as jnp
from director_jax.configs_common import load_config
from director_jax.train.checkpoint import Checkpointer
cfg = load_config(sys.argv[2])
cfg.checkpoint.keep_last = 10
ckpt = Checkpointer(sys.argv[1], cfg.checkpoint)
ckpt.save(30, {"params": {"x": jnp.zeros((4096, 1024))}}, {}, {"step": 30})  # asynchronous
os._exit(9)  # as a kill -9 while the save is under way
"""


def test_uncommitted_and_partial_newest_steps_are_ignored(saved, tmp_path, caplog):
    workdir = _copy(saved, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    subprocess.run([sys.executable, "-c", PARTIAL_SAVE, str(ckpt_dir), str(GEN_CONFIG)], check=False,
                   capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert (ckpt_dir / "30.orbax-checkpoint-tmp").is_dir() and not (ckpt_dir / "30").exists(), (
        f"the save was not caught under way; the test proves nothing: {sorted(p.name for p in ckpt_dir.iterdir())}")
    # step 20: a complete-looking directory (digits, state/, metadata) whose commit marker never came
    (ckpt_dir / "20" / "commit_success.txt").unlink()

    step_dir, step = step_directory(workdir)
    assert (Path(str(step_dir)).name, step) == ("10", 10)
    ckpt = Checkpointer(ckpt_dir, _cfg().checkpoint)
    assert (ckpt.all_steps(), ckpt.latest_step()) == ([10], 10)  # the trainer's rule is the same
    ckpt.close()
    with caplog.at_level(logging.WARNING):
        model, loaded = _load(workdir)
    assert loaded.step == 10 and Path(loaded.directory).name == "10"
    _assert_weights_of(model, loaded, saved[1][10])
    assert _warnings(caplog, "step 20") and _warnings(caplog, "step 30")
    with pytest.raises(FileNotFoundError, match="commit_success.txt"):  # named explicitly: refused, not replaced
        _load(workdir, step=20)
    with pytest.raises(FileNotFoundError, match="commit_success.txt"):
        _load(ckpt_dir / "20")


# ------------------------------------------------------------------------------------------------
# (b) a newest step whose array files are damaged: one warning line, the previous step's exact weights


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_damaged_newest_step_falls_back_to_the_previous_one(saved, tmp_path, caplog, damage):
    workdir = _copy(saved, tmp_path)
    damage(workdir / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING):
        model, loaded = _load(workdir)
    assert (loaded.step, loaded.weights) == (10, "ema")
    _assert_weights_of(model, loaded, saved[1][10])
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("step 20: ")
    lines = _warnings(caplog, "step 20")
    assert len(lines) == 1 and "\n" not in lines[0] and "cannot be used" in lines[0], lines
    assert len(lines[0]) < 600, lines[0]  # the reason, not TensorStore's whole spec
    assert "array metadata does not read" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------
# (c) NaN in the weights of the newest step is damage too


def test_nan_weights_in_the_newest_step_fall_back(saved, tmp_path, caplog):
    workdir = _copy(saved, tmp_path)
    _, host, first = saved
    flat = flatten_state(first)
    names = sorted(n for n in flat if n.startswith("ema."))
    bad = names[len(names) // 2]
    flat[bad] = flat[bad].at[(0,) * flat[bad].ndim].set(jnp.nan)
    nan_state = unflatten_state(first, flat)
    cfg = _cfg()
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(30, nan_state, {}, {"config": cfg.to_json_best_effort(), "task": "gen", "step": 30}, wait=True)
    ckpt.close()

    with caplog.at_level(logging.WARNING):
        model, loaded = _load(workdir)
    assert loaded.step == 20
    _assert_weights_of(model, loaded, host[20])
    lines = _warnings(caplog, "step 30")
    assert len(lines) == 1 and bad in lines[0] and "NaN" in lines[0], lines
    # the trainer's restore treats it the same way
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    try:
        with pytest.raises(DamagedCheckpointError, match=rf"step 30 .*{bad}.*NaN"):
            ckpt.restore(30, state_lib.with_shardings(run.abstract, run.shardings), data=False)
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------------------
# (d) a damaged step the user named explicitly: an error, no silent substitute


def test_explicitly_named_damaged_step_is_a_clear_error(saved, tmp_path):
    workdir = _copy(saved, tmp_path)
    _truncate(workdir / "checkpoints" / "20")
    for kw, path in (({"step": 20}, workdir), ({}, workdir / "checkpoints" / "20")):
        with pytest.raises(ValueError, match=r"checkpoint step 20 in .* is damaged: .*explicitly") as err:
            _load(path, **kw)
        assert "\n" not in str(err.value)
    _, loaded = _load(workdir, step=10)  # the intact one, named, loads
    assert loaded.step == 10 and loaded.skipped == ()


# ------------------------------------------------------------------------------------------------
# (f) nothing restores: an error, never a random model or a fresh training run over the checkpoints


def test_nothing_restorable_is_a_clear_error(saved, tmp_path):
    workdir = _copy(saved, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    _truncate(ckpt_dir / "20")
    _garbage(ckpt_dir / "10")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step in .* restores: step 20: .*; step 10: "):
        _load(workdir)
    before = sorted(p.name for p in ckpt_dir.iterdir())
    with pytest.raises(ValueError, match=r"no checkpoint step in .* restores \(step 20: .*; step 10: "):
        train(_cfg(22), workdir, devices=jax.devices()[:1], progress=False)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before  # nothing moved, nothing written

    for step in (10, 20):
        (ckpt_dir / str(step) / "commit_success.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint step under .*step 10: no commit_success"):
        _load(workdir)


# ------------------------------------------------------------------------------------------------
# (e) the trainer resumes from the previous complete step and goes on exactly


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def _restored(ckpt_dir: Path, step: int, cfg) -> dict[str, np.ndarray]:
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
    try:
        state, _, _ = ckpt.restore(step, state_lib.with_shardings(run.abstract, run.shardings), data=False)
    finally:
        ckpt.close()
    return {k: np.asarray(v) for k, v in flatten_state(state).items()}


@pytest.mark.slow  # ~30 s: two trainer runs; loading past damage stays in the default set; CI runs it
def test_train_resumes_from_the_previous_step_when_the_newest_is_damaged(tmp_path, caplog):
    workdir, reference = tmp_path / "run", tmp_path / "reference"
    cfg = _cfg(4)  # checkpoints at steps 2 and 4
    train(cfg, workdir, devices=jax.devices()[:1], progress=False)
    first_losses = _losses(workdir)
    shutil.copytree(workdir / "checkpoints", reference)
    _truncate(workdir / "checkpoints" / "4")

    with caplog.at_level(logging.WARNING):
        result = train(cfg, workdir, devices=jax.devices()[:1], progress=False)
    lines = _warnings(caplog, "step 4 ")
    assert len(lines) == 1 and "cannot be restored" in lines[0] and "\n" not in lines[0], lines
    assert sorted(result.losses) == [3, 4] and result.final_step == 4  # resumed from step 2
    for step in (3, 4):  # same parameters and same data order as the first run from step 2 on
        assert result.losses[step] == first_losses[step], (step, result.losses[step], first_losses[step])
    ckpt_dir = workdir / "checkpoints"
    assert (ckpt_dir / "4.damaged").is_dir() and (ckpt_dir / "4" / "commit_success.txt").exists()
    for step in (2, 4):  # step 2 untouched; the new step 4 bit for bit the one the damage destroyed
        ours, theirs = _restored(ckpt_dir, step, cfg), _restored(reference, step, cfg)
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"step {step}: {name}")
