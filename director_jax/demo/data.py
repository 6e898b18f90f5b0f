"""The demo's footage: synthetic movies written as real mp4 files, curated by the real pipeline, read back as clips.

Training movies go through ``curation/pipeline.py`` exactly as a user's films would (shot detection,
filters, single- and multi-shot samples, H.264 clips, manifest); the models then train on windows
of the curated clips. Held-out movies (other seeds) keep their ground truth (cuts, object centres)
for the showcase and the synthetic evaluation suite; more held-out movies are curated into shards
of their own for the curated suite (``heldout_footage``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import ml_collections
import numpy as np
from tqdm import tqdm

from director_jax.configs_common import load_config
from director_jax.curation.decode import read_frames
from director_jax.curation.pipeline import curate
from director_jax.curation.shards import build_curated_dataset
from director_jax.data.synthetic import SyntheticMovieInfo, write_synthetic_movie

log = logging.getLogger(__name__)
CURATE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curate.py"


def shot_lengths(rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> list[int]:
    lo, hi = cfg.shot_lengths
    return [int(rng.integers(lo, hi + 1)) for _ in range(int(cfg.shots_per_movie))]


def write_movies(out_dir: Path, first_seed: int, count: int, cfg: ml_collections.ConfigDict, *,
                 max_shapes: int, progress: bool = True) -> list[SyntheticMovieInfo]:
    """``count`` synthetic mp4 movies (seeds ``first_seed + i``) with their truth JSON beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first_seed)
    infos = []
    for i in tqdm(range(count), desc=f"movies -> {out_dir.name}", unit="movie", disable=not progress):
        lengths = shot_lengths(rng, cfg)
        infos.append(write_synthetic_movie(out_dir / f"movie_{first_seed + i}.mp4", first_seed + i, lengths,
                                           int(cfg.size), int(cfg.size), float(cfg.fps), max_shapes=max_shapes))
    return infos


def curation_config(progress: bool) -> ml_collections.ConfigDict:
    """``configs/curate.py`` (the command's default) with the demo's movies' scale: short shots, small clips."""
    cfg = load_config(CURATE_CONFIG)
    cfg.single_shot.min_frames = 17
    cfg.multi_shot.min_frames = 17
    cfg.multi_shot.max_shots = 2
    cfg.multi_shot.max_edge_frames = 16
    cfg.clip.crf = 12
    cfg.progress = progress
    return cfg


def heldout_footage(out: Path, first_seed: int, count: int, cfg: ml_collections.ConfigDict, *,
                    progress: bool = True) -> dict:
    """Held-out movies curated like the training ones and built into shards (``OUT/curated/tfds``): the curated
    evaluation suite's footage, as a user's own held-out film would be."""
    write_movies(out / "movies", first_seed, count, cfg, max_shapes=1, progress=False)
    shutil.rmtree(out / "curated", ignore_errors=True)
    movies = sorted(str(p) for p in (out / "movies").glob("*.mp4"))
    summary = curate(movies, out / "curated", curation_config(progress))
    build_curated_dataset(out / "curated", progress=progress)
    return summary


def read_curated(curated: Path) -> list[dict]:
    """Every curated sample: its decoded frames (T, H, W, 3) in [-1, 1], kind and cut frames (from manifest.jsonl)."""
    samples = []
    with open(curated / "manifest.jsonl") as f:
        for line in f:
            if line.strip():
                m = json.loads(line)
                frames = read_frames(curated / m["clip"]).astype(np.float32) / 127.5 - 1.0
                samples.append({"id": m["id"], "kind": m["kind"], "frames": frames, "caption": m["caption"],
                                "cuts": [c - m["start_frame"] for c in m["cuts"]]})  # manifest cuts: source frames
    if not samples:
        raise RuntimeError(f"curation of the demo's movies gave no samples ({curated / 'summary.json'}).")
    return samples


def training_windows(samples: list[dict], count: int, frames: int, rng: np.random.Generator, *,
                     multi_shot_fraction: float = 0.25) -> np.ndarray:
    """``count`` random ``frames``-long windows of curated samples, horizontally flipped half the time
    (the demo's VAE fit; Gen and SR read the curated shards through the trainer).

    About ``multi_shot_fraction`` of them come from multi-shot samples and contain a cut somewhere.
    """
    single = [s for s in samples if s["kind"] != "multi_shot" and len(s["frames"]) >= frames]
    multi = [s for s in samples if s["kind"] == "multi_shot" and len(s["frames"]) >= frames and s["cuts"]]
    if not single:
        raise RuntimeError(f"no curated single-shot sample has {frames} frames: lengthen data.shot_lengths.")
    picks = []
    for _ in range(count):
        if multi and rng.random() < multi_shot_fraction:
            s = multi[rng.integers(len(multi))]
            cut = s["cuts"][rng.integers(len(s["cuts"]))]
            lo, hi = max(0, cut - frames + 2), min(len(s["frames"]) - frames, cut - 1)
            last = len(s["frames"]) - frames
            start = int(rng.integers(lo, hi + 1)) if hi >= lo else int(rng.integers(0, last + 1))
        else:
            s = single[rng.integers(len(single))]
            start = int(rng.integers(0, len(s["frames"]) - frames + 1))
        picks.append((s, start))
    out = []
    for s, start in picks:
        clip = s["frames"][start:start + frames]
        out.append(clip[:, :, ::-1] if rng.random() < 0.5 else clip)
    return np.stack(out).astype(np.float32)


def downscale(video: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downscale of (..., H, W, 3) by an integer factor (the Gen resolution from the movies')."""
    if factor == 1:
        return video
    *lead, h, w, c = video.shape
    return video.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2)).astype(np.float32)
