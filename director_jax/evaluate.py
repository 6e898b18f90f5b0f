"""``python -m director_jax.evaluate --config configs/eval_synthetic.py --ckpt DIR [--workdir OUT]``

Generates every case of the config's suite with a Director-Gen checkpoint (the trainer's
``--workdir`` or its ``checkpoints/`` dir; the newest step unless ``--step``; EMA weights when the
run kept them), scores the videos and writes ``OUT/metrics.json`` (per case, per template and
aggregate numbers, identical between runs) and ``OUT/report.html`` (tables and contact sheets).
``--baseline crossfade`` scores the cross-fade between keyframes instead (no checkpoint);
``--baseline reference`` scores the true clips (each metric's best value).

Cases are generated on all devices (a data mesh; see ``eval/generate.py``); on a pod run the same
command on every host: ``--distributed`` as for training (``auto`` finds Cloud TPU slices, GKE and
SLURM; ``parallel/distributed.py``). Process 0 writes the files.
"""

from __future__ import annotations

import logging

import jax
from absl import flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.errors import UserError
from director_jax.eval.checks import check_evaluation
from director_jax.eval.run import run_evaluation
from director_jax.parallel.distributed import DistributedFlags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval_synthetic.py", "An eval suite config file.")
_CKPT = flags.DEFINE_string("ckpt", None, "Director-Gen checkpoint: the trainer's workdir, checkpoints/ or step dir.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/eval", "Where metrics.json, report.html and media/ are written.")
_BASELINE = flags.DEFINE_enum("baseline", None, ["crossfade", "reference"],
                              "Score a baseline instead of a checkpoint (no --ckpt).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars (process 0 only).")
_DISTRIBUTED = DistributedFlags()


def main(argv) -> int:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    check_evaluation(_CONFIG.value, _WORKDIR.value, ckpt=_CKPT.value, baseline=_BASELINE.value, step=_STEP.value)
    try:
        _DISTRIBUTED.initialize()
    except ValueError as e:
        raise UserError(str(e)) from e
    results = run_evaluation(_CONFIG.value, _WORKDIR.value, ckpt=_CKPT.value, baseline=_BASELINE.value,
                             step=_STEP.value, progress=_PROGRESS.value and jax.process_index() == 0)
    if jax.process_index() == 0:
        agg = results["aggregate"]
        print(f"{len(results['cases'])} cases -> {_WORKDIR.value}/metrics.json, report.html")
        for key in ("psnr", "ssim", "lpips", "keyframe_psnr", "temporal_error", "trajectory_error_px", "fvd"):
            if key in agg:
                print(f"  {key:<22} {agg[key]}")
    return 0


if __name__ == "__main__":
    cli.run(main, level=logging.WARNING)
