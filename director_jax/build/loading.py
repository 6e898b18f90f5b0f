"""Trainer checkpoints -> models for inference, straight onto their sharding, falling back past damaged steps.

The model is built abstractly first (``nnx.eval_shape``), then only its weights (EMA or raw) are
read from the Orbax step onto the target sharding; the optimizer state is never loaded. The newest
committed step is tried first; a damaged one is reported in one warning line and the one before it
is used (``LoadedCheckpoint.step`` and ``.skipped`` say which), unless the caller named the step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from director_jax.build.checkpoints import (
    STATE_ITEM,
    WEIGHTS,
    DamagedCheckpointError,
    LoadedCheckpoint,
    candidate_steps,
    describe_mismatch,
    first_nonfinite,
    flatten_state,
    quiet_failed_restore,
    quiet_orbax_reads,
    short_reason,
    unflatten_state,
)
from director_jax.build.models import build_director_gen, build_director_sr
from director_jax.models.dit import DirectorGen
from director_jax.models.sr import DirectorSR

log = logging.getLogger(__name__)

def _saved_arrays(state_dir: epath.Path, step: int) -> dict[str, Any]:
    """Name -> array metadata of a step's ``state`` item; ``DamagedCheckpointError`` when it cannot be read."""
    if not state_dir.is_dir():
        raise DamagedCheckpointError(state_dir.parent, step, f"it has no {STATE_ITEM}/ item")
    quiet_orbax_reads()
    try:  # the handler raises the cause; PyTreeCheckpointer().metadata() would log it and return None
        metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise ValueError("Orbax found no array metadata")
        return dict(tree)
    except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore / JSON raise many types for one damaged file
        quiet_failed_restore(state_dir.parent)
        raise DamagedCheckpointError(state_dir.parent, step, f"its array metadata does not read ({short_reason(e)})"
                                     ) from e


def _read_weights(build, cfg: ml_collections.ConfigDict, step_dir: epath.Path, step: int, *,
                  sharding: jax.sharding.Sharding, weights: str, what: str) -> tuple[nnx.Module, str]:
    """One step's weights in the model; ``DamagedCheckpointError`` for damage, ``ValueError`` for a wrong config."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg)))
    expected = flatten_state(abstract)
    saved = _saved_arrays(step_dir / STATE_ITEM, step)
    has_ema = any(name.startswith("ema.") for name in saved)
    prefix = ("ema" if has_ema else "params") if weights == "auto" else weights
    if prefix == "ema" and not has_ema:
        raise ValueError(f"{step_dir} holds no EMA weights (the run had optim.ema_decay = 0): use weights='params'.")
    found = {name[len(prefix) + 1:]: value for name, value in saved.items() if name.startswith(prefix + ".")}
    bad = describe_mismatch(expected, found)
    if bad:
        raise ValueError(f"the {prefix} weights in {step_dir} do not fit the model ({what}) of the given config:\n"
                         f"{bad}\nPass the config the checkpoint was trained with (evaluate: --config.model_config; "
                         "generate: --config / --sr_config).")
    target = {f"{prefix}.{n}": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for n, v in expected.items()}
    quiet_orbax_reads()
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=target, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:  # noqa: BLE001 -- truncated / garbage array files surface as TensorStore errors of any type
        quiet_failed_restore(step_dir)
        raise DamagedCheckpointError(step_dir, step, f"its {prefix} weights do not read ({short_reason(e)})") from e
    nonfinite = first_nonfinite(restored)
    if nonfinite is not None:
        raise DamagedCheckpointError(step_dir, step, f"{nonfinite} holds NaN or infinite values")
    state = unflatten_state(abstract, {n: restored[f"{prefix}.{n}"] for n in expected})
    return nnx.merge(graphdef, state), prefix


def _load_model(build, model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                step: int | None, weights: str, what: str) -> tuple[nnx.Module, LoadedCheckpoint]:
    """The newest committed step whose weights read and are finite; an older one, with a warning, otherwise.

    A step the user named (``step=`` or a step directory) is never replaced: its damage is the error.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {WEIGHTS}.")
    candidates, explicit, uncommitted = candidate_steps(path, step)
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.init_from = ""  # the checkpoint gives the weights: never read the config's init checkpoint
    newest = candidates[0][1]
    skipped = [f"step {s}: {why}" for s, why in sorted(uncommitted.items(), reverse=True) if s > newest]
    for s in skipped:
        log.warning("checkpoint %s; not used.", s)
    for step_dir, s in candidates:
        try:
            model, prefix = _read_weights(build, cfg, step_dir, s, sharding=sharding, weights=weights, what=what)
        except DamagedCheckpointError as e:
            if explicit:
                raise ValueError(f"{e}. The step was asked for explicitly, so no other step is used: pass another "
                                 "step, or the run's workdir to take its newest step that restores.") from e
            log.warning("checkpoint step %d in %s cannot be used: %s; trying the previous complete step.",
                        s, step_dir.parent, e.reason)
            skipped.append(f"step {s}: {e.reason}")
            continue
        if s != newest:
            log.warning("using checkpoint step %d of %s (newer steps are damaged).", s, step_dir.parent)
        return model, LoadedCheckpoint(str(step_dir), s, prefix, tuple(skipped))
    raise FileNotFoundError(f"no checkpoint step in {candidates[0][0].parent} restores: " + "; ".join(skipped)
                            + ". Train again, or pass a run whose checkpoints are intact.")


def load_director_gen(model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                      step: int | None = None, weights: str = "auto") -> tuple[DirectorGen, LoadedCheckpoint]:
    """Director-Gen as ``model_cfg`` builds it, with the checkpoint's EMA (or raw) weights placed on ``sharding``."""
    return _load_model(build_director_gen, model_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-Gen")


def load_director_sr(sr_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                     step: int | None = None, weights: str = "auto") -> tuple[DirectorSR, LoadedCheckpoint]:
    """Director-SR from an SR trainer checkpoint, as ``load_director_gen`` reads Gen's."""
    return _load_model(build_director_sr, sr_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-SR")
