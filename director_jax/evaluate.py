"""``python -m director_jax.evaluate --suite synthetic|curated|vsr [--data DIR] --ckpt DIR [--workdir OUT]``

Suites (each a config file in ``configs/``; ``--suite NAME`` is ``--config configs/eval_NAME.py``):

* ``synthetic``: keyframe timelines on held-out synthetic movies with known object trajectories;
* ``curated``: cases drawn with a fixed seed from held-out clips of your own footage (``--data``: a
  curated directory built into shards); ``WORKDIR/cases.json`` can be reused
  (``--config.cases_file``) to score another checkpoint on exactly the same cases;
* ``vsr``: Director-SR on video super-resolution benchmarks (``--data``: UDM10 / SPMCS / Vid4 /
  REDS4 / YouHQ40-style folders), with and without keyframe anchors, against bicubic.

Generates every case with a checkpoint (the trainer's ``--workdir`` or its ``checkpoints/`` dir; the
newest step unless ``--step``; EMA weights when the run kept them), scores the videos and writes
``OUT/metrics.json`` (per case, per template and aggregate numbers, identical between runs) and
``OUT/report.html`` (tables, plots, contact sheets). ``--baseline crossfade`` scores the cross-fade
between keyframes instead (no checkpoint); ``--baseline reference`` the true clips (each metric's
best value); ``--baseline bicubic`` (vsr) bicubic upscaling.

    python -m director_jax.evaluate compare RUN_A RUN_B --workdir OUT

compares two evaluations of one suite (``OUT/compare.html``, ``OUT/compare.json``).

Cases are generated on all devices (a data mesh; see ``eval/generate.py``); on a pod run the same
command on every host: ``--distributed`` as for training (``auto`` finds Cloud TPU slices, GKE and
SLURM; ``parallel/distributed.py``). Process 0 writes the files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.errors import UserError
from director_jax.eval.checks import check_evaluation
from director_jax.eval.compare import compare_runs
from director_jax.eval.run import run_evaluation
from director_jax.eval.vsr_run import check_vsr_evaluation, run_vsr_evaluation
from director_jax.parallel.distributed import DistributedFlags

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SUITE_NAMES = ("synthetic", "curated", "vsr")

def suite_config_file(argv: list[str]) -> str:
    """``configs/eval_SUITE.py`` for ``--suite SUITE`` in ``argv`` (synthetic without): the ``--config`` default, so
    that ``--config.X`` overrides apply to the suite's own config (config_flags reads them against the default)."""
    for i, a in enumerate(argv):
        name = a.split("=", 1)[1] if a.startswith("--suite=") else argv[i + 1] if a == "--suite" and i + 1 < len(
            argv) else None
        if name in SUITE_NAMES:
            return str(CONFIGS / f"eval_{name}.py")
    return str(CONFIGS / "eval_synthetic.py")


_CONFIG = config_flags.DEFINE_config_file("config", suite_config_file(sys.argv), "An eval suite config file.")
_SUITE = flags.DEFINE_enum("suite", None, list(SUITE_NAMES),
                           "The suite: --config configs/eval_SUITE.py unless --config is given (--config.X overrides "
                           "its fields).")
_DATA = flags.DEFINE_string("data", None, "Footage of the curated / vsr suite (sets --config.data).")
_CKPT = flags.DEFINE_string("ckpt", None, "Director-Gen (Director-SR for vsr) checkpoint: the trainer's workdir, "
                            "checkpoints/ or step dir.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/eval", "Where metrics.json, report.html and media/ are written.")
_BASELINE = flags.DEFINE_enum("baseline", None, ["crossfade", "reference", "bicubic"],
                              "Score a baseline instead of a checkpoint (no --ckpt); bicubic: the vsr suite.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars (process 0 only).")
_DISTRIBUTED = DistributedFlags()

_HEADLINE = ("psnr", "ssim", "lpips", "keyframe_psnr", "temporal_error", "flicker", "trajectory_error_px",
             "cut_precision", "cut_recall", "pacing_offset_frames", "fvd")


def _suite_config() -> ml_collections.ConfigDict:
    """The config the flags name (``--suite`` chose its file); ``--data`` set into it."""
    cfg = _CONFIG.value
    if _SUITE.value is not None and cfg.get("suite") != _SUITE.value:
        raise UserError(f"--suite {_SUITE.value} but --config is a {cfg.get('suite')!r} suite: give one of them.")
    if _DATA.value is not None:
        if "data" not in cfg:
            raise UserError(f"--data: the {cfg.get('suite')!r} suite makes its own footage; --data is for the "
                            "curated and vsr suites.")
        cfg.data = _DATA.value
    return cfg


def _compare(argv: list[str]) -> int:
    if len(argv) != 4:
        raise UserError("usage: python -m director_jax.evaluate compare RUN_A RUN_B --workdir OUT (two evaluation "
                        "workdirs, each with a metrics.json).")
    try:
        page = compare_runs(argv[2], argv[3], _WORKDIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"compared {argv[2]} and {argv[3]} -> {page}")
    return 0


def _print_summary(results: dict) -> None:
    agg = results["aggregate"]
    if results.get("run", {}).get("suite") == "vsr" or "sequences" in results:
        print(f"{len(results.get('sequences', []))} sequence windows -> {_WORKDIR.value}/metrics.json, report.html")
        for method, values in agg.items():
            print(f"  {method:<16} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()
                                                if isinstance(v, float)))
    else:
        print(f"{len(results['cases'])} cases -> {_WORKDIR.value}/metrics.json, report.html")
        for key in _HEADLINE:
            if agg.get(key) is not None:
                print(f"  {key:<22} {agg[key]}")
    for warning in results.get("warnings", []):
        print(f"warning: {warning}")


def main(argv) -> int:
    if len(argv) > 1 and argv[1] == "compare":
        return _compare(argv)
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag (or: compare RUN_A RUN_B).")
    cfg = _suite_config()
    vsr = cfg.get("suite") == "vsr"
    kw = dict(ckpt=_CKPT.value, baseline=_BASELINE.value, step=_STEP.value)
    if vsr:
        check_vsr_evaluation(cfg, _WORKDIR.value, **kw)
    else:
        if _BASELINE.value == "bicubic":
            raise UserError("--baseline bicubic is the vsr suite's; the generation suites take crossfade or "
                            "reference.")
        check_evaluation(cfg, _WORKDIR.value, **kw)
    try:
        _DISTRIBUTED.initialize()
    except ValueError as e:
        raise UserError(str(e)) from e
    progress = _PROGRESS.value and jax.process_index() == 0
    run = run_vsr_evaluation if vsr else run_evaluation
    results = run(cfg, _WORKDIR.value, progress=progress, **kw)
    if jax.process_index() == 0:
        _print_summary(results)
    return 0


if __name__ == "__main__":
    cli.run(main, level=logging.WARNING)
