"""The trainer: meshes agree, runs are reproducible, checkpoints resume exactly and survive kills.

Every run here is the real trainer on the tiny Director-Gen config (synthetic movies, frozen tiny
VAE encode inside the step), in this process or as a ``python -m director_jax.train`` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from director_jax.configs_common import load_config
from director_jax.train import state as state_lib
from director_jax.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from director_jax.train.trainer import NonFiniteLossError, build_run, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gen_tiny.py"


def tiny(steps: int = 10, **mesh) -> ml_collections.ConfigDict:
    cfg = load_config(CONFIG)
    cfg.train.steps = steps
    cfg.optim.decay_steps = 20  # one schedule for runs of any length, so their steps compare
    cfg.train.log_every = 1
    cfg.checkpoint.every = 10
    cfg.checkpoint.keep_last = 10
    cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return cfg


def _cli(workdir: Path, steps: int, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "director_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
            "--config.vae.init_from=random", f"--config.train.steps={steps}", f"--config.checkpoint.every={every}",
            "--config.checkpoint.keep_last=10",
            "--config.optim.decay_steps=20",
            "--config.train.log_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--noprogress",
            # the materialising reference attention: these runs compare training mechanics across processes and
            # restarts bit for bit, and rows' scans partition differently on 1 x 8 and 2 x 4 devices
            "--config.model_options.attention_impl=xla", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _jsonl(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restore_params(workdir: Path, step: int, cfg, devices=None):
    run = build_run(cfg, devices=devices, materialize_frozen=False)
    target = state_lib.with_shardings(run.abstract, run.shardings)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    try:
        state, _, meta = ckpt.restore(step, target, data=False)
    finally:
        ckpt.close()
    return state, meta


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended early (rc {proc.returncode}): "
                                 f"{proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.005)


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _jsonl(workdir)}


def _fingerprint(indices: list[int]) -> float:
    """The trainer's data_fingerprint of one step's example indices."""
    return float(zlib.crc32(np.asarray(indices, np.int64).tobytes()))


def _last_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """20 steps on fsdp=4 x data=2, checkpoints at 10 and 20: the reference run, launched as a user would.

    Runs compared bit for bit are all launched the same way (``python -m director_jax.train``).
    """
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cli(workdir, 20, 10), env=_env(), check=True, capture_output=True)
    return workdir, _losses(workdir)


@pytest.mark.slow  # ~7 min on 2 cores: four 10-step runs; CI runs it (.ci/run: the slow set after the default one)
def test_meshes_and_micro_batches_give_the_same_losses(uninterrupted, tmp_path):
    """Single device, fsdp=4 x data=2, tensor=2 x fsdp=4, 2 micro-batches and ring sequence parallelism over
    sequence=4 x fsdp=2: one loss curve within 1e-5."""
    ref_dir, reference = uninterrupted
    expected = np.array([reference[s] for s in range(1, 11)])
    fingerprints = {r["step"]: r["data_fingerprint"] for r in _jsonl(ref_dir)}
    runs = {"single device": (tiny(10), jax.devices()[:1]),
            "tensor=2 x fsdp=4": (tiny(10, tensor=2, fsdp=4), None),
            "fsdp=4 x data=2, 2 micro-batches": (tiny(10, data=2, fsdp=4), None),
            "sequence=4 x fsdp=2, ring attention": (tiny(10, fsdp=2, sequence=4), None)}
    runs["fsdp=4 x data=2, 2 micro-batches"][0].train.micro_batches = 2
    runs["sequence=4 x fsdp=2, ring attention"][0].model_options.sequence_parallel = "ring"
    for i, (name, (cfg, devices)) in enumerate(runs.items()):
        result = train(cfg, tmp_path / str(i), devices=devices, progress=False)
        got = np.array([result.losses[s] for s in range(1, 11)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
        assert {s: _fingerprint(i) for s, i in result.data_indices.items()} == {
            s: fingerprints[s] for s in range(1, 11)}, name
    assert expected[-1] < expected[0]  # and it trains


@pytest.mark.slow  # ~30 s; bitwise determinism also in the slow mesh and two-process runs; CI runs the slow set
def test_same_seed_and_config_give_bitwise_identical_losses(uninterrupted, tmp_path):
    ref_dir, reference = uninterrupted
    subprocess.run(_cli(tmp_path, 20, 10), env=_env(), check=True, capture_output=True)
    assert _losses(tmp_path) == reference and len(reference) == 20
    strip = lambda rows: [(r["step"], r["loss"], r["grad_norm"], r["data_fingerprint"]) for r in rows]  # noqa: E731
    assert strip(_jsonl(tmp_path)) == strip(_jsonl(ref_dir))


@pytest.mark.slow  # kill -9 safety also in test_kill_9_during_an_async_save_... and test_checkpoint_recovery.py
def test_kill_9_then_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    """10 steps, kill -9 (mid-run, after the step-10 checkpoint), resume to 20: same parameters, same data."""
    ref_dir, _ = uninterrupted
    proc = subprocess.Popen(_cli(tmp_path, 20, 10), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "checkpoints"
    _wait_for(lambda: (ckpt_dir / "10").is_dir() and _last_step(tmp_path) >= 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "20").exists(), "the run finished before the kill; the test proves nothing"

    resumed = subprocess.run(_cli(tmp_path, 20, 10), env=_env(), check=True, capture_output=True)
    assert b"resumed from step 10" in resumed.stderr

    cfg = tiny(20, data=2, fsdp=4)
    ours, _ = _restore_params(tmp_path, 20, cfg)
    theirs, _ = _restore_params(ref_dir, 20, cfg)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # data order: the fingerprint of every step's examples, 1..20, as the metrics file tells it after the restart
    fingerprints = lambda d: [(r["step"], r["data_fingerprint"]) for r in _jsonl(d)]  # noqa: E731
    assert fingerprints(tmp_path) == fingerprints(ref_dir)
    assert [r["loss"] for r in _jsonl(tmp_path)] == [r["loss"] for r in _jsonl(ref_dir)]


@pytest.mark.slow  # two trainer launches against the storage emulator, ~1 min; CI runs the slow set too
def test_cloud_storage_workdir_survives_kill_9_like_a_local_one(uninterrupted, gcs_emulator, tmp_path):
    """--workdir gs://...: checkpoints, metrics, TensorBoard and config in the bucket; kill -9 and resume as locally."""
    from etils import epath

    ref_dir, _ = uninterrupted
    remote = f"gs://{gcs_emulator.bucket}/runs/gen-{time.time_ns()}"
    env = {**_env(), **gcs_emulator.env}
    committed = epath.Path(remote) / "checkpoints" / "10" / "commit_success.txt"  # Orbax's last write on GCS
    proc = subprocess.Popen(_cli(remote, 20, 10), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(committed.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (epath.Path(remote) / "checkpoints" / "20").exists(), "the run finished before the kill"
    assert not list(Path.cwd().glob("gs:*")), "a local directory named after the bucket was made"

    resumed = subprocess.run(_cli(remote, 20, 10), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resumed from step 10" in resumed.stderr

    import gcsfs

    local = tmp_path / "downloaded"
    gcsfs.GCSFileSystem().get(remote + "/", str(local), recursive=True)
    strip = lambda d: [(r["step"], r["loss"], r["data_fingerprint"]) for r in _jsonl(d)]  # noqa: E731
    assert strip(local) == strip(ref_dir) and len(strip(local)) == 20
    assert json.loads((local / "config.json").read_text()) == json.loads((ref_dir / "config.json").read_text())
    assert len(list((local / "tensorboard").iterdir())) == 2  # one event file per process start
    cfg = tiny(20, data=2, fsdp=4)
    ours, _ = _restore_params(epath.Path(remote), 20, cfg)
    theirs, _ = _restore_params(ref_dir, 20, cfg)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mesh,devices", [({"data": 4}, 4), pytest.param({"data": 8}, 8, marks=pytest.mark.slow),
                                          ({"tensor": 2, "fsdp": 2}, 4)])
def test_restore_onto_another_mesh_gives_identical_parameters(uninterrupted, mesh, devices):
    """Saved as fsdp=4 x data=2 on 8 devices; restored on 4 devices or as pure data parallel."""
    ref_dir, _ = uninterrupted
    saved, meta = _restore_params(ref_dir, 20, tiny(20, data=2, fsdp=4))
    assert meta["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    moved, _ = _restore_params(ref_dir, 20, tiny(20, **mesh), devices=jax.devices()[:devices])
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(moved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(b.sharding.device_set) == devices
    kernel = moved.params["dit"]["blocks"]["ffn"]["proj_in"]["kernel"].get_value()
    run = build_run(tiny(20, **mesh), devices=jax.devices()[:devices], materialize_frozen=False)
    expected = run.shardings.params["dit"]["blocks"]["ffn"]["proj_in"]["kernel"]
    assert kernel.sharding == expected
    # Adam's moments and the EMA of that kernel live in the same shards as the kernel itself
    mirrors = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path((moved.opt_state, moved.ema))
               if state_lib.path_parts(path)[-5:] == ("dit", "blocks", "ffn", "proj_in", "kernel")]
    assert len(mirrors) == 3 and all(m.sharding.is_equivalent_to(expected, m.ndim) for m in mirrors)


@pytest.mark.slow  # over a minute and a half on 2 cores; CI runs the slow set too
def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_cli(tmp_path, 1000, 1000), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _last_step(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]
    ckpt = Checkpointer(tmp_path / "checkpoints", tiny().checkpoint)
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and 3 <= step < 1000
    assert f"preempted at step {step}" in out.decode()
    state, meta = _restore_params(tmp_path, step, tiny(1000, data=2, fsdp=4))
    assert int(state.step) == step == meta["step"]
    # and the run goes on from there
    result = train(tiny(step + 2, data=2, fsdp=4), tmp_path, progress=False)
    assert sorted(result.losses) == [step + 1, step + 2]


def test_kill_9_during_an_async_save_leaves_the_previous_checkpoint(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    proc = subprocess.Popen(_cli(tmp_path, 1000, 10), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "checkpoints"
    in_flight = lambda: ckpt_dir.is_dir() and any(  # noqa: E731
        "tmp" in p.name and p.name.startswith("20") for p in ckpt_dir.iterdir())
    _wait_for(lambda: (ckpt_dir / "10").is_dir() and in_flight(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "20").is_dir(), "the save finished before the kill; the test proves nothing"
    ckpt = Checkpointer(ckpt_dir, tiny().checkpoint)
    assert ckpt.latest_step() == 10
    ckpt.close()
    cfg = tiny(20, data=2, fsdp=4)
    ours, _ = _restore_params(tmp_path, 10, cfg)
    theirs, _ = _restore_params(ref_dir, 10, cfg)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# Bad input


def test_resuming_with_an_incompatible_config_names_the_arrays(uninterrupted, tmp_path):
    import shutil

    ref_dir, _ = uninterrupted
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    cfg = tiny(30, data=2, fsdp=4)
    cfg.model.ffn_dim = 96
    with pytest.raises(IncompatibleCheckpointError, match=r"ffn\.proj_in\.kernel: checkpoint \(2, 64, 128\)"):
        train(cfg, tmp_path, progress=False)


def test_mesh_that_does_not_match_the_devices():
    with pytest.raises(ValueError, match="multiply to 6 but there are 8 devices"):
        build_run(tiny(data=3, fsdp=2), materialize_frozen=False)


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run(_cli(tmp_path, 2, 1, "--config.train.stepz=3"), env=_env(), capture_output=True)
    assert proc.returncode != 0 and b"stepz" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_nonfinite_loss_stops_with_diagnostics_or_is_skipped(tmp_path):
    cfg = tiny(4)
    cfg.optim.learning_rate = 1e30  # the first update overflows the weights: every later loss is inf / NaN
    cfg.optim.warmup_steps = 0
    cfg.optim.grad_clip = 0.0
    with pytest.raises(NonFiniteLossError, match="not finite") as err:
        train(cfg, tmp_path / "stop", devices=jax.devices()[:1], progress=False)
    diag = list((tmp_path / "stop" / "diagnostics").glob("nonfinite_step_*"))
    assert len(diag) == 1 and str(diag[0]) in str(err.value)
    assert np.load(diag[0] / "batch_process_0.npz")["video"].shape == (8, 17, 32, 32, 3)

    cfg.train.nonfinite = "skip"
    result = train(cfg, tmp_path / "skip", devices=jax.devices()[:1], progress=False)
    bad = [s for s, loss in result.losses.items() if not np.isfinite(loss)]
    assert result.nonfinite_skips == len(bad) >= 1
    state, _ = _restore_params(tmp_path / "skip", 4, cfg, devices=jax.devices()[:1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))



@pytest.mark.slow  # over a minute and a half on 2 cores; CI runs the slow set too
def test_vae_task_trains_and_accumulation_matches_one_batch(tmp_path):
    """The same trainer on the VAE task: 2 micro-batches give the 1-batch losses (posterior samples too)."""
    cfg = load_config(ROOT / "configs" / "vae_tiny.py")
    cfg.train.update(dict(steps=4, log_every=1, sample_posterior=True))
    cfg.optim.warmup_steps = 0  # a 4-step run: learn from the first update
    cfg.mesh.update(dict(data=2, fsdp=1))
    devices = jax.devices()[:2]
    whole = train(cfg, tmp_path / "whole", devices=devices, progress=False)
    cfg.train.micro_batches = 2
    split = train(cfg, tmp_path / "split", devices=devices, progress=False)
    losses = np.array([whole.losses[s] for s in range(1, 5)])
    # float32 rounding: the two-micro-batch program sums in another order (YNNPACK picks matmul tiles by shape)
    np.testing.assert_allclose([split.losses[s] for s in range(1, 5)], losses, rtol=5e-6, atol=1e-5)
    assert (tmp_path / "whole" / "checkpoints" / "4").is_dir()


@pytest.mark.slow  # two processes of 4 devices: ~2 min on 2 cores; CI runs the slow set too
def test_two_processes_train_like_one(uninterrupted, tmp_path):
    """Two processes x 4 CPU devices (jax.distributed, gloo collectives), each loading its own half of every
    batch: the losses and the step-10 parameters of the one-process 8-device run; one data-state file per host."""
    import socket

    ref_dir, reference = uninterrupted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    procs = [subprocess.Popen(_cli(tmp_path, 10, 10, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    got = _losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=0,
                               atol=1e-5)
    data_files = sorted(p.name for p in (tmp_path / "checkpoints" / "10" / "data").glob("process_*"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    cfg = tiny(20, data=2, fsdp=4)
    ours, meta = _restore_params(tmp_path, 10, cfg)
    theirs, _ = _restore_params(ref_dir, 10, cfg)
    assert meta["process_count"] == 2
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_ema_in_host_memory_trains_and_resumes_like_the_device_ema(tmp_path):
    """optim.ema_memory=host: the EMA lives in pinned host memory (not HBM), and a run that keeps it there,
    stopped and resumed from its checkpoint, ends with the same EMA and weights as an uninterrupted device run."""

    def cfg(steps: int, memory: str) -> ml_collections.ConfigDict:
        c = tiny(steps, data=2, fsdp=4)
        c.vae.init_from = "random"
        c.checkpoint.every = 1
        c.optim.ema_memory = memory
        return c

    train(cfg(2, "device"), tmp_path / "device", progress=False)
    train(cfg(1, "host"), tmp_path / "host", progress=False)
    train(cfg(2, "host"), tmp_path / "host", progress=False)  # resumes at step 1: the EMA restored into host memory

    host, _ = _restore_params(tmp_path / "host", 2, cfg(2, "host"))
    device, _ = _restore_params(tmp_path / "device", 2, cfg(2, "device"))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host.ema)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(device.ema)} == {"device"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host.params)} == {"device"}
    for a, b in zip(jax.tree.leaves((host.params, host.ema)), jax.tree.leaves((device.params, device.ema)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(e) - np.asarray(p)).max())
             for e, p in zip(jax.tree.leaves(host.ema), jax.tree.leaves(host.params), strict=True)]
    assert max(moved) > 0  # two updates happened: the EMA trails the weights
