"""Everything an evaluation needs, checked before a model loads or a case is generated.

``check_evaluation`` reads the eval config and the model config it names, builds the case list
(cheap: the held-out movies are rendered, nothing is generated), checks the suite's size against a
memory budget, the checkpoint, the caption cache and the output directory, and raises
``UserError`` (one line for the command) for the first problem it finds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import ml_collections

from director_jax.build import WEIGHTS, check_config_matches, step_directory
from director_jax.build.reuse import is_trainer_run
from director_jax.configs_common import load_config
from director_jax.errors import UserError
from director_jax.eval.curated import SPLITS as CURATED_SPLITS
from director_jax.eval.curated import eligible_clips, resolve_case_list, suite_shape
from director_jax.eval.cuts import DETECTORS
from director_jax.eval.generate import eval_mesh
from director_jax.eval.scoring import MetricSettings
from director_jax.eval.suite import synthetic_cases
from director_jax.io_utils import is_remote, writable_dir_problem
from director_jax.pipeline.request import looks_like_weights, run_config

SUITES = ("synthetic", "curated")
TEMPLATE_KEYS = ("name", "keyframes", "frames", "anchor", "start")
DEFAULT_MAX_SUITE_GIB = 4.0


def _positive_int(value, what: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or int(value) != value or value < minimum:
        raise UserError(f"{what}={value!r}: give a whole number >= {minimum}.")
    return int(value)


def check_config(cfg: ml_collections.ConfigDict, ckpt: str | None = None, step: int | None = None
                 ) -> ml_collections.ConfigDict:
    """The eval config's own fields; returns the model config (``resolve_model_config``)."""
    if cfg.suite not in SUITES:
        raise UserError(f"--config.suite={cfg.suite!r}: the available suites are {SUITES}.")
    if cfg.weights not in WEIGHTS:
        raise UserError(f"--config.weights={cfg.weights!r}: choose one of {WEIGHTS}.")
    _positive_int(cfg.seed, "--config.seed", minimum=0)
    if cfg.suite == "synthetic":
        _check_synthetic(cfg)
    else:
        _check_curated(cfg)
    _positive_int(cfg.cases_per_device, "--config.cases_per_device")
    try:
        eval_mesh(cfg.get("mesh", "data"))
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.get("dtype", "float32") not in ("float32", "bfloat16"):
        raise UserError(f"--config.dtype={cfg.dtype!r}: choose float32 or bfloat16.")
    _positive_int(cfg.report.media_cases, "--config.report.media_cases", minimum=0)
    m = cfg.metrics
    _positive_int(m.fvd_frames, "--config.metrics.fvd_frames")
    _positive_int(m.fvd_size, "--config.metrics.fvd_size", minimum=32)
    unknown = sorted(set(m.to_dict()) - {f.name for f in dataclasses.fields(MetricSettings)})
    if unknown:
        raise UserError(f"--config.metrics has unknown keys {unknown}; known: "
                        f"{[f.name for f in dataclasses.fields(MetricSettings)]}.")
    _positive_int(m.get("fvd_bootstrap", 0), "--config.metrics.fvd_bootstrap", minimum=0)
    _positive_int(m.get("cut_tolerance", 0), "--config.metrics.cut_tolerance", minimum=0)
    if m.get("cut_detector", "content") not in DETECTORS:
        raise UserError(f"--config.metrics.cut_detector={m.cut_detector!r}: choose one of {DETECTORS}.")
    threshold = m.get("cut_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
            or threshold < 0:
        raise UserError(f"--config.metrics.cut_threshold={threshold!r}: give a number >= 0 (0: the detector's "
                        "default).")
    budget = cfg.get("max_suite_gib", DEFAULT_MAX_SUITE_GIB)
    if not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"--config.max_suite_gib={budget!r}: give a positive number of GiB.")
    return resolve_model_config(cfg, ckpt, step)


def _check_synthetic(cfg: ml_collections.ConfigDict) -> None:
    _positive_int(cfg.movies.count, "--config.movies.count")
    _positive_int(cfg.movies.max_shapes, "--config.movies.max_shapes")
    for n in cfg.movies.shot_lengths:
        _positive_int(n, "--config.movies.shot_lengths entry")
    templates = [dict(t) for t in cfg.cases]
    if not templates:
        raise UserError("the eval config lists no cases: add templates to config.cases.")
    for t in templates:
        unknown = sorted(set(t) - set(TEMPLATE_KEYS))
        if unknown:
            raise UserError(f"case template {t.get('name', t)!r} has unknown keys {unknown}; a template takes "
                            f"{list(TEMPLATE_KEYS)}.")


def _check_curated(cfg: ml_collections.ConfigDict) -> None:
    if not cfg.data:
        raise UserError("the curated suite needs footage: --data CURATED_DIR (a curated directory built into shards "
                        "by python -m director_jax.shards --curated CURATED_DIR).")
    if cfg.split not in CURATED_SPLITS:
        raise UserError(f"--config.split={cfg.split!r}: choose one of {CURATED_SPLITS}.")
    _positive_int(cfg.max_clips, "--config.max_clips")
    _positive_int(cfg.frames, "--config.frames", minimum=0)
    _positive_int(cfg.min_keyframes, "--config.min_keyframes")
    _positive_int(cfg.max_keyframes, "--config.max_keyframes", minimum=int(cfg.min_keyframes))


