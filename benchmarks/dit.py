#!/usr/bin/env python
"""Wan DiT benchmark: this project's JAX WanDiT against diffusers' WanTransformer3DModel (PyTorch), same weights.

One mid-size Wan DiT (default: 4 heads x 128 = dim 512, 4 layers, FFN 2048, text_dim 4096 with 512 text
tokens as in Wan, a 1x4x32x32x16 latent -> 4*16*16 = 1024 video tokens, float32) is built in diffusers with
random weights; its state dict is loaded into the JAX model with ``director_jax.convert.load_transformer``.
Both then run, in this one process and one after the other:

* **forward**: JAX ``jax.jit`` of ``WanDiT.__call__`` (AOT ``lower().compile()``, compile time reported on
  its own); PyTorch ``model(...)`` under ``torch.no_grad()``;
* **forward + backward**: the gradient of ``mean(output ** 2)`` with respect to every parameter: JAX
  ``jax.jit(jax.value_and_grad(loss))``, once per remat policy (``none`` / ``full`` / ``dots_saveable`` by
  default); PyTorch ``loss.backward()`` (and once more with diffusers' gradient checkpointing, the
  counterpart of remat ``full``).

Before any timing the run checks that the two compute the same thing: max abs difference of the forward
outputs, of the losses and of every parameter's gradient (the JAX gradients exported to diffusers' names).

Timings: ``--warmup`` untimed calls, then the median (and best) of ``--repeats`` timed calls; JAX results
are ``block_until_ready``-ed. PyTorch runs with ``torch.set_num_threads(<usable cores>)``; XLA uses its
default CPU thread pool (all cores). Memory: XLA's ``compiled.memory_analysis()`` temp bytes (the scratch
the executable allocates besides arguments and outputs), and, on CPU, the peak RSS increase during one call
over the RSS just before it (the kernel's ``VmHWM``, reset through ``/proc/self/clear_refs``, after
``gc.collect()`` + ``malloc_trim``) -- the same measure for both frameworks.

Run from the repository root::

    python benchmarks/dit.py                    # defaults: dim 512, 4 layers, 1024 tokens, 5 timed calls
    python benchmarks/dit.py --quick            # tiny sizes, 1 timed call: smoke test in well under a minute
    python benchmarks/dit.py --write-results    # also put the tables into benchmarks/RESULTS.md (## DiT)
    python benchmarks/dit.py --dtype bfloat16   # bf16 compute (JAX dtype=bf16, torch autocast), f32 params
    python benchmarks/dit.py --attention xla --xla-default   # the configuration before issue 23's CPU work

JAX runs with the project's CPU compiler flags (``director_jax/xla_flags.py``, as every command does)
unless ``--xla-default``; the header names the XLA_FLAGS and the attention implementation used.

Progress goes to stderr, the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import (
    REPO,
    RSSMonitor,
    fmt_mib,
    fmt_s,
    machine_description,
    make_log,
    usable_cores,
)
from dit_sides import JaxSide, TorchSide, build_config, build_torch_model, make_inputs, model_flops

log = make_log("dit-bench")

DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## DiT"

# Defaults; --quick swaps in the second column. Explicit flags always win.
DEFAULTS = {
    "heads": (4, 2),
    "head_dim": (128, 32),
    "layers": (4, 2),
    "ffn_dim": (2048, 256),
    "text_dim": (4096, 256),
    "text_len": (512, 32),
    "frames": (4, 2),
    "height": (32, 16),
    "width": (32, 16),
    "repeats": (5, 1),
    "warmup": (1, 1),
}


# ------------------------------------------------------------------------------------------------
# Report


def med_best(r: dict | None) -> str:
    if not r or not r.get("times"):
        return "-"
    return f"{fmt_s(statistics.median(r['times']))} ({fmt_s(min(r['times']))})"


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not a.get("times") or not b.get("times"):
        return "-"
    return f"{statistics.median(a['times']) / statistics.median(b['times']):.2f}"


def grad_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """Max abs difference over all parameters' gradients, the largest per-tensor difference relative to that
    tensor's max |grad|, and the tensor it occurs in."""
    worst, worst_rel, worst_key = 0.0, 0.0, ""
    for k in sorted(a):
        d = float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
        scale = float(np.max(np.abs(b[k]))) or 1.0
        worst = max(worst, d)
        if d / scale > worst_rel:
            worst_rel, worst_key = d / scale, k
    return worst, worst_rel, worst_key


