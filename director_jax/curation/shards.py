"""Building the curated-clip shards (``python -m director_jax.shards``) from a curated directory.

``build_curated_dataset(OUT)`` reads ``OUT/manifest.jsonl`` and ``OUT/clips/*.mp4`` (what
``python -m director_jax.curate --out OUT`` writes) and writes the TFDS ArrayRecord dataset that
``director_jax.data.shards`` describes (features, splits, index files; the loader reads it) into
``OUT/tfds/`` or ``data_dir``. With a text-embedding cache every caption must be cached, and for a
multi-shot sample also the caption of every proper shot range (what a loader window showing only
some of the shots is captioned with; ``captions.shot_range_captions``): ``python -m
director_jax.embed_text --captions OUT/manifest.jsonl`` computes them all. The embeddings are stored in
the examples, the empty caption's beside them.

A sample's caption must describe its shots: ``len(cuts) + 1`` of them (a plain caption is one
shot), with the cuts increasing and inside the sample. A sample that breaks this refuses the whole
build with one line naming it, since its windows could not be captioned; curation never writes one
(it checks every caption's shot count), so such a line was written or edited by hand.

Splits: ``validation`` holds the samples whose id hashes below ``validation_fraction``
(``sha256("validation:" + id)``), ``train`` the rest. A sample's split depends on its id only, so it
never moves when samples are added.

VAE latents are not stored: a training example's multi-chunk latents depend on its clip window, crop
and task (where the keyframes are), which the loader draws per example, so they cannot be fixed at
build time. A latent cache would fix those choices per sample; that is a later issue.

Every clip is decoded before anything is written (``check_clips``, a few threads): a clip that does
not decode, or decodes to another frame count or size than its manifest line records, refuses the
whole build with one line naming it (a dataset never packs a clip the loader would fail on, and
never silently drops a sample); the fix is to delete the clip and rerun curation, which curates its
source again. A manifest line whose clip path leaves the curated directory (absolute, ``..``) or
whose numbers are not finite is refused the same way.

Builds are atomic: the dataset is written to a temporary sibling of ``data_dir`` and swapped in only
when complete, so a failed or interrupted build leaves the last good one in place.
``DATA_DIR/build.json`` records a digest of the inputs (manifest bytes, clip file sizes, the
validation fraction, the text encoder); a build with the same digest is skipped. One build at a time
per ``data_dir`` (a lock file beside it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.data.captions import checked_shots, shot_range_captions
from director_jax.data.shards import (
    BUILD_FILE,
    DESCRIPTION,
    EMPTY_CAPTION_FILE,
    FORMAT,
    KEYFRAME_KINDS,
    SPLITS,
    VERSION,
    features,
    index_file,
    read_build_info,
    version_dir,
)
from director_jax.data.text_embeddings import TextEmbeddingCache, np_dtype
from director_jax.io_utils import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

_RELEASE_NOTE = ("clips (mp4 bytes), caption, cuts, keyframe candidates, optional text embeddings (the caption's "
                 "and its shot ranges')")
_REQUIRED = {"id": str, "source": str, "start_frame": int, "end_frame": int, "fps": (int, float), "cuts": list,
             "kind": str, "caption": str, "clip": str, "width": int, "height": int, "num_frames": int,
             "keyframe_candidates": dict}


def split_of(sample_id: str, validation_fraction: float) -> str:
    """'validation' or 'train' from the id alone (stable as samples come and go)."""
    h = int(hashlib.sha256(f"validation:{sample_id}".encode()).hexdigest()[:16], 16)
    return "validation" if h / 2.0**64 < validation_fraction else "train"


def read_manifest(curated_dir: str | os.PathLike) -> tuple[list[dict], bytes]:
    """The manifest's samples (checked: fields, types, unique ids, clips present) and its raw bytes."""
    curated_dir = Path(curated_dir)
    path = curated_dir / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {curated_dir} is not a curated directory; run "
                                f"`python -m director_jax.curate --out {curated_dir} ...` first.")
    raw = path.read_bytes()
    samples, seen = [], {}
    for n, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            s = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}); the manifest is damaged, rerun curation.") from e
        bad = [k for k, t in _REQUIRED.items() if not isinstance(s.get(k), t) or isinstance(s.get(k), bool)]
        if bad:
            raise ValueError(f"{path}:{n}: missing or mistyped fields {bad} (expected {[_REQUIRED[k] for k in bad]}); "
                             "is this a manifest.jsonl written by `python -m director_jax.curate`?")
        if s["id"] in seen:
            raise ValueError(f"{path}:{n}: sample id {s['id']} repeats line {seen[s['id']]}; ids must be unique "
                             "(a rerun of curation rewrites the manifest without duplicates).")
        seen[s["id"]] = n
        if s["num_frames"] != s["end_frame"] - s["start_frame"] or s["num_frames"] < 1:
            raise ValueError(f"{path}:{n}: num_frames={s['num_frames']} but end_frame - start_frame = "
                             f"{s['end_frame'] - s['start_frame']}.")
        clip = Path(s["clip"])
        if clip.is_absolute() or ".." in clip.parts or not clip.parts:
            raise ValueError(f"{path}:{n}: clip {s['clip']!r} is not a path inside {curated_dir} (absolute or "
                             "with '..'); is this a manifest.jsonl written by `python -m director_jax.curate`?")
        _check_shots(s, f"{path}:{n}")
        if min(s["width"], s["height"]) < 1 or not math.isfinite(s["fps"]) or s["fps"] <= 0:
            raise ValueError(f"{path}:{n}: width, height and fps must be finite and positive; got "
                             f"{s['width']}x{s['height']} at {s['fps']} fps.")
        samples.append(s)
    missing = [s["clip"] for s in samples if not (curated_dir / s["clip"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} clips named in {path} are missing (first: "
                                f"{missing[:3]}); rerun curation into {curated_dir} to restore them.")
    if not samples:
        raise ValueError(f"{path} holds no samples; curation kept nothing (see {curated_dir / 'skipped.jsonl'}).")
    return samples, raw


def _check_shots(s: dict, where: str) -> None:
    """The sample's cuts lie inside it in order, and its caption has one shot per cut + 1 (module doc)."""
    cuts = s["cuts"]
    bounds = [s["start_frame"], *cuts, s["end_frame"]]
    whole = all(isinstance(c, int) and not isinstance(c, bool) for c in cuts)
    if not whole or any(a >= b for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError(f"{where}: sample {s['id']} has cuts {cuts}, which must be increasing whole frames strictly "
                         f"between start_frame {s['start_frame']} and end_frame {s['end_frame']}; rerun curation.")
    try:
        checked_shots(s["caption"], len(cuts) + 1)
    except ValueError as e:
        raise ValueError(f"{where}: sample {s['id']}: {e}. A window's caption is cut from the caption's shots, so "
                         "the caption needs one 'Shot k:' per shot (format_multishot_caption of one caption per "
                         "shot); fix the line or rerun curation for its source.") from None


def cached_captions(samples: list[dict]) -> list[str]:
    """Every caption the text cache must hold for ``samples``: each caption and its proper shot ranges'."""
    return [c for s in samples for c in (s["caption"], *shot_range_captions(s["caption"], proper=True))]


def _clip_problem(path: Path, sample: dict) -> str | None:
    """Why the clip at ``path`` does not hold its sample's frames (decode error, frame count, size), or None."""
    import av

    count, size = 0, None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            for frame in container.decode(video=0):
                count += 1
                size = size or (frame.width, frame.height)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        return f"does not decode after {count} frames ({type(e).__name__}: {' '.join(str(e).split())})"
    if count != sample["num_frames"]:
        return f"decodes to {count} frames, the manifest records {sample['num_frames']}"
    if size != (sample["width"], sample["height"]):
        return f"decodes to {size[0]}x{size[1]}, the manifest records {sample['width']}x{sample['height']}"
    return None


def check_clips(samples: list[dict], curated_dir: Path, workers: int | None = None) -> None:
    """Decodes every clip; a ValueError naming the clips that do not hold their recorded frames (module doc)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PyAV decodes with the GIL released
        problems = list(pool.map(lambda s: _clip_problem(curated_dir / s["clip"], s), samples))
    bad = [(s, p) for s, p in zip(samples, problems, strict=True) if p is not None]
    if bad:
        shown = "; ".join(f"{s['clip']} (sample {s['id']}) {p}" for s, p in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{len(bad)} of {len(samples)} clips in {curated_dir} do not hold their recorded frames, so "
                         f"nothing was built (a previous build is kept): {shown}{more}. Delete them and rerun "
                         f"`python -m director_jax.curate --out {curated_dir}` on the same inputs to curate their "
                         "sources again.")


def _open_text_cache(text_cache, max_length: int):
    if text_cache is None or isinstance(text_cache, TextEmbeddingCache):
        return text_cache
    return TextEmbeddingCache(text_cache, max_length=max_length)


def _digest(samples: list[dict], manifest: bytes, curated_dir: Path, validation_fraction: float, cache) -> str:
    h = hashlib.sha256()
    text = None if cache is None else [cache.fingerprint, cache.info["dtype"], cache.max_length, cache.dim,
                                       "" in cache]
    h.update(json.dumps({"format": FORMAT, "validation_fraction": float(validation_fraction), "text": text,
                         "manifest": hashlib.sha256(manifest).hexdigest()}, sort_keys=True).encode())
    for s in samples:  # cheap: a stat per clip (clip ids hash source and frames, so content rarely changes)
        h.update(f"\n{s['clip']}:{(curated_dir / s['clip']).stat().st_size}".encode())
    return h.hexdigest()


@functools.cache
def _make_builder_class():
    """The builder class, defined once (TFDS registers builders by name; imported only when building)."""
    import tensorflow_datasets as tfds

    class CuratedClips(tfds.core.GeneratorBasedBuilder):
        """Curated clips and their metadata (see director_jax.curation.shards)."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): _RELEASE_NOTE}
        # TFDS looks for a checksums file beside the class's source through importlib_resources, which
        # this environment lacks (an optional etils dependency); this builder downloads nothing.
        code_path = None

        def __init__(self, *, curated_dir: Path, splits: dict[str, list[dict]], cache=None, metadata=None,
                     **kwargs):
            self._curated_dir, self._splits, self._cache = curated_dir, splits, cache
            self._extra_metadata = metadata or {}
            super().__init__(**kwargs)

        def _info(self):
            text_dim, text_dtype = (None, "float32") if self._cache is None else (self._cache.dim,
                                                                                  self._cache.info["dtype"])
            return tfds.core.DatasetInfo(builder=self, description=DESCRIPTION,
                                         features=features(text_dim, text_dtype), disable_shuffling=True,
                                         metadata=tfds.core.MetadataDict(self._extra_metadata))

        # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared to <the
        # temporary build dir>" on stdout; nothing is downloaded and the build is swapped in elsewhere.
        def _log_download_bytes(self) -> None:
            log.debug("building %s", self.data_dir)

        def _log_download_done(self) -> None:
            log.debug("built %s", self.data_dir)

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(samples) for name, samples in self._splits.items() if samples}

        def _generate_examples(self, samples: list[dict]) -> Iterator[tuple[str, dict]]:
            for i, s in enumerate(samples):
                yield f"{i:010d}", _example(s, self._curated_dir, self._cache)

    return CuratedClips


def _example(s: dict, curated_dir: Path, cache) -> dict[str, Any]:
    start = s["start_frame"]
    ex = {
        "clip": (curated_dir / s["clip"]).read_bytes(),
        "id": s["id"], "source": s["source"], "caption": s["caption"], "kind": s["kind"],
        "start_frame": start, "end_frame": s["end_frame"], "num_frames": s["num_frames"],
        "width": s["width"], "height": s["height"], "fps": np.float64(s["fps"]),
        "cuts": np.asarray([c - start for c in s["cuts"]], np.int32),
    }
    candidates = s["keyframe_candidates"]
    for kind in KEYFRAME_KINDS:
        ex[f"keyframes_{kind}"] = np.asarray(candidates.get(kind, []), np.int32)
    if cache is not None:
        emb = cache.read(s["caption"])
        ex["text_embedding"] = np.ascontiguousarray(emb.astype(np_dtype(cache.info["dtype"])))
        ex["text_length"] = np.int32(emb.shape[0])
        ranges = [cache.read(c) for c in shot_range_captions(s["caption"], proper=True)]
        ex["range_text_embedding"] = np.ascontiguousarray(
            np.concatenate(ranges) if ranges else np.zeros((0, cache.dim)), dtype=np_dtype(cache.info["dtype"]))
        ex["range_text_lengths"] = np.asarray([len(r) for r in ranges], np.int32)
    return ex


def _index_arrays(samples: list[dict]) -> dict[str, np.ndarray]:
    return {"id": np.asarray([s["id"] for s in samples], dtype=str),
            "width": np.asarray([s["width"] for s in samples], np.int64),
            "height": np.asarray([s["height"] for s in samples], np.int64),
            "num_frames": np.asarray([s["num_frames"] for s in samples], np.int64),
            "fps": np.asarray([s["fps"] for s in samples], np.float64)}


@contextlib.contextmanager
def _locked(data_dir: Path):
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process is building {data_dir} (it holds {f.name}); wait for it to "
                               "finish.") from None
        yield


def _recover(data_dir: Path) -> None:
    """Finishes or undoes a swap an earlier build was interrupted in, and removes its leftovers."""
    previous = data_dir.parent / f".{data_dir.name}.previous"
    if previous.exists():
        if data_dir.exists():
            shutil.rmtree(previous)
        else:
            log.warning("restoring the previous build of %s (an earlier build stopped while swapping)", data_dir)
            os.rename(previous, data_dir)
    for stale in data_dir.parent.glob(f".{data_dir.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)


def build_curated_dataset(curated_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                          text_cache=None, text_max_length: int = 512, validation_fraction: float = 0.01,
                          force: bool = False, progress: bool = True):
    """Builds (or keeps, if its inputs are unchanged) the dataset of ``curated_dir``; returns its builder.

    ``data_dir`` defaults to ``curated_dir/tfds``. ``text_cache`` is a TextEmbeddingCache or its
    directory (read with ``text_max_length``); every caption and shot-range caption must be in it
    (``cached_captions``; a ``MissingTextEmbeddingsError`` lists the others). The returned builder is
    ``tfds.builder_from_directory`` of the build: ``.as_data_source(split)`` reads it.
    """
    import tensorflow_datasets as tfds

    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if isinstance(text_max_length, bool) or not isinstance(text_max_length, int) or text_max_length < 1:
        raise ValueError(f"text_max_length must be an integer >= 1, got {text_max_length!r}.")
    curated_dir = Path(curated_dir).resolve()
    data_dir = Path(data_dir).resolve() if data_dir is not None else curated_dir / "tfds"
    samples, manifest = read_manifest(curated_dir)
    cache = _open_text_cache(text_cache, text_max_length)
    if cache is not None:
        missing = cache.missing(cached_captions(samples))
        if missing:
            raise cache._missing_error(missing, manifest=curated_dir / "manifest.jsonl")
        if "" not in cache:
            log.warning("the text cache %s has no embedding of the empty caption: dropped captions will get a "
                        "masked-out zero embedding (compute it with `python -m director_jax.embed_text`, "
                        "which adds it unless --noempty_caption).", cache.root)
    with _locked(data_dir):
        _recover(data_dir)
        digest = _digest(samples, manifest, curated_dir, validation_fraction, cache)
        info = read_build_info(data_dir)
        if not force and info is not None and info.get("digest") == digest and version_dir(data_dir).is_dir():
            log.info("%s is up to date with %s (digest %s); not rebuilding", data_dir, curated_dir, digest[:12])
            return tfds.builder_from_directory(str(version_dir(data_dir)))
        check_clips(samples, curated_dir)
        splits = {name: [] for name in SPLITS}
        for s in samples:
            splits[split_of(s["id"], validation_fraction)].append(s)
        if not splits["train"]:
            raise ValueError(f"all {len(samples)} samples fell in the validation split (validation_fraction="
                             f"{validation_fraction}); lower it.")
        metadata = {"format": FORMAT, "digest": digest, "validation_fraction": float(validation_fraction),
                    "curated_dir": str(curated_dir), "splits": {k: len(v) for k, v in splits.items()}}
        if cache is not None:
            metadata["text"] = {"fingerprint": cache.fingerprint, "dtype": cache.info["dtype"],
                                "max_length": cache.max_length, "dim": cache.dim, "empty_caption": "" in cache}
        build = Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=f".{data_dir.name}.building-"))
        try:
            builder = _make_builder_class()(curated_dir=curated_dir, splits=splits, cache=cache, metadata=metadata,
                                            data_dir=str(build), file_format="array_record")
            with _progress_bars(progress):
                builder.download_and_prepare(download_dir=str(build / "downloads"))
            shutil.rmtree(build / "downloads", ignore_errors=True)
            out = version_dir(build)
            for name, split_samples in splits.items():
                if split_samples:
                    arrays = _index_arrays(split_samples)
                    atomic_write(out / index_file(name), lambda tmp, a=arrays: np.savez(tmp, **a))
            if cache is not None and "" in cache:
                empty = cache.read("").astype(np.float32)
                atomic_write(out / EMPTY_CAPTION_FILE, lambda tmp: np.save(tmp, empty))
            atomic_write_text(build / BUILD_FILE, json.dumps(metadata, indent=1, sort_keys=True) + "\n")
            _swap(build, data_dir)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        log.info("built %s from %s: %s", data_dir, curated_dir, metadata["splits"])
        return tfds.builder_from_directory(str(version_dir(data_dir)))


def _swap(build: Path, data_dir: Path) -> None:
    """Puts ``build`` at ``data_dir``; a crash between the renames is undone by ``_recover``."""
    previous = data_dir.parent / f".{data_dir.name}.previous"
    if data_dir.exists():
        os.rename(data_dir, previous)
    os.rename(build, data_dir)
    if previous.exists():
        shutil.rmtree(previous)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import tensorflow_datasets as tfds

    if enabled:
        yield
        return
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        tfds.enable_progress_bar()
