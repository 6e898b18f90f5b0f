"""``config.init_from`` read straight into the parameters' shards, outside any traced function.

Reading a Wan2.1 transformer inside the traced init baked every weight into the program as a
constant and made every host read the whole checkpoint (three times: graphdef, abstract state,
init). Instead the builders, while ``deferred_init_from()`` is active (the trainer's traced init and
its ``eval_shape``), build the run's architecture without reading anything and record an
``InitRequest``; the trainer then fills the parameters here, each host reading only what its
devices hold:

* a diffusers / official-layout safetensors checkpoint: ``safetensors`` slices
  (``convert.lazy``), mapped through the converters' table (names, transposes, stacked layers),
  assembled with ``jax.make_array_from_callback``;
* a Gen / SR training run of this project: an Orbax restore onto the target shardings;
* anything else (``.pth``): read whole on the host (it cannot be sliced), then placed.

Director-SR from a Gen transformer gets its extra low-res patch-embedding channels as zeros
(``DirectorSR.from_gen``). Values are those of the in-trace builders (float32, then the
parameter dtype); the same configuration checks and messages apply.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from director_jax.build.checkpoints import describe_mismatch, flatten_state
from director_jax.build.reuse import TASK_NAMES, check_run_task, is_trainer_run, newest_step, recorded_run_config
from director_jax.build.sections import architecture_differences, dit_config
from director_jax.build.steps import restore_arrays, saved_arrays, weights_prefix
from director_jax.convert.checkpoint import Checkpoint
from director_jax.convert.dit import TRANSFORMER_FORMAT, empty_transformer, read_transformer_checkpoint
from director_jax.convert.dit_weights import diffusers_param_table, official_key_map
from director_jax.convert.lazy import LazyTensor, lazy_checkpoint
from director_jax.convert.param_table import expected_shapes, get_param
from director_jax.convert.state_dict import check_state_dict
from director_jax.errors import UserError
from director_jax.models.dit import DirectorGen, WanDiT, WanDiTConfig
from director_jax.models.sr import DirectorSR, sr_config

log = logging.getLogger(__name__)

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class InitRequest:
    """A builder's ``init_from`` left for ``load_into_shards``: the source and what it must fill."""

    source: str  # config.init_from
    task: str  # "gen" (Director-Gen) or "sr" (Director-SR over the Gen architecture gen_config)
    gen_config: WanDiTConfig


_PENDING: contextvars.ContextVar[list[InitRequest] | None] = contextvars.ContextVar("init_from_pending",
                                                                                     default=None)


@contextlib.contextmanager
def deferred_init_from() -> Iterator[list[InitRequest]]:
    """While active, ``build_director_gen`` / ``_sr`` read no ``init_from``: they build the architecture and
    append an ``InitRequest`` to the yielded list instead."""
    token = _PENDING.set([])
    try:
        yield _PENDING.get()
    finally:
        _PENDING.reset(token)


def defer(source: str, task: str, gen_config: WanDiTConfig) -> bool:
    """Records ``source`` for a later sharded load when deferral is active (the builder then skips the read)."""
    pending = _PENDING.get()
    if pending is None or not source:
        return False
    pending.append(InitRequest(str(source), task, gen_config))
    return True


# ------------------------------------------------------------------------------------------------
# Configuration checks (shared with the eager builders)


def check_gen_source(source: str, found: WanDiTConfig, gen_config: WanDiTConfig) -> None:
    if found != gen_config:
        raise ValueError(f"{source} holds a transformer with config {found}, but the run's config "
                         f"says {gen_config}: fix --config.model.* or pick the matching checkpoint.")


def sr_starts_from_gen(source: str, found: WanDiTConfig, gen_config: WanDiTConfig) -> bool:
    """True: ``found`` is the Gen architecture (SR starts as it); False: it is the SR one; else a ValueError."""
    if found == gen_config:
        return True
    if found == sr_config(gen_config):
        return False
    raise ValueError(f"{source} holds a transformer with config {found}; the run's config.model (the Gen "
                     f"architecture) is {gen_config}, so a Gen checkpoint must match it and an SR one must match "
                     f"sr_config() of it (in_channels {2 * gen_config.in_channels}). Fix --config.model.* or the path.")


