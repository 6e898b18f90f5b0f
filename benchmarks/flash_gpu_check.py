#!/usr/bin/env python
"""GPU check of this project's Pallas/Triton flash kernel (``director_jax/kernels/flash_gpu.py``).

1. Correctness at 4k tokens, bf16, head_dim 128: forward and gradients (through ``flash.flash_attention``)
   against ``xla_attention`` / ``jax.grad`` of it on the same inputs upcast to float32, with one batch
   row padded (``kv_len`` < L). cuDNN is checked the same way for comparison.
2. Speed, bf16, head_dim 128, B = 1, 16 heads, S = L in (4096, 16384, 32768): forward and backward
   TFLOP/s of our kernel and of cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``).
   FLOPs: forward 4 * B * H * S * L * D (QK^T and PV), backward 2.5x that (FlashAttention-2's count:
   five matmuls, one of them the recomputed QK^T). Backward time = time(forward + backward) - time(forward),
   both jitted, median of ``--repeats`` calls after warm-up.

Run on an H100/H200 from the repository root (about 1-2 minutes, mostly compiles)::

    python benchmarks/flash_gpu_check.py
    python benchmarks/flash_gpu_check.py --smoke   # any machine: tiny sizes, interpret mode, no cuDNN

Exits non-zero if the kernel's errors exceed the tolerances.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from director_jax.kernels import dispatch, flash, flash_gpu
from director_jax.kernels.flash import BlockSizes

FWD_TOL = 1e-2   # max |error| / max |reference|, bf16 output
GRAD_TOL = 3e-2  # the same for dq, dk, dv (bf16 gradients)


def _inputs(batch: int, seq: int, heads: int, dim: int, seed: int = 0) -> list[jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(key, (batch, seq, heads, dim), jnp.bfloat16) for key in keys]


def _flash(interpret: bool, blocks: BlockSizes) -> Callable[..., jax.Array]:
    def attend(q, k, v, kv_len=None):
        return flash.flash_attention(flash_gpu.forward, flash_gpu.backward, q, k, v, kv_len=kv_len,
                                     block_sizes=blocks, interpret=interpret)
    return attend


def _value_and_grads(attend: Callable[..., jax.Array], q, k, v, do, kv_len):
    def loss(q, k, v):
        o = attend(q, k, v, kv_len=kv_len)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def _rel_err(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def check(attend: Callable[..., jax.Array], name: str, seq: int, heads: int, dim: int) -> bool:
    q, k, v, do = _inputs(2, seq, heads, dim)
    kv_len = jnp.array([seq, seq // 3 + 5], jnp.int32)
    want_o, want_g = _value_and_grads(dispatch.xla_attention, *(x.astype(jnp.float32) for x in (q, k, v, do)),
                                      kv_len)
    o, grads = _value_and_grads(attend, q, k, v, do, kv_len)
    errors = {"o": _rel_err(o, want_o)}
    errors |= {n: _rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, want_g, strict=True)}
    nan = any(bool(jnp.isnan(x).any()) for x in (o, *grads))
    ok = not nan and errors["o"] <= FWD_TOL and all(errors[n] <= GRAD_TOL for n in ("dq", "dk", "dv"))
    shown = ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
    print(f"check {name:6s} S={seq} H={heads} D={dim} bf16, kv_len {kv_len.tolist()}: max|err|/max|ref| {shown}"
          f"{' NaN!' if nan else ''} -> {'ok' if ok else 'FAIL'} (tol o {FWD_TOL}, grads {GRAD_TOL})")
    return ok


def _time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(attend: Callable[..., jax.Array], name: str, seq: int, heads: int, dim: int, warmup: int,
          repeats: int) -> None:
    q, k, v, do = _inputs(1, seq, heads, dim, seed=1)
    fwd = jax.jit(lambda q, k, v: attend(q, k, v))
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * do), argnums=(0, 1, 2)))
    t_fwd = _time(lambda: fwd(q, k, v), warmup, repeats)
    t_all = _time(lambda: fwd_bwd(q, k, v), warmup, repeats)
    t_bwd = max(t_all - t_fwd, 1e-9)
    flops = 4.0 * heads * seq * seq * dim
    print(f"speed  {name:6s} S={seq:6d} H={heads} D={dim}: "
          f"fwd {t_fwd * 1e3:8.2f} ms {flops / t_fwd / 1e12:6.1f} TFLOP/s"
          f" | bwd {t_bwd * 1e3:8.2f} ms {2.5 * flops / t_bwd / 1e12:6.1f} TFLOP/s"
          f" | fwd+bwd {3.5 * flops / t_all / 1e12:6.1f} TFLOP/s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode, no cuDNN (any machine)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--block-sizes", type=int, nargs=4, default=None, metavar=("Q", "KV", "Q_BWD", "KV_BWD"),
                        help="default: flash.default_block_sizes() for this device")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if args.smoke:
        blocks = BlockSizes(*(args.block_sizes or (64, 64, 64, 64)))
        check_seq, seqs, heads, dim, warmup, repeats = 200, (256,), 2, 64, 1, 1
    else:
        if jax.default_backend() != "gpu":
            print("No GPU: run with --smoke for a CPU run of the script itself.", file=sys.stderr)
            return 2
        blocks = BlockSizes(*args.block_sizes) if args.block_sizes else flash.default_block_sizes()
        check_seq, seqs, heads, dim, warmup, repeats = 4096, (4096, 16384, 32768), args.heads, 128, 2, args.repeats
    print(f"flash_gpu block sizes: {blocks}")
    impls = {"pallas": _flash(args.smoke, blocks)}
    if not args.smoke:
        impls["cudnn"] = dispatch.cudnn_attention

    ok = check(impls["pallas"], "pallas", check_seq, 4 if not args.smoke else 2, dim)
    if "cudnn" in impls:
        check(impls["cudnn"], "cudnn", check_seq, 4, dim)
    for seq in seqs:
        for name, attend in impls.items():
            speed(attend, name, seq, heads, dim, warmup, repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
