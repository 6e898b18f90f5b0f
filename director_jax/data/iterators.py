"""What the Grain loaders (curated and synthetic) share: host rows, seeds, checks and the iterator.

Both give the trainer one contract: each host gets its own contiguous rows of every global batch
(stacked in process order they are the single-process global batch), the iterator state is plain
JSON (``make_iterator``), and everything is deterministic in the seeds, whatever the worker count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import grain
import numpy as np
from absl import flags

_Config = TypeVar("_Config")


def config_from(cls: type[_Config], config: Mapping[str, Any] | Any, **overrides: Any) -> _Config:
    """A loader config dataclass from the fields present in an ml_collections ConfigDict (or a dict).

    Keys that are not fields (e.g. the demo's ``train_movies``, ``worker_count``) are ignored, so one
    ``data`` block can serve several consumers; ``overrides`` set fields under other names.
    """
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in items.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def check_host_batch(*, global_batch_size: int, process_index: int, process_count: int, shuffle_seed: int,
                     num_epochs: int | None) -> int:
    """Validates a loader's sharding arguments; returns this host's rows per batch."""
    if global_batch_size < 1 or process_count < 1:
        raise ValueError(f"global_batch_size ({global_batch_size}) and process_count ({process_count}) must be >= 1.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}; each host needs an equal whole share.")
    if shuffle_seed < 0:
        raise ValueError(f"shuffle_seed must be >= 0, got {shuffle_seed}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    return global_batch_size // process_count


class HostRowsMapDataset(grain.MapDataset):
    """Host ``p``'s rows of each global batch: local item ``j`` is global item ``s*B + p*b + r``.

    Grain's own ``ds[p::P]`` interleaves rows across hosts; this keeps each host's share of a
    global batch contiguous, so stacking the host batches in process order gives the global batch.
    Incomplete trailing global batches are dropped on every host alike.
    """

    def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._b, self._p, self._n = local_batch, process_index, process_count
        self._length = len(parent) // (local_batch * process_count) * local_batch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._b)
        return self._parent[(step * self._n + self._p) * self._b + row]

    def __str__(self) -> str:
        return f"HostRowsMapDataset(b={self._b}, process={self._p}/{self._n})"


def mixed_shuffle_seed(shuffle_seed: int) -> int:
    """A uint32 seed hashed from ``shuffle_seed``.

    Grain shuffles epoch ``e`` with seed ``seed + e``, so raw seeds 0 and 1 would give the same
    orders one epoch apart; hashing makes nearby user seeds unrelated.
    """
    return int(np.random.SeedSequence([int(shuffle_seed), 0x5EED]).generate_state(1, np.uint32)[0])


def make_iterator(dataset: grain.MapDataset | grain.IterDataset, *, worker_count: int = 0, prefetch_buffer: int = 2,
                  read_threads: int = 1) -> grain.DatasetIterator:
    """A checkpointable iterator: ``get_state()`` is a JSON-serialisable dict, ``set_state`` resumes.

    ``worker_count > 0`` renders batches in that many worker processes (``mp_prefetch``; each
    worker takes every ``worker_count``-th batch, the main process interleaves them back in
    order), with ``prefetch_buffer`` batches buffered per worker. Otherwise ``read_threads``
    threads prefetch up to ``prefetch_buffer`` batches in this process. The batch sequence is the
    same either way, but a state can only be restored into an iterator with the same
    ``worker_count`` (the state layout differs). Close an iterator with workers (``it.close()``).
    Workers are started with ``spawn``, so a script that uses them needs an
    ``if __name__ == "__main__":`` guard, and the first batch waits about a second for start-up.
    """
    if worker_count < 0 or prefetch_buffer < 1 or read_threads < 0:
        raise ValueError(f"Need worker_count >= 0, prefetch_buffer >= 1 and read_threads >= 0; got "
                         f"{worker_count}, {prefetch_buffer}, {read_threads}.")
    if isinstance(dataset, grain.MapDataset):
        read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer)
        dataset = dataset.to_iter_dataset(read)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag (grain_enable_multiprocess_worker_profiling) when
            # jax is importable, which raises UnparsedFlagAccessError outside absl.app (pytest,
            # notebooks); google/grain#1355, fixed upstream by falling back to the default.
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch_buffer)
        dataset = dataset.mp_prefetch(options)
    return iter(dataset)
