"""The demo's Director-SR on the vsr suite: a benchmark-layout folder of held-out synthetic movies, vs bicubic.

    python benchmarks/vsr_demo.py --workdir runs/demo                 # after bash scripts/demo.sh
    python benchmarks/vsr_demo.py --workdir runs/demo --sequences 4   # faster

Writes ``OUT/data/GT/seq_NN/frame_NNN.png`` (the UDM10 / Vid4 layout: HR frames only, so the suite makes
the LR frames by the BI degradation, bicubic by the SR config's scale) from held-out synthetic movies
(seeds 9_500_000 + i, one shape per shot, a cut in each), then runs ``python -m director_jax.evaluate
--suite vsr``'s code on them with the demo's SR (``WORKDIR/sr``): without anchors, anchored on the
first and last HR frame of each window, and the bicubic baseline in the same run. Prints a markdown
table (stdout) with one more row: the HR windows through the SR run's own VAE (encode, decode), the
ceiling of any SR decoded by it; the full results are in ``OUT/eval/metrics.json`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import REPO, machine_description, make_log
from PIL import Image

from director_jax.build import load_frozen_vae
from director_jax.configs_common import load_config
from director_jax.data.synthetic import make_movie
from director_jax.eval.vsr import frame_metrics, mean_frames, mean_sequences
from director_jax.eval.vsr_run import check_vsr_evaluation, run_vsr_evaluation
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.request import run_config

log = make_log("vsr-demo")
FIRST_SEED = 9_500_000


def write_sequences(root: Path, count: int, size: int, shot_lengths: tuple[int, int]) -> None:
    """``count`` movies as ``root/GT/seq_NN/frame_NNN.png`` (uint8 RGB)."""
    for i in range(count):
        movie = make_movie(FIRST_SEED + i, list(shot_lengths), size, size, max_shapes=1)
        seq = root / "GT" / f"seq_{i:02d}"
        seq.mkdir(parents=True, exist_ok=True)
        pixels = np.round((movie.frames + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        for t, frame in enumerate(pixels):
            Image.fromarray(frame).save(seq / f"frame_{t:03d}.png")


def vae_floor(root: Path, sr_run: Path, frames: int, crop_border: int) -> dict[str, float]:
    """The HR windows through the SR run's frozen VAE (encode, decode): what any SR decoded by it can reach."""
    sr_cfg = run_config(str(sr_run), None)
    vae = load_frozen_vae(sr_cfg, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    encode, decode = jitted_codec(vae)
    rows = []
    for seq in sorted((root / "GT").iterdir()):
        truth = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(seq.glob("*.png"))])
        per_frame: dict[str, list] = {}
        for lo in range(0, len(truth) - frames + 1, frames):
            clip = truth[lo:lo + frames].astype(np.float32) / 127.5 - 1.0
            mean, _ = encode(jnp.asarray(clip)[None])
            video = np.asarray(decode(mean))[0]
            pixels = np.round((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8)
            for k, v in frame_metrics(pixels, truth[lo:lo + frames], crop_border=crop_border).items():
                per_frame.setdefault(k, []).extend(v.tolist())
        rows.append(mean_frames({k: np.asarray(v) for k, v in per_frame.items()}))
    return mean_sequences(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="the demo's workdir (its sr/ run is evaluated)")
    parser.add_argument("--out", default=None, help="default: WORKDIR/vsr_bench")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="HR frame size (the demo's SR makes 64x64)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "vsr_bench"
    shutil.rmtree(out, ignore_errors=True)
    write_sequences(out / "data", args.sequences, args.size, (12, 22))
    cfg = load_config(REPO / "configs" / "eval_vsr.py")
    cfg.data = str(out / "data")
    check_vsr_evaluation(cfg, str(out / "eval"), ckpt=str(workdir / "sr"), baseline=None, step=None)
    t0 = time.time()
    results = run_vsr_evaluation(cfg, out / "eval", ckpt=str(workdir / "sr"), progress=False)
    seconds = time.time() - t0
    windows = len(results["windows"])
    print(f"## The demo's Director-SR on the vsr suite ({args.sequences} held-out synthetic sequences of 34 frames "
          f"at {args.size}x{args.size}, {windows} windows; LR by the BI degradation)\n")
    print("\n".join(machine_description("benchmarks/vsr_demo.py", ("director_jax", "benchmarks"))))
    print(f"- Evaluation time: {seconds:.0f} s\n")
    print("| method | PSNR-Y (dB) | PSNR-RGB (dB) | SSIM-Y | LPIPS | frames |")
    print("|---|---|---|---|---|---|")
    settings = results["settings"]
    floor = vae_floor(out / "data", workdir / "sr", int(settings["frames"]), int(settings["crop_border"]))
    for method, m in [*results["aggregate"].items(), ("HR through the SR's VAE (its ceiling)", floor)]:
        print(f"| {method} | {m['psnr_y']:.2f} | {m['psnr_rgb']:.2f} | {m['ssim_y']:.4f} | {m['lpips']:.4f} | "
              f"{m.get('frames', '')} |")
    non_anchor = results.get("aggregate_non_anchor") or {}
    if non_anchor:
        print("\nOn the non-anchor frames only (every method):\n")
        print("| method | PSNR-Y (dB) | SSIM-Y | LPIPS |")
        print("|---|---|---|---|")
        for method, m in non_anchor.items():
            print(f"| {method} | {m['psnr_y']:.2f} | {m['ssim_y']:.4f} | {m['lpips']:.4f} |")
    log(f"done in {seconds:.0f} s: {out / 'eval' / 'report.html'}")


if __name__ == "__main__":
    main()
