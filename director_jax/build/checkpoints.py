"""What a trainer checkpoint is: its flat array names, which steps count, and what a damaged step is.

The trainer saves its state as flat arrays named by their paths (``flatten_state``:
``params.dit.blocks...``, ``opt_state...``, ``ema...``), so a restore can name the arrays that
differ from a config. A step counts only when Orbax committed it (a directory named by digits that
holds ``commit_success.txt``, locally as on gs://); a committed step whose files do not read, or
whose weights are not finite, is damaged (``DamagedCheckpointError``) and the readers fall back to
the step before it. The trainer (``train/checkpoint.py``) and inference (``build/loading.py``)
share these rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from director_jax.errors import UserError
from director_jax.io_utils import storage_path

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "params")
COMMIT_FILE = "commit_success.txt"  # Orbax's last write into a step (locally before its rename; on gs:// in place)

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
    step: int | None  # the step actually used (older than the newest one when damaged); None: a weight source
    weights: str  # "ema" or "params"; "weights" for a weight source (diffusers directory, weight file)
    skipped: tuple[str, ...] = ()  # newer steps passed over, one line each: "step 20: <why>"


# A step counts when Orbax finished it, on local disk as on gs://: Orbax (0.12) writes a step under
# ``<step>.orbax-checkpoint-tmp`` locally (renamed to ``<step>`` at the end) or in place on cloud storage,
# and in both cases writes ``commit_success.txt`` into the step as its last act before the rename. So:
# a directory named by digits alone that holds commit_success.txt. Nothing else is trusted; whether
# its files restore is checked when they are read (``DamagedCheckpointError``).
TMP_STEP = re.compile(r"(\d+)\.orbax-checkpoint-tmp(-\d+)?")
STATE_ITEM = "state"
_STEP_MARKERS = (STATE_ITEM, COMMIT_FILE, "_CHECKPOINT_METADATA")


class DamagedCheckpointError(UserError):
    """A committed checkpoint step that cannot be used: unreadable or missing files, or non-finite weights."""

    def __init__(self, directory: Any, step: int, reason: str):
        self.directory, self.step, self.reason = str(directory), step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


_DAMAGED_DIRS: set[str] = set()


class _DamagedReadEcho(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" echoes of a read already reported as damage."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (str(exc) if exc is not None else "")
        return not any(d in text for d in _DAMAGED_DIRS)


def _unraisable_without_closed_loops(hook):
    def quiet(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return  # TensorStore finishing a read for an Orbax restore that already failed and closed its loop
        if exc is not None and _DAMAGED_DIRS and any(d in str(exc) for d in _DAMAGED_DIRS):
            return  # the other reads of a damaged step, dropped unawaited: already reported in one line
        hook(unraisable)

    quiet.director_quiet = True
    return quiet


def quiet_orbax_reads() -> None:
    """Keeps the aftermath of a failed Orbax read off stderr: the damage is reported in one line instead.

    Orbax stops at the first unreadable array; TensorStore's other reads finish later into the closed
    event loop and print a traceback each ("Event loop is closed"), which say nothing more. Called
    before each read of a step (the callbacks may fire before the error reaches the caller).
    """
    if not getattr(sys.unraisablehook, "director_quiet", False):
        sys.unraisablehook = _unraisable_without_closed_loops(sys.unraisablehook)


def quiet_failed_restore(step_dir: Any) -> None:
    """After a failed read of ``step_dir``: asyncio's "Task exception was never retrieved" echoes of it are dropped."""
    _DAMAGED_DIRS.add(str(step_dir).rstrip("/") + "/")
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DamagedReadEcho) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DamagedReadEcho())


def is_committed_step(step_dir: epath.Path) -> bool:
    """The one rule for a complete step (build and the trainer's ``Checkpointer`` both use it)."""
    return step_dir.name.isdigit() and (step_dir / COMMIT_FILE).exists() and step_dir.is_dir()


def scan_steps(root: epath.Path) -> tuple[list[int], dict[int, str]]:
    """The committed steps under a ``checkpoints`` directory (ascending), and the others -> why they do not count."""
    committed, other = [], {}
    for d in root.iterdir() if root.is_dir() else ():
        tmp = TMP_STEP.fullmatch(d.name)
        if tmp:
            other.setdefault(int(tmp.group(1)), f"still named {d.name}: its save never finished")
        elif d.name.isdigit():
            if is_committed_step(d):
                committed.append(int(d.name))
            elif d.is_dir():
                other[int(d.name)] = f"no {COMMIT_FILE}: its save never finished (or the step was copied in part)"
    return sorted(committed), {s: why for s, why in other.items() if s not in committed}


