"""``python -m director_jax.train --config configs/X.py --workdir DIR [--config.a.b=value ...]``

Trains the task the config names (``task``: the VAE, Director-Gen or Director-SR), resuming from
``DIR/checkpoints`` when it holds any. ``--compile_topology v5p:2x2x1`` compiles the real train step for
that TPU topology instead (needs libtpu; no TPU needed), prints per-device memory and FLOPs, and exits non-zero when
the step does not fit the chip's HBM.

On a TPU pod run the same command on every host: ``--distributed auto`` (default) calls
``jax.distributed.initialize()`` when this host is one of several (``parallel/distributed.py``: the
environment, or a Cloud TPU VM's metadata server). Elsewhere give
``--coordinator_address host:port --num_processes N --process_id i`` to every process (on CPUs
also set ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``). Each process loads its own rows of every
global batch; process 0 writes metrics; checkpoints hold one data-iterator state per process.
"""

from __future__ import annotations

import jax
from absl import flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.errors import UserError
from director_jax.parallel.distributed import DistributedFlags
from director_jax.train.aot import compile_train_step
from director_jax.train.checks import check_training
from director_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (get_config()); see configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard files go here.")
_TOPOLOGY = flags.DEFINE_string("compile_topology", None,
                                "Compile only, for this TPU topology (e.g. v5p:2x2x1, v6e:2x2), and report memory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (process 0 only).")
_DISTRIBUTED = DistributedFlags()


def main(argv) -> int:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    cfg = _CONFIG.value
    if cfg is None:
        raise UserError("--config is required, e.g. --config configs/gen_tiny.py")
    if not _TOPOLOGY.value and not _WORKDIR.value:
        raise UserError("--workdir is required (checkpoints, metrics and TensorBoard files go there).")
    check_training(cfg, None if _TOPOLOGY.value else _WORKDIR.value)
    if _TOPOLOGY.value:
        report = compile_train_step(cfg, _TOPOLOGY.value)
        return 0 if report.fits else 1
    try:
        _DISTRIBUTED.initialize()
    except ValueError as e:
        raise UserError(str(e)) from e
    result = train(cfg, _WORKDIR.value, progress=_PROGRESS.value)
    if jax.process_index() == 0:
        state = "preempted" if result.preempted else "done"
        print(f"{state} at step {result.final_step}; non-finite updates skipped: {result.nonfinite_skips}")
    return 0


if __name__ == "__main__":
    cli.run(main)