# ------------------------------------------------------------------------------------------------
# Slices


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only unit-step slices are read; got {s}")
        out.append((start, max(start, stop)))
    return out


def _whole(target: Any) -> Index:
    return tuple(slice(None) for _ in target.shape)


def padded_read(read: Callable[[Index], np.ndarray], source_shape: tuple[int, ...], index: Index,
                target_shape: tuple[int, ...]) -> np.ndarray:
    """``index`` of the target, where the source fills the leading ``source_shape`` corner and zeros the rest."""
    bounds = _bounds(tuple(index) + (slice(None),) * (len(target_shape) - len(index)), target_shape)
    out_shape = tuple(b - a for a, b in bounds)
    inner = [(a, min(b, n)) for (a, b), n in zip(bounds, source_shape, strict=True)]
    if source_shape == target_shape or all(b <= n for (_, b), n in zip(bounds, source_shape, strict=True)):
        return read(tuple(slice(a, b) for a, b in inner))
    out = np.zeros(out_shape, np.float32)
    if all(b > a for a, b in inner):
        out[tuple(slice(0, b - a) for a, b in inner)] = read(tuple(slice(a, b) for a, b in inner))
    return out


def _permutation(from_torch: Callable[[np.ndarray], np.ndarray], ndim: int) -> tuple[int, ...]:
    """The axes of the PyTorch tensor each axis of ours comes from (the converters only transpose)."""
    sizes = tuple(range(2, 2 + ndim))
    shape = from_torch(np.empty(sizes, np.float32)).shape
    if sorted(shape) != list(sizes):
        raise AssertionError(f"a converter entry is not a transpose ({sizes} -> {shape})")
    return tuple(sizes.index(n) for n in shape)


class TransformerWeights:
    """A Wan2.1 transformer checkpoint's parameters in this project's layout, readable slice by slice.

    Names are the model's flat parameter names under ``prefix`` (``dit.blocks.attn1.to_q.kernel``);
    ``read(name, index)`` reads only the PyTorch slices that ``index`` (in our layout) covers.
    """

    def __init__(self, ckpt: Checkpoint, prefix: str = "dit"):
        self.config: WanDiTConfig = ckpt.config
        self.source = ckpt.source
        self._state = ckpt.state
        model = empty_transformer(ckpt.config)
        table = diffusers_param_table(model)
        names = {k: k for k in table}
        if ckpt.layout == "official":
            names = official_key_map(model)
            check_state_dict({names[k]: e.torch_shape for k, e in table.items()}, ckpt.state,
                             f"{ckpt.source} (official Wan2.1 layout)")
        else:
            check_state_dict(expected_shapes(table), ckpt.state, ckpt.source)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._parts: dict[str, dict[int | None, tuple[str, Any]]] = {}
        for key, entry in table.items():
            name = ".".join((prefix, *entry.path))
            self.shapes[name] = tuple(get_param(model, entry.path).get_value().shape)
            self._parts.setdefault(name, {})[entry.layer] = (names[key], entry)

    def _tensor(self, key: str, entry: Any, index: Index) -> np.ndarray:
        perm = _permutation(entry.from_torch, len(entry.torch_shape))
        torch_index = [slice(None)] * len(perm)
        for ours, theirs in enumerate(perm):
            torch_index[theirs] = index[ours]
        value = self._state[key]
        if isinstance(value, LazyTensor):
            part = value.read(tuple(torch_index))
        else:
            part = np.asarray(np.asarray(value)[tuple(torch_index)], np.float32)
        if not np.isfinite(part).all():
            raise ValueError(f"weights from {self.source} hold non-finite values in {key!r}. Refused; convert the "
                             "checkpoint with --allow_nonfinite if you mean to use it.")
        return entry.from_torch(part)

    def read(self, name: str, index: Index) -> np.ndarray:
        parts = self._parts[name]
        if None in parts:
            key, entry = parts[None]
            return self._tensor(key, entry, index)
        layers = range(len(parts))[index[0]]
        return np.stack([self._tensor(*parts[i], index[1:]) for i in layers]) if len(layers) else \
            np.zeros((0, *(len(range(n)[s]) for s, n in zip(index[1:], self.shapes[name][1:], strict=True))),
                     np.float32)


