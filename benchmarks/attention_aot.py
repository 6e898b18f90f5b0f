#!/usr/bin/env python
"""Per-chip memory of each attention kernel on a TPU, compiled from this machine (no TPU needed).

Every implementation that runs on a TPU (``pallas``: ours; ``splash``: JAX's; ``tokamax``: tokamax's splash
fork; ``blockwise`` / ``rows`` / ``xla`` in plain jnp) is AOT-compiled by libtpu for one chip of
``--topology``, forward and forward + backward (the gradients of q, k and v), at each sequence length,
self-attention of (B, S, H, D) ``--dtype`` arrays. The table gives XLA's ``memory_analysis()`` temporaries
(what the kernel needs beyond its inputs and outputs) and the FLOPs the compiled program declares (a Pallas
kernel counts only what its ``CostEstimate`` says: JAX's splash declares none), against ``pallas`` as the
named baseline. Compile only: no speed, which needs the chip (``benchmarks/attention.py`` on a TPU VM).

    python benchmarks/attention_aot.py                                  # v5p, S = 4k, 16k, 32k, H = 16, bf16
    python benchmarks/attention_aot.py --seq 8190,18900 --heads 3       # a 1.3B / 14B Ulysses shard's shapes

Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench_common import REPO, machine_description, make_log

log = make_log("attn-aot")
TPU_IMPLS = ("pallas", "splash", "tokamax", "blockwise", "rows", "xla")


def compile_one(impl: str, shape: tuple[int, ...], dtype, mesh, backward: bool) -> tuple[int, float]:
    """(temporary bytes, declared FLOPs) of one compiled forward or forward + backward."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from director_jax.kernels.attention import attention

    arg = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
    if backward:
        fn = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl).astype(jnp.float32)), argnums=(0, 1, 2))
    else:
        def fn(q, k, v):
            return attention(q, k, v, impl=impl)
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(arg, arg, arg).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled.memory_analysis().temp_size_in_bytes, float((cost or {}).get("flops", 0.0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x1", help="TPU topology; one of its chips is compiled for")
    p.add_argument("--seq", default="4096,16384,32768", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--impls", default=",".join(TPU_IMPLS))
    p.add_argument("--max-materialized-gib", type=float, default=8.0, help="skip xla above this many GiB of scores")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp

    from director_jax.train.aot import topology_devices

    impls = [x for x in args.impls.split(",") if x]
    if set(impls) - set(TPU_IMPLS):
        p.error(f"unknown implementations {sorted(set(impls) - set(TPU_IMPLS))}; choose from {TPU_IMPLS}")
    device = topology_devices(args.topology)[0]
    mesh = jax.sharding.Mesh([device], ("data",))
    b, h, d, dtype = args.batch, args.heads, args.head_dim, jnp.dtype(args.dtype)
    seqs = [int(x) for x in args.seq.split(",")]
    log(f"{args.topology}: one {device.device_kind}; B={b} H={h} D={d} {args.dtype}; S in {seqs}")

    mib = 2.0**20
    lines = [f"One chip of {args.topology} ({device.device_kind}); B={b}, H={h}, D={d}, {args.dtype}; "
             "temporaries from XLA's memory_analysis(); baseline `pallas`.", "",
             "| S | impl | fwd temp MiB | fwd+bwd temp MiB | fwd+bwd vs pallas | declared fwd+bwd TFLOP |",
             "|---:|---|---:|---:|---:|---:|"]
    for s in seqs:
        shape = (b, s, h, d)
        base = None
        for impl in impls:
            scores_gib = b * h * s * s * 4 / 2**30
            if impl == "xla" and scores_gib > args.max_materialized_gib:
                lines.append(f"| {s} | `{impl}` | skipped: scores would be {scores_gib:,.0f} GiB | | | |")
                continue
            try:
                fwd, _ = compile_one(impl, shape, dtype, mesh, backward=False)
                bwd, flops = compile_one(impl, shape, dtype, mesh, backward=True)
            except Exception as e:  # a kernel that does not compile is a row, not the end of the run
                lines.append(f"| {s} | `{impl}` | failed: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | |")
                log(f"S={s} {impl}: failed ({type(e).__name__})")
                continue
            base = bwd if impl == "pallas" else base
            ratio = f"{bwd / base:.2f}x" if base else "-"
            lines.append(f"| {s} | `{impl}` | {fwd / mib:,.1f} | {bwd / mib:,.1f} | {ratio} | {flops / 1e12:.2f} |")
            log(f"S={s} {impl}: fwd {fwd / mib:,.1f} MiB, fwd+bwd {bwd / mib:,.1f} MiB, {flops / 1e12:.2f} TFLOP")
    print("\n".join([*machine_description("benchmarks/attention_aot.py", ("director_jax", "benchmarks")), "",
                     *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
