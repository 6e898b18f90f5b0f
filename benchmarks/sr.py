"""Director-SR on held-out synthetic clips: PSNR / SSIM / LPIPS against bicubic and the VAE ceiling; what keyframes add.

    python benchmarks/sr.py                        # fit the VAE, train SR, evaluate (~12 min on 2 CPU cores)
    python benchmarks/sr.py --quick                # smoke test (minutes; numbers not meaningful)
    python benchmarks/sr.py --vae runs/bench_sr/vae --sr runs/bench_sr/sr   # evaluate saved models only
    python benchmarks/sr.py --write-results        # also write the table into benchmarks/RESULTS.md

The setting is ``configs/sr_tiny.py``: 17-frame 64x64 clips, keyframes at frames 0 and 16, 4x SR from
16x16 after the config's seeded degradations (blur, downscale kernel, noise, JPEG, H.264, each on for
part of the clips). Stages, all on the CPU:

1. **VAE** (skipped with ``--vae DIR``): the tiny Wan-architecture VAE fitted on 32x32 crops of 64x64
   synthetic clips (L1 on the posterior mean, as the CPU demo), its per-channel latent statistics
   measured and stored in its config, written as a diffusers directory (``WORKDIR/vae``).
2. **SR** (skipped with ``--sr DIR``): ``SRTask`` examples (synthetic clip -> degraded -> upsampled,
   seeded per example) encoded once by the frozen VAE over the timeline layout into a latent cache,
   then the real train step (``train.step``, the trainer's optimizer, EMA and schedule, task
   ``sr`` with ``train.latents="precomputed"``) on random batches of it, keyframes dropped for a
   quarter of the rows (redrawn every step). The EMA weights are written with ``export_sr``
   (``WORKDIR/sr``). Encoding once instead of in every step is what fits the run into minutes.
3. **Evaluation** on held-out clips (another seed: other movies, other degradations) with
   ``pipeline.sr.super_resolve``: bicubic upsampling of the degraded clip (the baseline), the
   VAE's multi-chunk round trip of the ground truth (the ceiling of anything this VAE decodes), and
   SR without and with the two high-res keyframes, per sampler budget. PSNR (mean over frames), SSIM
   (Gaussian window 11, sigma 1.5, borders cropped: scikit-image's ``gaussian_weights`` convention;
   dm-pix is not installed) and LPIPS (AlexNet, ``eval/lpips.py``), plus PSNR by distance to the
   nearest keyframe.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def fit_vae(cfg, steps: int, crop: int = 32, learning_rate: float = 1.5e-3, init_scale: float = 8.0,
            clip_every: int = 3, clip_frames: int = 17, clip_crop: int = 32, clip_batch: int = 1,
            snapshot=None):
    """The tiny VAE fitted on ``crop`` x ``crop`` crops of 64x64 synthetic footage: L1 on the posterior mean.

    Most steps see 4 single frames (the causal VAE encodes a clip's first frame alone, and they are
    cheap); every ``clip_every``-th step sees one clip of ``clip_frames``, which trains the temporal
    path: each later latent frame decodes with the caches of the ones before, so the clips must be as
    long as the chunks encoded later (trained on 5-frame clips, latents 2-4 of a 17-frame chunk
    decoded at ~6 dB PSNR).
    The conv kernels start ``init_scale`` x PyTorch's default: every conv of the Wan VAE feeds an
    RMS norm, so its output is invariant to the kernel's scale and Adam's relative step is
    ``lr / |kernel|``; from the default init the decoder collapsed to a constant at lr >= 1e-3 and
    crawled below it (L1 0.32 after 600 steps on frames; 0.17 with x8 kernels at lr 1.5e-3).
    ``snapshot(vae, step)``, when given, is called every 2000 steps (long fits write their progress).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from director_jax.data.synthetic_loader import SyntheticClipsConfig, synthetic_clip
    from director_jax.models.vae import WanVAE
    from director_jax.train.losses import vae_loss
    from director_jax.train.tasks import vae_config_from

    vae = WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(int(cfg.seed)))
    for _, module in nnx.iter_graph(vae):
        if isinstance(getattr(module, "kernel", None), nnx.Param):
            module.kernel.set_value(init_scale * module.kernel.get_value())
    source = dict(num_movies=10**9, height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps,
                  shot_lengths=tuple(cfg.data.synthetic.shot_lengths), shots_per_movie=2)
    frames = SyntheticClipsConfig(clip_frames=1, seed=int(cfg.seed) + 77, **source)
    clips = SyntheticClipsConfig(clip_frames=clip_frames, seed=int(cfg.seed) + 78, **source)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps - 1), steps, learning_rate / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    graphdef, params = nnx.split(vae, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, video):
        def loss_fn(p):
            return vae_loss(nnx.merge(graphdef, p), video, jax.random.key(0), 1e-6, False)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux["l1"]

    rng = np.random.default_rng(int(cfg.seed))
    start, l1s = time.perf_counter(), []
    for i in range(steps):
        is_clip = i % clip_every == clip_every - 1
        source, count, size = (clips, clip_batch, clip_crop) if is_clip else (frames, 4, crop)
        video = []
        for j in range(count):
            clip = synthetic_clip(i * 4 + j, source)["video"]
            y, x = rng.integers(0, cfg.video.height - size + 1), rng.integers(0, cfg.video.width - size + 1)
            video.append(clip[:, y:y + size, x:x + size])
        params, opt_state, l1 = step(params, opt_state, jnp.asarray(np.stack(video)))
        l1s.append(l1)
        if (i + 1) % 200 == 0 or i + 1 == steps:
            log(f"VAE step {i + 1}/{steps}: L1 {float(np.mean(jax.device_get(l1s[-200:]))):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
        if snapshot is not None and (i + 1) % 2000 == 0 and i + 1 < steps:
            nnx.update(vae, params)
            snapshot(vae, i + 1)
    nnx.update(vae, params)
    return vae


def with_latent_stats(vae, videos: np.ndarray):
    """``vae`` with per-channel mean / std of its posterior means on ``videos`` as its normalisation statistics."""
    import jax.numpy as jnp

    from director_jax.pipeline.sr import jitted_codec

    encode, _ = jitted_codec(vae)
    mean = np.concatenate([np.asarray(encode(jnp.asarray(v[None]))[0]) for v in videos])
    flat = mean.reshape(-1, mean.shape[-1]).astype(np.float64)
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(float(x) for x in flat.mean(0)),
                                     latents_std=tuple(float(x) for x in flat.std(0) + 1e-6))
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


