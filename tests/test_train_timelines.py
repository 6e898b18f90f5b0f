"""The trainer on per-example timelines (``train.timelines='per_example'``): on curated shards every row of a
step has its own task and keyframes, rows are padded to latent buckets, and meshes agree.

References: the loader's own task draw (``given`` / ``given_start`` of each row, read back from the arrays
the step receives) and each row's ``TimelineLayout``; the 1-device run for the 8-device ones.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from director_jax.data.task_sampling import TASKS, spans_from_masks
from director_jax.models.timeline import Timeline
from director_jax.train.trainer import batch_bucket, build_run, global_batch, make_data, train
from tests.test_train import CONFIG, _env, _jsonl
from tests.test_train_curated import _cfg, curated  # noqa: F401 (the module's shards fixture)

BUCKETS = (7, 9, 11)


def _timeline_cfg(root: Path, steps: int = 3, buckets: tuple[int, ...] = BUCKETS, **mesh):
    cfg = _cfg(root, steps=steps)
    cfg.train.timelines = "per_example"
    cfg.train.latent_buckets = buckets
    cfg.data.curated.caption_dropout = 0.0
    cfg.optim.decay_steps = 10
    if mesh:
        cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh})
    return cfg


def test_steps_see_many_timelines_each_rows_own(curated):  # noqa: F811
    root, _ = curated
    run = build_run(_timeline_cfg(root), materialize_frozen=False)
    data = make_data(run)
    tasks, counts, buckets = set(), set(), set()
    for _ in range(6):
        local = next(data)
        bucket = batch_bucket(run, local)
        batch = {k: np.asarray(v) for k, v in global_batch(run, local, bucket).items()}  # what the step receives
        buckets.add(bucket)
        assert batch["latent_given"].shape == (8, bucket) and batch["video"].shape == (8, 17, 32, 32, 3)
        for row in range(8):
            spans = spans_from_masks(local["given"][row], local["given_start"][row])
            layout = Timeline(17, tuple(spans)).layout
            n = layout.num_latents
            assert n <= bucket == min(b for b in BUCKETS if b >= local["latent_count"].max())
            np.testing.assert_array_equal(batch["latent_valid"][row], np.arange(bucket) < n)
            np.testing.assert_array_equal(batch["latent_given"][row, :n], layout.given)
            np.testing.assert_array_equal(batch["latent_position"][row, :n], layout.position)
            tasks.add(TASKS[int(local["task"][row])])
            counts.add(sum(1 for _, length in spans if length == 1))
    assert tasks == set(TASKS)  # every task, multi-shot windows at their cuts included
    assert len(counts) >= 3 and len(buckets) >= 2  # several keyframe counts, more than one compiled bucket


@pytest.mark.slow  # three trainer runs, ~1-1.5 min on 2 cores; CI runs the slow set too
def test_meshes_and_sequence_parallelism_give_the_one_device_losses(curated, tmp_path):  # noqa: F811
    root, _ = curated
    # one bucket (one compile per run): padding's invariance is test_row_timelines.py's
    reference = train(_timeline_cfg(root, 2, (), data=1), tmp_path / "one", devices=jax.devices()[:1], progress=False)
    runs = {"fsdp x data": _timeline_cfg(root, 2, (), data=2, fsdp=4),
            "ring": _timeline_cfg(root, 2, (), data=2, fsdp=2, sequence=2)}
    runs["ring"].model_options.sequence_parallel = "ring"
    for name, cfg in runs.items():
        got = train(cfg, tmp_path / name, progress=False)
        assert got.data_indices == reference.data_indices, name
        np.testing.assert_allclose([got.losses[s] for s in (1, 2)], [reference.losses[s] for s in (1, 2)],
                                   rtol=0, atol=1e-5, err_msg=name)
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["padding_fraction"] < 0.6 for m in metrics) and len(metrics) == 2


@pytest.mark.slow  # three trainer launches (~2 min on 2 cores); CI runs the slow set too
def test_two_processes_on_the_curated_path_train_like_one(curated, tmp_path):  # noqa: F811
    """2 processes x 4 devices (jax.distributed, gloo), each reading its own rows of the curated shards with
    per-example timelines (the bucket agreed by all-gather) == 1 process x 8 devices: losses and padding."""
    root, _ = curated

    def cli(workdir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "director_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
                "--config.vae.init_from=random", "--config.train.steps=4", "--config.checkpoint.every=4",
                "--config.train.log_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                "--config.train.timelines=per_example", f"--config.train.latent_buckets={BUCKETS}",
                "--config.data.source=curated", f"--config.data.curated.dir={root}", "--config.text.conditioning=True",
                "--noprogress", *extra]

    subprocess.run(cli(tmp_path / "one"), env=_env(), check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen(cli(tmp_path / "two", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                  f"--process_id={i}"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    one, two = _jsonl(tmp_path / "one"), _jsonl(tmp_path / "two")  # (fingerprints are of process 0's rows only)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["padding_fraction"] for r in two], [r["padding_fraction"] for r in one], atol=1e-7)
