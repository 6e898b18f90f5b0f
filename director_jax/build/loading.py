"""Trainer checkpoints -> models for inference, straight onto their sharding, falling back past damaged steps.

The model is built abstractly first (``nnx.eval_shape``), then only its weights (EMA or raw) are
read from the Orbax step onto the target sharding; the optimizer state is never loaded. The newest
committed step is tried first; a damaged one is reported in one warning line and the one before it
is used (``LoadedCheckpoint.step`` and ``.skipped`` say which), unless the caller named the step.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from director_jax.build.checkpoints import (
    WEIGHTS,
    LoadedCheckpoint,
    describe_mismatch,
    flatten_state,
    unflatten_state,
)
from director_jax.build.models import build_director_gen, build_director_sr
from director_jax.build.reuse import is_trainer_run
from director_jax.build.sections import dit_config
from director_jax.build.shard_init import InitRequest, load_into_shards
from director_jax.build.steps import read_newest, restore_arrays, saved_arrays, weights_prefix
from director_jax.errors import UserError
from director_jax.models.dit import DirectorGen
from director_jax.models.sr import DirectorSR
from director_jax.parallel.rules import param_shardings, rules_from_config

log = logging.getLogger(__name__)


Placement = jax.sharding.Sharding | Mesh


def inference_config(cfg: ml_collections.ConfigDict, *, dtype: str | None = None,
                     mesh: Mesh | None = None) -> ml_collections.ConfigDict:
    """The model config as inference builds it: ``dtype`` (weights and compute) instead of the run's, and
    sequence-parallel attention switched on ("auto") when ``mesh`` has a sequence axis the run did not use."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if dtype is not None:
        cfg.model_options.update(dict(dtype=dtype, param_dtype=dtype))
    if mesh is not None and mesh.shape.get("sequence", 1) > 1 and not cfg.model_options.get("sequence_parallel"):
        cfg.model_options.sequence_parallel = "auto"
    return cfg


def _targets(abstract: nnx.State, cfg: ml_collections.ConfigDict, placement: Placement) -> dict[str, Any]:
    """Name -> the sharding of each weight: one sharding for all, or the config's axis rules on a mesh."""
    if not isinstance(placement, Mesh):
        return {n: placement for n in flatten_state(abstract)}
    return flatten_state(param_shardings(abstract, placement, rules_from_config(cfg)))


def _read_weights(build, cfg: ml_collections.ConfigDict, step_dir: epath.Path, step: int, *,
                  sharding: Placement, weights: str, what: str, dtype: str | None = None) -> tuple[nnx.Module, str]:
    """One step's weights in the model; ``DamagedCheckpointError`` for damage, ``ValueError`` for a wrong config.

    The saved arrays are checked against the model of ``cfg`` as trained, then read straight into the shards of
    the model as inference builds it (``dtype``: Orbax casts while reading; on a mesh each host reads its shards).
    """
    expected = flatten_state(nnx.split(nnx.eval_shape(lambda: build(cfg)))[1])
    infer_cfg = inference_config(cfg, dtype=dtype, mesh=sharding if isinstance(sharding, Mesh) else None)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(infer_cfg)))
    saved = saved_arrays(step_dir, step)
    prefix = weights_prefix(saved, weights, step_dir)
    found = {name[len(prefix) + 1:]: value for name, value in saved.items() if name.startswith(prefix + ".")}
    bad = describe_mismatch(expected, found)
    if bad:
        raise ValueError(f"the {prefix} weights in {step_dir} do not fit the model ({what}) of the given config:\n"
                         f"{bad}\nPass the config the checkpoint was trained with (evaluate: --config.model_config; "
                         "generate: --config / --sr_config).")
    placed = _targets(abstract, infer_cfg, sharding)
    target = {f"{prefix}.{n}": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[n])
              for n, v in flatten_state(abstract).items()}
    restored = restore_arrays(step_dir, step, target, what=f"{prefix} weights")
    state = unflatten_state(abstract, {n: restored[f"{prefix}.{n}"] for n in expected})
    return nnx.merge(graphdef, state), prefix


def _load_model(build, model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: Placement,
                step: int | None, weights: str, what: str, dtype: str | None = None
                ) -> tuple[nnx.Module, LoadedCheckpoint]:
    """The newest committed step whose weights read and are finite; an older one, with a warning, otherwise.

    A step the user named (``step=`` or a step directory) is never replaced: its damage is the error.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {WEIGHTS}.")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.init_from = ""  # the checkpoint gives the weights: never read the config's init checkpoint
    if not is_trainer_run(path):
        if step is not None or weights != "auto":
            raise ValueError(f"{path} is a weight source, not a training run: a step or EMA / raw weights "
                             "choose among a run's checkpoints.")
        return _read_weight_source(build, cfg, str(path), sharding=sharding, dtype=dtype,
                                   task="sr" if build is build_director_sr else "gen"), LoadedCheckpoint(
            directory=str(path), step=None, weights="weights")
    (model, prefix), loaded = read_newest(path, step, lambda step_dir, s: _read_weights(
        build, cfg, step_dir, s, sharding=sharding, weights=weights, what=what, dtype=dtype))
    return model, dataclasses.replace(loaded, weights=prefix)


def _read_weight_source(build, cfg: ml_collections.ConfigDict, source: str, *, sharding: Placement,
                        dtype: str | None, task: str) -> nnx.Module:
    """A diffusers directory, a release root or a weight file (diffusers or official Wan layout) read straight
    into the shards of the model ``cfg`` builds, as the trainer's ``init_from`` is (``build.shard_init``): each
    host reads only the safetensors slices its devices hold. A transformer of another size is a ValueError."""
    infer_cfg = inference_config(cfg, dtype=dtype, mesh=sharding if isinstance(sharding, Mesh) else None)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(infer_cfg)))
    placed = _targets(abstract, infer_cfg, sharding)
    targets = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[n])
               for n, v in flatten_state(abstract).items()}
    try:
        arrays = load_into_shards(InitRequest(source, task, dit_config(cfg.model)), targets)
    except UserError as e:
        raise ValueError(str(e)) from None
    return nnx.merge(graphdef, unflatten_state(abstract, arrays))


def load_director_gen(model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: Placement,
                      step: int | None = None, weights: str = "auto", dtype: str | None = None
                      ) -> tuple[DirectorGen, LoadedCheckpoint]:
    """Director-Gen as ``model_cfg`` builds it, with the checkpoint's EMA (or raw) weights placed on ``sharding``.

    ``sharding``: one sharding for every weight, or a ``Mesh`` (each weight sharded by the config's axis
    rules, as the trainer shards it); ``dtype`` ("bfloat16" / "float32"): weights and compute in it,
    instead of the config's ``model_options``.
    """
    return _load_model(build_director_gen, model_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-Gen", dtype=dtype)


def load_director_sr(sr_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: Placement,
                     step: int | None = None, weights: str = "auto", dtype: str | None = None
                     ) -> tuple[DirectorSR, LoadedCheckpoint]:
    """Director-SR from an SR trainer checkpoint, as ``load_director_gen`` reads Gen's."""
    return _load_model(build_director_sr, sr_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-SR", dtype=dtype)