def _file_weights(request: InitRequest) -> tuple[TransformerWeights, bool]:
    """The checkpoint's weights, checked against the run's architecture; True when SR starts from a Gen model."""
    ckpt = lazy_checkpoint(TRANSFORMER_FORMAT, request.source)
    if ckpt is None:  # not safetensors (.pth): read whole, once, on the host
        log.warning("init_from=%s is not safetensors: every host reads it whole.", request.source)
        ckpt = read_transformer_checkpoint(request.source)
    weights = TransformerWeights(ckpt)
    if request.task == "gen":
        check_gen_source(request.source, weights.config, request.gen_config)
        return weights, False
    return weights, sr_starts_from_gen(request.source, weights.config, request.gen_config)


def _place(read: Callable[[str, Index], np.ndarray], source_shapes: dict[str, tuple[int, ...]],
           targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    out = {}
    for name, target in targets.items():
        cache: dict[tuple, np.ndarray] = {}  # devices holding the same shard share one read

        def callback(index: Index, name=name, target=target, cache=cache) -> np.ndarray:
            key = tuple(_bounds(index, target.shape))
            if key not in cache:
                part = padded_read(lambda i: read(name, i), source_shapes[name], index, target.shape)
                cache[key] = np.asarray(part, target.dtype)
            return cache[key]

        out[name] = jax.make_array_from_callback(target.shape, target.sharding, callback)
    return out


# ------------------------------------------------------------------------------------------------
# A training run of this project


def _run_source(request: InitRequest, step_dir: epath.Path, step: int) -> tuple[dict[str, Any], str, dict]:
    """(found arrays' metadata by name, ``ema`` / ``params``, the run model's abstract shapes by name)."""
    source = f"config.init_from={request.source}"
    tasks = ("gen",) if request.task == "gen" else ("sr", "gen")
    fix = ("a Director-Gen run starts from a Gen run or a Wan2.1 T2V checkpoint" if request.task == "gen"
           else "Director-SR starts from a Director-Gen or Director-SR run")
    config = recorded_run_config(step_dir, step)
    task = check_run_task(config, tasks, source, fix)
    saved_gen = dit_config(config["model"])
    differ = architecture_differences(saved_gen, request.gen_config)
    if differ:
        raise UserError(f"{source} was trained with another architecture than config.model: {differ}. Set "
                        "--config.model.<field> to the run's values, or pass a run of this architecture.")
    saved = saved_arrays(step_dir, step)
    prefix = weights_prefix(saved, "auto", step_dir)
    if task == "sr":
        build = lambda: DirectorSR.init(saved_gen, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        build = lambda: DirectorGen(WanDiT(saved_gen, rngs=nnx.Rngs(0)))  # noqa: E731
    expected = flatten_state(nnx.state(nnx.eval_shape(build), nnx.Param))
    found = {name[len(prefix) + 1:]: value for name, value in saved.items() if name.startswith(prefix + ".")}
    shapes_only = {n: jax.ShapeDtypeStruct(e.shape, found[n].dtype if n in found else e.dtype)
                   for n, e in expected.items()}
    bad = describe_mismatch(shapes_only, found, limit=4)
    if bad:
        raise UserError(f"the {prefix} weights of {source} (step {step}) do not fit {TASK_NAMES[task][2:]} of its "
                        "config: " + "; ".join(line.strip() for line in bad.splitlines())
                        + ". Pass a run of this architecture (its config's model / vae sections).")
    return found, prefix, {n: tuple(e.shape) for n, e in expected.items()}


def _load_run(request: InitRequest, targets: dict[str, jax.ShapeDtypeStruct], *, host: bool) -> dict[str, Any]:
    """A Gen / SR run's newest readable step: onto the targets' shardings, or (``host``) as NumPy arrays."""

    def read(step_dir: epath.Path, step: int) -> dict[str, Any]:
        found, prefix, shapes = _run_source(request, step_dir, step)
        if set(shapes) != set(targets):
            raise AssertionError(f"the run's model names {sorted(set(shapes) ^ set(targets))[:4]} differ")
        padded = {n for n, t in targets.items() if shapes[n] != tuple(t.shape)}
        whole = {n for n in targets if host or n in padded}
        out: dict[str, Any] = {}
        if len(whole) < len(targets):  # straight into the target shards
            want = {f"{prefix}.{n}": jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
                    for n, t in targets.items() if n not in whole}
            restored = restore_arrays(step_dir, step, want, what=f"{prefix} weights")
            out.update({n[len(prefix) + 1:]: v for n, v in restored.items()})
        if whole:  # on the host (SR's zero-padded patch kernel; everything for the in-trace fallback)
            want = {f"{prefix}.{n}": jax.ShapeDtypeStruct(found[n].shape, found[n].dtype) for n in whole}
            restored = restore_arrays(step_dir, step, want, what=f"{prefix} weights")
            arrays = {n[len(prefix) + 1:]: np.asarray(v, np.float32) for n, v in restored.items()}
            if host:
                out.update({n: np.asarray(padded_read(lambda i, n=n: arrays[n][i], shapes[n], _whole(targets[n]),
                                                      targets[n].shape), targets[n].dtype) for n in whole})
            else:
                out.update(_place(lambda n, i: arrays[n][i], shapes, {n: targets[n] for n in whole}))
        return out

    loaded, info = newest_step(request.source, f"config.init_from={request.source}", read)
    log.info("init_from: step %d of the run %s", info.step, request.source)
    return loaded


# ------------------------------------------------------------------------------------------------
# Entry points


def load_into_shards(request: InitRequest, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The model parameters ``request`` names, each created in ``targets[name].sharding``, read per shard.

    ``targets``: flat parameter name (``dit.blocks.ffn.proj_in.kernel``) -> ShapeDtypeStruct with a
    sharding. Every host reads only the slices its addressable devices hold.
    """
    if is_trainer_run(request.source):
        return _load_run(request, targets, host=False)
    weights, pad = _file_weights(request)
    _check_names(weights.shapes, targets, pad, request.source)
    return _place(weights.read, weights.shapes, targets)


def host_reader(request: InitRequest, targets: dict[str, jax.ShapeDtypeStruct]) -> Callable[[str], np.ndarray]:
    """``name -> the whole parameter`` as a NumPy array, resolved on first use (for run-time host callbacks)."""
    cache: dict[str, Any] = {}

    def whole(name: str) -> np.ndarray:
        if "arrays" not in cache:
            if is_trainer_run(request.source):
                cache["arrays"] = _load_run(request, targets, host=True)
            else:
                weights, pad = _file_weights(request)
                _check_names(weights.shapes, targets, pad, request.source)
                cache["arrays"] = {n: np.asarray(padded_read(lambda i, n=n: weights.read(n, i), weights.shapes[n],
                                                             _whole(t), t.shape), t.dtype)
                                   for n, t in targets.items()}
        return cache["arrays"][name]

    return whole


def _check_names(shapes: dict[str, tuple[int, ...]], targets: dict[str, jax.ShapeDtypeStruct], pad: bool,
                 source: str) -> None:
    differ = sorted(set(shapes) ^ set(targets))
    if differ:
        raise AssertionError(f"{source}: the converter's names and the model's differ: {differ[:4]}")
    for name, target in targets.items():
        shape, want = shapes[name], tuple(target.shape)
        if shape != want and not (pad and name.endswith("patch_embedding.kernel")):
            raise AssertionError(f"{source}: {name} is {shape} in the checkpoint, {want} in the model")
