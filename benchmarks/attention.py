#!/usr/bin/env python
"""Attention benchmark: every implementation of ``director_jax.kernels.attention`` in one run.

For each sequence length S (self-attention, B x S x H x D, bf16 by default) and each implementation
the backend can run, it reports forward and forward + backward time and TFLOP/s, counting
``4 * B * S^2 * H * D`` FLOPs per forward and 2.5x that for the backward (the FlashAttention
convention: 5 matmuls of the backward against 2 of the forward). The named baseline of the run is
the vendor kernel of the backend: ``cudnn`` on GPU, ``splash`` on TPU, ``xla`` on the CPU; the last
column is each row's forward speed relative to it at the same length.

Before timing, an agreement pass runs every implementation at a small size (``--check-seq`` tokens,
float32, two examples, the second with a quarter of its keys masked as padding) against the ``xla``
reference: forward output and the gradients of q, k and v, as max abs differences in a table, so a fast
but wrong kernel shows. On the CPU the Pallas kernels (``pallas``: this project's; ``splash``: JAX's;
``tokamax``: the tokamax library's splash fork) run there in interpret mode: agreement, not speed.

``tokamax`` is DeepMind's kernel library (pinned in ``requirements-test.txt``): its splash fork on
TPU, its Mosaic GPU / Triton flash attention on GPU (``director_jax/kernels/splash.py``).

``torch`` is PyTorch's ``scaled_dot_product_attention`` on the CPU (its fused flash kernel), in the
same process, (B, H, S, D) layout: the reference a CPU user compares against. Skipped, with the reason
in the table: ``xla`` where the score matrix would exceed ``--max-materialized-gib`` per call,
``pallas`` / ``splash`` / ``tokamax`` on the CPU (interpret mode is a correctness tool, not a speed), ``cudnn`` off
GPU, ``torch`` off the CPU or without torch installed. JAX runs with the project's CPU compiler flags
(``director_jax/xla_flags.py``) unless ``--xla-default``.

    python benchmarks/attention.py                                  # S = 4k, 16k, 32k, D = 128, bf16
    python benchmarks/attention.py --seq 4096 --heads 1 --impls xla,blockwise     # a quick CPU look
    python benchmarks/attention.py --seq 1024,4096 --heads 4 --dtype float32 --impls xla,rows,blockwise,torch
                                                      # the CPU's choice for the DiT benchmark's sizes
    python benchmarks/attention.py --write-results                  # also into RESULTS.md (## Attention)

Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_common import REPO, machine_description, make_log

log = make_log("attn-bench")
SECTION = "## Attention"
BASELINE = {"gpu": "cudnn", "tpu": "splash", "cpu": "xla"}
ALL_IMPLS = ("xla", "rows", "blockwise", "pallas", "splash", "tokamax", "cudnn", "torch")
INTERPRETED_ON_CPU = ("pallas", "splash", "tokamax")


def skip_reason(impl: str, backend: str, b: int, s: int, h: int, max_gib: float) -> str | None:
    if impl == "cudnn" and backend != "gpu":
        return "GPU only"
    if impl == "splash" and backend == "gpu":
        return "TPU only"
    if impl in INTERPRETED_ON_CPU and backend == "cpu":
        return "interpret mode on CPU: not a speed"
    if impl == "tokamax" and importlib.util.find_spec("tokamax") is None:
        return "tokamax not installed"
    if impl == "torch" and (backend != "cpu" or importlib.util.find_spec("torch") is None):
        return "CPU only, with torch installed"
    if impl == "xla":
        gib = b * h * s * s * 4 / 2**30
        if gib > max_gib:
            return f"scores would be {gib:,.0f} GiB"
    return None


def timed(fn: Callable[[], object], warmup: int, repeats: int, block: bool = True) -> float:
    import jax

    wait = jax.block_until_ready if block else (lambda x: x)
    for _ in range(warmup):
        wait(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wait(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_torch(row: dict, arrays: tuple, args: argparse.Namespace, fwd_flops: float) -> None:
    """PyTorch's CPU scaled_dot_product_attention, timed like ``measure``."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    q, k, v, do = (torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, args.dtype)).transpose(1, 2)
                   .contiguous() for x in arrays)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def bwd():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad((out.float() * do.float()).sum(), (q, k, v))

    row["fwd"] = timed(fwd, args.warmup, args.repeats, block=False)
    row["fwd_tflops"] = fwd_flops / row["fwd"] / 1e12
    if not args.no_backward:
        row["bwd"] = timed(bwd, args.warmup, args.repeats, block=False)
        row["fb_tflops"] = 3.5 * fwd_flops / row["bwd"] / 1e12


