"""Director-SR on held-out synthetic clips: PSNR / SSIM / LPIPS against bicubic and the VAE ceiling; what keyframes add.

    python benchmarks/sr.py                        # fit the VAE, train SR, evaluate (~15 min on 2 CPU cores)
    python benchmarks/sr.py --quick                # smoke test (~2 min; numbers not meaningful)
    python benchmarks/sr.py --only-vae --vae-steps 6000 --workdir runs/bench_sr_long      # a better VAE
    python benchmarks/sr.py --vae runs/demo/vae --workdir runs/bench_sr_demo_vae          # SR on the demo's VAE
    python benchmarks/sr.py --vae DIR --sr DIR     # evaluate saved models only; --write-results: into RESULTS.md

The setting is ``configs/sr_tiny.py``: 17-frame 64x64 clips of synthetic movies (64-96 frame shots),
keyframes at frames 0 and 16, 4x SR from 16x16 (``--scale`` to change) after the config's seeded
degradations (blur, downscale kernel, noise, JPEG, H.264, each on for part of the clips). Stages,
all on the CPU:

1. **VAE** (skipped with ``--vae DIR``): the tiny Wan-architecture VAE fitted on 32x32 crops of 64x64
   synthetic frames and 17-frame clips (``fit_vae``), its per-channel latent statistics measured and
   stored in its config (``SRTask`` normalises with them), written as a diffusers directory
   (``WORKDIR/vae``). This VAE learns slowly on a CPU (its temporal path above all): its round trip
   of the ground truth is the ceiling of every decoded SR output and is reported beside bicubic.
2. **SR** (skipped with ``--sr DIR``): ``SRTask`` examples (synthetic clip -> degraded -> upsampled,
   seeded per example) encoded once by the frozen VAE over the timeline layout into a latent cache,
   then the real train step (``train.step``: the trainer's optimizer, schedule and EMA; task ``sr``
   with ``train.latents="precomputed"``) on random batches of it, keyframes dropped for a quarter of
   the rows (redrawn every step). The result is a trainer checkpoint (``WORKDIR/sr``).
   Encoding once instead of in every step is what fits the run into minutes.
3. **Evaluation** on held-out clips (another seed: other movies, other degradation draws) with
   ``pipeline.sr.super_resolve``: bicubic upsampling of the degraded clip (the baseline), its VAE
   round trip (the SR model's input, decoded), the VAE round trip of the ground truth (the ceiling),
   and SR without and with the high-res keyframes, per sampler budget. PSNR (mean over frames), SSIM
   (Gaussian window 11, sigma 1.5, borders cropped: scikit-image's ``gaussian_weights`` convention;
   dm-pix is not installed), LPIPS (AlexNet, ``eval/lpips.py``), the RMSE of the normalized latents
   against the ground truth's on the non-keyframe latent frames (the SR model measured apart from the
   VAE decoder), and PSNR by distance to the nearest keyframe.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, machine_description, make_log

log = make_log("sr-bench")

HELDOUT_SEED = 900_000


# ------------------------------------------------------------------------------------------------
# Metrics


def frame_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR per frame (dB) of [-1, 1] clips (..., H, W, 3) -> (...)."""
    from director_jax.eval.metrics import psnr

    return psnr(a, b, axis=(-3, -2, -1))


