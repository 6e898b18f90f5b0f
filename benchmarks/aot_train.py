"""AOT-compile the real Director-Gen train step for TPU topologies from this CPU and tabulate per-chip memory.

    python benchmarks/aot_train.py --models 1_3b,14b --sizes 480p,720p --topologies v5p:2x2x1,v6e:2x2 \
        --remat full --out /tmp/aot_train.jsonl

Each case (model x size x topology x remat) is compiled in a fresh subprocess (``--one``), so its memory is
released and a failing or slow case does not stop the rest; each result is appended to ``--out`` as one JSON
line as soon as it completes. Figures are XLA's per-device ``memory_analysis()`` for the TPU (libtpu compile-only
devices; no TPU needed). Cases are run in the order given: models, then sizes, then topologies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
CONFIGS = {"1_3b": "configs/gen_1_3b.py", "14b": "configs/gen_14b.py"}
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
BASELINE_NOTE = ("baseline (maxdiffusion): Wan2.1 14B at 720p x 81 frames, global batch 1, trained on a v5p-8 "
                 "(= v5p:2x2x1)")
COLUMNS = ("model", "size", "tokens", "topology", "remat", "attention", "args GiB", "temps GiB", "peak+code GiB",
           "HBM GiB", "fits", "TFLOP/step", "compile s")


def apply_overrides(cfg, overrides: list[str]) -> None:
    """``section.key=value`` settings (Python literals where they parse, else strings), as --config flags give them."""
    import ast

    for item in overrides:
        path, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *sections, key = path.split(".")
        node = cfg
        for name in sections:
            node = node[name]
        node[key] = value


def run_one(model: str, size: str, topology: str, remat: str, attention: str = "xla",
            sequence_parallel: str | None = None, mesh: dict[str, int] | None = None,
            overrides: list[str] | None = None) -> dict:
    """Compiles one case in this process and returns its JSON-able result."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    from director_jax.configs_common import load_config
    from director_jax.train.aot import compile_report, format_report, topology_devices
    from director_jax.train.state import with_shardings
    from director_jax.train.trainer import abstract_batch, build_run

    cfg = load_config(REPO / CONFIGS[model])
    height, width = SIZES[size]
    cfg.video.height, cfg.video.width = height, width
    cfg.model_options.remat_policy = remat
    cfg.model_options.attention_impl = attention
    cfg.model_options.sequence_parallel = sequence_parallel
    for axis, size_ in (mesh or {}).items():
        setattr(cfg.mesh, axis, size_)
    apply_overrides(cfg, overrides or [])
    # As compile_train_step does, without check_fits (which raises on a non-fitting step): the report is wanted.
    run = build_run(cfg, devices=topology_devices(topology), materialize_frozen=False)
    state = with_shardings(run.abstract, run.shardings)
    analytic = run.task.train_flops_per_example()
    tflop = None if analytic is None else analytic * int(cfg.train.batch_size) / 1e12
    info = {"tokens": int(run.task.tokens_per_example()), "analytic_tflop_per_step": tflop,
            "mesh": {k: int(v) for k, v in run.mesh.shape.items()}}
    print("INFO " + json.dumps(info), flush=True)  # before the (slow, possibly failing) compile
    report = compile_report(run.step_fn, state, run.frozen_state, abstract_batch(run), topology=topology,
                            mesh=run.mesh)
    print(f"train step of {cfg.task} ({run.task.describe()}), global batch {cfg.train.batch_size}, "
          f"mesh {dict(run.mesh.shape)}", flush=True)
    print(format_report(report), flush=True)
    return {
        "model": model, "size": size, "height": height, "width": width, "frames": int(cfg.video.num_frames),
        "tokens": int(run.task.tokens_per_example()), "batch": int(cfg.train.batch_size), "topology": topology,
        "remat": remat, "attention": attention, "sequence_parallel": sequence_parallel,
        "mesh": {k: int(v) for k, v in run.mesh.shape.items()}, "num_devices": report.num_devices,
        "device_kind": report.device_kind, "argument_bytes": report.argument_bytes,
        "output_bytes": report.output_bytes, "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
        "generated_code_bytes": report.generated_code_bytes, "peak_bytes": report.peak_bytes,
        "total_bytes": report.total_bytes, "hbm_bytes": report.hbm_bytes, "fits": report.fits,
        "analytic_tflop_per_step": tflop, "lower_seconds": report.lower_seconds,
        "compile_seconds": report.compile_seconds, "flops_per_device": report.flops, "status": "ok",
        "overrides": list(overrides or []), "task": run.task.describe(),
    }


_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED: Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)"
                     r"(?:.*?shape: ([a-z0-9]+\[[0-9,]+\]))?")


def parse_failure(text: str) -> dict:
    """What a failed compile's error says: the TPU compiler refuses a single buffer larger than HBM
    (``xla_tpu_no_crash_on_oom`` does not cover that), which is a "does not fit" result, not a crash."""
    m = _OOM_RE.search(text)
    if m is None:
        return {}
    out = {"status": "no_fit", "largest_buffer_bytes": int(m.group(1)), "hbm_limit_bytes": int(m.group(2)),
           "largest_buffer_shape": m.group(3)}
    dims = re.findall(r"\d+", (m.group(3) or "[]").split("[", 1)[1])
    if len(dims) == 3 and dims[1] == dims[2]:
        out["tokens_from_shape"] = int(dims[1])
    return out


