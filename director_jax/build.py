"""Config -> models, and trained weights -> models: the one place every command builds its models from.

* **Builders** (``build_vae``, ``build_director_gen``, ``build_director_sr``, ``random_frozen_vae``)
  turn a config (``configs/*.py``) into a model; they are traceable, so the trainer calls them
  under ``nnx.eval_shape`` and ``jax.jit`` for a sharded initialisation. ``model_options`` is the
  one map from ``config.model_options`` to module arguments.
* **The frozen VAE** of a Director-Gen / SR config: ``vae.init_from`` read with its own latent
  statistics (``vae_config_with_checkpoint_stats``), else the trainer's random initialisation.
* **Trainer checkpoints for inference** (``load_director_gen``, ``load_director_sr``): the model is
  built abstractly first, then only its weights (EMA or raw) are read from the Orbax step, straight
  onto the target sharding; the optimizer state is never loaded. The flat array names a trainer
  checkpoint uses (``flatten_state``) are defined here, so the trainer writes what this reads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from director_jax.convert.dit import load_transformer
from director_jax.convert.vae import load_vae, vae_config
from director_jax.io_utils import is_remote, storage_path
from director_jax.models.dit import DirectorGen, WanDiT, WanDiTConfig
from director_jax.models.sr import DirectorSR, sr_config
from director_jax.models.vae import WanVAE, WanVAEConfig

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "params")
COMMIT_FILE = "commit_success.txt"  # Orbax's last write of a step on cloud storage


# ------------------------------------------------------------------------------------------------
# Config -> model


def model_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.model_options`` as DiT keyword arguments (numerics, attention, remat, sequence parallelism)."""
    opts = cfg.model_options
    return dict(dtype=jnp.dtype(opts.dtype), param_dtype=jnp.dtype(opts.param_dtype),
                attention_impl=opts.attention_impl, remat_policy=opts.remat_policy,
                sequence_parallel=opts.get("sequence_parallel"),
                attention_block_sizes=opts.get("attention_block_sizes"))


def dit_config(model: ml_collections.ConfigDict) -> WanDiTConfig:
    """The ``model`` section of a config (diffusers' ``WanTransformer3DModel`` arguments) as a WanDiTConfig."""
    return WanDiTConfig.from_diffusers_config(model.to_dict())


