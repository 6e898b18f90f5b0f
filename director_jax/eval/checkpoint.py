"""Director-Gen weights from a trainer checkpoint, and the frozen VAE its config names, for evaluation.

The trainer saves the whole train state as flat arrays (``params.*``, ``opt_state.*``, ``ema.*``,
... see ``train/checkpoint.py``). Evaluation reads only the model weights (the EMA copy when the
run kept one, else the raw parameters) with an Orbax partial restore, straight onto the target
sharding (replicated over the evaluation mesh): the optimizer state is never loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from director_jax.configs_common import build_director_gen
from director_jax.io_utils import is_remote, storage_path
from director_jax.models.dit import DirectorGen
from director_jax.models.vae import WanVAE
from director_jax.train.checkpoint import describe_mismatch, flatten_state, unflatten_state
from director_jax.train.tasks import vae_config_with_checkpoint_stats

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "params")


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    directory: str  # the step directory read
    step: int
    weights: str  # "ema" or "params"


COMMIT_FILE = "commit_success.txt"  # Orbax's last write of a step on cloud storage


def step_directory(path: str | Path, step: int | None = None) -> tuple[epath.Path, int]:
    """The directory of one saved step: ``path`` may be a run's workdir, its ``checkpoints`` dir or a step dir."""
    remote = is_remote(path)
    p = storage_path(path)  # Orbax reads relative paths as nothing
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist: pass the trainer's --workdir (or its "
                                "checkpoints/ directory).")
    if (p / "state").is_dir() and p.name.isdigit():
        if remote and not (p / COMMIT_FILE).exists():
            raise FileNotFoundError(f"{p} has no {COMMIT_FILE}: the step was still being written when its run "
                                    "stopped; pass the run's workdir to take its newest complete step.")
        if step is not None and int(p.name) != step:
            raise ValueError(f"{p} is step {p.name}, but step {step} was asked for.")
        return p, int(p.name)
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    # Locally Orbax writes a step under a temporary name and renames it when complete: digit names are complete
    # steps. Cloud storage has no rename: the step is written in place and commit_success.txt comes last.

    def complete(d: epath.Path) -> bool:
        return d.name.isdigit() and (d / "state").is_dir() and (not remote or (d / COMMIT_FILE).exists())

    steps = sorted(int(d.name) for d in root.iterdir() if complete(d))
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint step under {root}: train first (python -m director_jax.train "
                                "--config ... --workdir DIR) and pass that DIR.")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise FileNotFoundError(f"step {step} is not among the checkpoints in {root} (found {steps}).")
    return root / str(chosen), chosen


def _saved_arrays(state_dir: epath.Path) -> dict[str, Any]:
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    return dict(tree)


def _load_model(build, model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                step: int | None, weights: str, what: str) -> tuple[nnx.Module, LoadedCheckpoint]:
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {WEIGHTS}.")
    step_dir, step = step_directory(path, step)
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.init_from = ""  # the checkpoint gives the weights: never read the config's init checkpoint
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg)))
    expected = flatten_state(abstract)
    saved = _saved_arrays(step_dir / "state")
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
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                                        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    state = unflatten_state(abstract, {n: restored[f"{prefix}.{n}"] for n in expected})
    return nnx.merge(graphdef, state), LoadedCheckpoint(str(step_dir), step, prefix)


def load_director_gen(model_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                      step: int | None = None, weights: str = "auto") -> tuple[DirectorGen, LoadedCheckpoint]:
    """Director-Gen as ``model_cfg`` builds it, with the checkpoint's EMA (or raw) weights placed on ``sharding``."""
    return _load_model(build_director_gen, model_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-Gen")


def load_director_sr(sr_cfg: ml_collections.ConfigDict, path: str | Path, *, sharding: jax.sharding.Sharding,
                     step: int | None = None, weights: str = "auto") -> tuple[nnx.Module, LoadedCheckpoint]:
    """Director-SR from an SR trainer checkpoint, as ``load_director_gen`` reads Gen's."""
    from director_jax.train.tasks import build_director_sr

    return _load_model(build_director_sr, sr_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-SR")


def load_frozen_vae(model_cfg: ml_collections.ConfigDict, *, sharding: jax.sharding.Sharding) -> WanVAE:
    """The frozen VAE of a Director-Gen config, built as the trainer builds it (``vae.init_from``, or for runs
    that encode in the step with an empty ``init_from`` the trainer's own random initialisation)."""
    from director_jax.convert.vae import load_vae
    from director_jax.train.tasks import make_task

    if model_cfg.vae.init_from:
        vae = load_vae(model_cfg.vae.init_from, vae_config_with_checkpoint_stats(model_cfg.vae))
    elif model_cfg.train.get("latents") == "encode":
        log.warning("vae.init_from is empty: using the randomly initialised VAE the trainer encoded with (fine for "
                    "tests; real evaluations set vae.init_from in the model config to a Wan2.1 VAE).")
        vae = make_task(model_cfg).frozen_model()
    else:
        raise ValueError("the model config's vae.init_from is empty and its run trained on precomputed latents: set "
                         "vae.init_from in the model config (--config.model_config) to the VAE of those latents.")
    graphdef, state = nnx.split(vae)
    return nnx.merge(graphdef, jax.device_put(state, sharding))
