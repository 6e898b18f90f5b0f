"""Host memory of starting a run from ``init_from``: per-shard reads vs the old in-trace load (issue 20, item 4).

Writes a random-weight Wan2.1 transformer (``configs/gen_1_3b.py``'s model; ``--layers`` to shrink it)
as a sharded diffusers safetensors directory, then in a fresh subprocess per path fills the
parameters on 8 virtual CPU devices (fsdp=8) and reports the peak RSS (``ru_maxrss``):

* ``shards``: ``build.shard_init.load_into_shards`` (what ``train()`` does now): each device's
  slices read from the file, nothing traced;
* ``in-trace``: the old path: the builder reads the whole checkpoint inside ``jax.jit`` (after the
  graphdef's and the abstract state's ``eval_shape``, which read it too), weights as constants.

On CPU the devices' buffers are host memory, so both peaks include the parameters themselves
(``model bytes``). ``--state`` builds the whole train state (``state.create_state``: + EMA + Adam's
two moments, ~4x the model), which at 1.3B needs more memory than a 24 GB machine has. A path
whose RSS passes ``--guard_gb`` is killed and reported as such.

    nice python benchmarks/init_rss.py [--layers 30] [--guard_gb 14] [--state]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def _config(layers: int, init_from: str = ""):
    from director_jax.configs_common import load_config

    cfg = load_config(ROOT / "configs" / "gen_1_3b.py")
    cfg.model.num_layers = layers
    cfg.vae.init_from = "random"
    cfg.init_from = init_from
    cfg.mesh.update(dict(data=1, fsdp=8, tensor=1))
    return cfg


def write_random_transformer(out: Path, layers: int, shard_bytes: int = GiB) -> int:
    """A random float32 diffusers transformer directory, one ~1 GiB shard in memory at a time; returns its bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    from director_jax.build import dit_config
    from director_jax.convert.dit import DIFFUSERS_CLASS, empty_transformer
    from director_jax.convert.dit_weights import diffusers_param_table

    config = dit_config(_config(layers).model)
    table = diffusers_param_table(empty_transformer(config))
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for key, entry in table.items():
        n = 4 * int(np.prod(entry.torch_shape))
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: rng.random(table[k].torch_shape, np.float32) - np.float32(0.5) for k in keys}
        save_file(tensors, str(out / name))
        total += sum(v.nbytes for v in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps({"_class_name": DIFFUSERS_CLASS, **config.to_diffusers_config()}))
    return total


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def child(path: str, src: str, layers: int, full_state: bool) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import jax
    from flax import nnx

    from director_jax.build import flatten_state, unflatten_state
    from director_jax.build.shard_init import load_into_shards
    from director_jax.parallel import axis_rules
    from director_jax.train import state as state_lib
    from director_jax.train.trainer import build_run

    t0 = time.perf_counter()
    run = build_run(_config(layers, src), materialize_frozen=False)
    built = _rss_gb()
    if full_state and path == "shards":
        out = state_lib.create_state(run.init, run.shardings)
    elif path == "shards":
        request = run.init.request()
        abstract = jax.eval_shape(run.init).params
        targets = flatten_state(state_lib.with_shardings(abstract, run.shardings.params))
        out = unflatten_state(abstract, load_into_shards(request, targets))
    else:  # the old path: the builder reads init_from inside the traced function
        build = run.task.build_fn()

        def params():
            with axis_rules(run.rules):
                return nnx.state(build(), nnx.Param)

        nnx.eval_shape(build)  # model_graphdef
        jax.eval_shape(params)  # the abstract state
        if full_state:
            out = jax.jit(lambda: run.init.from_params(params()), out_shardings=run.shardings)()
        else:
            out = jax.jit(params, out_shardings=run.shardings.params)()
    jax.block_until_ready(out)
    print(json.dumps(dict(path=path, peak_gb=_rss_gb(), after_build_run_gb=built,  # ru_maxrss: peaks so far
                          seconds=time.perf_counter() - t0)), flush=True)


def measure(path: str, src: str, layers: int, guard_gb: float, full_state: bool) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--child", path, "--src", src, "--layers", str(layers)]
    proc = subprocess.Popen(cmd + (["--state"] if full_state else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = {"max_gb": 0.0, "killed": False}

    def watch() -> None:
        while proc.poll() is None:
            try:
                kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                break
            seen["max_gb"] = max(seen["max_gb"], kb * 1024 / GiB)
            if seen["max_gb"] > guard_gb:
                seen["killed"] = True
                proc.kill()
                break
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    thread.join()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if seen["killed"]:
        return dict(path=path, status=f"killed: RSS passed the {guard_gb:g} GB guard", peak_gb=seen["max_gb"])
    if proc.returncode or not lines:
        return dict(path=path, status=f"failed rc={proc.returncode}: {stderr.strip().splitlines()[-1:]}",
                    peak_gb=seen["max_gb"])
    return dict(json.loads(lines[-1]), status="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--guard_gb", type=float, default=14.0)
    parser.add_argument("--state", action="store_true", help="the whole train state (~4x the model)")
    parser.add_argument("--paths", default="shards,in-trace")
    parser.add_argument("--child", choices=("shards", "in-trace"))
    parser.add_argument("--src", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.src, args.layers, args.state)
        return
    with tempfile.TemporaryDirectory(prefix="init_rss_") as tmp:
        t0 = time.perf_counter()
        total = write_random_transformer(Path(tmp) / "transformer", args.layers)
        print(f"wrote {total / GiB:.2f} GiB of float32 weights ({args.layers} layers) in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        rows = [measure(p, str(Path(tmp) / "transformer"), args.layers, args.guard_gb, args.state)
                for p in args.paths.split(",")]
    print(f"\nmodel bytes: {total / GiB:.2f} GiB ({total:,} B); 8 CPU devices, fsdp=8; "
          f"{'whole train state' if args.state else 'parameters'}")
    print(f"{'path':10} {'peak RSS GiB':>13} {'x model':>8} {'peak to build_run':>18} {'seconds':>8}  status")
    for r in rows:
        after = f"{r['after_build_run_gb']:.2f}" if "after_build_run_gb" in r else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(f"{r['path']:10} {r['peak_gb']:>13.2f} {r['peak_gb'] * GiB / total:>8.2f} {after:>18} {secs:>8}  "
              f"{r['status']}")


if __name__ == "__main__":
    main()