def report(args: argparse.Namespace, jx: dict, th: dict, agree: list[str], machine: list[str], wall: float
           ) -> list[str]:
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    dim = args.heads * args.head_dim
    title = "Wan DiT forward + backward: JAX vs diffusers PyTorch"
    if args.quick:
        title += " -- SMOKE TEST (--quick: tiny sizes, numbers not meaningful)"
    on_cpu = jx["backend"] == "cpu" and th["device"] == "cpu"
    mem_col = "peak RSS Δ fwd / fwd+bwd (MiB)" if on_cpu else "peak memory Δ fwd / fwd+bwd (MiB)"
    lines = [
        f"### {title}",
        "",
        *machine,
        f"- Model: WanDiTConfig(heads {args.heads} x head_dim {args.head_dim} = dim {dim}, {args.layers} layers, "
        f"ffn {args.ffn_dim}, text_dim {args.text_dim}, freq_dim 256, patch (1, 2, 2), 16 -> 16 channels), "
        f"{jx['params'] / 1e6:.1f}M parameters, random weights (seed {args.seed}), {args.dtype}"
        + (" compute with float32 parameters (JAX dtype=bf16; torch.autocast)" if args.dtype == "bfloat16" else "")
        + f"; JAX attention_impl `{args.attention}`",
        f"- Inputs: latents {args.batch}x{args.frames}x{args.height}x{args.width}x16 (BxFxHxWxC) -> {tokens} video "
        f"tokens per sample; text {args.batch}x{args.text_len}x{args.text_dim}; one timestep per sample; loss = "
        "mean(output²), gradients w.r.t. every parameter",
        f"- {args.repeats} timed call(s) after {args.warmup} warm-up call(s); JAX on {jx['devices']}, PyTorch on "
        f"{th['device']} with torch.set_num_threads({th['threads']})",
        "",
        f"| Variant | compile (s) | forward median (best) (s) | fwd+bwd median (best) (s) | JAX / PyTorch "
        f"forward | JAX / PyTorch fwd+bwd | XLA temp fwd / fwd+bwd (MiB) | {mem_col} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t_eager = th.get("eager")
    for i, policy in enumerate(args.policies):
        p = jx["policies"].get(policy, {})
        name = f"JAX jit, remat `{policy}`"
        if "error" in p:
            lines.append(f"| {name} | failed: {p['error']} | | | | | | |")
            continue
        fwd = jx["fwd"] if i == 0 else None
        compile_s = (f"fwd {fmt_s(jx['fwd_compile_s'])} + fwd+bwd {fmt_s(p['compile_s'])}" if i == 0
                     else f"fwd+bwd {fmt_s(p['compile_s'])}")
        temp_f = fmt_mib(jx["fwd_xla"]["temp"]) if i == 0 else "-"
        peak_f = fmt_mib(jx["fwd"]["peak_rss"]) if i == 0 else "-"
        lines.append(f"| {name} | {compile_s} | {med_best(fwd)} | {med_best(p)} | {ratio(fwd, th['fwd'])} | "
                     f"**{ratio(p, t_eager)}** | {temp_f} / {fmt_mib(p['xla']['temp'])} | "
                     f"{peak_f} / {fmt_mib(p['peak_rss'])} |")
    lines.append(f"| diffusers PyTorch (eager; baseline) | first calls: fwd {fmt_s(th['fwd']['first_s'])}, fwd+bwd "
                 f"{fmt_s(t_eager['first_s'])} | {med_best(th['fwd'])} | {med_best(t_eager)} | 1 | 1 | n/a | "
                 f"{fmt_mib(th['fwd']['peak_rss'])} / {fmt_mib(t_eager['peak_rss'])} |")
    if th.get("grad_ckpt"):
        g = th["grad_ckpt"]
        lines.append(f"| diffusers PyTorch, gradient checkpointing | first call {fmt_s(g['first_s'])} | - | "
                     f"{med_best(g)} | - | {ratio(g, t_eager)} (vs eager) | n/a | - / {fmt_mib(g['peak_rss'])} |")

    flops_f = args.batch * model_flops(build_config(args), tokens, args.text_len)
    flops_b = 3 * flops_f
    lines += [""]
    if th["fwd"]["times"]:
        rate = [f"forward: JAX {flops_f / statistics.median(jx['fwd']['times']) / 1e9:.0f}, PyTorch "
                f"{flops_f / statistics.median(th['fwd']['times']) / 1e9:.0f}"]
        if "none" in jx["policies"] and "times" in jx["policies"]["none"] and t_eager:
            t_none = statistics.median(jx["policies"]["none"]["times"])
            rate.append(f"fwd+bwd (remat none): JAX {flops_b / t_none / 1e9:.0f}, PyTorch "
                        f"{flops_b / statistics.median(t_eager['times']) / 1e9:.0f}")
        lines.append("- Work (model FLOPs: the matmuls of every layer, counted from the config, "
                     "`dit_sides.model_flops`; XLA's `cost_analysis()` counts the scanned layers' body once): "
                     f"forward {flops_f / 1e9:.1f} GFLOP, fwd+bwd {flops_b / 1e9:.1f} GFLOP (3x); divided by each "
                     "framework's median time, in GFLOP/s: " + "; ".join(rate) + ".")
    lines += [
        "- JAX / PyTorch < 1 means JAX is faster (ratio of medians). The fwd+bwd ratio of every remat policy is "
        "against PyTorch eager (no checkpointing); PyTorch's own gradient-checkpointing row is relative to eager.",
        "- Compile: JAX `jax.jit(fn).lower(...).compile()` (trace + XLA compile, cold, no persistent cache); PyTorch "
        "has none (eager), its first-call time (one-off allocator / oneDNN set-up) is given instead. Neither is in "
        "the timed calls.",
        "- XLA temp: `compiled.memory_analysis().temp_size_in_bytes`, the executable's scratch besides its "
        "arguments (parameters, inputs) and outputs (the output, or loss + gradients).",
    ]
    if on_cpu:
        lines.append(
            "- Peak RSS Δ: the kernel's high-water mark `VmHWM` (reset through `/proc/self/clear_refs` after "
            "`gc.collect()` + `malloc_trim(0)`) minus the RSS just before the call, max over the timed calls; both "
            "frameworks run in this one process, one after the other, and PyTorch's gradients of the previous call "
            "are dropped before each call. It counts activations, outputs and gradients newly touched by the call; "
            "memory an allocator kept from an earlier call and reuses is already in the baseline and does not "
            "count, so it is a lower bound.")
    else:
        lines.append("- Peak memory Δ: PyTorch `torch.cuda.max_memory_allocated()` minus the allocation before the "
                     "call; JAX: n/a on this backend.")
    lines += ["", "Agreement (same weights and inputs; checked on the timed calls' own outputs):", "",
              "| Comparison | max abs difference | scale |", "|---|---|---|", *agree, "",
              f"Total benchmark wall time: {wall:.0f} s."]
    return lines


def agreement(jx: dict, th: dict) -> list[str]:
    rows = []
    out_t, out_j = th["out"], jx["out"]
    rows.append(f"| forward output: JAX vs PyTorch | {np.max(np.abs(out_j - out_t)):.2e} | max abs output "
                f"{np.max(np.abs(out_t)):.3g}, mean abs {np.mean(np.abs(out_t)):.3g} |")
    if "grads" in th:
        t_loss = th["eager"]["loss"]
        for policy, p in jx["policies"].items():
            if "grads" not in p:
                continue
            rows.append(f"| loss, JAX remat `{policy}` vs PyTorch | {abs(p['loss'] - t_loss):.2e} | "
                        f"loss {t_loss:.4g} |")
            d, rel, key = grad_diff(p["grads"], th["grads"])
            gmax = max(float(np.max(np.abs(g))) for g in th["grads"].values())
            rows.append(f"| gradients (all {len(th['grads'])} tensors), JAX remat `{policy}` vs PyTorch | {d:.2e} | "
                        f"max abs grad {gmax:.3g}; worst tensor relative to its own max: {rel:.1e} (`{key}`) |")
    ref = jx["policies"].get("none", {}).get("grads")
    for policy, p in jx["policies"].items():
        if policy != "none" and ref is not None and "grads" in p:
            d, _, _ = grad_diff(p["grads"], ref)
            rows.append(f"| gradients, JAX remat `{policy}` vs remat `none` | {d:.2e} | |")
    return rows


def write_results(path: Path, block: str, quick: bool) -> None:
    """Replaces this kind of run's generated block (quick or not) in the ``## DiT`` section of ``path``, or adds
    it at the end of that section (the section itself is appended when missing)."""
    tag = "dit-bench:quick" if quick else "dit-bench:run"
    begin, end = f"<!-- {tag} begin (written by benchmarks/dit.py --write-results) -->", f"<!-- {tag} end -->"
    new = f"{begin}\n{block.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin.split(" (")[0]) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text, count=1)
    else:
        m = re.search(rf"^{re.escape(SECTION)}\b.*$", text, re.M)
        if m is None:
            text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{new}"
        else:
            nxt = re.search(r"^## ", text[m.end():], re.M)
            at = m.end() + nxt.start() if nxt else len(text)
            head, tail = text[:at].rstrip("\n"), text[at:]
            text = head + "\n\n" + new + ("\n" + tail if tail else "")
    path.write_text(text)


# ------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring and benchmarks/RESULTS.md (## DiT) for what is "
                                       "measured.")
    d = {k: v[0] for k, v in DEFAULTS.items()}
    g = p.add_argument_group("model and inputs")
    g.add_argument("--heads", type=int, help=f"attention heads [default {d['heads']}]")
    g.add_argument("--head-dim", type=int, help=f"attention head dim [default {d['head_dim']}]")
    g.add_argument("--layers", type=int, help=f"transformer blocks [default {d['layers']}]")
    g.add_argument("--ffn-dim", type=int, help=f"feed-forward hidden size [default {d['ffn_dim']}]")
    g.add_argument("--text-dim", type=int, help=f"text embedding width (umT5: 4096) [default {d['text_dim']}]")
    g.add_argument("--text-len", type=int, help=f"text tokens (Wan pads to 512) [default {d['text_len']}]")
    g.add_argument("--frames", type=int, help=f"latent frames [default {d['frames']}]")
    g.add_argument("--height", type=int, help=f"latent height (even) [default {d['height']}]")
    g.add_argument("--width", type=int, help=f"latent width (even) [default {d['width']}]")
    g.add_argument("--batch", type=int, default=1, help="samples per batch [default 1]")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters stay float32 [default float32]")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs [default 0]")
    g.add_argument("--attention", default="auto",
                   help="the JAX model's attention_impl (auto: rows on the CPU; xla: the materialising reference) "
                        "[default auto]")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, help=f"timed calls per variant [default {d['repeats']}]")
    g.add_argument("--warmup", type=int, help=f"untimed calls before them [default {d['warmup']}]")
    g.add_argument("--policies", default="none,full,dots_saveable",
                   help="JAX remat policies for forward + backward, comma-separated; the first one also gives the "
                        "forward row [default none,full,dots_saveable]")
    g.add_argument("--no-torch-grad-ckpt", dest="torch_grad_ckpt", action="store_false",
                   help="skip the PyTorch gradient-checkpointing row")
    g.add_argument("--threads", type=int, default=usable_cores(),
                   help="torch.set_num_threads [default: the usable cores]")
    g.add_argument("--torch-device", default="cpu", help="PyTorch device [default cpu]")
    g.add_argument("--jax-platforms", default="cpu",
                   help="JAX_PLATFORMS unless already set in the environment [default cpu]")
    g.add_argument("--xla-default", action="store_true",
                   help="XLA's own CPU flags, without director_jax/xla_flags.py's (the configuration before them)")
    g = p.add_argument_group("general")
    g.add_argument("--quick", action="store_true",
                   help="smoke test: dim 64, 2 layers, 128 tokens, text 32x256, 1 timed call")
    g.add_argument("--write-results", action="store_true",
                   help="put the tables into --results-file, replacing the previous block of the same kind "
                        "(quick or not) in its '## DiT' section")
    g.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS,
                   help="[default benchmarks/RESULTS.md]")
    args = p.parse_args(argv)
    for key, (normal, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    from_module = {"none", "full", "dots_saveable", "offload"}
    if not args.policies or set(args.policies) - from_module:
        p.error(f"--policies takes a comma-separated subset of {sorted(from_module)}; got {args.policies}")
    if args.height % 2 or args.width % 2 or min(args.height, args.width, args.frames) < 1:
        p.error("latent height and width must be positive and even (patch 1x2x2)")
    if args.head_dim % 2 or args.head_dim < 6:
        p.error("--head-dim must be even and >= 6 (3D RoPE)")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", args.jax_platforms)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not args.xla_default:
        from director_jax.xla_flags import apply_cpu_flags

        apply_cpu_flags()  # what the commands run with; before JAX's backend starts
    # before the run: the load average is the one at the start
    machine = machine_description("benchmarks/dit.py", ("director_jax", "benchmarks/dit.py"))
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    log(f"building diffusers WanTransformer3DModel (dim {cfg.inner_dim}, {cfg.num_layers} layers) with random "
        "weights")
    torch_model = build_torch_model(cfg, args.seed)
    state = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    inputs = make_inputs(args)
    mem = RSSMonitor()
    log(f"peak RSS measured by {mem.method}")

    jax_side = JaxSide(args, cfg, state, inputs)
    del state
    torch_side = TorchSide(args, torch_model, inputs)

    # Before any timing: one forward each, same weights and inputs; stop if they do not compute the same thing.
    out_j = np.asarray(jax_side.forward_call(), np.float32)
    t0 = time.perf_counter()
    out_t = torch_side.to_channels_last(torch_side.forward_call())
    torch_side.res["first_fwd_s"] = time.perf_counter() - t0
    diff, scale = float(np.max(np.abs(out_j - out_t))), float(np.max(np.abs(out_t)))
    tol = (2e-2 if args.dtype == "bfloat16" else 1e-4) * max(scale, 1.0)
    log(f"agreement before timing: forward max abs diff JAX vs PyTorch {diff:.2e} (max abs output {scale:.3g}, "
        f"tolerance {tol:.1e})")
    if not diff <= tol:
        log("the two models disagree: not timing them (see the diff above)")
        return 1

    jx = jax_side.run(mem)
    th = torch_side.run(mem)
    agree = agreement(jx, th)
    lines = report(args, jx, th, agree, machine, time.perf_counter() - t_start)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        write_results(args.results_file, text, args.quick)
        log(f"wrote the tables into {args.results_file} ({SECTION} section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