def frame_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM per frame of [-1, 1] clips (..., H, W, 3) -> (...): Gaussian window 11 / sigma 1.5, channel mean.

    Data range 2 (so C1 = (0.01 * 2)^2, C2 = (0.03 * 2)^2); the 5-pixel border where the window
    leaves the image is cropped, as scikit-image's ``structural_similarity(gaussian_weights=True)``.
    """
    import cv2

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    lead = a.shape[:-3]
    a = a.reshape(-1, *a.shape[-3:]).astype(np.float64)
    b = b.reshape(-1, *b.shape[-3:]).astype(np.float64)
    out = np.empty(len(a))
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        def blur(z):
            return cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101)
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out[i] = s[5:-5, 5:-5].mean()
    return out.reshape(lead)


def frame_lpips(lpips, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    lead = a.shape[:-3]
    d = lpips(jnp.asarray(a.reshape(-1, *a.shape[-3:])), jnp.asarray(b.reshape(-1, *b.shape[-3:])))
    return np.asarray(d).reshape(lead)


# ------------------------------------------------------------------------------------------------
# Stage 1: the VAE


def fit_vae(cfg, steps: int, crop: int = 32, learning_rate: float = 5e-3, init_scale: float = 8.0,
            clip_every: int = 2, clip_frames: int = 17, frame_batch: int = 8, clip_batch: int = 4, clip_crop: int = 16,
            mse_weight: float = 1.0, inflate: bool = True, anchor_weight: float = 0.0):
    """The tiny VAE fitted on ``crop`` x ``crop`` crops of the synthetic footage (``demo/cpu_fit.py``'s fit).

    Half the steps see ``frame_batch`` single frames (the causal VAE encodes a clip's first frame
    alone), every ``clip_every``-th step ``clip_batch`` ``clip_frames``-frame clips as small crops,
    which train the temporal path (each later latent decodes with the caches of the ones before, so
    the clips are as long as the chunks encoded later; configs/demo.py says what too few clip steps
    cost). Kernels start ``init_scale`` x PyTorch's default (``scale_conv_kernels`` says why),
    temporal taps as an inflated image VAE (``inflate``, see ``inflate_temporal_kernels``), and
    ``anchor_weight`` keeps later latents near their frames' image latents (``temporal_anchor_loss``).
    """
    from flax import nnx

    from director_jax.build import vae_config_from
    from director_jax.data.synthetic_loader import SyntheticClipsConfig, synthetic_clip
    from director_jax.demo.cpu_fit import fit_vae as fit
    from director_jax.models.vae import WanVAE
    from director_jax.models.vae_init import inflate_temporal_kernels, scale_conv_kernels

    vae = WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(int(cfg.seed)))
    scale_conv_kernels(vae, init_scale)
    if inflate:
        inflate_temporal_kernels(vae)
    source = dict(num_movies=10**9, height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps,
                  shot_lengths=tuple(cfg.data.synthetic.shot_lengths), shots_per_movie=2)
    frames = SyntheticClipsConfig(clip_frames=1, seed=int(cfg.seed) + 77, **source)
    clips = SyntheticClipsConfig(clip_frames=clip_frames, seed=int(cfg.seed) + 78, **source)

    def sample(i: int, rng: np.random.Generator) -> np.ndarray:
        is_clip = i % clip_every == clip_every - 1
        src, count, size = (clips, clip_batch, clip_crop) if is_clip else (frames, frame_batch, crop)
        out = []
        for j in range(count):
            clip = synthetic_clip(i * frame_batch + j, src)["video"]
            y, x = rng.integers(0, cfg.video.height - size + 1), rng.integers(0, cfg.video.width - size + 1)
            out.append(clip[:, y:y + size, x:x + size])
        return np.stack(out)

    history = fit(vae, sample, steps, learning_rate=learning_rate, seed=int(cfg.seed), log_every=200,
                  mse_weight=mse_weight, anchor_weight=anchor_weight)
    log(f"VAE fit: {history[-1]}")
    return vae


# ------------------------------------------------------------------------------------------------
# Stage 2: SR


def example_batch(task, indices) -> dict[str, np.ndarray]:
    """The SR task's host batch for example ``indices``: clip, degraded clip, upsampled clip, given mask."""
    from director_jax.data.synthetic_loader import synthetic_clip

    clips = task.clips_config()
    rows = [synthetic_clip(int(i), clips) for i in indices]
    batch = {"video": np.stack([r["video"] for r in rows]), "index": np.asarray(indices, np.int64)}
    return task.data_transform()(batch)


def build_cache(task, vae, count: int):
    """Normalized latents of ``count`` SR examples (high-res and upsampled low-res) over the task's layout."""
    from layout_cache import encode_layouts

    batch = example_batch(task, range(count))
    (cache,) = encode_layouts(vae, batch["video"], [task.layout], lowres=batch["upsampled"])
    return cache


def train_sr(cfg, cache, steps: int, workdir: Path):
    """The trainer's step (task ``sr``) on random batches of the cache; returns the EMA model from its checkpoint."""
    import jax
    from layout_cache import train_on_cache

    from director_jax.build import load_director_sr

    cfg = cfg.copy_and_resolve_references()
    cfg.train.update(dict(latents="precomputed", timelines="per_example", steps=steps, log_every=100))
    cfg.checkpoint.update(dict(every=steps, keep_last=1, async_save=False))
    report = train_on_cache(cfg, [cache], workdir, keyframe_dropout=float(cfg.train.keyframe_dropout))
    log(f"SR training: {report['history'][-1]}")
    sr, _ = load_director_sr(cfg, workdir, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return sr


# ------------------------------------------------------------------------------------------------
# Stage 3: evaluation


def keyframes_of(task) -> tuple[int, ...]:
    return tuple(int(k) for k in task.cfg.train.keyframes)


def distances(num_frames: int, keyframes: tuple[int, ...]) -> np.ndarray:
    """Per frame: the distance (frames) to the nearest keyframe."""
    return np.asarray([min(abs(f - k) for k in keyframes) for f in range(num_frames)])


def evaluate(sr, vae, task, num_clips: int, sampler_steps: list[int], batch: int = 4) -> dict[str, dict]:
    """Per-method per-frame metrics (num_clips, T) on held-out clips: PSNR, SSIM, LPIPS."""
    import jax
    import jax.numpy as jnp

    from director_jax.models.lpips import LPIPS
    from director_jax.models.multichunk import decode_timeline, encode_timeline
    from director_jax.models.vae import normalize_latents
    from director_jax.pipeline.codec import jitted_codec
    from director_jax.pipeline.sr import super_resolve

    lpips = LPIPS("alexnet")
    encode, decode = jitted_codec(vae)
    layout, scale, kf = task.layout, task.scale, keyframes_of(task)

    def round_trip(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(decoded video, normalized latents) of the multi-chunk VAE round trip."""
        mean, _ = encode_timeline(vae, jnp.asarray(video), layout, encode=encode)
        decoded = np.clip(np.asarray(decode_timeline(vae, mean, layout, decode=decode)), -1, 1)
        return decoded, np.asarray(normalize_latents(mean, vae.config))

    methods = ["bicubic (baseline)", "bicubic, VAE round trip (what SR starts from, decoded)",
               "ground truth, VAE round trip (ceiling)"]
    for s in sampler_steps:
        steps = f"{s} step{'s' * (s > 1)}"
        methods += [f"SR, no keyframes, {steps}", f"SR + keyframes {' and '.join(map(str, kf))}, {steps}"]
    out = {m: {"psnr": [], "ssim": [], "lpips": [], "latent_rmse": []} for m in methods}
    generated = ~np.asarray(layout.given)  # latent frames generated in both runs (the keyframes' are given in one)
    start = time.perf_counter()
    for first in range(0, num_clips, batch):
        ex = example_batch(task, range(first, min(first + batch, num_clips)))
        truth, lowres = ex["video"], ex["lowres"]
        (bicubic_decoded, bicubic_latents), (recon, truth_latents) = round_trip(ex["upsampled"]), round_trip(truth)
        results = {methods[0]: (ex["upsampled"], None), methods[1]: (bicubic_decoded, bicubic_latents),
                   methods[2]: (recon, truth_latents)}
        keyframes = {k: truth[:, k] for k in kf}
        key = jax.random.key(first)
        for j, s in enumerate(sampler_steps):
            for with_kf in (False, True):
                video, latents = super_resolve(sr, vae, lowres, keyframes if with_kf else None, scale=scale,
                                               layout=layout, steps=s, key=key, return_latents=True)
                results[methods[3 + 2 * j + with_kf]] = (video, latents["sampled"])
        for m, (video, latents) in results.items():
            out[m]["psnr"].append(frame_psnr(video, truth))
            out[m]["ssim"].append(frame_ssim(video, truth))
            out[m]["lpips"].append(frame_lpips(lpips, video, truth))
            diff = np.full(len(truth), np.nan) if latents is None else np.sqrt(
                np.mean(np.square(latents - truth_latents)[:, generated], axis=(1, 2, 3, 4)))
            out[m]["latent_rmse"].append(diff)
        log(f"evaluated {first + len(truth)}/{num_clips} held-out clips ({time.perf_counter() - start:.0f} s)")
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}


# ------------------------------------------------------------------------------------------------
# Report


def tables(results: dict[str, dict], keyframes: tuple[int, ...]) -> list[str]:
    """The metrics table and PSNR by distance to the nearest keyframe (Markdown lines)."""
    num_frames = next(iter(results.values()))["psnr"].shape[1]
    dist = distances(num_frames, keyframes)
    lines = ["| method | PSNR (dB) | PSNR, non-keyframe frames (dB) | SSIM | LPIPS | latent RMSE |",
             "|---|---|---|---|---|---|"]
    for m, r in results.items():
        rmse = r["latent_rmse"].mean()
        lines.append(f"| {m} | {r['psnr'].mean():.2f} | {r['psnr'][:, dist > 0].mean():.2f} | "
                     f"{r['ssim'].mean():.4f} | {r['lpips'].mean():.4f} | {'-' if np.isnan(rmse) else f'{rmse:.4f}'} |")
    buckets = [(0, 0)] + [(lo, min(lo + 1, dist.max())) for lo in range(1, dist.max() + 1, 2)]
    head = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in buckets]
    lines += ["", f"PSNR (dB) by distance d (frames) to the nearest keyframe (keyframes: frames {keyframes}):", "",
              "| method | " + " | ".join(f"d = {h}" for h in head) + " |", "|---|" + "---|" * len(head)]
    for m, r in results.items():
        cells = [r["psnr"][:, (dist >= lo) & (dist <= hi)].mean() for lo, hi in buckets]
        lines.append(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return lines


def write_results(section: list[str]) -> Path:
    """Replaces (or appends) the ``## Director-SR`` section of benchmarks/RESULTS.md."""
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    head = "## Director-SR"
    if head in lines:
        i = lines.index(head)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + section + ([""] + lines[j:] if j < len(lines) else [])
    else:
        lines = lines + ([""] if lines and lines[-1] else []) + section
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench_sr"), help="where the VAE and SR are written")
    parser.add_argument("--vae", help="a fitted VAE (diffusers dir, e.g. WORKDIR/vae): skip the VAE fit")
    parser.add_argument("--sr", help="a trained SR model (trainer workdir, e.g. WORKDIR/sr): skip SR training")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-inflate", action=argparse.BooleanOptionalAction, default=True,
                        help="start the VAE's temporal taps as an inflated image VAE (inflate_temporal_kernels)")
    parser.add_argument("--vae-anchor", type=float, default=0.0, help="temporal_anchor_loss weight of the VAE fit")
    parser.add_argument("--cache", type=int, default=400, help="training examples encoded into the latent cache")
    parser.add_argument("--sr-steps", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=24, help="held-out clips evaluated (multiple of 4)")
    parser.add_argument("--steps", default="1,4", help="sampler step budgets to evaluate")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budgets, numbers not meaningful")
    parser.add_argument("--write-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--only-vae", action="store_true", help="fit and write the VAE, then stop")
    parser.add_argument("--scale", type=int, help="SR factor (default: configs/sr_tiny.py's degradation.scales)")
    parser.add_argument("--vae-spatial", type=int, choices=(4, 8), default=4,
                        help="VAE fitted here: 4 = the CPU demo's (two downsampling stages), 8 = Wan2.1's three")
    args = parser.parse_args()
    if args.quick:
        args.vae_steps, args.cache, args.sr_steps, args.heldout = 20, 16, 20, 4
    sampler_steps = [int(s) for s in args.steps.split(",")]

    import jax

    from director_jax.build import load_director_sr
    from director_jax.configs_common import load_config
    from director_jax.convert.vae import export_vae, load_vae
    from director_jax.demo.cpu_fit import with_latent_stats
    from director_jax.train.tasks import SRTask

    timings = {}
    workdir = Path(args.workdir)
    cfg = load_config(REPO / "configs" / "sr_tiny.py")
    cfg.mesh.fsdp = 1
    if args.scale:
        cfg.degradation.scales = (args.scale,)
    if args.vae_spatial == 4:
        cfg.vae.update(dict(dim_mult=(1, 2, 2), temperal_downsample=(True, True)))
    t0 = time.perf_counter()
    if args.vae:
        vae_dir = Path(args.vae)
        saved = json.loads((vae_dir / "config.json").read_text())  # the architecture the directory holds
        cfg.vae.update({k: tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
                        for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                                  "temperal_downsample")})
        log(f"VAE: {vae_dir}")
    else:
        log(f"fitting the tiny VAE: {args.vae_steps} steps on 32x32 crops")
        from director_jax.data.synthetic_loader import SyntheticClipsConfig, synthetic_clip

        stats_clips = SyntheticClipsConfig(num_movies=10**6, height=cfg.video.height, width=cfg.video.width,
                                           clip_frames=cfg.video.num_frames, seed=int(cfg.seed) + 79,
                                           shot_lengths=tuple(cfg.data.synthetic.shot_lengths))
        stats_videos = np.stack([synthetic_clip(i, stats_clips)["video"] for i in range(16)])

        fitted = fit_vae(cfg, args.vae_steps, inflate=args.vae_inflate, anchor_weight=args.vae_anchor)
        vae_dir = export_vae(with_latent_stats(fitted, stats_videos), workdir / "vae")
        log(f"VAE written to {vae_dir}")
        if args.only_vae:
            return
    timings["VAE fit"] = time.perf_counter() - t0
    cfg.vae.init_from = str(vae_dir)
    task = SRTask(cfg)
    vae = load_vae(vae_dir)

    t0 = time.perf_counter()
    if args.sr:
        sr, _ = load_director_sr(cfg, args.sr, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        log(f"SR: {args.sr}")
    else:
        log(f"latent cache: {args.cache} examples ({task.describe()})")
        cache = build_cache(task, vae, args.cache)
        timings["latent cache"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log(f"training SR: {args.sr_steps} steps of batch {cfg.train.batch_size}")
        sr = train_sr(cfg, cache, args.sr_steps, workdir / "sr")
        log(f"SR written to {workdir / 'sr'}")
        timings["SR training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heldout_cfg = cfg.copy_and_resolve_references()
    heldout_cfg.seed = HELDOUT_SEED  # other movies, other degradation draws
    results = evaluate(sr, vae, SRTask(heldout_cfg), args.heldout, sampler_steps)
    timings["evaluation"] = time.perf_counter() - t0

    d = task.degradation
    vae_budget = f"loaded from {args.vae}" if args.vae else f"fitted here, {args.vae_steps} steps"
    sr_budget = (f"loaded from {args.sr}" if args.sr else
                 f"{args.sr_steps} steps x batch {cfg.train.batch_size} over a cache of {args.cache} examples")
    section = [
        "## Director-SR" + (" -- SMOKE TEST (--quick: numbers not meaningful)" if args.quick else ""),
        "",
        "`benchmarks/sr.py`: the tiny Director-SR (`configs/sr_tiny.py`: 2 layers of width 128) trained on the CPU on "
        "synthetic movies, evaluated on held-out clips (other movies, other degradation draws).",
        "",
        *machine_description("benchmarks/sr.py", ("director_jax", "benchmarks/sr.py", "configs/sr_tiny.py")),
        f"- Setting: {cfg.video.num_frames} frames of {cfg.video.height}x{cfg.video.width}, {task.scale}x SR from "
        f"{cfg.video.height // task.scale}x{cfg.video.width // task.scale}; keyframes at frames {keyframes_of(task)} "
        f"(chunks {[(c.start, c.length) for c in task.layout.chunks]}); degradations: blur p {d.blur_prob} "
        f"sigma {d.blur_sigma}, kernels {d.down_kernels}, noise p {d.noise_prob} sigma {d.noise_sigma}, JPEG p "
        f"{d.jpeg_prob} q {d.jpeg_quality}, H.264 p {d.codec_prob} CRF {d.codec_crf}",
        f"- VAE: {vae_budget}; SR: {sr_budget}; {args.heldout} held-out clips; Euler sampler; times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
        *tables(results, keyframes_of(task)),
    ]
    print("\n".join(section))
    if args.write_results:
        log(f"wrote {write_results(section)}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