def build_cache(task, vae, count: int, chunk: int = 8) -> dict[str, np.ndarray]:
    """Normalized latents of ``count`` SR examples (high-res and upsampled low-res, over the task's layout)."""
    import jax.numpy as jnp

    from director_jax.pipeline.gen import timeline_latents
    from director_jax.pipeline.sr import jitted_codec

    encode, _ = jitted_codec(vae)
    latents, lowres = [], []
    start = time.perf_counter()
    for first in range(0, count, chunk):
        batch = example_batch(task, range(first, min(first + chunk, count)))
        latents.append(np.asarray(timeline_latents(vae, jnp.asarray(batch["video"]), task.layout, encode=encode)))
        lowres.append(np.asarray(timeline_latents(vae, jnp.asarray(batch["upsampled"]), task.layout, encode=encode)))
        done = first + len(batch["index"])
        if done % (8 * chunk) == 0 or done == count:
            log(f"latent cache: {done}/{count} examples ({time.perf_counter() - start:.0f} s)")
    return {"latents": np.concatenate(latents), "lowres_latents": np.concatenate(lowres)}


def train_sr(cfg, cache: dict[str, np.ndarray], layout, steps: int):
    """The real train step (task ``sr``, precomputed latents) on random batches of the cache; returns the EMA model."""
    import jax
    from flax import nnx

    from director_jax.train.trainer import build_run, global_batch

    cfg = cfg.copy_and_resolve_references()
    cfg.train.latents = "precomputed"
    cfg.train.steps = steps
    run = build_run(cfg, devices=jax.devices()[:1])
    state = jax.jit(run.init, out_shardings=run.shardings)()
    rng = np.random.default_rng(int(cfg.seed))
    b, n = int(cfg.train.batch_size), len(cache["latents"])
    dropout = float(cfg.train.keyframe_dropout)
    start, losses = time.perf_counter(), []
    for i in range(steps):
        rows = rng.choice(n, b, replace=False)
        given = np.asarray(layout.given)[None] & (rng.random(b) >= dropout)[:, None]
        local = {"latents": cache["latents"][rows], "lowres_latents": cache["lowres_latents"][rows], "given": given}
        state, metrics = run.step_fn(state, run.frozen_state, global_batch(run, local))
        losses.append(metrics["loss"])
        if (i + 1) % 100 == 0 or i + 1 == steps:
            recent = float(np.mean(jax.device_get(losses[-100:])))
            log(f"SR step {i + 1}/{steps}: flow loss (mean of last 100) {recent:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    from director_jax.models.sr import DirectorSR

    params = state.ema if state.ema is not None else state.params
    model = nnx.merge(run.graphdef, jax.device_get(params))
    assert isinstance(model, DirectorSR)
    return model


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

    from director_jax.eval.lpips import LPIPS
    from director_jax.models.timeline import decode_timeline, encode_timeline
    from director_jax.pipeline.sr import jitted_codec, super_resolve

    lpips = LPIPS("alexnet")
    encode, decode = jitted_codec(vae)
    layout, scale, kf = task.layout, task.scale, keyframes_of(task)

    def round_trip(video: np.ndarray) -> np.ndarray:
        mean, _ = encode_timeline(vae, jnp.asarray(video), layout, encode=encode)
        return np.clip(np.asarray(decode_timeline(vae, mean, layout, decode=decode)), -1, 1)

    methods = ["bicubic (baseline)", "bicubic, VAE round trip (what SR starts from, decoded)",
               "ground truth, VAE round trip (ceiling)"]
    for s in sampler_steps:
        steps = f"{s} step{'s' * (s > 1)}"
        methods += [f"SR, no keyframes, {steps}", f"SR + keyframes {' and '.join(map(str, kf))}, {steps}"]
    out = {m: {"psnr": [], "ssim": [], "lpips": []} for m in methods}
    start = time.perf_counter()
    for first in range(0, num_clips, batch):
        ex = example_batch(task, range(first, min(first + batch, num_clips)))
        truth, lowres = ex["video"], ex["lowres"]
        results = {methods[0]: ex["upsampled"], methods[1]: round_trip(ex["upsampled"]), methods[2]: round_trip(truth)}
        keyframes = {k: truth[:, k] for k in kf}
        key = jax.random.key(first)
        for j, s in enumerate(sampler_steps):
            for with_kf in (False, True):
                video = super_resolve(sr, vae, lowres, keyframes if with_kf else None, scale=scale, layout=layout,
                                      steps=s, key=key)
                results[methods[3 + 2 * j + with_kf]] = video
        for m, video in results.items():
            out[m]["psnr"].append(frame_psnr(video, truth))
            out[m]["ssim"].append(frame_ssim(video, truth))
            out[m]["lpips"].append(frame_lpips(lpips, video, truth))
        log(f"evaluated {first + len(truth)}/{num_clips} held-out clips ({time.perf_counter() - start:.0f} s)")
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}


