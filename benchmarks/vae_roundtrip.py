"""Single-frame round-trip PSNR of a frozen VAE: how well keyframes can come back through it.

    python benchmarks/vae_roundtrip.py runs/vae                     # a trainer run, step dir, or diffusers dir
    python benchmarks/vae_roundtrip.py runs/vae --stills heldout    # and each PNG there, resized as generate does

Keyframes enter Director-Gen as single-frame latents, so a keyframe's PSNR in ``generate``'s output is
this round trip. Held-out frames: every 6th frame of 4 synthetic movies (seeds 7000000..7000003, two
24-frame shots, up to 3 shapes) at the size of ``configs/gen_tiny.py``. Prints mean and worst PSNR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from director_jax.build import frozen_vae
from director_jax.configs_common import load_config
from director_jax.data.synthetic import make_movie
from director_jax.pipeline.media import read_image, to_float

REPO = Path(__file__).resolve().parents[1]


def psnr(vae, frames: np.ndarray) -> np.ndarray:
    """PSNR (dB, frames in [-1, 1]) of each frame (N, H, W, 3) encoded alone and decoded."""
    x = jnp.asarray(frames[:, None], jnp.float32)
    out = np.clip(np.asarray(vae.decode(vae.encode(x)[0])), -1, 1)
    return 10 * np.log10(4.0 / np.mean((out - np.asarray(x)) ** 2, axis=(1, 2, 3, 4)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", help="vae.init_from: a VAE trainer run, a step directory or a diffusers directory")
    parser.add_argument("--stills", help="a folder of PNG keyframes, resized to the model size as generate does")
    args = parser.parse_args(argv)
    cfg = load_config(REPO / "configs" / "gen_tiny.py")
    cfg.vae.init_from = args.vae
    vae = frozen_vae(cfg)
    h, w = int(cfg.video.height), int(cfg.video.width)
    frames = np.concatenate([make_movie(seed, [24, 24], h, w, 8.0).frames[::6] for seed in range(7_000_000, 7_000_004)])
    p = psnr(vae, frames)
    print(f"held-out synthetic frames ({len(p)}): mean {p.mean():.2f} dB, worst {p.min():.2f} dB")
    for path in sorted(Path(args.stills).glob("*.png")) if args.stills else []:
        print(f"{path}: {psnr(vae, to_float(read_image(str(path), h, w, resize=True))[None])[0]:.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1:])
