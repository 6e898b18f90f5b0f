#!/usr/bin/env python
"""Where a compiled program spends its time on the CPU: XLA's own per-operation profile, as a table.

Runs one of the programs ``benchmarks/dit.py`` and ``benchmarks/vae.py`` time (random weights, no PyTorch)
under ``jax.profiler.trace``, reads the trace's XSpace back with JAX's profile reader, and sums the events of
XLA's CPU worker threads per operation (a fusion, a YNNPACK matmul, a copy). Each operation is matched to
its instruction in the optimised HLO for its shape, the kind of work in it and the JAX operation it came
from (the ``op_name`` of the fusion's root, else of its matmul). Threads run operations side by side, so the
per-thread times can add up to more than the wall time ("busy" below: thread time / wall time); a matmul that
YNNPACK spreads over several cores counts once, on the thread that started it.

    python benchmarks/profile_cpu.py dit                      # the DiT forward + backward at dit.py's defaults
    python benchmarks/profile_cpu.py dit --attention xla --xla-default    # as before issue 23's CPU work
    python benchmarks/profile_cpu.py vae-decode --top 15      # the Wan2.1 VAE decoder, 1x17x64x64
    python benchmarks/profile_cpu.py dit-forward --remat dots_saveable

Categories: ``matmul`` (a dot, alone or fused), ``copy/transpose`` (data movement only), ``softmax exp``,
``reduce``, ``elementwise`` (everything else, the fused loops).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOVES = {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
         "dynamic-update-slice", "concatenate", "pad", "constant", "tuple", "get-tuple-element"}
SKIP_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "while", "call", "conditional")


def parse_hlo(text: str) -> dict[str, tuple[str, str, collections.Counter, str]]:
    """instruction name -> (shape, opcode, opcodes of the computation it calls, op_name of that root)."""
    comps: dict[str, list[tuple[str, str]]] = {}
    instrs: dict[str, tuple[str, str, str | None, str]] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip())
            if m:
                current = comps.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s+(ROOT )?%?([\w.\-]+) = (\S+?\[[^\]]*\](?:\{[^}]*\})?|\([^)]*\)|\S+) ([\w\-]+)\((.*)", line)
        if not m or current is None:
            continue
        root, name, shape, op, rest = m.groups()
        source = re.search(r'op_name="([^"]*)"', rest)
        current.append((op, source.group(1) if source else "", bool(root)))
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        instrs[name] = (shape, op, calls.group(1) if calls else None, source.group(1) if source else "")
    table = {}
    for name, (shape, op, calls, source) in instrs.items():
        body = comps.get(calls, []) if calls else []
        ops = collections.Counter(o for o, _, _ in body)
        named = [(is_root, o == "dot", s) for o, s, is_root in body if s]  # the root's op_name, else a dot's
        root_source = max(named)[2] if named else source
        table[name] = (shape, op, ops, root_source)
    return table


def category(op: str, ops: collections.Counter) -> str:
    names = set(ops) | {op}
    if "dot" in names or "convolution" in names:
        return "matmul"
    if names - {"fusion"} <= MOVES:
        return "copy/transpose"
    if "exponential" in names:
        return "softmax exp"
    if "reduce" in names or "reduce-window" in names:
        return "reduce"
    return "elementwise"


def thread_times(trace_dir: str, calls: int) -> collections.Counter:
    """Per-operation time (ns per call) summed over XLA's CPU worker threads."""
    from jax._src.lib import _profile_data

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    per: collections.Counter = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA") or "PjRt" in line.name:
                continue
            for ev in line.events:
                if not ev.name.startswith(SKIP_EVENTS):
                    per[ev.name] += ev.duration_ns / calls
    return per


def build_program(args: argparse.Namespace):
    """(compiled function, its arguments) of the chosen target."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(0)
    if args.target.startswith("dit"):
        from director_jax.models.dit import WanDiT, WanDiTConfig

        cfg = WanDiTConfig(num_attention_heads=4, attention_head_dim=128, text_dim=4096, ffn_dim=2048, num_layers=4)
        model = WanDiT(cfg, rngs=nnx.Rngs(0), attention_impl=args.attention, remat_policy=args.remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        latents = jnp.asarray(rng.standard_normal((1, 4, 32, 32, 16)), jnp.float32)
        text = jnp.asarray(rng.standard_normal((1, 512, 4096)), jnp.float32)
        timestep = jnp.asarray([500.0])

        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(latents, timestep, text)))

        fn = jax.value_and_grad(loss) if args.target == "dit" else loss
        return jax.jit(fn).lower(params).compile(), (params,)
    from director_jax.models.vae import WanVAE, WanVAEConfig

    graphdef, state = nnx.split(WanVAE(WanVAEConfig(), rngs=nnx.Rngs(0)))
    if args.target == "vae-encode":
        x = jnp.asarray(rng.uniform(-1, 1, (1, 17, 64, 64, 3)), jnp.float32)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    else:
        x = jnp.asarray(rng.standard_normal((1, 5, 8, 8, 16)), jnp.float32)
        fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    return fn.lower(state, x).compile(), (state, x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=("dit", "dit-forward", "vae-encode", "vae-decode"))
    p.add_argument("--attention", default="auto", help="the DiT's attention_impl [default auto]")
    p.add_argument("--remat", default="none", help="the DiT's remat policy [default none]")
    p.add_argument("--xla-default", action="store_true", help="without director_jax/xla_flags.py's CPU flags")
    p.add_argument("--calls", type=int, default=3, help="profiled calls (after 2 untimed ones) [default 3]")
    p.add_argument("--top", type=int, default=25, help="operations listed [default 25]")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    if not args.xla_default:
        from director_jax.xla_flags import apply_cpu_flags

        apply_cpu_flags()
    import jax

    compiled, inputs = build_program(args)
    for _ in range(2):
        jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    wall = sorted(times)[len(times) // 2]
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.calls):
                jax.block_until_ready(compiled(*inputs))
        per = thread_times(trace_dir, args.calls)
    hlo = parse_hlo(compiled.as_text())
    total = sum(per.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ns in per.items():
        shape, op, ops, _ = hlo.get(name, ("?", "?", collections.Counter(), ""))
        by_kind[category(op, ops)] += ns
    print(f"### `python benchmarks/profile_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print(f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '') or '(none)'}`; median wall time of {args.calls} calls: "
          f"{wall * 1e3:.0f} ms; thread time {total / 1e6:.0f} ms (busy {total / 1e9 / wall:.2f} of "
          f"{os.cpu_count()} cores)\n")
    print("| category | thread ms per call | share |\n|---|---|---|")
    for kind, ns in by_kind.most_common():
        print(f"| {kind} | {ns / 1e6:.1f} | {100 * ns / total:.1f}% |")
    print("\n| operation | ms per call | category | shape | from (JAX op) |\n|---|---|---|---|---|")
    for name, ns in per.most_common(args.top):
        shape, op, ops, source = hlo.get(name, ("?", "?", collections.Counter(), ""))
        print(f"| `{name}` | {ns / 1e6:.2f} | {category(op, ops)} | `{shape.split('{')[0]}` | "
              f"{source.split('/')[-1] if source else '-'} ({'backward' if 'transpose(' in source else 'forward'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
