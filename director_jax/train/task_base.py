"""The task interface of the one trainer: what a task builds, what its batch holds, its loss.

A task says how to build the trainable model (and any frozen one, such as the VAE that encodes
Director-Gen's pixels inside the step), what a global batch looks like (shapes, dtypes, logical
sharding names), the loss of one micro-batch, how many tokens a batch holds (for tokens/s and the
progress bar), where its examples come from and what the host does to each batch before the step
(``data_transform``: Director-SR degrades its clips there, per-example timelines are planned there).
The tasks themselves: ``vae_task.py``, ``gen_task.py``, ``sr_task.py``; ``tasks.py`` names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from director_jax.data.loader import curated_loader_config
from director_jax.data.synthetic_loader import SyntheticClipsConfig
from director_jax.data.task_sampling import TaskSamplingConfig

LATENT_SOURCES = ("encode", "precomputed")


def task_sampling(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``data.tasks``: how examples draw their task and keyframes (``data/task_sampling.py``), as loader fields."""
    tasks = cfg.data.get("tasks")
    fields = {} if tasks is None else tasks.to_dict()
    TaskSamplingConfig(**fields)  # validated here, named by the config's own keys
    return fields


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a global batch: its shape (batch first), dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    logical: tuple[str | None, ...]


def synthetic_clips(cfg: ml_collections.ConfigDict, clip_frames: int, height: int, width: int, **extra):
    s = cfg.data.synthetic
    return SyntheticClipsConfig(num_movies=int(s.num_movies), height=height, width=width, fps=float(s.fps),
                                clip_frames=clip_frames, shot_lengths=tuple(s.shot_lengths),
                                shots_per_movie=int(s.shots_per_movie), hflip=bool(s.hflip), seed=int(cfg.seed),
                                **extra)


class Task:
    """Base: subclasses fill in the model, the batch fields and the loss."""

    name: str = ""
    latent_channels: int | None = None  # the VAE task's: keep running latent statistics (train/latent_stats.py)

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def build_fn(self) -> Callable[[], nnx.Module]:
        """A function making the trainable model with its own RNGs (traceable: used under eval_shape / jit)."""
        raise NotImplementedError

    def frozen_build_fn(self) -> Callable[[], nnx.Module] | None:
        """How to build (randomly initialised) the model the step uses but does not train; None if none."""
        return None

    def frozen_model(self) -> nnx.Module | None:
        """That frozen model with its real weights."""
        build = self.frozen_build_fn()
        return None if build is None else build()

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        raise NotImplementedError

    def loss(self, model: nnx.Module, frozen: nnx.Module | None, batch: dict[str, jax.Array], key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def tokens_per_example(self, bucket: int | None = None) -> int:
        """Tokens of one example (``bucket``: its latent frames, for tasks with per-example timelines)."""
        raise NotImplementedError

    def train_flops_per_example(self, bucket: int | None = None) -> float | None:
        """Analytic training FLOPs of one example (3x forward), or None to use XLA's count."""
        return None

    def describe(self) -> str:
        """One line for logs: what one example is."""
        return f"{self.tokens_per_example()} tokens per example"

    def clips_config(self):
        """The synthetic-clip source settings for this task's examples."""
        raise NotImplementedError

    def curated_config(self):
        """The curated-shard loader's settings (``data.source='curated'``): windows of the config's video size."""
        return curated_loader_config(self.cfg)

    def data_transform(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
        """A picklable function the data pipeline applies to every host batch (numpy in, numpy out); None: none."""
        return None
