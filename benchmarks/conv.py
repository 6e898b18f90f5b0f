"""Why the causal 3D conv is a sum of per-tap 2D convs: both formulations timed in one run.

    python benchmarks/conv.py [--batch 4 --frames 7 --size 32 --channels 32 --repeats 5]

Baseline: XLA's native 3D convolution (``lax.conv_general_dilated`` with NDHWC / DHWIO). The
candidate is what ``director_jax.models.vae_blocks.CausalConv3d`` runs: for each of the kt time taps, a 2D
convolution of the shifted frames, summed. Prints forward and forward+backward times, GFLOP/s and
the max abs difference between the two.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def conv3d(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def taps2d(x, k):
    b, t, h, w, c = x.shape
    t_out = t - k.shape[0] + 1
    y = 0
    for i in range(k.shape[0]):
        frames = x[:, i:i + t_out].reshape(b * t_out, h, w, c)
        y = y + jax.lax.conv_general_dilated(frames, k[i], (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t_out, h, w, -1)


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=7)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b, t, s, c = args.batch, args.frames, args.size, args.channels
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, s, s, c), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 3, c, c), np.float32))
    flops = 2 * b * (t - 2) * s * s * 27 * c * c
    reference = jax.jit(conv3d)(x, k)
    print(f"# causal conv 3x3x3, x {x.shape}, {jax.default_backend()} ({platform.processor() or platform.machine()})")
    print("| formulation | pass | time (ms) | GFLOP/s | max abs diff vs conv3d |")
    print("|---|---|---|---|---|")
    for name, fn in (("conv3d (baseline)", conv3d), ("2D taps (ours)", taps2d)):
        diff = float(jnp.abs(jax.jit(fn)(x, k) - reference).max())
        fwd = best_time(jax.jit(fn), x, k, repeats=args.repeats)
        grad = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
        both = best_time(grad, x, k, repeats=args.repeats)
        print(f"| {name} | forward | {fwd * 1e3:.1f} | {flops / fwd / 1e9:.1f} | {diff:.1e} |")
        print(f"| {name} | forward+backward | {both * 1e3:.1f} | {3 * flops / both / 1e9:.1f} | |")


if __name__ == "__main__":
    main()
