"""Trainer checkpoints reused: a VAE run as the frozen VAE of a Gen / SR run (``config.vae.init_from``), a Gen or
SR run as the start of another (``config.init_from``), and any run as the source of a diffusers export
(``python -m director_jax.convert export --src RUN``, ``export_run``).

A run is given as its workdir, its ``checkpoints/`` directory or one step directory
(``is_trainer_run``). The newest committed step that reads is used (``steps.read_newest``: a damaged
step is one warning line and the step before it is tried). Every step records the config it was
trained with, so the run's task and architecture are checked first, each mismatch one ``UserError``
line naming the fields. Weights: the EMA where the run kept one, else the raw parameters
(``weights``). A VAE run's latent statistics (its train state's ``latent_stats``: EMA sums of the
posterior mean per latent channel and of its square, and their total weight) become the
``latents_mean`` / ``latents_std`` of the VAE's config, so Gen / SR latents are normalised by the
scale of that VAE, and an export's config.json records them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from director_jax.build.checkpoints import (
    COMMIT_FILE,
    STATE_ITEM,
    TMP_STEP,
    DamagedCheckpointError,
    LoadedCheckpoint,
    describe_mismatch,
    flatten_state,
    saved_config,
    unflatten_state,
)
from director_jax.build.sections import architecture_differences, dit_config, vae_config_from
from director_jax.build.steps import read_newest, restore_arrays, saved_arrays, weights_prefix
from director_jax.convert.command import MODELS, check_inputs
from director_jax.errors import UserError
from director_jax.io_utils import storage_path
from director_jax.models.dit import DirectorGen, WanDiT, WanDiTConfig
from director_jax.models.sr import DirectorSR
from director_jax.models.vae import WanVAE, WanVAEConfig

TASK_NAMES = {"vae": "a VAE", "gen": "a Director-Gen", "sr": "a Director-SR"}
EXPORT_TASKS = {"vae": "vae", "dit": "gen", "sr": "sr"}  # convert's --model -> the task of the runs it exports

# The VAE task's running latent statistics in the train state (``train/latent_stats.py`` keeps them up to date)
LATENT_STATS = "latent_stats"
LATENT_STATS_KEYS = ("mean", "mean_sq", "weight")  # EMA sums of E[mu], E[mu^2] per channel; their weight 1 - decay^n
MIN_LATENT_STD = 1e-6  # a channel the encoder never varies is scaled by this, not divided by zero

_VAE_FIX = ("pass the workdir of a VAE run (task 'vae', e.g. configs/vae_tiny.py) or a diffusers AutoencoderKLWan "
            "directory")


# ------------------------------------------------------------------------------------------------
# What a run is


def _is_step_dir(p: epath.Path) -> bool:
    return ((p.name.isdigit() or TMP_STEP.fullmatch(p.name) is not None)
            and ((p / STATE_ITEM).exists() or (p / COMMIT_FILE).exists()))


def is_trainer_run(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a training run (``python -m director_jax.train``'s workdir, its ``checkpoints/``
    directory or one of its steps), rather than a weight file or a diffusers directory.

    A workdir without any step yet counts (its config.json is the trainer's, naming a task), so that
    reading it says there is no complete step, instead of misreading that config as a model's.
    """
    if not path:
        return False
    p = storage_path(path)
    try:
        if not p.is_dir():
            return False
        if (p / "checkpoints").is_dir() or p.name == "checkpoints" or _is_step_dir(p):
            return True
        if any(_is_step_dir(child) for child in p.iterdir() if child.name[:1].isdigit()):
            return True  # a checkpoints directory by another name
        config = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else None
        return isinstance(config, dict) and "task" in config and "train" in config
    except (OSError, ValueError):
        return False


def recorded_run_config(step_dir: epath.Path, step: int) -> dict[str, Any]:
    """The config a step was trained with; a step without one (its ``meta`` item) is damaged."""
    config = saved_config(step_dir)
    if not isinstance(config, dict) or "task" not in config:
        raise DamagedCheckpointError(step_dir, step, "its meta/ item (the config the run was trained with) does not "
                                     "read")
    return config


