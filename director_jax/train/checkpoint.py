"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata per step.

* Saves are asynchronous (``checkpoint.async_save``); Orbax writes each step into a temporary
  directory and renames it when complete, so a kill -9 in the middle of a save leaves only
  complete steps visible, and ``latest_step`` is the newest complete one.
* Retention: the last ``keep_last`` steps, plus every step divisible by ``keep_every`` (0 = none).
* The state is stored as a flat dict of arrays named by their paths (``params.dit.blocks...``), so
  a restore can name exactly which arrays differ from the run's config.
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
import orbax.checkpoint as ocp
from etils import epath

from director_jax.build import describe_mismatch, flatten_state, unflatten_state
from director_jax.io_utils import storage_path
from director_jax.train.state import TrainState

log = logging.getLogger(__name__)


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
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: Any, meta: dict, *, wait: bool = False) -> None:
        """Starts saving (async unless configured otherwise); ``wait`` blocks until it is on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(flatten_state(state)),
                                  data=IteratorStateSave(data_state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def check_compatible(self, step: int, target: dict[str, Any]) -> None:
        """Raises ``IncompatibleCheckpointError`` naming the arrays whose shape or dtype differ."""
        found = self.manager.item_metadata(step)["state"]
        found = {name: found[name] for name in found}
        bad = describe_mismatch(target, found)
        if bad:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this run's config:\n{bad}\n"
                "Use the config the checkpoint was trained with, or start a new --workdir.")

    def restore(self, step: int, target: TrainState, *, data: bool = True) -> tuple[TrainState, Any, dict]:
        """The train state at ``step`` placed on ``target``'s shardings, plus the data state and metadata."""
        flat_target = flatten_state(target)
        self.check_compatible(step, flat_target)
        items = {"state": ocp.args.StandardRestore(flat_target), "meta": ocp.args.JsonRestore()}
        if data:
            items["data"] = IteratorStateRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = unflatten_state(target, restored["state"])
        return state, restored["data"] if data else None, restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
