"""The curated-clip shards: a TFDS ArrayRecord dataset, its layout and how to read it.

``python -m director_jax.shards --curated OUT`` (``director_jax.curation.shards``) builds it from a
curated directory into ``OUT/tfds/`` (or ``--data_dir``): a TFDS dataset ``curated_clips`` in
ArrayRecord files (random access; no TensorFlow needed). Read it with
``tfds.builder_from_directory(version_dir(OUT/tfds)).as_data_source(split)`` or through
``director_jax.data.loader``. Each example holds:

- ``clip``: the sample's mp4 file (bytes, H.264 as curation wrote it; decoded by the loader);
- ``id``, ``source``, ``caption``, ``kind`` (text); ``start_frame``, ``end_frame``, ``num_frames``,
  ``width``, ``height`` (int64); ``fps`` (float64, exact);
- ``cuts``: shot starts inside the sample, **sample-relative** (the manifest's source frames minus
  ``start_frame``), int32, variable length;
- ``keyframes_shot_starts``, ``keyframes_even``, ``keyframes_motion_peaks``: the manifest's keyframe
  candidates (sample-relative), int32, variable length;
- with a text-embedding cache: ``text_embedding`` ``(L, D)`` in the cache's dtype (float32 or
  bfloat16, stored bit-exact) and ``text_length`` (= L). The empty caption's embedding (for caption
  dropout) is stored beside the shards as ``empty_caption_embedding.npy`` (float32) when the cache
  holds it; the dataset's metadata ``text`` says which encoder made them (fingerprint, dtype,
  max_length, dim, empty_caption);
- with a text-embedding cache, the embeddings of the caption's *proper shot ranges* (the captions of
  a window that shows only some of the shots: ``director_jax.data.captions.shot_range_captions``), in
  the canonical order of ``captions.shot_ranges(len(cuts) + 1, proper=True)``, laid end to end:
  ``range_text_embedding`` ``(sum L_r, D)`` and ``range_text_lengths`` ``(R,)`` int32 (``L_r`` each).
  A single-shot sample has none (``(0, D)`` and ``(0,)``). Every caption's shot count is
  ``len(cuts) + 1``: the build refuses a sample whose caption disagrees.

``FORMAT`` is the layout's version, recorded in the dataset's metadata; ``Shards`` refuses another
one with the command that rebuilds it (a plain rerun: the format is part of the build digest).

Splits: ``train`` and ``validation`` (a split with no samples is not written). Records keep manifest
order within a split (the loader shuffles). Beside the shards, ``index-<split>.npz`` lists per record
its id, width, height, num_frames and fps, so a loader can plan batches (aspect buckets, clip
lengths) without reading the clips. ``DATA_DIR/build.json`` records what the build was made from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.data.captions import shot_ranges
from director_jax.data.text_embeddings import np_dtype

NAME = "curated_clips"
VERSION = "1.0.0"
FORMAT = 2  # bump when the features or the build digest change (2: the shot ranges' embeddings)
BUILD_FILE = "build.json"
EMPTY_CAPTION_FILE = "empty_caption_embedding.npy"
SPLITS = ("train", "validation")
KEYFRAME_KINDS = ("shot_starts", "even", "motion_peaks")
CLI = "python -m director_jax.shards"
DESCRIPTION = "The TFDS ArrayRecord dataset of a curated directory: what the training loader reads."


def index_file(split: str) -> str:
    return f"index-{split}.npz"


def version_dir(data_dir: str | os.PathLike) -> Path:
    """Where the shards of a build into ``data_dir`` live (what ``tfds.builder_from_directory`` takes)."""
    return Path(data_dir) / NAME / VERSION


def dataset_dir(path: str | os.PathLike) -> Path:
    """The TFDS dataset version directory for a curated dir, its ``tfds/`` data dir, or that directory itself."""
    p = Path(path)
    for candidate in (p, version_dir(p), version_dir(p / "tfds")):
        if (candidate / "dataset_info.json").is_file():
            return candidate
    raise FileNotFoundError(f"no curated TFDS dataset at {p} (looked for dataset_info.json in it, in "
                            f"{version_dir(p)} and in {version_dir(p / 'tfds')}); build it with "
                            f"`{CLI} --curated CURATED_DIR`.")


def read_build_info(data_dir: str | os.PathLike) -> dict | None:
    """``DATA_DIR/build.json`` (the build's digest, splits, text metadata), None when there is none."""
    path = Path(data_dir) / BUILD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def features(text_dim: int | None = None, text_dtype: str = "float32"):
    """The examples' TFDS ``FeaturesDict`` (``text_dim`` None: no text embeddings)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    ints = {k: f.Tensor(shape=(), dtype=np.int64)
            for k in ("start_frame", "end_frame", "num_frames", "width", "height")}
    seqs = {k: f.Tensor(shape=(None,), dtype=np.int32) for k in ("cuts", *(f"keyframes_{k}" for k in KEYFRAME_KINDS))}
    spec: dict[str, Any] = {
        "clip": f.Tensor(shape=(), dtype=np.object_),
        **{k: f.Text() for k in ("id", "source", "caption", "kind")},
        **ints,
        "fps": f.Tensor(shape=(), dtype=np.float64, encoding=f.Encoding.BYTES),  # tf.Example floats are f32
        **seqs,
    }
    if text_dim is not None:
        spec["text_embedding"] = f.Tensor(shape=(None, text_dim), dtype=np_dtype(text_dtype),
                                          encoding=f.Encoding.BYTES)
        spec["text_length"] = f.Tensor(shape=(), dtype=np.int32)
        spec["range_text_embedding"] = f.Tensor(shape=(None, text_dim), dtype=np_dtype(text_dtype),
                                                encoding=f.Encoding.BYTES)
        spec["range_text_lengths"] = f.Tensor(shape=(None,), dtype=np.int32)
    return f.FeaturesDict(spec)


def range_embedding(rec: Mapping[str, Any], first: int, last: int, num_shots: int) -> np.ndarray:
    """A record's embedding of the caption of shots ``first..last`` (0-based, inclusive) of its ``num_shots``:
    ``text_embedding`` for all of them, else that range's slice of ``range_text_embedding`` (module doc)."""
    if (first, last) == (0, num_shots - 1):
        return np.asarray(rec["text_embedding"])
    ranges = shot_ranges(num_shots, proper=True)
    lengths = np.asarray(rec["range_text_lengths"], np.int64)
    if len(lengths) != len(ranges):
        raise ValueError(f"a record of {num_shots} shots holds {len(lengths)} shot-range embeddings, not "
                         f"{len(ranges)}: the shards are damaged; rebuild them.")
    k = ranges.index((first, last))
    start = int(lengths[:k].sum())
    return np.asarray(rec["range_text_embedding"])[start:start + int(lengths[k])]


class Shards:
    """One split of a built dataset: its TFDS info, the index (no clip read) and the text metadata.

    ``path`` is a curated dir, its ``tfds/`` or the version dir (``dataset_dir``). Records are read
    through ``record(i)``, which opens the ArrayRecord data source lazily, once per process (so a
    ``Shards`` pickles to Grain workers without an open file).
    """

    def __init__(self, path: str | os.PathLike, split: str):
        import tensorflow_datasets as tfds

        self.path, self.split = dataset_dir(path), split
        info = tfds.builder_from_directory(str(self.path)).info
        built = (info.metadata or {}).get("format")
        if built != FORMAT:
            raise ValueError(f"{self.path} holds shards of format {built}, this loader reads format {FORMAT} (window "
                             f"captions and their embeddings); rebuild them: `{CLI} --curated CURATED_DIR` (with the "
                             "same --text_cache, filled by `python -m director_jax.embed_text --captions "
                             "CURATED_DIR/manifest.jsonl`).")
        if split not in info.splits:
            raise ValueError(f"{self.path} has no split {split!r}; it has {sorted(info.splits)} (an empty split is "
                             "not written: raise --validation_fraction or add samples).")
        index_path = self.path / index_file(split)
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} is missing: {self.path} was not built by {CLI}; rebuild it.")
        with np.load(index_path) as z:
            self.index: dict[str, np.ndarray] = {k: z[k] for k in z.files}
        if len(self.index["id"]) != info.splits[split].num_examples:
            raise ValueError(f"{index_path} lists {len(self.index['id'])} records but the split has "
                             f"{info.splits[split].num_examples}; rebuild with `{CLI} --force`.")
        # the build's text metadata (fingerprint, dtype, max_length, dim, empty_caption), None without text
        self.text: dict | None = dict(info.metadata.get("text") or {}) or None
        self.empty_caption: np.ndarray | None = None  # (L, D) float32
        if self.text is not None and (self.path / EMPTY_CAPTION_FILE).is_file():
            self.empty_caption = np.load(self.path / EMPTY_CAPTION_FILE).astype(np.float32)
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return len(self.index["id"])

    def record(self, i: int) -> dict[str, Any]:
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.builder_from_directory(str(self.path)).as_data_source(self.split)
        return self._source[i]