def vae_config_from(section: ml_collections.ConfigDict) -> WanVAEConfig:
    """``config.vae`` (WanVAEConfig fields, plus ``init_from``) as a WanVAEConfig."""
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    values = {k: v for k, v in section.to_dict().items() if k != "init_from"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.vae has unknown keys {unknown}; WanVAEConfig fields are {sorted(fields)}.")
    return WanVAEConfig(**values)


def vae_config_with_checkpoint_stats(section: ml_collections.ConfigDict) -> WanVAEConfig:
    """``config.vae`` as a WanVAEConfig, with the latent statistics of ``init_from``'s config.json when it has one.

    A VAE fitted here (the CPU demo's, ``benchmarks/sr.py``'s) has its own latent scale; its directory
    records it, and normalising with other statistics mis-scales every latent (Director-Gen once got
    keyframes normalised ~2x off this way). The architecture fields must agree with ``config.vae``
    (they fix the shapes the step is compiled for). For the Wan2.1 VAE the directory's statistics
    are the defaults, so nothing changes.
    """
    config = vae_config_from(section)
    src = section.get("init_from", "")
    config_json = next((p for p in (Path(src) / "config.json", Path(src) / "vae" / "config.json")
                        if src and p.is_file()), None)
    if config_json is None:
        return config
    saved = vae_config(config_json)
    stats = ("latents_mean", "latents_std")
    differ = [f.name for f in dataclasses.fields(WanVAEConfig)
              if f.name not in stats and getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError(f"{config_json} describes another VAE than config.vae: " + ", ".join(
            f"{k}={getattr(saved, k)!r} (config: {getattr(config, k)!r})" for k in differ)
            + ". Set --config.vae.<field> to the checkpoint's values.")
    return dataclasses.replace(config, latents_mean=saved.latents_mean, latents_std=saved.latents_std)


def build_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The trainable VAE of a VAE run (``config.task = "vae"``), randomly initialised from ``cfg.seed``."""
    opts = cfg.model_options
    return WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(int(cfg.seed)), dtype=jnp.dtype(opts.dtype),
                  param_dtype=jnp.dtype(opts.param_dtype))


def build_director_gen(cfg: ml_collections.ConfigDict, *, seed: int | None = None) -> DirectorGen:
    """Director-Gen as the config says: random init, or ``cfg.init_from`` (any Wan2.1 T2V checkpoint)."""
    kw = model_options(cfg)
    model_cfg = dit_config(cfg.model)
    if cfg.init_from:
        dit = load_transformer(cfg.init_from, **kw)
        if dit.config != model_cfg:
            raise ValueError(f"{cfg.init_from} holds a transformer with config {dit.config}, but the run's config "
                             f"says {model_cfg}: fix --config.model.* or pick the matching checkpoint.")
    else:
        dit = WanDiT(model_cfg, rngs=nnx.Rngs(cfg.seed if seed is None else seed), **kw)
    return DirectorGen(dit)


def build_director_sr(cfg: ml_collections.ConfigDict) -> DirectorSR:
    """Director-SR for the Gen architecture of ``cfg.model``: random, from a Gen checkpoint, or an SR checkpoint.

    ``cfg.init_from`` may hold a Director-Gen / Wan T2V transformer (the SR model starts as it, the
    low-res channels zero: ``DirectorSR.from_gen``) or an SR transformer (``convert.sr.export_sr``;
    training continues from it). Empty: ``DirectorSR.init`` with ``cfg.seed``.
    """
    kw = model_options(cfg)
    gen_cfg = dit_config(cfg.model)
    if not cfg.init_from:
        return DirectorSR.init(gen_cfg, rngs=nnx.Rngs(int(cfg.seed)), **kw)
    dit = load_transformer(cfg.init_from, **kw)
    if dit.config == gen_cfg:
        return DirectorSR.from_gen(dit)
    if dit.config == sr_config(gen_cfg):
        return DirectorSR(dit)
    raise ValueError(f"{cfg.init_from} holds a transformer with config {dit.config}; the run's config.model (the Gen "
                     f"architecture) is {gen_cfg}, so a Gen checkpoint must match it and an SR one must match "
                     f"sr_config() of it (in_channels {2 * gen_cfg.in_channels}). Fix --config.model.* or the path.")


def random_frozen_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The frozen VAE of a Gen / SR config with random weights (seed ``cfg.seed + 1``): shapes, tests."""
    return WanVAE(vae_config_with_checkpoint_stats(cfg.vae), rngs=nnx.Rngs(int(cfg.seed) + 1))


def frozen_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The frozen VAE a Gen / SR run encodes with: ``vae.init_from`` with its own latent statistics, else random."""
    if cfg.vae.init_from:
        return load_vae(cfg.vae.init_from, vae_config_with_checkpoint_stats(cfg.vae))
    log.warning("config.vae.init_from is empty: the VAE is randomly initialised (fine for tests; set "
                "--config.vae.init_from to a Wan2.1 VAE for real runs).")
    return random_frozen_vae(cfg)


def load_frozen_vae(model_cfg: ml_collections.ConfigDict, *, sharding: jax.sharding.Sharding) -> WanVAE:
    """The frozen VAE of a trained Gen / SR config for inference, placed on ``sharding``.

    ``vae.init_from``, or for runs that encoded in the step with an empty ``init_from`` the trainer's
    own random initialisation; a run trained on precomputed latents must name their VAE.
    """
    if not model_cfg.vae.init_from and model_cfg.train.get("latents") != "encode":
        raise ValueError("the model config's vae.init_from is empty and its run trained on precomputed latents: set "
                         "vae.init_from in the model config (--config.model_config) to the VAE of those latents.")
    graphdef, state = nnx.split(frozen_vae(model_cfg))
    return nnx.merge(graphdef, jax.device_put(state, sharding))


# ------------------------------------------------------------------------------------------------
# The flat array names of a trainer checkpoint


def path_parts(path: tuple) -> tuple[str, ...]:
    """A pytree key path as names: ``("params", "dit", "blocks", "ffn", "proj_in", "kernel")``.

    The ``value`` attribute of an ``nnx.Variable`` is left out, so a parameter and the optimizer /
    EMA leaves that mirror it end with the same names.
    """
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return tuple(parts)


def _name(path: tuple) -> str:
    return ".".join(path_parts(path))


def flatten_state(state: Any) -> dict[str, Any]:
    """``{"params.dit.blocks.attn1.to_q.kernel": array, ...}`` for every leaf of the train state."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = _name(path)
        if name in flat:
            raise ValueError(f"two leaves of the train state are both named {name!r}.")
        flat[name] = leaf
    return flat


def unflatten_state(like: Any, flat: dict[str, Any]) -> Any:
    """The inverse of ``flatten_state`` given a tree of the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_name(p)] for p, _ in paths])


def describe_mismatch(expected: dict[str, Any], found: dict[str, Any], limit: int = 12) -> str:
    """Lines naming the arrays that are missing, unexpected, or of another shape / dtype."""
    lines = []
    for name in sorted(set(expected) | set(found)):
        e, f = expected.get(name), found.get(name)
        if f is None:
            lines.append(f"  {name}: expected {tuple(e.shape)} {e.dtype}, missing in the checkpoint")
        elif e is None:
            lines.append(f"  {name}: in the checkpoint {tuple(f.shape)}, not in this run's state")
        elif tuple(e.shape) != tuple(f.shape) or np.dtype(e.dtype) != np.dtype(f.dtype):
            lines.append(f"  {name}: checkpoint {tuple(f.shape)} {np.dtype(f.dtype)}, "
                         f"this run {tuple(e.shape)} {np.dtype(e.dtype)}")
    more = len(lines) - limit
    return "\n".join(lines[:limit] + ([f"  ... and {more} more"] if more > 0 else []))


# ------------------------------------------------------------------------------------------------
# Trainer checkpoint -> model for inference


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    directory: str  # the step directory read
    step: int
    weights: str  # "ema" or "params"


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
                     step: int | None = None, weights: str = "auto") -> tuple[DirectorSR, LoadedCheckpoint]:
    """Director-SR from an SR trainer checkpoint, as ``load_director_gen`` reads Gen's."""
    return _load_model(build_director_sr, sr_cfg, path, sharding=sharding, step=step, weights=weights,
                       what="Director-SR")