def analytic(model: str, size: str) -> dict:
    """Tokens and analytic TFLOP per step of a case without compiling (for rows whose compile failed)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    from director_jax.configs_common import load_config
    from director_jax.train.tasks import make_task

    cfg = load_config(REPO / CONFIGS[model])
    cfg.video.height, cfg.video.width = SIZES[size]
    task = make_task(cfg)
    flops = task.train_flops_per_example()
    return {"tokens": int(task.tokens_per_example()),
            "analytic_tflop_per_step": None if flops is None else flops * int(cfg.train.batch_size) / 1e12}


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table_row(r: dict) -> str:
    """One markdown table row of a result (finished or not)."""
    if r.get("status") == "error":
        r = {**r, **parse_failure(r.get("note", "") + r.get("error", ""))}
    if r.get("status") != "ok" and "analytic_tflop_per_step" not in r:
        r = {**analytic(r["model"], r["size"]), **r}
    tokens = r.get("tokens", r.get("tokens_from_shape", "-"))
    attn = r.get("attention", "xla") + (f" + {r['sequence_parallel']}" if r.get("sequence_parallel") else "")
    if r.get("mesh") and any(v > 1 for k, v in r["mesh"].items() if k != "fsdp"):
        attn += " (" + ", ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) + ")"
    head = [r["model"], r["size"], str(tokens), r["topology"], r["remat"], attn]
    if r.get("status") == "no_fit":
        tflop = "-" if r.get("analytic_tflop_per_step") is None else f"{r['analytic_tflop_per_step']:.1f}"
        shape = r.get("largest_buffer_shape") or "one buffer"
        note = (f"**NO**: XLA refused one buffer, {shape} = {_gib(r['largest_buffer_bytes'])} GiB "
                f"> {_gib(r['hbm_limit_bytes'])} GiB")
        wall = f"refused after {r['wall_seconds']:.0f} s wall" if "wall_seconds" in r else "-"
        return "| " + " | ".join(head + ["-", "-", "-", _gib(r["hbm_limit_bytes"]), note, tflop, wall]) + " |"
    if r.get("status") != "ok":
        return "| " + " | ".join(head + ["-"] * 6 + [r.get("note", r.get("status", "failed"))]) + " |"
    fits = "yes" if r["fits"] else "**NO**"
    if r["hbm_bytes"]:
        fits += f" ({100 * r['total_bytes'] / r['hbm_bytes']:.0f}%)"
    tflop = "-" if r["analytic_tflop_per_step"] is None else f"{r['analytic_tflop_per_step']:.1f}"
    cells = head + [_gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["total_bytes"]), _gib(r["hbm_bytes"]),
                    fits, tflop, f"{r['compile_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1_3b,14b", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--sizes", default="480p,720p", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--topologies", default="v5p:2x2x1,v6e:2x2", help="comma-separated TPU topologies")
    p.add_argument("--remat", default="full", help="comma-separated remat policies (full, dots_saveable, ...)")
    p.add_argument("--attention", default="xla", help="attention_impl: xla, pallas, splash, blockwise, auto")
    p.add_argument("--sequence-parallel", default=None, help="ulysses, ring or auto (needs --mesh sequence=N)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=2,sequence=2 (default: the config's)")
    p.add_argument("--out", default="aot_train.jsonl", help="JSON lines are appended here as cases complete")
    p.add_argument("--timeout_min", type=float, default=12.0, help="kill a case's compile after this many minutes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.timelines=per_example (repeatable)")
    p.add_argument("--one", action="store_true", help="(internal) compile one case in this process")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of these result files")
    args = p.parse_args()
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    models, sizes, topologies, remats = split(args.models), split(args.sizes), split(args.topologies), split(args.remat)
    for m in models:
        if m not in CONFIGS:
            p.error(f"unknown model {m!r}; choose from {', '.join(CONFIGS)}")
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")

    if args.table:
        print(table_header())
        for path in args.table:
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    print(table_row(json.loads(line)))
        return 0
    mesh = {k: int(v) for k, v in (item.split("=") for item in split(args.mesh))}
    if args.one:
        result = run_one(models[0], sizes[0], topologies[0], remats[0], args.attention, args.sequence_parallel, mesh,
                         args.set)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(table_header(), flush=True)
    failures = 0
    for model, size, topology, remat in itertools.product(models, sizes, topologies, remats):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--models", model, "--sizes", size,
               "--topologies", topology, "--remat", remat, "--attention", args.attention, "--mesh", args.mesh]
        if args.sequence_parallel:
            cmd += ["--sequence-parallel", args.sequence_parallel]
        for item in args.set:
            cmd += ["--set", item]
        t0 = time.perf_counter()
        base = {"model": model, "size": size, "topology": topology, "remat": remat, "attention": args.attention,
                "sequence_parallel": args.sequence_parallel}
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout_min * 60)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            info = [json.loads(ln[len("INFO "):]) for ln in proc.stdout.splitlines() if ln.startswith("INFO ")]
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1][len("RESULT "):])
            else:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                result = {**base, **(info[-1] if info else {}), "status": "error",
                          "note": f"failed (rc {proc.returncode}): {err}", **parse_failure(proc.stderr)}
        except subprocess.TimeoutExpired as e:
            out_text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            info = [json.loads(ln[len("INFO "):]) for ln in out_text.splitlines() if ln.startswith("INFO ")]
            result = {**base, **(info[-1] if info else {}), "status": "timeout",
                      "note": f"compile did not finish in {args.timeout_min:g} min on this {os.cpu_count()}-core "
                              "machine"}
        result["wall_seconds"] = time.perf_counter() - t0
        failures += result["status"] != "ok"
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(table_row(result), flush=True)
        if model == "14b" and size == "720p" and topology.startswith("v5p:2x2x1"):
            print(f"  ^ {BASELINE_NOTE}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
