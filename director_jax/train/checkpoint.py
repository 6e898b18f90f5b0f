"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata per step.

* Saves are asynchronous (``checkpoint.async_save``); Orbax writes each step into a temporary
  directory (``<step>.orbax-checkpoint-tmp``; in place on ``gs://``) and writes ``commit_success.txt``
  into it last, so a kill -9 in the middle of a save leaves only complete steps visible.
  ``latest_step`` is the newest committed one by the rule inference uses too
  (``build.is_committed_step``).
* A committed step that does not restore (truncated or garbage array files, a missing item,
  unreadable metadata, NaN / inf in the state) is a ``DamagedCheckpointError``; ``restore_latest``
  warns and resumes from the previous complete step, and moves the damaged (and uncommitted) newer
  steps aside to ``<step>.damaged`` so the run can save those steps again.
* Retention: the last ``keep_last`` steps, plus every step divisible by ``keep_every`` (0 = none).
* The state is stored as a flat dict of arrays named by their paths (``params.dit.blocks...``), so
  a restore can name exactly which arrays differ from the run's config. A VAE step written before
  the task kept latent statistics (``latent_stats.*``) resumes with them empty.
* Restoring takes target shardings: a checkpoint saved on one mesh restores onto any other mesh
  (other device count or other axis sizes) shard by shard.
* The data iterator's state (JSON) is written per process, as Grain's own handler does, so
  every host of a pod resumes its own data shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from director_jax.build import (
    LATENT_STATS,
    DamagedCheckpointError,
    describe_mismatch,
    first_nonfinite,
    flatten_state,
    is_committed_step,
    quiet_failed_restore,
    quiet_orbax_reads,
    scan_steps,
    short_reason,
    unflatten_state,
)
from director_jax.errors import UserError
from director_jax.io_utils import is_remote, storage_path
from director_jax.train.state import TrainState

log = logging.getLogger(__name__)


# State added to the train state after runs began: a step written before it restores with it fresh (zeros).
LATE_ADDED = (f"{LATENT_STATS}.",)


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's arrays do not match the run's config (shapes, dtypes or names)."""


# ------------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process, captured at the moment of the save call.


class IteratorStateHandler(ocp.CheckpointHandler):
    """Writes ``process_{i}-of-{n}.json`` with the iterator state given (a JSON-able dict)."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file()).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> Any:
        path = directory / _process_file()
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise IncompatibleCheckpointError(
                f"{path} does not exist (found {found}): the checkpoint was written by a run with another number "
                "of processes; data order cannot resume exactly. Restore parameters only (restore_state) instead.")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> Any:
        return None


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------------------------


class Checkpointer:
    """The run's ``CheckpointManager`` under ``workdir/checkpoints``."""

    def __init__(self, directory: str | os.PathLike, options: ml_collections.ConfigDict):
        # Orbax refuses relative paths: a local --workdir like runs/x is made absolute (gs:// stays as it is)
        self.directory = storage_path(directory)
        keep_every = int(options.keep_every) or None
        manager_options = ocp.CheckpointManagerOptions(
            max_to_keep=int(options.keep_last), keep_period=keep_every,
            enable_async_checkpointing=bool(options.async_save), create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": IteratorStateHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=manager_options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (Orbax's own list also counts a local step without its commit file)."""
        return scan_steps(self.directory)[0]

    def save(self, step: int, state: TrainState, data_state: Any, meta: dict, *, wait: bool = False) -> None:
        """Starts saving (async unless configured otherwise); ``wait`` blocks until it is on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(flatten_state(state)),
                                  data=IteratorStateSave(data_state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def check_compatible(self, step: int, target: dict[str, Any]) -> list[str]:
        """Raises ``IncompatibleCheckpointError`` naming the arrays whose shape or dtype differ.

        Returns the names of ``target`` the step lacks and that may start fresh (``LATE_ADDED``: state
        added after the step was written, such as a VAE run's latent statistics).
        """
        quiet_orbax_reads()
        try:
            found = self.manager.item_metadata(step)["state"]
            found = {name: found[name] for name in found}
        except Exception as e:  # noqa: BLE001 -- a damaged _METADATA surfaces as many types
            quiet_failed_restore(self.directory / str(step))
            raise DamagedCheckpointError(self.directory / str(step), step, "its array metadata (state/_METADATA) is "
                                         f"missing or unreadable ({short_reason(e)})") from e
        fresh = [n for n in target if n not in found and n.startswith(LATE_ADDED)]
        bad = describe_mismatch({n: v for n, v in target.items() if n not in fresh}, found)
        if bad:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this run's config:\n{bad}\n"
                "Use the config the checkpoint was trained with, or start a new --workdir.")
        return fresh

    def restore(self, step: int, target: TrainState, *, data: bool = True) -> tuple[TrainState, Any, dict]:
        """The train state at ``step`` placed on ``target``'s shardings, plus the data state and metadata.

        ``DamagedCheckpointError`` when the step is not committed or does not restore (files, items, NaN / inf).
        """
        step_dir = self.directory / str(step)
        if not is_committed_step(step_dir):
            raise DamagedCheckpointError(step_dir, step, "it is not a committed step (no commit_success.txt)")
        items = ("state", "meta") + (("data",) if data else ())
        missing = [item for item in items if not (step_dir / item).is_dir()]
        if missing:
            raise DamagedCheckpointError(step_dir, step, f"it has no {', '.join(m + '/' for m in missing)} item")
        flat_target = flatten_state(target)
        fresh = self.check_compatible(step, flat_target)
        saved_target = {n: v for n, v in flat_target.items() if n not in fresh}
        args = {"state": ocp.args.StandardRestore(saved_target), "meta": ocp.args.JsonRestore()}
        if data:
            args["data"] = IteratorStateRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- truncated / garbage files surface as TensorStore / JSON errors
            quiet_failed_restore(step_dir)
            raise DamagedCheckpointError(step_dir, step, f"it does not restore ({short_reason(e)})") from e
        nonfinite = first_nonfinite(dict(restored["state"]))
        if nonfinite is not None:
            raise DamagedCheckpointError(step_dir, step, f"{nonfinite} holds NaN or infinite values")
        arrays = dict(restored["state"])
        if fresh:
            log.warning("checkpoint step %d in %s predates %s: they start empty from this step on.", step,
                        self.directory, ", ".join(fresh))
            for n in fresh:
                t = flat_target[n]
                arrays[n] = jax.make_array_from_callback(t.shape, t.sharding,
                                                         lambda i, t=t: np.zeros(t.shape, t.dtype)[i])
        state = unflatten_state(target, arrays)
        return state, restored["data"] if data else None, restored["meta"]

    def restore_latest(self, target: TrainState, *, data: bool = True) -> tuple[int, TrainState, Any, dict] | None:
        """``(step, state, data state, metadata)`` of the newest committed step that restores; None when none exists.

        Each damaged step is one warning line and the previous complete step is tried; when every
        committed step is damaged, ``ValueError`` (never a fresh start over a run's
        checkpoints). The damaged and uncommitted steps newer than the one used are moved aside
        (``<step>.damaged``) so this run can save those steps again.
        """
        steps, uncommitted = scan_steps(self.directory)
        damaged: list[int] = []
        reasons: list[str] = []
        for step in reversed(steps):
            try:
                state, data_state, meta = self.restore(step, target, data=data)
            except DamagedCheckpointError as e:
                log.warning("checkpoint step %d in %s cannot be restored: %s; trying the previous complete step.",
                            step, self.directory, e.reason)
                damaged.append(step)
                reasons.append(f"step {step}: {e.reason}")
                continue
            self._set_aside(sorted(damaged + [s for s in self._colliding(uncommitted) if s > step]))
            return step, state, data_state, meta
        if steps:
            raise UserError(f"no checkpoint step in {self.directory} restores (" + "; ".join(reasons) + "). Move "
                             "that directory away (or pass another --workdir) to start a new run.")
        self._set_aside(sorted(self._colliding(uncommitted)))
        return None

    def _colliding(self, uncommitted: dict[int, str]) -> list[int]:
        """Uncommitted steps Orbax would refuse to save again: locally it counts any digit-named directory as a
        step (gs:// it does not, and it writes over such a step in place)."""
        return [] if is_remote(self.directory) else list(uncommitted)

    def _set_aside(self, steps: list[int]) -> None:
        """Renames step directories Orbax would collide with to ``<step>.damaged`` (kept for inspection)."""
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                if not src.is_dir():  # only an Orbax temporary directory: Orbax replaces it on the next save
                    continue
                dst, n = self.directory / f"{step}.damaged", 1
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{step}.damaged{n}"
                src.rename(dst)
                moved.append(dst.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("director_jax checkpoint set aside")
        if moved:
            log.warning("moved the unusable newer steps of %s aside (%s); this run will write those steps anew.",
                        self.directory, ", ".join(moved))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
