"""Bytes per example and writer throughput of the latent cache (``python -m director_jax.encode``) on this machine.

    python benchmarks/latent_cache.py            # the demo size (32x32 x 17) and 128x128 x 33; ~3 min on 2 cores
    python benchmarks/latent_cache.py --quick    # the demo size only

It writes a curated directory of synthetic film-like clips (``benchmarks/loader.py``'s), builds its
TFDS shards, exports a random ``configs/vae_tiny.py``-sized VAE (the demo's architecture; the speed
of random and trained weights is the same) and runs the job with ``gen_tiny``'s per-example
timelines. Per setting it prints the bytes per example (one timeline of one clip; a clip costs K times
that) split into latents and the rest, against the curated mp4 and float32 latents, and the writer's
examples/s: cold (the whole job, VAE load and compiles included) and warm (the shards after the
first, whose time includes one compile per chunk length).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, machine_description, make_log, usable_cores
from loader import write_curated

log = make_log("latent-cache-bench")

SETTINGS = {  # name: stored clip (h, w), frames per stored clip, fps, video (h, w), clip_frames, clips
    "demo": ((36, 64), 24, 8.0, (32, 32), 17, 24),
    "128px": ((128, 228), 40, 8.0, (128, 128), 33, 8),
}


def run_setting(base: Path, name: str, k: int, shard_size: int, batch: int) -> dict:
    from flax import nnx

    from director_jax.build.sections import vae_config_from
    from director_jax.configs_common import load_config
    from director_jax.convert import export_vae
    from director_jax.curation import latent_writer
    from director_jax.curation.shards import build_curated_dataset
    from director_jax.models.vae import WanVAE

    size, frames, fps, (h, w), clip_frames, clips = SETTINGS[name]
    root = base / name
    mbps = write_curated(root, clips, size, frames, fps, 1)
    build_curated_dataset(root, validation_fraction=0.0, progress=False)
    mp4 = np.mean([p.stat().st_size for p in (root / "clips").glob("*.mp4")])
    cfg = load_config(REPO / "configs" / "gen_tiny.py")
    cfg.video.height, cfg.video.width, cfg.video.num_frames = h, w, clip_frames
    cfg.data.curated.dir = str(root)
    cfg.vae.init_from = str(export_vae(WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(0)), root / "vae"))
    log(f"{name}: {clips} clips of {size[0]}x{size[1]} x {frames} frames ({mbps:.2f} Mbit/s), windows {h}x{w} x "
        f"{clip_frames}")

    real, times = latent_writer._write_shard, []

    def timed(*args, **kwargs):
        t = time.perf_counter()
        real(*args, **kwargs)
        times.append((len(args[0].shard_examples(args[1])), time.perf_counter() - t))

    latent_writer._write_shard = timed
    try:
        t0 = time.perf_counter()
        manifest = latent_writer.write_latent_cache(cfg, root / "cache", timelines_per_clip=k, shard_size=shard_size,
                                                    batch=batch, progress=False)
        cold = time.perf_counter() - t0
    finally:
        latent_writer._write_shard = real
    n = manifest["count"]
    hh, ww, z = manifest["job"]["latent_shape"]
    counts = [r["latents"].shape[0] for r in _records(root / "cache")]
    latent_bytes = float(np.mean(counts)) * hh * ww * z * 2
    warm_n, warm_s = sum(c for c, _ in times[1:]), sum(s for _, s in times[1:])
    return dict(name=name, video=f"{h}x{w}x{clip_frames}", latent=f"Lx{hh}x{ww}x{z}", mean_l=float(np.mean(counts)),
                per_example=manifest["bytes"] / n, latent_bytes=latent_bytes, mp4=mp4, examples=n,
                cold=n / cold, warm=warm_n / warm_s if warm_s else None, manifest=manifest)


def _records(d: Path):
    from array_record.python.array_record_module import ArrayRecordReader

    from director_jax.data.latent_cache import decode_record

    for p in sorted(d.glob("shard-*.array_record")):
        reader = ArrayRecordReader(str(p))
        yield from (decode_record(r) for r in reader.read_all())
        reader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="demo,128px", help=f"comma list of {sorted(SETTINGS)}")
    parser.add_argument("--timelines_per_clip", type=int, default=2)
    parser.add_argument("--shard_size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="the demo size only")
    args = parser.parse_args()
    names = ["demo"] if args.quick else args.settings.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="latent-cache-bench-") as tmp:
        for name in names:
            rows.append(run_setting(Path(tmp), name, args.timelines_per_clip, args.shard_size, args.batch))
            r = rows[-1]
            log(f"{name}: {r['examples']} examples, {r['per_example']:.0f} B each, cold {r['cold']:.2f} examples/s")
    print("\n".join(machine_description("benchmarks/latent_cache.py",
                                        ("director_jax/data/latent_cache.py", "director_jax/curation/latent_writer.py",
                                         "benchmarks/latent_cache.py"))))
    print(f"- Usable cores: {usable_cores()}; K={args.timelines_per_clip} timelines per clip, shards of "
          f"{args.shard_size}, encode batch {args.batch}; VAE: configs/vae_tiny.py's architecture (random weights)\n")
    print("| setting | video window | latents | mean L | bytes / example | of which latents (bf16) | float32 latents "
          "| curated mp4 / clip | examples | cold examples/s | warm examples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        warm = "-" if r["warm"] is None else f"{r['warm']:.2f}"
        print(f"| {r['name']} | {r['video']} | {r['latent']} | {r['mean_l']:.1f} | {r['per_example']:,.0f} | "
              f"{r['latent_bytes']:,.0f} | {2 * r['latent_bytes']:,.0f} | {r['mp4']:,.0f} | {r['examples']} | "
              f"{r['cold']:.2f} | {warm} |")
    print("\nA clip with K timelines costs K x bytes / example; Wan2.1 at 480x832 x 81 frames (L=21 for one chunk, "
          f"60x104x16) would hold {21 * 60 * 104 * 16 * 2:,} B of bf16 latents per timeline.")


if __name__ == "__main__":
    main()
