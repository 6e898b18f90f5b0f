"""A training config checked before any device, file or data source is touched.

``check_training`` validates the numbers the trainer reads (finite, whole where they count, in
range), builds the task (which checks its own section: keyframes, sizes, latent source) and the
rules table, and checks that the workdir can be written. The first problem is one ``UserError``.
"""

from __future__ import annotations

import math

import ml_collections

from director_jax.build import RANDOM_VAE
from director_jax.errors import UserError
from director_jax.io_utils import writable_dir_problem
from director_jax.parallel.rules import rules_from_config
from director_jax.train.optim import EMA_MEMORY
from director_jax.train.tasks import make_task

NONFINITE_POLICIES = ("stop", "skip")

# (section.field, minimum, whole number?) for every number the loop, optimizer and checkpoints read.
_NUMBERS = (
    ("train.steps", 0, True), ("train.batch_size", 1, True), ("train.micro_batches", 1, True),
    ("train.log_every", 1, True), ("checkpoint.every", 1, True), ("checkpoint.keep_last", 1, True),
    ("checkpoint.keep_every", 0, True), ("data.worker_count", 0, True), ("optim.warmup_steps", 0, True),
    ("optim.decay_steps", 0, True), ("optim.learning_rate", 0.0, False), ("optim.end_lr_ratio", 0.0, False),
    ("optim.b1", 0.0, False), ("optim.b2", 0.0, False), ("optim.eps", 0.0, False), ("optim.weight_decay", 0.0, False),
    ("optim.grad_clip", 0.0, False), ("optim.ema_decay", 0.0, False), ("seed", 0, True),
    ("video.height", 1, True), ("video.width", 1, True), ("video.num_frames", 1, True),
)


def _get(cfg: ml_collections.ConfigDict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def check_numbers(cfg: ml_collections.ConfigDict) -> None:
    """Every number of ``_NUMBERS`` the config has: a finite number (whole where it counts) at or above its minimum."""
    for name, minimum, whole in _NUMBERS:
        value = _get(cfg, name)
        if value is None:
            continue
        ok = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
              and value >= minimum and (not whole or int(value) == value))
        if not ok:
            kind = "a whole number" if whole else "a finite number"
            raise UserError(f"--config.{name}={value!r}: give {kind} >= {minimum}.")
    for name, below in (("optim.b1", 1.0), ("optim.b2", 1.0), ("optim.ema_decay", 1.0), ("optim.end_lr_ratio", 1.0001)):
        value = _get(cfg, name)
        if value is not None and value >= below:
            raise UserError(f"--config.{name}={value!r}: give a rate below 1.")
    ema_memory = _get(cfg, "optim.ema_memory")
    if ema_memory is not None and ema_memory not in EMA_MEMORY:
        raise UserError(f"--config.optim.ema_memory={ema_memory!r}: choose {' or '.join(EMA_MEMORY)}.")
    for name in ("optim.moment_dtype", "optim.ema_dtype"):
        value = _get(cfg, name)
        if value is not None and value not in ("float32", "bfloat16"):
            raise UserError(f"--config.{name}={value!r}: choose float32 or bfloat16 (or leave it unset: the "
                            "parameters' dtype).")
    mode = cfg.get("model_options", {}).get("sequence_parallel")
    if mode in ("ring", "ulysses") and "mesh" in cfg and int(cfg.mesh.get("sequence", 1)) * int(
            cfg.mesh.get("dcn_sequence", 1)) == 1:
        raise UserError(f"--config.model_options.sequence_parallel={mode!r} needs a sequence axis: set "
                        "--config.mesh.sequence to the devices to split the tokens over, or use 'auto' (local "
                        "attention when the axis is 1).")
    t = cfg.train
    if int(t.batch_size) % int(t.get("micro_batches", 1)):
        raise UserError(f"--config.train.batch_size={t.batch_size} is not divisible by train.micro_batches="
                        f"{t.micro_batches}: each micro-batch takes an equal share.")
    if t.get("nonfinite", "stop") not in NONFINITE_POLICIES:
        raise UserError(f"--config.train.nonfinite={t.nonfinite!r}: choose one of {NONFINITE_POLICIES}.")


def check_frozen_vae(cfg: ml_collections.ConfigDict) -> None:
    """A Gen / SR run needs a trained frozen VAE: an empty ``vae.init_from`` is refused, with how to get one."""
    if cfg.get("task") not in ("gen", "sr") or str(cfg.vae.get("init_from", "") or ""):
        return
    what = "Director-SR" if cfg.task == "sr" else "Director-Gen"
    raise UserError(f"--config: vae.init_from is empty: {what} trains on the latents of a frozen VAE, and a random one "
                    "gives noise in every frame. Train one first (python -m director_jax.train --config "
                    "configs/vae_tiny.py --workdir runs/vae) and pass --config.vae.init_from runs/vae, or give a "
                    f"Wan2.1 VAE file (--config.vae.init_from={RANDOM_VAE} runs a smoke test on a random VAE).")


def check_training(cfg: ml_collections.ConfigDict, workdir: str | None) -> None:
    """The whole config, then the workdir (``None``: compile-only, nothing written)."""
    check_numbers(cfg)
    try:
        make_task(cfg)
        rules_from_config(cfg)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"--config: {e}") from e
    if workdir is not None:
        check_frozen_vae(cfg)
        problem = writable_dir_problem(workdir)
        if problem:
            raise UserError(f"--workdir: {problem}.")
