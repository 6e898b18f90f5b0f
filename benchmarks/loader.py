"""Clips per second of the curated-clip Grain loader, against plain PyAV decoding of the same clips.

    python benchmarks/loader.py            # 480p (480x832) x 81 frames and the demo size (32x32 x 17); ~2.5 min
    python benchmarks/loader.py --quick    # fewer clips (smoke test, ~1 min)
    python benchmarks/loader.py --workers 0,1,2,4 --clips 12 --dtypes uint8

It writes its own curated directory of synthetic movies (real H.264 mp4 files from
``director_jax.video_io.write_mp4``, moving shapes on gradients) in a temporary directory,
builds the TFDS ArrayRecord dataset from it, then times per setting:

- **decode-only (baseline)**: PyAV decoding the same clips from bytes in memory, in this process, the
  first ``clip_frames`` frames of each to an RGB uint8 array; one FFmpeg thread, as the loader uses.
  This is the floor: what the loader costs beyond it is its own overhead (ArrayRecord read, window,
  resize + crop, float conversion, task sampling, batching, worker transfer).
- **loader, N workers**: ``make_curated_dataset`` + ``make_iterator(worker_count=N)`` (0: in-process
  with one prefetch thread), global batch ``--batch``, after a warm-up of one batch per worker; once with
  ``video_dtype="float32"`` (the [-1, 1] batches the trainer takes now) and once with ``"uint8"``.

Clips at 480p are stored at 480x854 (16:9 with a 480 short side, as curation stores them) and cropped to
the 480x832 bucket; demo clips are stored at 36x64 and resized + cropped to 32x32. Flat synthetic shapes
compress to ~0.1 Mbit/s at 480p and decode ~3x faster than film, so by default each shot gets a panning
texture and grain (~2.7 Mbit/s at 480p, crf 16; ``--smooth`` leaves them out). The bitrate is printed:
footage of a higher bitrate decodes slower.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import machine_description, make_log, usable_cores

log = make_log("loader-bench")

SETTINGS = {  # name: stored clip (h, w), frames per stored clip, fps, bucket (h, w), clip_frames, render scale
    "480p": ((480, 854), 96, 16.0, (480, 832), 81, 2),
    "demo": ((36, 64), 24, 8.0, (32, 32), 17, 1),
}


def _film_like(movie: np.ndarray, shots: list[int], rng: np.random.Generator) -> np.ndarray:
    """Adds what makes film cost more to decode than flat shapes: a panning texture per shot and grain."""
    from PIL import Image

    t, h, w, _ = movie.shape
    out, first = movie.copy(), 0
    for n in shots:
        coarse = rng.normal(size=(h // 4 + 2, (w + 2 * n) // 4 + 2)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse).resize((w + 2 * n, h), Image.BICUBIC))
        for i in range(n):
            out[first + i] += 0.15 * texture[:, 2 * i:2 * i + w, None]  # pans 2 px per frame
        first += n
    out += 0.02 * rng.standard_normal(out.shape, np.float32)
    return np.clip(out, -1, 1)


def write_curated(root: Path, num_clips: int, size: tuple[int, int], frames: int, fps: float, scale: int,
                  film: bool = True) -> float:
    """Synthetic clips + manifest.jsonl in the curation format; returns the mean bitrate in Mbit/s."""
    from director_jax.data.captions import format_multishot_caption
    from director_jax.data.synthetic import make_movie
    from director_jax.video_io import write_mp4

    h, w = size
    lines, bits = [], 0
    for k in range(num_clips):
        shots = [frames // 2, frames - frames // 2]
        movie = make_movie(k, shots, -(-h // scale), -(-w // scale), fps).frames
        movie = movie.repeat(scale, axis=1).repeat(scale, axis=2)[:, :h, :w] if scale > 1 else movie
        if film:
            movie = _film_like(movie, shots, np.random.default_rng(k))
        start = 1000 * k
        source = f"/bench/movie_{k}.mp4"
        sid = hashlib.sha1(f"{source}:{start}:{start + frames}".encode()).hexdigest()[:16]
        path = write_mp4(root / "clips" / f"{sid}.mp4", movie, fps)
        bits += path.stat().st_size * 8
        lines.append({"id": sid, "source": source, "start_frame": start, "end_frame": start + frames, "fps": fps,
                      "cuts": [start + shots[0]], "kind": "multi_shot",
                      "caption": format_multishot_caption([f"movie {k} shot 1.", f"movie {k} shot 2."]),
                      "clip": f"clips/{sid}.mp4", "width": w, "height": h, "num_frames": frames,
                      "keyframe_candidates": {"shot_starts": [0, shots[0]], "even": [0, frames - 1],
                                              "motion_peaks": []}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return bits / num_clips / (frames / fps) / 1e6


def decode_only(clips: list[bytes], clip_frames: int, count: int) -> float:
    """Seconds to decode ``count`` clips (cycling through ``clips``) with plain PyAV."""
    import av

    start = time.perf_counter()
    for i in range(count):
        with av.open(io.BytesIO(clips[i % len(clips)])) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == clip_frames:
                    break
            np.stack(frames)
    return time.perf_counter() - start


def loader_time(cfg, workers: int, batch: int, count: int) -> float:
    """Seconds for ``count`` clips (whole batches) from the loader after warm-up."""
    from director_jax.data.loader import make_curated_dataset, make_iterator

    it = make_iterator(make_curated_dataset(cfg, global_batch_size=batch, shuffle_seed=0), worker_count=workers)
    try:
        for _ in range(max(workers, 1)):  # warm-up: worker start-up and the first batch of each
            next(it)
        start = time.perf_counter()
        for _ in range(-(-count // batch)):
            out = next(it)
        assert out["video"].shape[0] == batch
        return time.perf_counter() - start
    finally:
        if workers:
            it.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="480p,demo", help=f"comma list of {sorted(SETTINGS)}")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
    parser.add_argument("--clips", type=int, default=None, help="distinct clips per setting (default 6 / 3 quick)")
    parser.add_argument("--measure", type=int, default=None,
                        help="clips timed per row at 480p (default 8 / 3 quick); the demo size times 10x as many")
    parser.add_argument("--batch", type=int, default=1, help="global batch size (one process)")
    parser.add_argument("--quick", action="store_true", help="fewer clips: a smoke test")
    parser.add_argument("--keep", help="build the curated directories here (kept) instead of a temp dir")
    parser.add_argument("--smooth", action="store_true",
                        help="plain synthetic shapes (no texture or grain): far lower bitrate than film")
    parser.add_argument("--dtypes", default="float32,uint8", help="loader video_dtype values to time")
    args = parser.parse_args()
    from director_jax.curation.shards import build_curated_dataset
    from director_jax.data.loader import CuratedLoaderConfig

    workers = [int(w) for w in args.workers.split(",")]
    num_clips = args.clips or (3 if args.quick else 6)
    measure = args.measure or (3 if args.quick else 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        base = Path(args.keep or tmp)
        for name in args.settings.split(","):
            size, frames, fps, bucket, clip_frames, scale = SETTINGS[name]
            count = measure * (10 if name == "demo" else 1)
            root = base / name
            t0 = time.perf_counter()
            mbps = write_curated(root, num_clips, size, frames, fps, scale, film=not args.smooth)
            build_curated_dataset(root, validation_fraction=0.0, progress=False)
            log(f"{name}: wrote and built {num_clips} clips of {size[0]}x{size[1]} x {frames} frames "
                f"({mbps:.2f} Mbit/s) in {time.perf_counter() - t0:.1f} s")
            clips = [p.read_bytes() for p in sorted((root / "clips").glob("*.mp4"))]
            decode_only(clips[:1], clip_frames, 1)  # warm-up (library init)
            base_s = decode_only(clips, clip_frames, count)
            rows.append((name, f"decode-only (PyAV, baseline; clips {mbps:.2f} Mbit/s)", "-", count, base_s, None))
            log(f"{name}: decode-only {count / base_s:.2f} clips/s")
            for dtype in args.dtypes.split(","):
                cfg = CuratedLoaderConfig(data_dir=str(root), clip_frames=clip_frames, fps=None, buckets=(bucket,),
                                          caption_dropout=0.1, video_dtype=dtype)
                for w in workers:
                    s = loader_time(cfg, w, args.batch, count)
                    rows.append((name, f"loader, video {dtype}", str(w), -(-count // args.batch) * args.batch, s,
                                 base_s / count))
                    log(f"{name}: loader ({dtype}), {w} workers: {rows[-1][3] / s:.2f} clips/s")
    print("\n".join(machine_description("benchmarks/loader.py", ("director_jax/data", "benchmarks/loader.py"))))
    print(f"- Usable cores: {usable_cores()}; global batch {args.batch}; {num_clips} distinct clips per setting\n")
    print("| setting | pipeline | workers | clips timed | seconds | clips/s | time per clip vs decode-only |")
    print("|---|---|---|---|---|---|---|")
    for name, what, w, n, s, base_per_clip in rows:
        ratio = "1.00" if base_per_clip is None else f"{(s / n) / base_per_clip:.2f}x"
        size, _, _, bucket, clip_frames, _ = SETTINGS[name]
        label = f"{name}: {bucket[0]}x{bucket[1]} x {clip_frames}"
        print(f"| {label} | {what} | {w} | {n} | {s:.2f} | {n / s:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
