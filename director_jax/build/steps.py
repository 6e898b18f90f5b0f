"""Reading arrays out of a trainer checkpoint: which weights (EMA or raw), restored onto a sharding or onto the
host, and the newest committed step that reads, falling back past damaged ones.

Shared by ``loading`` (a trained model for inference) and ``reuse`` (a run reused as a frozen VAE, as
the start of another run, or exported). The fallback rule is ``read_newest``'s: a step whose files do
not read, or whose weights are not finite, is a ``DamagedCheckpointError`` and the step before it is
tried, with one warning line; a step the user named (``step=`` or a step directory) is never replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from director_jax.build.checkpoints import (
    STATE_ITEM,
    WEIGHTS,
    DamagedCheckpointError,
    LoadedCheckpoint,
    candidate_steps,
    first_nonfinite,
    quiet_failed_restore,
    quiet_orbax_reads,
    short_reason,
)
from director_jax.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


def saved_arrays(step_dir: epath.Path, step: int) -> dict[str, Any]:
    """Name -> array metadata of a step's ``state`` item; ``DamagedCheckpointError`` when it cannot be read."""
    state_dir = step_dir / STATE_ITEM
    if not state_dir.is_dir():
        raise DamagedCheckpointError(step_dir, step, f"it has no {STATE_ITEM}/ item")
    quiet_orbax_reads()
    try:  # the handler raises the cause; PyTreeCheckpointer().metadata() would log it and return None
        metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise ValueError("Orbax found no array metadata")
        return dict(tree)
    except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore / JSON raise many types for one damaged file
        quiet_failed_restore(step_dir)
        raise DamagedCheckpointError(step_dir, step, f"its array metadata does not read ({short_reason(e)})"
                                     ) from e


def weights_prefix(saved: dict[str, Any], weights: str, step_dir: Any, *, ask_raw: str = "weights='params'") -> str:
    """``"ema"`` or ``"params"``: which of a step's weights ``weights`` (auto / ema / params) means.

    ``auto`` is the EMA when the run kept one. Asking for an EMA the run did not keep is a one-line
    ``UserError`` whose fix is ``ask_raw`` (how the caller's user asks for the raw weights).
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r}; choose one of {WEIGHTS}.")
    has_ema = any(name.startswith("ema.") for name in saved)
    prefix = ("ema" if has_ema else "params") if weights == "auto" else weights
    if prefix == "ema" and not has_ema:
        raise UserError(f"{step_dir} holds no EMA weights (the run had optim.ema_decay = 0): use {ask_raw}.")
    return prefix


def _first_nonfinite_host(arrays: dict[str, np.ndarray]) -> str | None:
    return next((n for n in sorted(arrays) if np.issubdtype(arrays[n].dtype, np.inexact)
                 and not np.isfinite(arrays[n]).all()), None)


def restore_arrays(step_dir: epath.Path, step: int, target: dict[str, jax.ShapeDtypeStruct], *, what: str
                   ) -> dict[str, Any]:
    """The named arrays of a step: onto their ``sharding`` (jax.Arrays), or as NumPy arrays where it is None.

    Host arrays read inside a trace too (a model built under ``jax.jit``: the trainer's init). Files
    that do not read, or NaN / infinite values, are a ``DamagedCheckpointError`` (``what`` names the
    arrays in its reason).
    """
    host = all(getattr(t, "sharding", None) is None for t in target.values())
    if host:
        item = {n: np.zeros((), t.dtype) for n, t in target.items()}  # structure only; shapes come from the file
        restore_args = {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in target}
    else:
        item, restore_args = target, ocp.checkpoint_utils.construct_restore_args(target)
    quiet_orbax_reads()
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                                               restore_args=restore_args))
    except Exception as e:  # noqa: BLE001 -- truncated / garbage array files surface as TensorStore errors of any type
        quiet_failed_restore(step_dir)
        raise DamagedCheckpointError(step_dir, step, f"its {what} do not read ({short_reason(e)})") from e
    restored = dict(restored)
    nonfinite = _first_nonfinite_host(restored) if host else first_nonfinite(restored)
    if nonfinite is not None:
        raise DamagedCheckpointError(step_dir, step, f"{nonfinite} holds NaN or infinite values")
    return restored


def read_newest(path: str | Path, step: int | None, read: Callable[[epath.Path, int], T]) -> tuple[T, LoadedCheckpoint]:
    """``read(step_dir, step)`` of the newest committed step it succeeds on; older steps, with a warning, after
    a ``DamagedCheckpointError``. Any other error (a wrong config, another task) is raised as it is.

    The ``LoadedCheckpoint``'s ``weights`` is left empty for the caller to fill in.
    """
    candidates, explicit, uncommitted = candidate_steps(path, step)
    newest = candidates[0][1]
    skipped = [f"step {s}: {why}" for s, why in sorted(uncommitted.items(), reverse=True) if s > newest]
    for s in skipped:
        log.warning("checkpoint %s; not used.", s)
    for step_dir, s in candidates:
        try:
            result = read(step_dir, s)
        except DamagedCheckpointError as e:
            if explicit:
                raise UserError(f"{e}. The step was asked for explicitly, so no other step is used: pass another "
                                "step, or the run's workdir to take its newest step that restores.") from e
            log.warning("checkpoint step %d in %s cannot be used: %s; trying the previous complete step.",
                        s, step_dir.parent, e.reason)
            skipped.append(f"step {s}: {e.reason}")
            continue
        if s != newest:
            log.warning("using checkpoint step %d of %s (newer steps are damaged).", s, step_dir.parent)
        return result, LoadedCheckpoint(str(step_dir), s, "", tuple(skipped))
    raise FileNotFoundError(f"no checkpoint step in {candidates[0][0].parent} restores: " + "; ".join(skipped)
                            + ". Train again, or pass a run whose checkpoints are intact.")
