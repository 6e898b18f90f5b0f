"""The training loop: mesh, sharded state, resume, data, jitted step, metrics, checkpoints, preemption.

One loop for every task (``director_jax.train.tasks``). What it guarantees:

* **Exact resume**: the checkpoint holds the train state (including the base RNG key; step keys are
  ``fold_in(key, step)``) and every host's data-iterator state, so stopping at any checkpoint and
  resuming gives the same parameters and the same data order as an uninterrupted run.
* **Preemption**: SIGTERM (or a pod's preemption notice) makes the loop save the current step,
  wait for the write and exit cleanly; a kill -9 loses only the steps since the last complete save.
* **Non-finite losses**: with ``train.nonfinite = "stop"`` the run writes the offending batch and
  metrics to ``workdir/diagnostics/`` and raises; with ``"skip"`` the update is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import signal
import zlib
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from director_jax.data.iterators import make_iterator
from director_jax.data.latent_cache import latent_cache_config, make_latent_dataset
from director_jax.data.loader import make_curated_dataset
from director_jax.data.row_timelines import crop_to_bucket
from director_jax.data.synthetic_loader import make_dataset
from director_jax.io_utils import atomic_write, atomic_write_text, dir_path
from director_jax.parallel import MeshConfig, create_mesh, param_shardings, rules_from_config
from director_jax.train import state as state_lib
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.metrics import MetricWriter, Progress, peak_flops
from director_jax.train.optim import EMA_MEMORY, learning_rate_schedule, make_optimizer
from director_jax.train.step import batch_shardings, jit_train_step, make_train_step
from director_jax.train.tasks import Task, make_task

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was NaN or inf (train.nonfinite = "stop")."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    preempted: bool
    losses: dict[int, float]  # step -> loss of the steps run in this process (for tests and summaries)
    data_indices: dict[int, list[int]]  # step -> example indices of this host's rows of the batch
    nonfinite_skips: int


class _PreemptionFlag:
    """Set by SIGTERM; on multi-host pods also by the coordination service's preemption notice."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. embedded use): no handler, no preemption saves
            self._previous = None

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
        self.requested = True

    def check(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Run:
    """Everything the loop and the compile-only mode share, built once from the config."""

    cfg: ml_collections.ConfigDict
    task: Task
    mesh: Any
    rules: tuple  # the logical-axis rules table (config mesh.rules over parallel.rules.DEFAULT_RULES)
    tx: Any
    graphdef: Any
    init: Any
    abstract: Any
    shardings: Any
    frozen_graphdef: Any
    frozen_state: Any
    frozen_sharding: Any
    batch_fields: dict
    batch_sharding: dict
    step_fn: Any


def build_run(cfg: ml_collections.ConfigDict, *, devices=None, materialize_frozen: bool = True) -> Run:
    """Mesh, abstract sharded state and the jitted step, from the config (no state is allocated).

    Parameters, optimizer state, batch and the activations inside the step and the init are all
    placed by one logical-axis rules table, ``rules_from_config(cfg)``.
    """
    rules = rules_from_config(cfg)
    task = make_task(cfg)
    t = cfg.train
    if t.batch_size < 1 or t.micro_batches < 1 or t.batch_size % t.micro_batches:
        raise ValueError(f"train.batch_size={t.batch_size} must be a positive multiple of "
                         f"train.micro_batches={t.micro_batches}.")
    if t.nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite={t.nonfinite!r}; choose 'stop' or 'skip'.")
    sizes = {k: v for k, v in cfg.mesh.to_dict().items() if k != "rules"}
    mesh = create_mesh(MeshConfig.from_dict(sizes), devices=devices)
    tx = make_optimizer(cfg.optim, int(t.steps))
    build_fn = task.build_fn()
    graphdef = state_lib.model_graphdef(build_fn)
    ema_decay = float(cfg.optim.ema_decay)
    init = state_lib.init_fn(build_fn, tx, seed=int(cfg.seed), use_ema=ema_decay > 0, rules=rules,
                             latent_channels=task.latent_channels, ema_dtype=cfg.optim.get("ema_dtype"))
    abstract = jax.eval_shape(init)
    ema_memory = cfg.optim.get("ema_memory") or "device"
    if ema_memory not in EMA_MEMORY:
        raise ValueError(f"optim.ema_memory={ema_memory!r}; choose one of {EMA_MEMORY}.")
    shardings = state_lib.state_shardings(abstract, mesh, rules, ema_memory=ema_memory)

    frozen_graphdef = frozen_state = frozen_sharding = None
    if task.frozen_build_fn() is not None:
        # abstract (compile-only runs) or loaded and placed on the mesh
        frozen = task.frozen_model() if materialize_frozen else nnx.eval_shape(task.frozen_build_fn())
        frozen_graphdef, frozen_state = nnx.split(frozen)
        frozen_sharding = param_shardings(frozen_state, mesh, rules)
        if materialize_frozen:
            frozen_state = jax.device_put(frozen_state, frozen_sharding)
        else:
            frozen_state = state_lib.with_shardings(frozen_state, frozen_sharding)

    fields = task.batch_fields(int(t.batch_size))
    batch_sharding = batch_shardings(fields, mesh, rules)
    step = make_train_step(task, graphdef, frozen_graphdef, tx, micro_batches=int(t.micro_batches),
                           ema_decay=ema_decay, schedule=learning_rate_schedule(cfg.optim, int(t.steps)),
                           ema_memory=ema_memory)
    step_fn = jit_train_step(step, mesh, shardings, frozen_sharding, batch_sharding, rules)
    return Run(cfg, task, mesh, rules, tx, graphdef, init, abstract, shardings, frozen_graphdef, frozen_state,
               frozen_sharding, fields, batch_sharding, step_fn)


DATA_SOURCES = ("synthetic", "curated", "latents")


def make_data(run: Run):
    """This host's iterator over its rows of every global batch: synthetic clips or the curated shards."""
    cfg = run.cfg
    where = dict(global_batch_size=int(cfg.train.batch_size), process_index=jax.process_index(),
                 process_count=jax.process_count(), shuffle_seed=int(cfg.seed))
    if cfg.data.source == "synthetic":
        dataset = make_dataset(run.task.clips_config(), **where)
    elif cfg.data.source == "curated":
        dataset = make_curated_dataset(run.task.curated_config(), **where)
    elif cfg.data.source == "latents":  # a latent cache written by python -m director_jax.encode
        if cfg.train.latents != "precomputed" or not getattr(run.task, "per_example", False):
            raise ValueError("data.source='latents' feeds precomputed per-example latents: set "
                             "--config.train.latents=precomputed --config.train.timelines=per_example.")
        dataset = make_latent_dataset(latent_cache_config(cfg, max_latents=run.task.buckets[-1]), **where)
    else:
        raise ValueError(f"data.source={cfg.data.source!r}; choose one of {DATA_SOURCES}.")
    transform = run.task.data_transform()
    if transform is not None:  # the task's host-side work on each batch (e.g. SR degradations), seeded per example
        dataset = dataset.map(transform)
    return make_iterator(dataset, worker_count=int(cfg.data.worker_count))


def batch_bucket(run: Run, local: dict[str, np.ndarray] | None) -> int | None:
    """The latent bucket of this global batch (per-example timelines), None for one fixed shape.

    The smallest bucket holding the longest row of the global batch: every host computes it from
    the longest row of every host (one tiny all-gather on pods), so all feed one shape.
    """
    if not getattr(run.task, "per_example", False):
        return None
    if local is None:  # the run's own batch fields: the largest bucket
        return run.task.buckets[-1]
    if "latent_count" in local:
        longest = int(np.max(local["latent_count"], initial=0))
    else:  # a latent cache's rows, padded to its own length
        longest = int(np.asarray(local["latents"]).shape[1])
    if jax.process_count() > 1:
        longest = int(np.max(multihost_utils.process_allgather(np.asarray(longest, np.int32))))
    return run.task.shapes.bucket_for(longest)


def fields_for(run: Run, bucket: int | None) -> dict:
    """The batch fields of a batch in ``bucket`` (the run's own fields for a fixed shape)."""
    return run.batch_fields if bucket is None else run.task.batch_fields(int(run.cfg.train.batch_size), bucket)


def global_batch(run: Run, local: dict[str, np.ndarray], bucket: int | None = None) -> dict[str, jax.Array]:
    """Host rows -> global arrays sharded as the step expects (no host holds the whole batch).

    Per-example timelines: the rows' latent arrays are cut to ``bucket`` (default: ``batch_bucket``).
    """
    if bucket is None:
        bucket = batch_bucket(run, local)
    if bucket is not None:
        local = crop_to_bucket(local, bucket)
    out = {}
    for name, field in fields_for(run, bucket).items():
        if name not in local:
            raise KeyError(f"the data source gave no {name!r} (it gave {sorted(local)}); the {run.task.name} task "
                           f"needs {sorted(run.batch_fields)}.")
        value = np.asarray(local[name], dtype=field.dtype)
        out[name] = jax.make_array_from_process_local_data(run.batch_sharding[name], value, field.shape)
    return out


def _save_diagnostics(workdir: Path, step: int, metrics: dict, batch: dict[str, np.ndarray]) -> Path:
    out = workdir / "diagnostics" / f"nonfinite_step_{step}"
    buffer = io.BytesIO()
    np.savez(buffer, **batch)
    atomic_write(out / f"batch_process_{jax.process_index()}.npz", lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    atomic_write_text(out / "metrics.json", json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
    return out


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, devices=None, progress: bool = True
          ) -> TrainResult:
    """Trains until ``train.steps`` (resuming from ``workdir`` when it holds checkpoints).

    ``workdir`` is a local directory or cloud storage (``gs://bucket/run``: every host must be able to
    write there, and the pinned gcsfs finds the credentials as Google's client libraries do).
    """
    workdir = dir_path(workdir)
    is_main = jax.process_index() == 0
    run = build_run(cfg, devices=devices)
    total = int(cfg.train.steps)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    data = make_data(run)

    # the newest committed step that restores; a damaged newer one is reported and set aside (Checkpointer)
    resumed = ckpt.restore_latest(state_lib.with_shardings(run.abstract, run.shardings))
    if resumed is None:
        state = state_lib.create_state(run.init, run.shardings)  # init_from: read into the shards, per host
        start = 0
        log.info("initialised a new %s run in %s", run.task.name, workdir)
    else:
        start, state, data_state, saved = resumed
        workers = saved.get("data_worker_count", int(cfg.data.worker_count))
        if workers != int(cfg.data.worker_count):
            raise ValueError(f"checkpoint step {start} was written with data.worker_count={workers}; the data "
                             f"iterator's state only resumes with the same count: set --config.data.worker_count="
                             f"{workers}.")
        data.set_state(data_state)
        log.info("resumed from step %d in %s", start, ckpt.directory)

    meta = {"config": cfg.to_json_best_effort(), "task": run.task.name, "mesh": dict(run.mesh.shape),
            "process_count": jax.process_count(), "data_worker_count": int(cfg.data.worker_count)}
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    if start == 0:
        writer.write_config(cfg.to_dict())
    lowered = run.step_fn.lower(state, run.frozen_state, abstract_batch(run))
    # per latent bucket (per-example timelines: the run's own fields are the largest bucket's), each compiled once
    compiled = {batch_bucket(run, None): lowered.compile()}
    flops = step_flops(run, lowered)
    tokens = run.task.tokens_per_example() * int(cfg.train.batch_size)
    bar = Progress(total, start, flops_per_step=flops, tokens_per_step=tokens, peak=peak_flops(run.mesh.devices.flat),
                   enabled=is_main and progress)
    flag = _PreemptionFlag()
    flag.install()
    losses: dict[int, float] = {}
    indices: dict[int, list[int]] = {}
    preempted = False
    pending = None  # (step, metrics on device, host batch): checked one step late so dispatch runs ahead
    try:
        step = start
        while step < total:
            local = next(data)
            bucket = batch_bucket(run, local)
            if bucket not in compiled:
                compiled[bucket] = run.step_fn.lower(state, run.frozen_state, abstract_batch(run, bucket)).compile()
            state, metrics = compiled[bucket](state, run.frozen_state, global_batch(run, local, bucket))
            step += 1
            if pending is not None:
                _finish_step(pending, cfg, workdir, writer, bar, losses, indices)
            pending = (step, metrics, local, step_work(run, bucket))
            want_save = step % int(cfg.checkpoint.every) == 0 or step == total
            if flag.check(step):
                preempted = True
                want_save = True
            if want_save:
                _finish_step(pending, cfg, workdir, writer, bar, losses, indices)
                pending = None
                ckpt.save(step, state, data.get_state(), {**meta, "step": step}, wait=preempted)
                writer.sync()  # a cloud workdir's metrics up to the checkpoint are in the bucket
                bar.reset_window()  # the save's pause is not training speed
            if preempted:
                log.warning("preempted: checkpoint of step %d written to %s; exiting.", step, ckpt.directory)
                break
        if pending is not None:
            _finish_step(pending, cfg, workdir, writer, bar, losses, indices)
    finally:
        flag.restore()
        ckpt.close()
        bar.close()
        writer.close()
    skips = int(jax.device_get(state.nonfinite_skips))
    return TrainResult(final_step=step, preempted=preempted, losses=losses, data_indices=indices,
                       nonfinite_skips=skips)


def abstract_batch(run: Run, bucket: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as sharded ShapeDtypeStructs (for lowering without data); ``bucket``: its latent length."""
    return {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=run.batch_sharding[k])
            for k, f in fields_for(run, bucket).items()}


def step_flops(run: Run, lowered_or_state) -> float | None:
    """FLOPs of one train step on all devices, for MFU.

    The task's analytic count (3x the forward's matmul and attention FLOPs) where it has one: XLA
    counts a scanned layer stack once, not once per layer. Otherwise XLA's count of the lowered
    (not yet partitioned, so global) program.
    """
    analytic = run.task.train_flops_per_example()
    if analytic is not None:
        return analytic * int(run.cfg.train.batch_size)
    lowered = lowered_or_state
    if not hasattr(lowered, "cost_analysis"):
        lowered = run.step_fn.lower(lowered_or_state, run.frozen_state, abstract_batch(run))
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends do not report costs
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def step_work(run: Run, bucket: int | None) -> tuple[float | None, float | None]:
    """(tokens, FLOPs) of one step of a batch in ``bucket`` (per-example timelines: the bucket's own sizes,
    padded tokens included); (None, None) for a fixed shape, whose figures the progress bar already has."""
    if bucket is None:
        return None, None
    b = int(run.cfg.train.batch_size)
    flops = run.task.train_flops_per_example(bucket)
    return float(run.task.tokens_per_example(bucket) * b), None if flops is None else float(flops * b)


def _finish_step(pending, cfg, workdir: Path, writer, bar, losses: dict[int, float],
                 indices: dict[int, list[int]]) -> None:
    step, metrics, local, (tokens, flops) = pending
    host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    loss = float(host["loss"])
    losses[step] = loss
    if "index" in local:
        indices[step] = [int(i) for i in np.asarray(local["index"]).ravel()]
    if not bool(host["finite"]):
        if cfg.train.nonfinite == "stop":
            where = _save_diagnostics(workdir, step, host, local)
            raise NonFiniteLossError(
                f"step {step}: loss {loss}, gradient norm {float(host['grad_norm'])} (not finite). The batch and "
                f"metrics are in {where}; the last checkpoint is intact. Lower optim.learning_rate, check the data, "
                "or set --config.train.nonfinite=skip to drop such updates.")
        log.warning("step %d: non-finite loss %s, update skipped", step, loss)
    bar.update(step, loss, tokens=tokens, flops=flops)
    if step % int(cfg.train.log_every) == 0 or step == int(cfg.train.steps):
        scalars = {k: float(v) for k, v in host.items()}
        if step in indices:  # which examples this step saw: audits of data order across restarts
            scalars["data_fingerprint"] = float(zlib.crc32(np.asarray(indices[step], np.int64).tobytes()))
        scalars.update(bar.rates())
        writer.write_scalars(step, scalars)