def _check_cases(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> None:
    """Places the suite's cases without generating anything: the synthetic movies are rendered (cheap); the curated
    clips are chosen from the dataset's index (no clip decoded) or the saved case list is matched to the data."""
    v = model_cfg.video
    size = dict(height=int(v.height), width=int(v.width), fps=float(v.fps), num_frames=int(v.num_frames))
    try:
        if cfg.suite == "synthetic":
            synthetic_cases(cfg, **size)
            return
        shape = suite_shape(cfg, **size)
        if cfg.get("cases_file"):
            resolve_case_list(cfg.cases_file, cfg.data, shape)
        else:
            eligible_clips(cfg, shape)
    except FileNotFoundError as e:
        raise UserError(f"--data: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"the suite's cases: {e}") from None


def resolve_model_config(cfg: ml_collections.ConfigDict, ckpt: str | None, step: int | None = None
                         ) -> ml_collections.ConfigDict:
    """The model config: ``model_config`` (a config file, or a trainer run whose recorded config is used), or when
    empty the config the evaluated checkpoint recorded."""
    src = str(cfg.get("model_config") or "")
    if not src:
        if ckpt is None:
            raise UserError("--config.model_config is empty: a baseline takes its clip size from a model config; give "
                            "a config file (configs/gen_tiny.py) or a trainer run (runs/gen).")
        if not is_trainer_run(ckpt) and looks_like_weights(ckpt):
            raise UserError(f"--ckpt {ckpt} is a weight source (a diffusers directory, a Wan release or a weight "
                            "file), which records no config: set --config.model_config to the model's config.")
        return run_config(ckpt, step)
    if is_remote(src) or Path(src).is_dir():
        return run_config(src, None, "--config.model_config")
    if not Path(src).is_file():
        raise UserError(f"--config.model_config={src!r} is neither a config file nor a trainer run: give the config "
                        "the checkpoint was trained with, or leave it empty to use the checkpoint's own.")
    try:
        return load_config(src)
    except Exception as e:  # a user's config file: any failure is theirs to fix
        raise UserError(f"--config.model_config={src!r} could not be read: {type(e).__name__}: {e}") from e


def check_suite(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, *, frames: int, height: int,
                width: int) -> None:
    """The suite's size against ``max_suite_gib``, from its shape alone (before the movies are rendered)."""
    v = model_cfg.video
    for name, value in (("video.height", v.height), ("video.width", v.width), ("video.num_frames", v.num_frames)):
        _positive_int(value, f"the model config's {name}")
    if cfg.suite == "synthetic":
        longest = max(int(t.get("frames", frames)) for t in (dict(t) for t in cfg.cases))
        count, what = int(cfg.movies.count) * len(cfg.cases), "evaluate fewer movies (--config.movies.count)"
    else:
        longest = int(cfg.frames) or frames
        count, what = int(cfg.max_clips), "evaluate fewer clips (--config.max_clips)"
    per_case = longest * height * width * 3 * 4 * 2
    total = count * per_case
    budget = float(cfg.get("max_suite_gib", DEFAULT_MAX_SUITE_GIB))
    if total > budget * 2**30:
        raise UserError(f"the suite holds {count} cases of up to {per_case / 2**20:.1f} MiB each "
                        f"({total / 2**30:.1f} GiB), over the {budget:g} GiB budget: {what} or raise "
                        "--config.max_suite_gib.")


def check_evaluation(cfg: ml_collections.ConfigDict, workdir: str, *, ckpt: str | None, baseline: str | None,
                     step: int | None) -> None:
    """Every input of ``run_evaluation`` checked, cheapest first; a ``UserError`` names the first problem."""
    if (ckpt is None) == (baseline is None):
        raise UserError("give --ckpt DIR (a Director-Gen checkpoint) or --baseline crossfade|reference.")
    if step is not None and step < 0:
        raise UserError(f"--step={step}: steps count from 0.")
    if ckpt is not None and not is_remote(ckpt) and Path(ckpt).is_file():
        raise UserError(f"--ckpt {ckpt} is a file: give the trainer's --workdir (or its checkpoints/ directory).")
    model_cfg = check_config(cfg, ckpt, step)
    v = model_cfg.video
    check_suite(cfg, model_cfg, frames=int(v.num_frames), height=int(v.height), width=int(v.width))
    _check_cases(cfg, model_cfg)
    if ckpt is not None:
        if is_trainer_run(ckpt) or not looks_like_weights(ckpt):
            try:
                step_dir, _ = step_directory(ckpt, step)
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"--ckpt: {e}") from None
            if cfg.get("model_config") and not cfg.get("allow_config_mismatch", False):
                check_config_matches(model_cfg, step_dir, what="--config.model_config",
                                     override="--config.allow_config_mismatch=True")
        elif step is not None:
            raise UserError(f"--step chooses among a training run's checkpoints; --ckpt {ckpt} is a weight source.")
        if model_cfg.text.conditioning and not (cfg.text_cache or cfg.get("text_encoder")):
            raise UserError("the model is text-conditioned: set --config.text_encoder to the umT5 encoder (a Wan "
                            "diffusers or official release: captions embedded in JAX) or --config.text_cache to a "
                            "text-embedding cache holding the suite's captions (python -m director_jax.embed_text "
                            "--captions FILE --cache DIR).")
    problem = writable_dir_problem(workdir)
    if problem:
        raise UserError(f"--workdir: {problem}.")
