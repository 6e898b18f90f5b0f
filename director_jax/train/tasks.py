"""What the one trainer trains, chosen by ``config.task``: the VAE, Director-Gen or Director-SR.

The interface is ``task_base.Task``; the tasks live in ``vae_task.py``, ``gen_task.py`` and
``sr_task.py``. This module names them (``TASKS``, ``make_task``) and gives their names one import path.
"""

from __future__ import annotations

import ml_collections

from director_jax.train.gen_task import GenTask
from director_jax.train.sr_task import SRTask, degrade_batch, keyframes_kept
from director_jax.train.task_base import LATENT_SOURCES, BatchField, Task
from director_jax.train.vae_task import VaeTask

__all__ = ["BatchField", "GenTask", "LATENT_SOURCES", "SRTask", "TASKS", "Task", "VaeTask", "degrade_batch",
           "keyframes_kept", "make_task"]

TASKS: dict[str, type[Task]] = {"vae": VaeTask, "gen": GenTask, "sr": SRTask}


def make_task(cfg: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.task``."""
    if cfg.task not in TASKS:
        raise ValueError(f"config.task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}.")
    return TASKS[cfg.task](cfg)