def measure(row: dict, impl: str, arrays: tuple, args: argparse.Namespace, fwd_flops: float) -> None:
    """Times ``impl``'s forward (and gradient of <out, do>) into ``row``."""
    import jax
    import jax.numpy as jnp

    if impl == "torch":
        measure_torch(row, arrays, args, fwd_flops)
        return

    from director_jax.kernels.attention import attention

    q, k, v, do = arrays
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, impl=impl))
    bwd = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(attention(q, k, v, impl=impl).astype(jnp.float32),
                                                    do.astype(jnp.float32)), argnums=(0, 1, 2)))
    row["fwd"] = timed(lambda: fwd(q, k, v), args.warmup, args.repeats)
    row["fwd_tflops"] = fwd_flops / row["fwd"] / 1e12
    if not args.no_backward:
        row["bwd"] = timed(lambda: bwd(q, k, v), args.warmup, args.repeats)
        row["fb_tflops"] = 3.5 * fwd_flops / row["bwd"] / 1e12


def agreement_reason(impl: str, backend: str) -> str | None:
    if impl == "cudnn" and backend != "gpu":
        return "GPU only"
    if impl == "splash" and backend == "gpu":
        return "TPU only"
    if impl == "tokamax" and importlib.util.find_spec("tokamax") is None:
        return "tokamax not installed"
    if impl == "torch" and importlib.util.find_spec("torch") is None:
        return "torch not installed"
    return None