# ------------------------------------------------------------------------------------------------
# Report


def tables(results: dict[str, dict], keyframes: tuple[int, ...]) -> list[str]:
    """The metrics table and PSNR by distance to the nearest keyframe (Markdown lines)."""
    num_frames = next(iter(results.values()))["psnr"].shape[1]
    dist = distances(num_frames, keyframes)
    lines = ["| method | PSNR (dB) | PSNR, non-keyframe frames (dB) | SSIM | LPIPS |", "|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['psnr'].mean():.2f} | {r['psnr'][:, dist > 0].mean():.2f} | "
                     f"{r['ssim'].mean():.4f} | {r['lpips'].mean():.4f} |")
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
    parser.add_argument("--sr", help="a trained SR model (export_sr dir, e.g. WORKDIR/sr): skip SR training")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--cache", type=int, default=400, help="training examples encoded into the latent cache")
    parser.add_argument("--sr-steps", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=24, help="held-out clips evaluated (multiple of 4)")
    parser.add_argument("--steps", default="1,4", help="sampler step budgets to evaluate")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budgets, numbers not meaningful")
    parser.add_argument("--write-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--only-vae", action="store_true", help="fit and write the VAE, then stop")
    parser.add_argument("--scale", type=int, help="SR factor (default: configs/sr_tiny.py's degradation.scales)")
    args = parser.parse_args()
    if args.quick:
        args.vae_steps, args.cache, args.sr_steps, args.heldout = 20, 16, 20, 4
    sampler_steps = [int(s) for s in args.steps.split(",")]

    from director_jax.configs_common import load_config
    from director_jax.convert.sr import export_sr, load_sr
    from director_jax.convert.vae import export_vae, load_vae
    from director_jax.train.tasks import SRTask

    timings = {}
    workdir = Path(args.workdir)
    cfg = load_config(REPO / "configs" / "sr_tiny.py")
    cfg.mesh.fsdp = 1
    if args.scale:
        cfg.degradation.scales = (args.scale,)
    t0 = time.perf_counter()
    if args.vae:
        vae_dir = Path(args.vae)
        log(f"VAE: {vae_dir}")
    else:
        log(f"fitting the tiny VAE: {args.vae_steps} steps on 32x32 crops")
        from director_jax.data.synthetic_loader import SyntheticClipsConfig, synthetic_clip

        stats_clips = SyntheticClipsConfig(num_movies=10**6, height=cfg.video.height, width=cfg.video.width,
                                           clip_frames=cfg.video.num_frames, seed=int(cfg.seed) + 79,
                                           shot_lengths=tuple(cfg.data.synthetic.shot_lengths))
        stats_videos = np.stack([synthetic_clip(i, stats_clips)["video"] for i in range(16)])

        def write_vae(vae, step=None):
            out = export_vae(with_latent_stats(vae, stats_videos), workdir / ("vae" if step is None else f"vae_{step}"))
            log(f"VAE written to {out}")
            return out

        vae_dir = write_vae(fit_vae(cfg, args.vae_steps, snapshot=write_vae))
        if args.only_vae:
            return
    timings["VAE fit"] = time.perf_counter() - t0
    cfg.vae.init_from = str(vae_dir)
    task = SRTask(cfg)
    vae = load_vae(vae_dir)

    t0 = time.perf_counter()
    if args.sr:
        sr = load_sr(args.sr)
        log(f"SR: {args.sr}")
    else:
        log(f"latent cache: {args.cache} examples ({task.describe()})")
        cache = build_cache(task, vae, args.cache)
        timings["latent cache"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log(f"training SR: {args.sr_steps} steps of batch {cfg.train.batch_size}")
        sr = train_sr(cfg, cache, task.layout, args.sr_steps)
        out = export_sr(sr, workdir / "sr")
        log(f"SR written to {out}")
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
        "`benchmarks/sr.py`: the tiny Director-SR (`configs/sr_tiny.py`: 2 layers of width 64) trained on the CPU on "
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