def short_reason(error: BaseException, limit: int = 300) -> str:
    """The innermost cause of an Orbax / TensorStore error as one line (their outer messages print whole specs)."""
    inner = error
    for _ in range(32):  # chains are short; a cycle must not hang the report
        if (inner.__cause__ or inner.__context__) is None:
            break
        inner = inner.__cause__ or inner.__context__
    text = " ".join(str(inner).split()) or " ".join(str(error).split())
    if type(inner).__name__ not in ("Exception", "ValueError", "RuntimeError", "OSError"):
        text = f"{type(inner).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_nonfinite(arrays: dict[str, Any]) -> str | None:
    """The first name (sorted) whose floating-point array holds a NaN or an infinity, else None."""
    names = sorted(n for n, a in arrays.items() if jnp.issubdtype(a.dtype, jnp.inexact))
    if not names:
        return None
    finite = jax.device_get(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([arrays[n] for n in names]))
    return next((n for n, ok in zip(names, finite, strict=True) if not bool(ok)), None)


def _step_dir_given(p: epath.Path) -> bool:
    return (p.name.isdigit() or TMP_STEP.fullmatch(p.name) is not None) and any(
        (p / m).exists() for m in _STEP_MARKERS)


def candidate_steps(path: str | Path, step: int | None) -> tuple[list[tuple[epath.Path, int]], bool, dict[int, str]]:
    """Step directories to try, newest first; whether the user named one step (no fallback); uncommitted steps."""
    p = storage_path(path)  # Orbax reads relative paths as nothing
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist: pass the trainer's --workdir (or its "
                                "checkpoints/ directory).")
    if _step_dir_given(p):
        if not is_committed_step(p):
            raise FileNotFoundError(f"{p} has no {COMMIT_FILE}: the step was still being written when its run "
                                    "stopped; pass the run's workdir to take its newest complete step.")
        if step is not None and int(p.name) != step:
            raise ValueError(f"{p} is step {p.name}, but step {step} was asked for.")
        return [(p, int(p.name))], True, {}
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps, uncommitted = scan_steps(root)
    if step is not None:
        if step not in steps:
            why = f": {uncommitted[step]}" if step in uncommitted else ""
            raise FileNotFoundError(f"step {step} is not among the complete checkpoints in {root} (found {steps})"
                                    f"{why}.")
        return [(root / str(step), step)], True, uncommitted
    if not steps:
        found = "".join(f"; step {s}: {why}" for s, why in sorted(uncommitted.items()))
        raise FileNotFoundError(f"no complete checkpoint step under {root}{found}: train first (python -m "
                                "director_jax.train --config ... --workdir DIR) and pass that DIR.")
    return [(root / str(s), s) for s in reversed(steps)], False, uncommitted


def step_directory(path: str | Path, step: int | None = None) -> tuple[epath.Path, int]:
    """The directory of one committed step: ``path`` may be a run's workdir, its ``checkpoints`` dir or a step dir.

    The newest committed step (or ``step``); its files are only read, and checked, when a model loads
    (``load_director_gen`` falls back to an older step when they are damaged).
    """
    candidates, _, _ = candidate_steps(path, step)
    return candidates[0]


# ------------------------------------------------------------------------------------------------
# The config a step was trained with


CHECKED_SECTIONS = ("model", "vae")  # what a checkpoint's weights and latents depend on


def saved_config(step_dir: Any) -> dict | None:
    """The config the trainer recorded in a step's ``meta`` item, or ``None`` when it has none (or it does not read)."""
    path = epath.Path(str(step_dir)) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
        config = meta.get("config")
        return json.loads(config) if isinstance(config, str) else config
    except (OSError, ValueError, AttributeError):
        return None


def _same(saved: Any, given: Any, key: str) -> bool:
    if key == "init_from" and saved and given:  # one checkpoint named two ways (relative / absolute) is the same
        return os.path.realpath(str(saved)) == os.path.realpath(str(given)) or str(saved) == str(given)
    as_json = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731  (tuples and lists alike)
    return as_json(saved) == as_json(given)


def config_disagreements(saved: dict, cfg: Any, sections: tuple[str, ...] = CHECKED_SECTIONS) -> list[str]:
    """``section.key: checkpoint X, config Y`` for every field of ``sections`` where ``cfg`` differs from ``saved``."""
    out = []
    for section in sections:
        old, new = saved.get(section), cfg.get(section)
        if not isinstance(old, dict) or new is None:
            continue
        new = new.to_dict() if hasattr(new, "to_dict") else dict(new)
        for key in sorted(set(old) | set(new)):
            if key in old and key in new and not _same(old[key], new[key], key):
                out.append(f"{section}.{key}: checkpoint {old[key]!r}, config {new[key]!r}")
    return out


def check_config_matches(cfg: Any, step_dir: Any, *, what: str, override: str) -> None:
    """A ``UserError`` when ``cfg`` describes another model or VAE than the one the step was trained with.

    Weights of another shape are caught when they load; this catches what shapes cannot show: another
    VAE (other latents, other statistics) behind a model of the same shape. ``override`` names the
    flag that accepts the difference on purpose.
    """
    saved = saved_config(step_dir)
    if saved is None:
        return
    differ = config_disagreements(saved, cfg)
    if differ:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise UserError(f"{what} differs from the config {step_dir} was trained with: " + "; ".join(differ[:3]) + more
                        + f". Pass the run's own config (its workdir's config.json holds it), or {override} to "
                        "use it anyway.")
