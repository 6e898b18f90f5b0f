"""AOT-compile one Director-Gen sampler step (sharded inference) for TPU topologies from this CPU; tabulate per chip.

    python benchmarks/aot_sampler.py --models 14b --sizes 720p --topologies v5p:2x2x1 \
        --mesh fsdp=4 --mesh fsdp=2,sequence=2 --out /tmp/aot_sampler.jsonl

One sampler step is the model call of one denoising step exactly as ``generate`` runs it on a mesh:
``pipeline.gen._velocity`` (``nnx.merge(graphdef, state)(x, sigma_frames, text, positions=..., text_mask=...)``
traced under the mesh and the config's rules), with the model as inference builds it
(``build.loading.inference_config``: bf16 weights and compute, sequence-parallel attention "auto" when the mesh
has a sequence axis) and its weights sharded by ``param_shardings`` on the mesh. Everything is abstract
(``nnx.eval_shape`` weights, ``jax.ShapeDtypeStruct`` inputs): nothing is allocated.

Inputs, as ``generate_latents`` / ``diffusion.samplers.sample`` hand them to the model: latents (B, L, h, w, z)
float32 and sigma per latent frame (B, L) float32 (0 on the given frames) for a keyframe timeline
(``Timeline.from_keyframes(frames, keyframes)``: default first, middle and last frame), its MC-RoPE positions
(L,), and umT5 text embeddings (B, text.max_length, text_dim) with their mask. Under classifier-free guidance
(``guidance_scale != 1``, the configs' default 5.0) ``guided_velocity`` concatenates the cond and uncond halves
into ONE call of batch 2B, so ``--cfg_batch 2`` (the default) compiles what the sampler calls for one video.
The inputs are replicated on the mesh, as ``generate`` passes them (uncommitted arrays).

Each case (model x size x topology x mesh x attention) is compiled in a fresh subprocess (``--one``) and appended
to ``--out`` as one JSON line. Figures are XLA's per-chip ``memory_analysis()`` (libtpu compile-only devices; no
TPU needed). GFLOP/step is the analytic matmul count of the call on all chips (``step_flops``). XLA's own
``cost_analysis()`` per chip (``xla_flops_per_chip``, the table's "XLA GFLOP/chip") counts the scanned layer stack's
body once, not once per layer: compare it only between meshes of one model and size, where it shows how much of
the call each chip computes, replicated work included. One-chip topologies (``v5p:1x1x1``, ``v6e:1x1``) are built
with libtpu's ``chips_per_host_bounds`` set to one chip.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_common, also when this file is loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"1_3b": "configs/gen_1_3b.py", "14b": "configs/gen_14b.py", "tiny": "configs/gen_tiny.py"}
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
COLUMNS = ("model", "size", "frames", "tokens", "topology", "mesh", "dtype", "CFG batch", "attention", "args GiB",
           "temps GiB", "peak+code GiB", "HBM GiB", "fits", "GFLOP/step", "XLA GFLOP/chip", "compile s")
MESH_AXES = ("data", "fsdp", "tensor", "sequence")


# ------------------------------------------------------------------------------------------------
# Topologies and meshes


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"fsdp=2,sequence=2"`` -> ``{"fsdp": 2, "sequence": 2}`` (one size may be -1: the rest of the chips)."""
    if spec is None or spec == "":
        return {"fsdp": -1}
    if isinstance(spec, Mapping):
        sizes = {str(k): int(v) for k, v in spec.items()}
    else:
        sizes = {}
        for part in str(spec).split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not re.fullmatch(r"-?\d+", value.strip()):
                raise ValueError(f"mesh {spec!r}: write sizes like fsdp=4 or fsdp=2,sequence=2 (axes "
                                 f"{', '.join(MESH_AXES)}; one may be -1 for the rest of the chips).")
            sizes[name.strip()] = int(value)
    bad = [name for name in sizes if name not in MESH_AXES]
    if bad:
        raise ValueError(f"mesh {spec!r}: unknown axis {bad[0]!r}; the axes are {', '.join(MESH_AXES)}.")
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {spec!r}: sizes must be positive, and at most one may be -1.")
    return sizes


