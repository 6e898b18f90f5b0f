"""AOT-compile the real Director-Gen train step for TPU topologies from this CPU and tabulate per-chip memory.

    python benchmarks/aot_train.py --models 1_3b,14b --sizes 480p,720p --topologies v5p:2x2x1,v6e:2x2 \
        --remat full --out /tmp/aot_train.jsonl

Each case (model x size x topology x remat) is compiled in a fresh subprocess (``--one``), so its memory is
released and a failing or slow case does not stop the rest; each result is appended to ``--out`` as one JSON
line as soon as it completes. Figures are XLA's per-device ``memory_analysis()`` for the TPU (libtpu compile-only
devices; no TPU needed). Cases are run in the order given: models, then sizes, then topologies.

``--hardware-flops`` also reports what the chips compute against the model's FLOPs (the recompute overhead of
remat and of a flash kernel's backward). XLA's ``cost_analysis()`` counts the layer scan's body once, so the
step is compiled twice more, with one and with two layers and no loop (``model_options.scan_unroll``): the
difference is one layer's hardware FLOPs ``body``, and the full step's are ``f1 + (L - 1) * body`` per chip.
Pallas kernels count what their cost estimates declare: ours and tokamax's do, JAX's splash does not (its
attention is missing from the count).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_common, also when this file is loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"1_3b": "configs/gen_1_3b.py", "14b": "configs/gen_14b.py"}
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
BASELINE_NOTE = ("baseline (maxdiffusion): Wan2.1 14B at 720p x 81 frames, global batch 1, trained on a v5p-8 "
                 "(= v5p:2x2x1)")
COLUMNS = ("model", "size", "tokens", "topology", "remat", "attention", "args GiB", "temps GiB", "peak+code GiB",
           "HBM GiB", "fits", "TFLOP/step", "hw / model FLOPs", "compile s")


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
            overrides: list[str] | None = None, hardware_flops: bool = False) -> dict:
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
    hardware = None
    if hardware_flops:
        layers = int(cfg.model.num_layers)

        def unrolled_flops(n: int) -> float:
            cfg.model.num_layers, cfg.model_options.scan_unroll = n, n  # n layers, no loop
            small = build_run(cfg, devices=topology_devices(topology), materialize_frozen=False)
            return compile_report(small.step_fn, with_shardings(small.abstract, small.shardings), small.frozen_state,
                                  abstract_batch(small), topology=topology, mesh=small.mesh).flops

        one, two = unrolled_flops(1), unrolled_flops(2)
        body = two - one  # one layer's forward, recompute and backward, per chip
        hardware = (one + (layers - 1) * body) * report.num_devices / 1e12
        print(f"hardware FLOPs: {hardware:.1f} TFLOP per step ({body / 1e12:.2f} TFLOP per layer per chip)"
              + (f", {hardware / tflop:.3f}x the model's {tflop:.1f}" if tflop else ""), flush=True)
    return {
        "model": model, "size": size, "height": height, "width": width, "frames": int(cfg.video.num_frames),
        "tokens": int(run.task.tokens_per_example()), "batch": int(cfg.train.batch_size), "topology": topology,
        "remat": remat, "attention": attention, "sequence_parallel": sequence_parallel,
        "mesh": {k: int(v) for k, v in run.mesh.shape.items()}, "num_devices": report.num_devices,
        "device_kind": report.device_kind, "argument_bytes": report.argument_bytes,
        "output_bytes": report.output_bytes, "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
        "generated_code_bytes": report.generated_code_bytes, "peak_bytes": report.peak_bytes,
        "host_bytes": report.host_bytes,
        "total_bytes": report.total_bytes, "hbm_bytes": report.hbm_bytes, "fits": report.fits,
        "analytic_tflop_per_step": tflop, "lower_seconds": report.lower_seconds,
        "compile_seconds": report.compile_seconds, "flops_per_device": report.flops, "status": "ok",
        "overrides": list(overrides or []), "task": run.task.describe(), "hardware_tflop_per_step": hardware,
    }


def parse_failure(text: str) -> dict:
    """What a failed compile's error says: the TPU compiler refuses a single buffer larger than HBM
    (``xla_tpu_no_crash_on_oom`` does not cover that), which is a "does not fit" result, not a crash."""
    m = bench.XLA_OOM_RE.search(text)
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
        note = (f"**NO**: XLA refused one buffer, {shape} = {bench.fmt_gib(r['largest_buffer_bytes'])} GiB "
                f"> {bench.fmt_gib(r['hbm_limit_bytes'])} GiB")
        wall = f"refused after {r['wall_seconds']:.0f} s wall" if "wall_seconds" in r else "-"
        cells = ["-", "-", "-", bench.fmt_gib(r["hbm_limit_bytes"]), note, tflop, "-", wall]
        return "| " + " | ".join(head + cells) + " |"
    if r.get("status") != "ok":
        return "| " + " | ".join(head + ["-"] * 7 + [r.get("note", r.get("status", "failed"))]) + " |"
    tflop = "-" if r["analytic_tflop_per_step"] is None else f"{r['analytic_tflop_per_step']:.1f}"
    ratio = "-"
    if r.get("hardware_tflop_per_step") and r["analytic_tflop_per_step"]:
        ratio = f"{r['hardware_tflop_per_step'] / r['analytic_tflop_per_step']:.2f}x"
    cells = head + bench.memory_cells(r) + [tflop, ratio, f"{r['compile_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1_3b,14b", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--sizes", default="480p,720p", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--topologies", default="v5p:2x2x1,v6e:2x2", help="comma-separated TPU topologies")
    p.add_argument("--remat", default="full", help="comma-separated remat policies (full, dots_saveable, ...)")
    p.add_argument("--attention", default="xla", help="attention_impl: xla, pallas, splash, blockwise, auto")
    p.add_argument("--sequence-parallel", default=None, help="ulysses, ring or auto (needs --mesh sequence=N)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=2,sequence=2 (default: the config's)")
    bench.add_output_args(p, out="aot_train.jsonl", timeout_min=12.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.timelines=per_example (repeatable)")
    p.add_argument("--hardware-flops", action="store_true",
                   help="also compile a 2-layer unrolled step to count the chips' FLOPs (recompute overhead)")
    bench.add_mode_args(p)
    args = p.parse_args()
    models, sizes = bench.split_list(args.models), bench.split_list(args.sizes)
    topologies, remats = bench.split_list(args.topologies), bench.split_list(args.remat)
    bench.check_choices(p, "model", models, CONFIGS)
    bench.check_choices(p, "size", sizes, SIZES)

    if args.table:
        bench.print_jsonl_table(args.table, COLUMNS, table_row)
        return 0
    mesh = {k: int(v) for k, v in (item.split("=") for item in bench.split_list(args.mesh))}
    if args.one:
        bench.emit_result(run_one(models[0], sizes[0], topologies[0], remats[0], args.attention,
                                  args.sequence_parallel, mesh, args.set, args.hardware_flops))
        return 0

    def cases():
        for model, size, topology, remat in itertools.product(models, sizes, topologies, remats):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--models", model, "--sizes", size,
                   "--topologies", topology, "--remat", remat, "--attention", args.attention, "--mesh", args.mesh]
            if args.sequence_parallel:
                cmd += ["--sequence-parallel", args.sequence_parallel]
            for item in args.set:
                cmd += ["--set", item]
            if args.hardware_flops:
                cmd.append("--hardware-flops")
            yield cmd, {"model": model, "size": size, "topology": topology, "remat": remat,
                        "attention": args.attention, "sequence_parallel": args.sequence_parallel}

    def baseline(case: dict) -> str | None:
        if case["model"] == "14b" and case["size"] == "720p" and case["topology"].startswith("v5p:2x2x1"):
            return f"  ^ {BASELINE_NOTE}"
        return None

    return bench.run_cases(cases(), args.out, COLUMNS, table_row, timeout_min=args.timeout_min,
                           parse_failure=parse_failure, footnote=baseline)


if __name__ == "__main__":
    sys.exit(main())
