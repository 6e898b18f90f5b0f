#!/usr/bin/env python
"""Wan2.1 VAE benchmark: this project's JAX port against diffusers' AutoencoderKLWan (PyTorch), same weights.

Part 1 (speed + memory, one clip): the Wan2.1-sized VAE (``WanVAEConfig()`` defaults, random weights,
float32) encodes a clip and decodes a latent of the matching shape, in three variants:

* ``jax-full``   -- ``WanVAE.encode`` / ``WanVAE.decode`` jitted over the whole clip (AOT-compiled; the
  compile time is reported on its own);
* ``jax-stream`` -- ``WanVAE.encode_streaming`` / ``WanVAE.decode_streaming`` (one jitted step per chunk);
* ``torch``      -- diffusers' ``AutoencoderKLWan.encode`` / ``.decode`` under ``torch.no_grad()``, with
  ``torch.set_num_threads(<usable cores>)``. Diffusers itself runs the causal chunk loop (frame 0, then 4
  frames per encoder call; one latent frame per decoder call), so it is the baseline for both JAX paths.

It reports best / median seconds of ``--repeats`` timed runs, the time ratio JAX / PyTorch, and each
variant's peak RSS increase, and checks that the outputs agree (max abs difference), so the timings are
of the same computation.

Part 2 (memory vs clip length): the decoder alone at two clip lengths (default 17 and 81 frames, i.e. 5 and
21 latent frames), streaming and full-sequence, plus XLA's compiled ``memory_analysis()`` of one streaming
decode step and of the whole full-sequence decode.

Every variant runs in its own subprocess (this file, re-invoked with ``--worker``), so peak memory is that
variant's alone. Peak RSS is the kernel's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` at the start of the measured phase (psutil sampling where that is unavailable);
it is reported as an increase over the RSS after imports, model construction and input creation.

Run from the repository root::

    python benchmarks/vae.py                    # defaults: part 1 at 128x128x17, part 2 at 64x64, 17 vs 81
    python benchmarks/vae.py --quick            # tiny sizes: smoke-tests every path in about a minute
    python benchmarks/vae.py --height 256 --width 256 --repeats 3 --write-results
    python benchmarks/vae.py --parts 2 --mem-height 128 --mem-width 128

Progress goes to stderr; the markdown tables go to stdout (and, with ``--write-results``, are appended
to benchmarks/RESULTS.md with the date, machine and command line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import (
    REPO,
    fmt_mib,
    fmt_s,
    machine_description,
    make_log,
    usable_cores,
)
from vae_workers import worker_main

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from director_jax.xla_flags import apply_cpu_flags  # noqa: E402  (no jax import: only edits XLA_FLAGS)

log = make_log("vae-bench")

DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS.md"

# Defaults; --quick swaps in the second column. Explicit flags always win. (The quick size is 24, not 16:
# at 16x16 the 2x2 latent makes XLA's CPU compiler take ~10x longer than at 24 or 32.)
DEFAULTS = {
    "height": (128, 24),
    "width": (128, 24),
    "frames": (17, 17),
    "repeats": (2, 1),
    "warmup": (0, 0),
    "mem_height": (64, 24),
    "mem_width": (64, 24),
    "mem_frames": ("17,81", "9,17"),
}


# ------------------------------------------------------------------------------------------------
# Driver


def run_worker(spec: dict, tmp: Path, args: argparse.Namespace) -> dict:
    name = spec["label"].replace(" ", "_").replace("/", "_")
    spec = {**spec, "result": str(tmp / f"{name}.result.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("JAX_PLATFORMS", args.jax_platforms)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.compile_cache:
        # A persistent XLA cache private to this run: later workers reuse executables of identical shape
        # (part 2's streaming steps, memory_analysis). Part 1's variants compile distinct programs, so
        # their compile times are cold.
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "xla-cache")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    log(f"{spec['label']}: starting worker")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve().with_name("vae_workers.py")),
                               "--worker", str(spec_path)],
                              env=env, timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    if rc is None:
        res = {"error": f"timed out after {args.timeout} s (--timeout)"}
    elif rc != 0:
        why = " (killed: likely out of memory)" if rc in (-9, 137) else ""
        res = {"error": f"worker failed with exit code {rc}{why}"}
    else:
        res = json.loads(Path(spec["result"]).read_text())
    res["wall_s"] = wall
    log(f"{spec['label']}: done in {wall:.1f} s" + (f" -- {res['error']}" if "error" in res else ""))
    return res


def best_median(xs: list[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


def max_abs_diff(tmp: Path, a: str, b: str, what: str) -> float | None:
    pa, pb = tmp / f"{a}_{what}.npy", tmp / f"{b}_{what}.npy"
    if not (pa.exists() and pb.exists()):
        return None
    x, y = np.load(pa), np.load(pb)
    if x.shape != y.shape:
        return float("nan")
    return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))


def part1(args: argparse.Namespace, tmp: Path, common: dict) -> list[str]:
    size = f"{args.batch}x{args.frames}x{args.height}x{args.width}"
    base = {**common, "height": args.height, "width": args.width, "frames": args.frames, "batch": args.batch,
            "repeats": args.repeats, "warmup": args.warmup, "mode": "encode+decode"}
    labels = {"jax-full": "JAX full-sequence (jit)", "jax-stream": "JAX streaming", "torch": "diffusers PyTorch"}
    results = {}
    for kind, label in labels.items():
        log(f"part 1: {label}, encode + decode of a {size} clip")
        results[kind] = run_worker({**base, "kind": kind, "label": f"p1 {kind}", "save": str(tmp / kind)},
                                   tmp, args)

    ref = results["torch"]
    ref_t = None
    if "enc_s" in ref:
        ref_t = (statistics.median(ref["enc_s"]), statistics.median(ref["dec_s"]),
                 statistics.median([e + d for e, d in zip(ref["enc_s"], ref["dec_s"], strict=True)]))
    lines = [
        f"### Part 1: encode + decode, Wan2.1 VAE (float32), clip {size} (BxTxHxW), "
        f"{args.repeats} timed run(s) after the compile / short-clip warm-up and {args.warmup} full-length "
        "warm-up run(s)",
        "",
        "| Variant | compile or short-clip warm-up (s) | 1st full warm-up run (s) | encode best / median (s) "
        "| decode best / median (s) | total median (s) | JAX / PyTorch time (enc / dec / total) "
        "| peak RSS Δ, timed runs: encode / decode (MiB) | peak RSS Δ incl. compile + warm-up (MiB) "
        "| baseline RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, label in labels.items():
        r = results[kind]
        if "enc_s" not in r:
            reason = r.get("error") or r.get("skipped") or "no result"
            lines.append(f"| {label} | {reason} | | | | | | | | |")
            continue
        enc, dec = best_median(r["enc_s"]), best_median(r["dec_s"])
        total = statistics.median([e + d for e, d in zip(r["enc_s"], r["dec_s"], strict=True)])
        compile_s = sum(r["compile_s"].values()) if r["compile_s"] else None
        warm = fmt_s(r["warmup_s"][0]) if r.get("warmup_s") else "-"
        if kind == "torch":
            ratio = "1 (baseline)"
        elif ref_t:
            ratio = f"{enc[1] / ref_t[0]:.2f} / {dec[1] / ref_t[1]:.2f} / **{total / ref_t[2]:.2f}**"
        else:
            ratio = "n/a (no PyTorch result)"
        lines.append(
            f"| {label} | {fmt_s(compile_s)} | {warm} | {fmt_s(enc[0])} / {fmt_s(enc[1])} | {fmt_s(dec[0])} / "
            f"{fmt_s(dec[1])} | {fmt_s(total)} | {ratio} | {fmt_mib(r['peak_enc'])} / {fmt_mib(r['peak_dec'])} | "
            f"{fmt_mib(max(r['peak_incl_warmup'], r.get('peak_compile', 0)))} | {fmt_mib(r['baseline_rss'])} |")

    method = next((r["rss_method"] for r in results.values() if "rss_method" in r), "n/a")
    torch_threads = results["torch"].get("threads", args.threads)
    full_compile = results["jax-full"].get("compile_s", {})
    lines += [
        "",
        "- Encode: the clip in [-1, 1] -> posterior (mean, logvar). Decode: a fixed N(0, 1) latent of the "
        "matching shape -> video (so decode timings do not depend on the encoder's output).",
        "- Compile: JAX full = AOT `jit(...).lower().compile()` of encode + decode ("
        + ", ".join(f"{k} {fmt_s(v)} s" for k, v in full_compile.items())
        + "); JAX streaming = first calls on a short clip (frame 0 + one 4-frame chunk; latent frame 0 + one "
        "more), which compile every step shape, plus that tiny run; PyTorch = the same short-clip first calls "
        "(one-off oneDNN / allocator set-up for every chunk shape it will see). None of this is in the timed runs; "
        "full-length warm-up runs (--warmup) come after it and are not timed either.",
        f"- Peak RSS Δ: {method}, minus the RSS after imports, model construction and input creation (the "
        "baseline column; it includes the ~0.5 GiB of float32 weights). 'Timed runs' resets the peak after "
        "compile + warm-up and again between the encode and decode phases (freed heap returned to the OS with "
        "malloc_trim first); each variant runs in its own process.",
        f"- PyTorch: diffusers AutoencoderKLWan, torch.no_grad(), torch.set_num_threads({torch_threads}); it "
        "runs the same causal chunk loop as the JAX streaming path. JAX: XLA's default CPU threading.",
        "- JAX / PyTorch time < 1 means JAX is faster (ratio of medians).",
        "",
        "Agreement (max abs difference; same weights and inputs):",
        "",
        "| Comparison | encode: posterior mean | decode: video |",
        "|---|---|---|",
    ]
    for a, b in (("jax-full", "torch"), ("jax-stream", "torch"), ("jax-stream", "jax-full")):
        dm, dv = max_abs_diff(tmp, a, b, "mean"), max_abs_diff(tmp, a, b, "video")
        lines.append(f"| {labels[a]} vs {labels[b]} | {'-' if dm is None else f'{dm:.2e}'} | "
                     f"{'-' if dv is None else f'{dv:.2e}'} |")
    ref_video = tmp / "torch_video.npy"
    ref_mean = tmp / "torch_mean.npy"
    if ref_video.exists() and ref_mean.exists():
        v, m = np.load(ref_video), np.load(ref_mean)
        lines += ["", f"Scale of the outputs compared: PyTorch posterior mean max |x| = {np.abs(m).max():.3g}, "
                      f"decoded video mean |x| = {np.abs(v).mean():.3g} (clipped to [-1, 1]; "
                      f"{np.mean(np.abs(v) >= 1.0) * 100:.1f}% of values at the clip)."]
    return lines


def part2(args: argparse.Namespace, tmp: Path, common: dict) -> list[str]:
    frames_list = [int(f) for f in args.mem_frames.split(",")]
    size = f"{args.batch}x{{T}}x{args.mem_height}x{args.mem_width}"
    base = {**common, "height": args.mem_height, "width": args.mem_width, "batch": args.batch,
            "repeats": 1, "warmup": 0, "mode": "decode"}
    rows = []
    for kind, label in (("jax-stream", "JAX streaming"), ("jax-full", "JAX full-sequence")):
        for frames in frames_list:
            log(f"part 2: {label} decoder, {size.format(T=frames)}")
            spec = {**base, "kind": kind, "frames": frames, "label": f"p2 {kind} {frames}f",
                    "step_memory": kind == "jax-stream"}
            rows.append((label, frames, run_worker(spec, tmp, args)))

    lines = [
        f"### Part 2: decoder peak memory vs clip length, Wan2.1 VAE (float32), "
        f"{args.mem_height}x{args.mem_width}, batch {args.batch}",
        "",
        "| Decoder | frames (latent frames) | decode time, 1 run (s) | peak RSS Δ (MiB) "
        "| XLA temp (MiB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for label, frames, r in rows:
        lat = (frames - 1) // 4 + 1
        note, temp = "", "-"
        if "step_memory" in r:
            sm = r["step_memory"]
            first, steady = sm.get("first"), sm.get("steady")
            if steady:
                temp = f"{fmt_mib(steady['temp'])} per step"
            note = (f"first step temp {fmt_mib(first['temp']) if first else 'n/a'} MiB; "
                    f"carried caches {fmt_mib(sm['cache_bytes'])} MiB")
        elif r.get("xla_memory", {}).get("decode"):
            temp = f"{fmt_mib(r['xla_memory']['decode']['temp'])} whole decode"
        if "error" in r:
            note = r["error"]
        elif "skipped" in r:
            note = r["skipped"]
        t = fmt_s(r["dec_s"][0]) if r.get("dec_s") else "-"
        peak = fmt_mib(r.get("peak_runs")) if "peak_runs" in r else "-"
        lines.append(f"| {label} | {frames} ({lat}) | {t} | {peak} | {temp} | {note} |")
    lines += [
        "",
        "- Decode of a fixed N(0, 1) latent; one timed run per row, each in its own process. Streaming is "
        "compiled first on a 2-latent-frame clip (every step shape), full-sequence AOT; the peak is measured "
        "over the run only, relative to the RSS after imports, model construction and input creation.",
        "- XLA temp: `compiled.memory_analysis().temp_size_in_bytes`: for streaming, one decode step with "
        "carried caches (the steady state; the first step is in the note); for full-sequence, the whole decode.",
        f"- Full-sequence rows are skipped (not crashed) when XLA's arguments + outputs + temp exceed "
        f"--mem-budget-gib ({args.mem_budget_gib:.1f} GiB here).",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Each variant runs in its own subprocess; see the module docstring and "
                                       "benchmarks/RESULTS.md for what is measured.")
    d = {k: v[0] for k, v in DEFAULTS.items()}
    g = p.add_argument_group("part 1: encode + decode speed and memory")
    g.add_argument("--height", type=int, help=f"frame height (multiple of 8) [default {d['height']}]")
    g.add_argument("--width", type=int, help=f"frame width (multiple of 8) [default {d['width']}]")
    g.add_argument("--frames", type=int, help=f"clip length, 4n+1 [default {d['frames']}]")
    g.add_argument("--repeats", type=int, help=f"timed runs per variant [default {d['repeats']}]")
    g.add_argument("--warmup", type=int,
                   help="full-length untimed runs before them (a short-clip warm-up / the AOT compile always "
                        f"comes first) [default {d['warmup']}]")
    g = p.add_argument_group("part 2: decoder memory vs clip length")
    g.add_argument("--mem-height", type=int, help=f"frame height [default {d['mem_height']}]")
    g.add_argument("--mem-width", type=int, help=f"frame width [default {d['mem_width']}]")
    g.add_argument("--mem-frames", help=f"comma-separated clip lengths, each 4n+1 [default {d['mem_frames']}]")
    g.add_argument("--mem-budget-gib", type=float,
                   help="skip a JAX full-sequence run whose XLA arguments + outputs + temp exceed this "
                        "[default: 75%% of MemAvailable at start]")
    g = p.add_argument_group("general")
    g.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes (part 1: 24x24x17, 1 timed run, no warm-up; part 2: 24x24, 9 vs 17 "
                        "frames); about a minute on an idle 2-core machine")
    g.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2 [default 1,2]")
    g.add_argument("--batch", type=int, default=1, help="clips per batch [default 1]")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs [default 0]")
    g.add_argument("--threads", type=int, default=usable_cores(),
                   help="torch.set_num_threads [default: the usable cores]")
    g.add_argument("--jax-platforms", default="cpu",
                   help="JAX_PLATFORMS for the workers unless already set in the environment [default cpu]")
    g.add_argument("--xla-default", action="store_true",
                   help="XLA's own CPU flags in the JAX workers, without director_jax/xla_flags.py's")
    g.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not share a run-private persistent XLA compilation cache between the workers")
    g.add_argument("--timeout", type=int, default=3600, help="seconds before a worker is abandoned [default 3600]")
    g.add_argument("--write-results", action="store_true", help="append the tables to --results-file")
    g.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS,
                   help="where --write-results appends [default benchmarks/RESULTS.md]")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    for key, (normal, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"1", "2"}:
        p.error(f"--parts takes 1, 2 or 1,2; got {args.parts!r}")
    args.part_set = parts
    frames = [args.frames] + [int(f) for f in args.mem_frames.split(",")]
    if any(f < 1 or (f - 1) % 4 for f in frames):
        p.error(f"clip lengths must be 4n+1 (1, 5, 9, ..., 17, ..., 81): got {frames}")
    if any(s < 8 or s % 8 for s in (args.height, args.width, args.mem_height, args.mem_width)):
        p.error("frame sizes must be positive multiples of 8")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.mem_budget_gib is None:
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except ImportError:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        args.mem_budget_gib = 0.75 * avail / 2**30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmpdir:
        tmp = Path(tmpdir)
        common = {"seed": args.seed, "z_dim": 16, "threads": args.threads, "weights": str(tmp / "weights.npz"),
                  "config": str(tmp / "config.json"), "budget_bytes": int(args.mem_budget_gib * 2**30)}
        log("prep: random Wan2.1-sized weights (diffusers state dict shared by both frameworks)")
        prep = run_worker({**common, "kind": "prep", "label": "prep"}, tmp, args)
        if "error" in prep:
            log("prep failed; nothing to benchmark")
            return 1
        title = "Wan2.1 VAE: JAX vs diffusers PyTorch"
        if args.quick:
            title += " -- SMOKE TEST (--quick: tiny sizes, numbers not meaningful)"
        if not args.xla_default:
            apply_cpu_flags()  # the workers inherit it: what the commands run with (director_jax/xla_flags.py)
        machine = machine_description("benchmarks/vae.py", ("director_jax",), args.jax_platforms)
        sections = [f"## {title}", "", *machine,
                    f"- Model: WanVAEConfig() defaults (Wan2.1 VAE), {prep['params'] / 1e6:.1f}M parameters, "
                    f"random weights (seed {args.seed}), float32", ""]
        if "1" in args.part_set:
            sections += part1(args, tmp, common) + [""]
        if "2" in args.part_set:
            sections += part2(args, tmp, common) + [""]
    sections.append(f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(sections) + "\n"
    print(text)
    if args.write_results:
        path = args.results_file
        existing = path.read_text() if path.exists() else ""
        with open(path, "a") as f:
            f.write(("\n" if existing and not existing.endswith("\n\n") else "") + text)
        log(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
