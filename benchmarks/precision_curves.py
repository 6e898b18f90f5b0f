#!/usr/bin/env python
"""What each precision recipe costs in loss: the tiny Director-Gen trained once per recipe, same data, same seed.

The recipes differ only in what the train state stores (``model_options.param_dtype``, ``optim.moment_dtype``,
``optim.ema_dtype``, ``optim.ema_decay``); compute stays float32, so any difference in the curves is the
stored state's rounding. Each run is ``configs/gen_tiny.py`` (per-example timelines, latents encoded in the
step by a random frozen VAE: the loss is flow matching on those latents) for ``--steps`` steps at the
learning rate of ``--lr``, in its own subprocess-free call of the trainer's Python API, and its
``metrics.jsonl`` is read back. Reported per recipe: the mean training loss over the first and the last
``--window`` steps, that loss relative to the float32 recipe's, and the train state's bytes per parameter.

    python benchmarks/precision_curves.py                       # 300 steps at lr 1e-4, the four recipes
    python benchmarks/precision_curves.py --lr 1e-5 --steps 300 # the large configs' learning rate

The baseline (named in the table) is the default recipe: float32 parameters, float32 Adam moments, a
float32 EMA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# name -> (config overrides, bytes per parameter of params + moments + EMA)
RECIPES = {
    "float32 (default; baseline)": (dict(), 4 + 8 + 4),
    "float32 params, bf16 moments": (dict(moment_dtype="bfloat16"), 4 + 4 + 4),
    "float32 params and moments, bf16 EMA": (dict(ema_dtype="bfloat16"), 4 + 8 + 2),
    "bf16 params and moments, no EMA (maxdiffusion's)": (dict(param_dtype="bfloat16", ema_decay=0.0), 2 + 4),
}


def run_recipe(overrides: dict, args: argparse.Namespace, workdir: Path) -> list[dict]:
    import importlib.util

    from director_jax.train.trainer import train

    spec = importlib.util.spec_from_file_location("gen_tiny", REPO / "configs" / "gen_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.vae.init_from = "random"
    cfg.train.steps = args.steps
    cfg.train.log_every = 1
    cfg.checkpoint.every = args.steps
    cfg.optim.learning_rate = args.lr
    cfg.optim.warmup_steps = min(10, args.steps - 1)
    for key, value in overrides.items():
        (cfg.model_options if key == "param_dtype" else cfg.optim)[key] = value
    train(cfg, workdir, progress=False)
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_loss(rows: list[dict], first: bool, window: int) -> float:
    losses = [r["loss"] for r in rows if "loss" in r]
    part = losses[:window] if first else losses[-window:]
    return sum(part) / len(part)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--window", type=int, default=50, help="steps averaged at the start and at the end [default 50]")
    p.add_argument("--recipes", default="", help="comma-separated indices into the recipe list (default: all)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from director_jax.cli import configure_logging
    from director_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    configure_logging(False)
    from bench_common import machine_description

    machine = machine_description("benchmarks/precision_curves.py", ("director_jax", "benchmarks"))
    names = list(RECIPES)
    chosen = [names[int(i)] for i in args.recipes.split(",") if i] or names
    rows = []
    for name in chosen:
        overrides, nbytes = RECIPES[name]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            metrics = run_recipe(overrides, args, Path(tmp))
        rows.append((name, nbytes, mean_loss(metrics, True, args.window), mean_loss(metrics, False, args.window),
                     time.perf_counter() - t0))
        print(f"[precision] {name}: last-{args.window} mean loss {rows[-1][3]:.5f} ({rows[-1][4]:.0f} s)",
              file=sys.stderr, flush=True)
    base = rows[0][3] if chosen[0] == names[0] else None
    print("\n".join(machine))
    print(f"- configs/gen_tiny.py, {args.steps} steps, lr {args.lr:g} (warmup 10), batch 8, random frozen VAE, "
          "float32 compute\n")
    print(f"| recipe | state bytes / param | loss, first {args.window} steps | loss, last {args.window} steps | "
          "last vs baseline | run s |\n|---|---|---|---|---|---|")
    for name, nbytes, first, last, secs in rows:
        rel = f"{last / base - 1:+.2%}" if base else "-"
        print(f"| {name} | {nbytes} | {first:.5f} | {last:.5f} | {rel} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