Fix = str | Callable[[str], str]  # what to do instead, or a function of the task the run has


def check_run_task(config: dict[str, Any], want: tuple[str, ...], source: str, fix: Fix) -> str:
    task = config["task"]
    if task not in want:
        instead = fix(task) if callable(fix) else fix
        raise UserError(f"{source} is {TASK_NAMES.get(task, repr(task))} training run (task {task!r}), not "
                        f"{' or '.join(TASK_NAMES[w] for w in want)} run: {instead}.")
    return task


def newest_step(path: str | os.PathLike, source: str, read: Callable[[epath.Path, int], Any]
            ) -> tuple[Any, LoadedCheckpoint]:
    """``steps.read_newest`` with a missing path, an empty workdir or nothing readable as one line naming ``source``."""
    try:
        return read_newest(os.fspath(path), None, read)
    except FileNotFoundError as e:
        raise UserError(f"{source}: {' '.join(str(e).split())}") from e


def _filled(build: Callable[[], nnx.Module], saved: dict[str, Any], prefix: str, step_dir: epath.Path, step: int,
            *, what: str, source: str) -> nnx.Module:
    """The module ``build`` makes, with the step's ``prefix`` (ema / params) weights, read onto the host.

    Names and shapes must match; the values are cast to the module's parameter dtype (a run may have
    kept bfloat16 weights). Works inside a trace (the trainer builds its init under ``jax.jit``).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    expected = flatten_state(abstract)
    found = {name[len(prefix) + 1:]: value for name, value in saved.items() if name.startswith(prefix + ".")}
    shapes_only = {n: jax.ShapeDtypeStruct(e.shape, found[n].dtype if n in found else e.dtype)
                   for n, e in expected.items()}
    bad = describe_mismatch(shapes_only, found, limit=4)
    if bad:
        raise UserError(f"the {prefix} weights of {source} (step {step}) do not fit {what}: "
                        + "; ".join(line.strip() for line in bad.splitlines())
                        + ". Pass a run of this architecture (its config's model / vae sections).")
    target = {f"{prefix}.{n}": jax.ShapeDtypeStruct(found[n].shape, found[n].dtype) for n in expected}
    restored = restore_arrays(step_dir, step, target, what=f"{prefix} weights")
    state = unflatten_state(abstract, {n: jnp.asarray(restored[f"{prefix}.{n}"], e.dtype)
                                       for n, e in expected.items()})
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# A VAE run


def latent_mean_std(mean_sum: Any, mean_sq_sum: Any, weight: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(latents_mean, latents_std) from the stored EMA sums: mean = E[mu], std = sqrt(E[mu^2] - E[mu]^2)
    (float64, at least ``MIN_LATENT_STD``)."""
    w = float(np.asarray(weight, np.float64))
    mean = np.asarray(mean_sum, np.float64) / w
    var = np.maximum(np.asarray(mean_sq_sum, np.float64) / w - mean * mean, 0.0)
    std = np.maximum(np.sqrt(var), MIN_LATENT_STD)
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def _latent_stats(step_dir: epath.Path, step: int, saved: dict[str, Any], source: str
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    names = [f"{LATENT_STATS}.{k}" for k in LATENT_STATS_KEYS]
    if any(n not in saved for n in names):
        raise UserError(f"{source}: step {step} of this VAE run holds no latent statistics (written before the VAE "
                        "task kept them): resume the run for a few steps (its checkpoints then record them), or "
                        "export it with latents_mean / latents_std set by hand.")
    arrays = restore_arrays(step_dir, step, {n: jax.ShapeDtypeStruct(saved[n].shape, saved[n].dtype) for n in names},
                            what="latent statistics")
    mean_sum, mean_sq_sum, weight = (arrays[n] for n in names)
    if not float(weight) > 0:
        raise UserError(f"{source}: step {step} of this VAE run has seen no finite training step (its latent "
                        "statistics are empty): train it further.")
    return latent_mean_std(mean_sum, mean_sq_sum, weight)


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
    config: WanVAEConfig  # the run's architecture, with its latent statistics
    vae: WanVAE | None  # None when only the config was asked for
    loaded: LoadedCheckpoint


def read_trainer_vae(path: str | os.PathLike, expected: WanVAEConfig | None = None, *, weights: str = "auto",
                     with_weights: bool = True, source: str | None = None, fix: Fix = _VAE_FIX,
                     ask_raw: str = "weights='params'") -> TrainedVAE:
    """A VAE run's newest readable step: its config with its latent statistics, and (``with_weights``) the VAE.

    ``expected``: the architecture the caller needs (``config.vae``); any other field is a one-line
    ``UserError`` naming the fields. ``source`` names the path in messages (default: the path).
    """
    source = source or os.fspath(path)

    def read(step_dir: epath.Path, step: int) -> tuple[WanVAE | None, WanVAEConfig, str]:
        config = recorded_run_config(step_dir, step)
        check_run_task(config, ("vae",), source, fix)
        saved_cfg = vae_config_from(config["vae"])
        if expected is not None:
            differ = architecture_differences(saved_cfg, expected)
            if differ:
                raise UserError(f"{source} is a VAE of another architecture than config.vae: {differ}. Set "
                                "--config.vae.<field> to the run's values, or pass a VAE run of this architecture.")
        saved = saved_arrays(step_dir, step)
        mean, std = _latent_stats(step_dir, step, saved, source)
        vae_cfg = dataclasses.replace(saved_cfg, latents_mean=mean, latents_std=std)
        if not with_weights:
            return None, vae_cfg, ""
        prefix = weights_prefix(saved, weights, step_dir, ask_raw=ask_raw)
        vae = _filled(lambda: WanVAE(vae_cfg, rngs=nnx.Rngs(0)), saved, prefix, step_dir, step, what="the VAE",
                      source=source)
        return vae, vae_cfg, prefix

    (vae, vae_cfg, prefix), loaded = newest_step(path, source, read)
    return TrainedVAE(vae_cfg, vae, dataclasses.replace(loaded, weights=prefix))


# ------------------------------------------------------------------------------------------------
# A Director-Gen or Director-SR run


def read_trainer_dit(path: str | os.PathLike, tasks: tuple[str, ...], gen_config: WanDiTConfig | None,
                     model_kw: dict[str, Any], *, weights: str = "auto", source: str | None = None,
                     fix: Fix = "", ask_raw: str = "weights='params'"
                     ) -> tuple[DirectorGen | DirectorSR, LoadedCheckpoint]:
    """A Gen or SR run's model (DirectorGen or DirectorSR, as its task) from its newest readable step.

    ``tasks``: the tasks accepted; ``gen_config``: the Gen architecture the caller needs (``config.model``;
    an SR run's is the Gen architecture it was trained over), None for any; ``model_kw``: ``WanDiT``
    arguments (numerics, attention), the weights cast to its ``param_dtype``.
    """
    source = source or os.fspath(path)

    def read(step_dir: epath.Path, step: int) -> tuple[nnx.Module, str]:
        config = recorded_run_config(step_dir, step)
        task = check_run_task(config, tasks, source, fix or f"pass {TASK_NAMES[tasks[0]]} run")
        saved_gen = dit_config(config["model"])
        if gen_config is not None:
            differ = architecture_differences(saved_gen, gen_config)
            if differ:
                raise UserError(f"{source} was trained with another architecture than config.model: {differ}. Set "
                                "--config.model.<field> to the run's values, or pass a run of this architecture.")
        saved = saved_arrays(step_dir, step)
        prefix = weights_prefix(saved, weights, step_dir, ask_raw=ask_raw)
        if task == "sr":
            build = lambda: DirectorSR.init(saved_gen, rngs=nnx.Rngs(0), **model_kw)  # noqa: E731
        else:
            build = lambda: DirectorGen(WanDiT(saved_gen, rngs=nnx.Rngs(0), **model_kw))  # noqa: E731
        what = f"{TASK_NAMES[task][2:]} of its config"
        return _filled(build, saved, prefix, step_dir, step, what=what, source=source), prefix

    (model, prefix), loaded = newest_step(path, source, read)
    return model, dataclasses.replace(loaded, weights=prefix)


def trainer_director_gen(path: str | os.PathLike, gen_config: WanDiTConfig, model_kw: dict[str, Any]) -> DirectorGen:
    """``config.init_from`` = a Director-Gen run: its EMA (or raw) weights, to continue or fine-tune from."""
    model, _ = read_trainer_dit(path, ("gen",), gen_config, model_kw, source=f"config.init_from={path}",
                                fix="a Director-Gen run starts from a Gen run or a Wan2.1 T2V checkpoint")
    return model


def trainer_director_sr(path: str | os.PathLike, gen_config: WanDiTConfig, model_kw: dict[str, Any]) -> DirectorSR:
    """``config.init_from`` of an SR run = a Gen run (``DirectorSR.from_gen`` of it) or an SR run (continued)."""
    model, _ = read_trainer_dit(path, ("sr", "gen"), gen_config, model_kw, source=f"config.init_from={path}",
                                fix="Director-SR starts from a Director-Gen or Director-SR run")
    return DirectorSR.from_gen(model) if isinstance(model, DirectorGen) else model


# ------------------------------------------------------------------------------------------------
# Export (``python -m director_jax.convert export --src RUN``)


def _parameters(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def read_run_for_export(model: str, src: str | os.PathLike, *, weights: str = "auto"
                        ) -> tuple[nnx.Module, str, LoadedCheckpoint]:
    """The model ``convert``'s exporter for ``model`` (vae / dit / sr) takes, read from a run of the matching task.

    Returns (WanVAE / WanDiT / DirectorSR, the run's task, which step and weights were read). The VAE's
    config carries the run's latent statistics, so its config.json records them. Float32 weights.
    """
    if model not in EXPORT_TASKS:
        raise UserError(f"--model {model!r} cannot be exported from a training run; choose one of "
                        f"{sorted(EXPORT_TASKS)}.")
    source, ask_raw = f"--src {os.fspath(src)}", "--weights params"
    right = {t: m for m, t in EXPORT_TASKS.items()}

    def fix(found: str) -> str:
        return f"export it with --model {right[found]}" if found in right else "pass a VAE, Gen or SR run"

    task = EXPORT_TASKS[model]
    if model == "vae":
        trained = read_trainer_vae(src, weights=weights, source=source, fix=fix, ask_raw=ask_raw)
        return trained.vae, task, trained.loaded
    built, loaded = read_trainer_dit(src, (task,), None, dict(dtype=jnp.float32, param_dtype=jnp.float32),
                                     weights=weights, source=source, fix=fix, ask_raw=ask_raw)
    return (built.dit if model == "dit" else built), task, loaded


def export_run(direction: str, model: str, src: str | os.PathLike, out: str | os.PathLike, config: str | None = None,
               *, weights: str = "auto") -> str:
    """``python -m director_jax.convert import|export --src RUN``: a training run's newest complete step written
    as a diffusers directory (``convert``'s exporter for ``model``); returns the one-line summary.

    The arguments are checked as for any source (``convert.command.check_inputs``), before anything
    is read or written; ``config`` is refused (a run carries its own).
    """
    src, out = os.fspath(src), os.fspath(out)
    check_inputs(direction, model, src, out, config)
    if config is not None:
        raise UserError(f"--config is for bare weight files; {src} is a training run and carries its own config.")
    built, task, loaded = read_run_for_export(model, src, weights=weights)
    written = MODELS[model].export(built, out)
    skipped = f" (newer steps skipped: {'; '.join(loaded.skipped)})" if loaded.skipped else ""
    verb = "imported" if direction == "import" else "exported"
    return (f"{verb} {model}: {_parameters(built):,} parameters, the {loaded.weights} weights of step {loaded.step} "
            f"of the {task} run {src}{skipped} -> {written} (diffusers)")