def torch_output_and_grads(q: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray,
                           kv_len: np.ndarray) -> list[np.ndarray]:
    """PyTorch SDPA's output and <out, w>'s q / k / v gradients, keys past ``kv_len`` masked, (B, S, H, D)."""
    import torch

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    mask = torch.from_numpy(np.arange(k.shape[1])[None, :] < kv_len[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    grads = torch.autograd.grad((out * torch.from_numpy(w).transpose(1, 2)).sum(), (tq, tk, tv))
    return [x.detach().transpose(1, 2).numpy() for x in (out, *grads)]


def agreement(impls: list[str], backend: str, seq: int, head_dim: int) -> list[str]:
    """Forward output and q / k / v gradients of each implementation against ``xla``, float32, one example of
    two with a quarter of its keys padding; a Markdown table (max abs differences)."""
    import jax
    import jax.numpy as jnp

    from director_jax.kernels.attention import attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, (2, seq, 2, head_dim), jnp.float32) for key in keys)
    kv_len = jnp.array([seq, seq - seq // 4], jnp.int32)

    def output_and_grads(impl: str) -> list[np.ndarray]:
        if impl == "torch":
            return torch_output_and_grads(*(np.asarray(x) for x in (q, k, v, w, kv_len)))
        dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32  # cuDNN's flash kernel takes bf16 / f16 only

        def run(q, k, v):
            out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl=impl), q, k, v)
            return out, *pullback(w.astype(dtype))

        return [np.asarray(x.astype(jnp.float32)) for x in jax.jit(run)(*(x.astype(dtype) for x in (q, k, v)))]

    reference = output_and_grads("xla")
    lines = [f"Agreement with `xla` (float32, B=2, S={seq}, H=2, D={head_dim}, the second example's last "
             f"{seq // 4} keys masked): max abs difference of the output and of the q / k / v gradients.", "",
             "| impl | runs as | out | dq | dk | dv |", "|---|---|---:|---:|---:|---:|"]
    for impl in impls:
        if impl == "xla":
            continue
        mode = "interpret mode" if backend == "cpu" and impl in INTERPRETED_ON_CPU else \
            "PyTorch" if impl == "torch" else "bf16 inputs" if impl == "cudnn" else "compiled"
        reason = agreement_reason(impl, backend)
        if reason:
            lines.append(f"| `{impl}` | skipped: {reason} | | | | |")
            continue
        try:
            got = output_and_grads(impl)
        except Exception as e:  # a failing implementation is a row, not the end of the run
            lines.append(f"| `{impl}` | failed: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | | |")
            continue
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(got, reference, strict=True)]
        lines.append(f"| `{impl}` | {mode} | " + " | ".join(f"{x:.1e}" for x in diffs) + " |")
        log(f"agreement {impl}: " + ", ".join(f"{x:.1e}" for x in diffs))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="4096,16384,32768", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default: 16 on TPU/GPU, 1 on the CPU")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--impls", default=",".join(ALL_IMPLS))
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-materialized-gib", type=float, default=8.0)
    p.add_argument("--check-seq", type=int, default=256, help="tokens of the agreement pass (0: skip it)")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--results-file", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--xla-default", action="store_true", help="without director_jax/xla_flags.py's CPU flags")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from director_jax.cli import default_jax_platforms

    platforms = default_jax_platforms()  # as the commands choose: no libtpu probing without TPU chips
    if platforms and "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = platforms
        sys.modules["jax"].config.update("jax_platforms", platforms)  # imported with director_jax.cli
    if not args.xla_default:
        from director_jax.xla_flags import apply_cpu_flags

        apply_cpu_flags()  # before JAX's backend starts

    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    heads = args.heads or (1 if backend == "cpu" else 16)
    dtype = jnp.dtype(args.dtype)
    seqs = [int(x) for x in args.seq.split(",")]
    impls = [x for x in args.impls.split(",") if x]
    unknown = set(impls) - set(ALL_IMPLS)
    if unknown:
        p.error(f"unknown implementations {sorted(unknown)}; choose from {ALL_IMPLS}")
    baseline = BASELINE[backend] if BASELINE[backend] in impls else impls[0]
    b, d = args.batch, args.head_dim
    log(f"backend {backend} ({device}); B={b} H={heads} D={d} {args.dtype}; S in {seqs}; baseline {baseline}")

    checks = agreement(impls, backend, args.check_seq, d) if args.check_seq else []
    rows: list[dict] = []
    for s in seqs:
        keys = jax.random.split(jax.random.key(s), 4)
        q, k, v, do = (jax.random.normal(key, (b, s, heads, d), jnp.float32).astype(dtype) for key in keys)
        fwd_flops = 4.0 * b * s * s * heads * d
        for impl in impls:
            reason = skip_reason(impl, backend, b, s, heads, args.max_materialized_gib)
            row = {"impl": impl, "seq": s, "skip": reason}
            rows.append(row)
            if reason:
                log(f"S={s} {impl}: skipped ({reason})")
                continue
            try:
                measure(row, impl, (q, k, v, do), args, fwd_flops)
                log(f"S={s} {impl}: fwd {row['fwd'] * 1e3:.2f} ms = {row['fwd_tflops']:.3g} TFLOP/s"
                    + (f", fwd+bwd {row['bwd'] * 1e3:.2f} ms" if "bwd" in row else ""))
            except Exception as e:  # a failing implementation is a row, not the end of the run
                row["skip"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                log(f"S={s} {impl}: {row['skip']}")

    base = {r["seq"]: r.get("fwd") for r in rows if r["impl"] == baseline}
    lines = [f"Backend: {backend} ({device}); B={b}, H={heads}, D={d}, {args.dtype}; baseline `{baseline}`.", "",
             "| S | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd vs baseline |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["skip"]:
            lines.append(f"| {r['seq']} | `{r['impl']}` | skipped: {r['skip']} | | | | |")
            continue
        ratio = f"{base[r['seq']] / r['fwd']:.2f}x" if base.get(r["seq"]) else "-"
        fb = (f"{r['bwd'] * 1e3:.2f} | {r['fb_tflops']:.3g}" if "bwd" in r else "- | -")
        lines.append(f"| {r['seq']} | `{r['impl']}` | {r['fwd'] * 1e3:.2f} | {r['fwd_tflops']:.3g} | {fb} | {ratio} |")
    block = "\n".join([*machine_description("benchmarks/attention.py", ("director_jax", "benchmarks")), "", *lines,
                       "", *checks])
    print(block)
    if args.write_results:
        write_results(args.results_file, block, backend)
        log(f"wrote into {args.results_file} ({SECTION}, {backend})")
    return 0


def write_results(path: Path, block: str, backend: str) -> None:
    """Replaces this backend's block of the Attention section (other backends' blocks stay)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = f"<!-- attention-{backend} begin -->", f"<!-- attention-{backend} end -->"
    new = f"{begin}\n{block}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    elif SECTION in text:
        text = text.replace(SECTION, f"{SECTION}\n\n{new}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{new}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