def _one_chip(topology: str) -> str | None:
    """The generation of a one-chip topology name (``v5p:1x1x1``, ``v6e:1x1``), else None."""
    m = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*:\s*1(?:x1)*\s*", topology)
    return m.group(1).lower() if m else None


def compile_devices(topology: str) -> list:
    """libtpu's compile-only devices of ``topology`` (``train.aot.topology_devices``), one-chip slices included.

    libtpu's default host is 2x2 chips, so it refuses a 1x1 slice unless told the host holds one chip
    (``chips_per_host_bounds=(1, 1, 1)``): those names are built here with that bound.
    """
    from director_jax.train import aot

    generation = _one_chip(topology)
    if generation is None:
        return aot.topology_devices(topology)
    aot.topology_devices(f"{generation}:2x2" + ("x1" if topology.count("x") == 2 else ""))  # checks + libtpu env
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"chips_per_host_bounds": (1, 1, 1)}
    if generation == "v4":
        kwargs["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(topology_name=topology.strip(), platform="tpu", **kwargs).devices)


def sampler_mesh(topology: str, mesh: str | Mapping[str, int] | None):
    """The mesh ``mesh`` over ``topology``'s chips; a ValueError when its size is not the topology's chip count.

    Axes not named have size 1 (``fsdp=-1`` is every chip on fsdp). The sizes must use every chip of the
    slice: a smaller mesh would leave chips idle, a larger one cannot be built.
    """
    from director_jax.parallel.mesh import create_mesh

    sizes = {**{axis: 1 for axis in MESH_AXES}, **parse_mesh(mesh)}
    devices = compile_devices(topology)
    n = len(devices)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n % fixed:
            raise ValueError(f"mesh {format_mesh(sizes)} does not fit topology {topology} ({n} chips): the fixed sizes "
                             f"multiply to {fixed}, which does not divide {n}.")
        sizes = {k: (n // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != n:
        example = f"fsdp={n}" + (f", or fsdp={n // 2},sequence=2" if n % 2 == 0 else "")
        raise ValueError(f"mesh {format_mesh(sizes)} has {fixed} devices but topology {topology} has {n} chips: the "
                         f"mesh sizes must multiply to {n} (e.g. {example}).")
    return create_mesh(sizes, devices)


def format_mesh(sizes: Mapping[str, int]) -> str:
    """``fsdp=2,sequence=2`` (axes of size 1 left out; ``single`` when all are)."""
    kept = [f"{k}={int(v)}" for k, v in sizes.items() if int(v) != 1]
    return ",".join(kept) or "single"


# ------------------------------------------------------------------------------------------------
# The step


def default_keyframes(num_frames: int) -> tuple[int, ...]:
    """First, middle and last frame: 81 frames -> (0, 40, 80)."""
    return tuple(sorted({0, (num_frames - 1) // 2, num_frames - 1}))


def text_length(cfg) -> int:
    """Text tokens per row as ``generate`` passes them: ``text.max_length`` (one empty token for an
    unconditional model, as ``pipeline.settings.text_inputs`` gives it)."""
    return int(cfg.text.max_length) if cfg.text.conditioning else 1


def step_flops(cfg, num_latents: int, tokens: int, text_len: int, batch: int, *, layers: int | None = None) -> float:
    """Analytic FLOPs of one model call (all chips): every matmul of the DiT forward at ``batch`` rows.

    Per block and token 12 D^2 + 4 D F (self-attention q/k/v/o, cross-attention q/o, FFN), 4 S D for the
    self-attention scores and values (all heads), 4 T D for the cross-attention's; per block 4 T D^2 (the
    cross-attention's text keys and values); outside the blocks the patch embedding and head, the text
    projection (text_dim -> D -> D) and the time embedding and projection per latent frame. ``layers``
    overrides the config's depth (1: XLA's cost-analysis convention for a scanned stack).
    """
    m = cfg.model
    d, ffn = int(m.num_attention_heads) * int(m.attention_head_dim), int(m.ffn_dim)
    layers = int(m.num_layers) if layers is None else int(layers)
    s, t = int(tokens), int(text_len)
    patch = math.prod(m.patch_size)
    per_block = s * (12 * d * d + 4 * d * ffn) + 4 * s * s * d + 4 * s * t * d + 4 * t * d * d
    outside = (2 * s * patch * int(m.in_channels) * d + 2 * s * d * patch * int(m.out_channels)
               + 2 * t * (int(m.text_dim) * d + d * d) + 2 * num_latents * (int(m.freq_dim) * d + 7 * d * d))
    return float(batch) * (layers * per_block + outside)


def sampler_step(cfg, mesh=None, *, dtype: str | None = "bfloat16", batch: int = 2,
                 keyframes: Sequence[int] | None = None, attention: str | None = None,
                 text_dtype: str = "bfloat16") -> dict[str, Any]:
    """The abstract arguments of one sampler step of ``cfg`` on ``mesh`` (None: one device, no shardings).

    Returns ``fn`` (``pipeline.gen._velocity``) and ``args`` to ``fn.lower(*args)``, the inference config,
    and the case's sizes (latent frames, tokens, text length, the resolved attention).
    """
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from director_jax.build.loading import inference_config
    from director_jax.build.models import build_director_gen
    from director_jax.build.sections import vae_config_from
    from director_jax.kernels import dispatch, sequence_parallel
    from director_jax.models.timeline import Timeline
    from director_jax.parallel.rules import param_shardings, rules_from_config
    from director_jax.pipeline.gen import _velocity
    from director_jax.train.state import with_shardings

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.init_from = ""  # random weights, abstractly: never read a checkpoint for shapes
    infer = inference_config(cfg, dtype=dtype, mesh=mesh)
    if attention is not None:
        infer.model_options.attention_impl = attention
    frames = int(cfg.video.num_frames)
    keyframes = tuple(default_keyframes(frames) if keyframes is None else keyframes)
    layout = Timeline.from_keyframes(frames, keyframes).layout
    vae = vae_config_from(cfg.vae)
    h, w = int(cfg.video.height) // vae.spatial_factor, int(cfg.video.width) // vae.spatial_factor
    pt, ph, pw = cfg.model.patch_size
    latents = layout.num_latents
    tokens = (latents // pt) * (h // ph) * (w // pw)
    t_len = text_length(cfg)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_director_gen(infer)))
    rules = rules_from_config(infer)
    if mesh is not None:
        state = with_shardings(abstract, param_shardings(abstract, mesh, rules))
        replicated = NamedSharding(mesh, PartitionSpec())
    else:
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
        replicated = None

    def arg(shape, dt):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dt), sharding=replicated)

    x = arg((batch, latents, h, w, int(cfg.model.in_channels)), jnp.float32)
    sigma = arg((batch, latents), jnp.float32)
    positions = arg((latents,), jnp.float32)
    text = arg((batch, t_len, int(cfg.model.text_dim)), text_dtype)
    mask = arg((batch, t_len), jnp.bool_)
    context = None if mesh is None else (mesh, rules)

    impl = infer.model_options.attention_impl
    platform = "cpu" if mesh is None else next(iter(mesh.devices.flat)).platform
    heads, head_dim = int(cfg.model.num_attention_heads), int(cfg.model.attention_head_dim)
    if impl == "auto":
        q = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.dtype(infer.model_options.dtype))
        impl = f"{dispatch.choose_implementation(q, q, backend=platform)} (auto)"
    sp = infer.model_options.get("sequence_parallel")
    seq = 1 if mesh is None else int(dict(mesh.shape).get("sequence", 1))
    if sp and seq > 1:
        tensor = int(dict(mesh.shape).get("tensor", 1))
        resolved = sequence_parallel.resolve_mode(sp, heads, tensor if heads % tensor == 0 else 1, seq)
        impl += f" + {resolved}" + (f" ({sp})" if resolved != sp else "")
    return dict(fn=_velocity, args=(graphdef, context, state, x, sigma, positions, (text, mask)), config=infer,
                latents=latents, tokens=tokens, text_len=t_len, attention=impl, keyframes=keyframes,
                mesh={k: int(v) for k, v in dict(mesh.shape).items()} if mesh is not None else {})


def compile_sampler_step(cfg, topology: str, mesh: str | Mapping[str, int] | None = None, *,
                         dtype: str | None = "bfloat16", batch: int = 2, keyframes: Sequence[int] | None = None,
                         attention: str | None = None, echo=print) -> dict[str, Any]:
    """Compiles one sampler step of ``cfg`` for ``topology`` on ``mesh``; returns a JSON-able result.

    ``mesh``: sizes (``"fsdp=4"``, ``{"fsdp": 2, "sequence": 2}``), which must use every chip of the
    topology (a ValueError otherwise). Memory is per chip (XLA's TPU compiler); ``flops`` is the analytic
    count of the call on all chips (``step_flops``), ``xla_flops_per_chip`` XLA's cost analysis.
    """
    from director_jax.train.aot import compile_report, format_report

    built_mesh = sampler_mesh(topology, mesh)
    step = sampler_step(cfg, built_mesh, dtype=dtype, batch=batch, keyframes=keyframes, attention=attention)
    flops = step_flops(step["config"], step["latents"], step["tokens"], step["text_len"], batch)
    info = dict(height=int(cfg.video.height), width=int(cfg.video.width), frames=int(cfg.video.num_frames),
                latents=step["latents"], tokens=step["tokens"], text_len=step["text_len"], mesh=step["mesh"],
                attention=step["attention"], gflop_per_step=flops / 1e9)
    echo("INFO " + json.dumps(info))  # before the (slow, possibly failing) compile
    # No jax.set_mesh: generate does not set one; _velocity traces under its static (mesh, rules) context.
    report = compile_report(step["fn"], *step["args"], topology=topology)
    echo(f"sampler step: {step['tokens']} tokens ({step['latents']} latent frames, keyframes {step['keyframes']}), "
         f"batch {batch}, text {step['text_len']} tokens, mesh {format_mesh(step['mesh'])}, "
         f"attention {step['attention']}")
    echo(format_report(report))
    cfg_inf = step["config"]
    return {
        "height": int(cfg.video.height), "width": int(cfg.video.width), "frames": int(cfg.video.num_frames),
        "keyframes": list(step["keyframes"]), "latents": step["latents"], "tokens": step["tokens"],
        "text_len": step["text_len"], "topology": topology, "mesh": step["mesh"],
        "dtype": str(cfg_inf.model_options.dtype), "cfg_batch": int(batch), "attention": step["attention"],
        "num_devices": report.num_devices, "device_kind": report.device_kind,
        "argument_bytes": report.argument_bytes, "output_bytes": report.output_bytes,
        "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
        "generated_code_bytes": report.generated_code_bytes, "peak_bytes": report.peak_bytes,
        "total_bytes": report.total_bytes, "hbm_bytes": report.hbm_bytes, "fits": report.fits,
        "flops": flops, "gflop_per_step": flops / 1e9, "xla_flops_per_chip": report.flops,
        "lower_seconds": report.lower_seconds, "compile_seconds": report.compile_seconds, "status": "ok",
    }


# ------------------------------------------------------------------------------------------------
# Cases, subprocesses, the table


def load_case_config(model: str, size: str | None):
    from director_jax.configs_common import load_config

    cfg = load_config(REPO / CONFIGS[model])
    if size is not None:
        cfg.video.height, cfg.video.width = SIZES[size]
    return cfg


def run_one(model: str, size: str, topology: str, mesh: str, dtype: str, batch: int, attention: str | None,
            keyframes: Sequence[int] | None) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    cfg = load_case_config(model, size)
    result = compile_sampler_step(cfg, topology, mesh, dtype=dtype, batch=batch, keyframes=keyframes,
                                  attention=attention, echo=lambda s: print(s, flush=True))
    return {"model": model, "size": size, **result}


def table_row(r: dict) -> str:
    mesh = format_mesh(r["mesh"]) if r.get("mesh") else r.get("mesh_spec", "-")
    frames = f"{r['height']}x{r['width']} x {r['frames']}" if "height" in r else r.get("size", "-")
    head = [r["model"], r.get("size") or "-", frames, str(r.get("tokens", "-")), r["topology"], mesh,
            r.get("dtype", "-"), str(r.get("cfg_batch", "-")), str(r.get("attention", r.get("attention_flag", "-")))]
    gflop = "-" if r.get("gflop_per_step") is None else f"{r['gflop_per_step']:,.0f}"
    if r.get("status") != "ok":
        m = bench.XLA_OOM_RE.search(r.get("note", ""))
        hbm = bench.fmt_gib(int(m.group(2))) if m else "-"
        note = (f"**NO**: XLA refused one buffer, {m.group(3) or 'size'} = {bench.fmt_gib(int(m.group(1)))} GiB "
                f"> {hbm} GiB" if m else r.get("note", r.get("status", "failed")))
        wall = f"refused after {r['wall_seconds']:.0f} s wall" if m and "wall_seconds" in r else "-"
        return "| " + " | ".join(head + ["-", "-", "-", hbm, note, gflop, "-", wall]) + " |"
    cells = head + bench.memory_cells(r) + [gflop, f"{r['xla_flops_per_chip'] / 1e9:,.0f}",
                                            f"{r['compile_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="14b", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--sizes", default="720p", help="comma-separated: " + ",".join(SIZES) + " (x the config's frames)")
    p.add_argument("--topologies", default="v5p:2x2x1", help="comma-separated TPU topologies (v5p:1x1x1: one chip)")
    p.add_argument("--mesh", action="append", default=None, metavar="SIZES",
                   help="mesh sizes over the topology's chips, e.g. fsdp=4 or fsdp=2,sequence=2 (repeatable; "
                        "default fsdp=-1: every chip on fsdp)")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute (inference_config): bfloat16, float32")
    p.add_argument("--cfg_batch", type=int, default=2,
                   help="rows per model call: 2 = classifier-free guidance's cond + uncond of one video, 1 = none")
    p.add_argument("--attention", default="config",
                   help="comma-separated attention_impl values: config (the config's), pallas, splash, xla, ...")
    p.add_argument("--keyframes", default="", help="keyframe frame indices, e.g. 0,40,80 (default first,middle,last)")
    bench.add_output_args(p, out="aot_sampler.jsonl", timeout_min=25.0)
    bench.add_mode_args(p)
    args = p.parse_args()
    if args.table:
        bench.print_jsonl_table(args.table, COLUMNS, table_row)
        return 0
    models, sizes = bench.split_list(args.models), bench.split_list(args.sizes)
    topologies = bench.split_list(args.topologies)
    meshes = args.mesh or ["fsdp=-1"]
    attentions = bench.split_list(args.attention)
    bench.check_choices(p, "model", models, CONFIGS)
    bench.check_choices(p, "size", sizes, SIZES)
    for spec in meshes:
        try:
            parse_mesh(spec)
        except ValueError as e:
            p.error(str(e))
    keyframes = [int(k) for k in bench.split_list(args.keyframes)] or None

    if args.one:
        attention = None if attentions[0] == "config" else attentions[0]
        bench.emit_result(run_one(models[0], sizes[0], topologies[0], meshes[0], args.dtype, args.cfg_batch,
                                  attention, keyframes))
        return 0

    def cases():
        for model, size, topology, mesh, attention in itertools.product(models, sizes, topologies, meshes, attentions):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--models", model, "--sizes", size,
                   "--topologies", topology, "--mesh", mesh, "--dtype", args.dtype, "--cfg_batch",
                   str(args.cfg_batch), "--attention", attention, "--keyframes", args.keyframes]
            yield cmd, {"model": model, "size": size, "topology": topology, "mesh_spec": mesh, "dtype": args.dtype,
                        "cfg_batch": args.cfg_batch, "attention_flag": attention}

    # A failed compile's note quotes the TPU compiler's refusal of a too-large buffer, which table_row reads back.
    return bench.run_cases(cases(), args.out, COLUMNS, table_row, timeout_min=args.timeout_min,
                           error_pattern=bench.XLA_OOM_RE)


if __name__ == "__main__":
    sys.exit(main())
