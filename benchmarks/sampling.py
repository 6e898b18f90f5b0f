#!/usr/bin/env python
"""Sampling speed: this project's JAX ``generate_latents`` against diffusers' ``WanPipeline.__call__``, same network.

For every size in ``--sizes`` a ``DirectorGen`` (Wan DiT) is built with random weights in JAX; its weights are
copied into PyTorch (``DirectorWanTransformer3DModel.from_jax``, i.e. ``export_state_dict`` with diffusers' names)
and loaded strictly into a plain diffusers ``WanTransformer3DModel`` of the same config. Then, in this one process,
one after the other, each side samples latents with UniPC (flow sigmas, bh2, order 2, ``--shift``), ``--steps``
steps and classifier-free guidance on (``--guidance``, a random negative caption of the caption's length):

* **JAX**: ``pipeline.gen.generate_latents`` on a one-chunk timeline (keyframe at frame 0, so one latent frame is
  held clean, as Director-Gen always has at least one); a jitted model call per step over cond + uncond batched
  (batch 2), the solver arithmetic in small jitted helpers. One warm-up run first (it compiles; the compile time,
  jaxpr trace + lowering + XLA compile, is summed from ``jax.monitoring`` events and reported on its own), then
  ``--repeats`` timed runs (``block_until_ready``).
* **diffusers**: ``WanPipeline(...)(prompt_embeds=..., negative_prompt_embeds=..., output_type="latent")`` with
  ``text_encoder=None, tokenizer=None`` and a small random ``AutoencoderKLWan`` that is never run: with
  ``output_type="latent"`` the VAE decode is skipped, and the JAX side never decodes either, so **no VAE work is
  in either number**. diffusers runs cond and uncond as two batch-1 transformer calls per step. One warm-up run,
  then ``--repeats`` timed runs, ``torch.set_num_threads(<usable cores>)``, ``torch.no_grad`` (the pipeline's).
* **ours, PyTorch** (``--no-torch-twin`` skips it): ``TorchDirectorPipeline.sample`` with the same weights, the
  same noise and keyframe as the JAX side (cond + uncond batched, like JAX), so its latents are compared with
  JAX's numerically too.

The latent size is the same on every side: ``frames`` pixel frames -> (frames - 1) / 4 + 1 latent frames, and
``height`` x ``width`` pixels -> /8 latents (Wan2.1's VAE factors, which WanPipeline uses), 16 channels.
Checks (cheap): every side's latents are finite and of the same shape (B, F, h, w, C); JAX vs our PyTorch twin
max abs difference (same noise). WanPipeline's latents are not compared numerically (other noise, no keyframe).

Run from the repository root::

    python benchmarks/sampling.py --sizes tiny,mid --steps 4 --repeats 3

Progress goes to stderr, the markdown table to stdout. Only same-run numbers are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
from bench_common import REPO, fmt_s, machine_description, make_log, usable_cores

log = make_log("sampling-bench")


@dataclasses.dataclass(frozen=True)
class Size:
    heads: int
    head_dim: int
    layers: int
    ffn: int
    text_dim: int
    text_len: int
    freq_dim: int
    frames: int  # pixel frames (4n + 1)
    height: int  # pixels (multiple of 16)
    width: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    @property
    def tokens(self) -> int:
        f, h, w = self.latent_shape
        return f * (h // 2) * (w // 2)


SIZES = {
    # configs/gen_tiny.py's DiT (dim 64, 2 heads, 2 layers, ffn 128, text_dim 32, freq_dim 64, 64 text tokens) and
    # its latent grid (17 frames at 32x32 with the tiny 4x VAE = 5 x 8 x 8 latents = 64x64 pixels at Wan's 8x).
    "tiny": Size(heads=2, head_dim=32, layers=2, ffn=128, text_dim=32, text_len=64, freq_dim=64, frames=17,
                 height=64, width=64),
    # dim 512, 8 layers, Wan's text width and length (umT5: 4096 x 512), 33 frames at 128x128 -> 9 x 16 x 16
    # latents -> 576 video tokens.
    "mid": Size(heads=4, head_dim=128, layers=8, ffn=2048, text_dim=4096, text_len=512, freq_dim=256, frames=33,
                height=128, width=128),
}


def dit_config(s: Size):
    from director_jax.models.dit import WanDiTConfig

    return WanDiTConfig(num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=16, out_channels=16,
                        text_dim=s.text_dim, freq_dim=s.freq_dim, ffn_dim=s.ffn, num_layers=s.layers)


def fmt_t(x: float) -> str:
    """Seconds, with four decimals below 0.1 s (tiny's steps take milliseconds)."""
    return f"{x:.4f}" if x < 0.1 else fmt_s(x)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


class CompileTimer:
    """Sums JAX's compile events (jaxpr trace, lowering to MLIR, XLA backend compile) while ``active``."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        import jax

        self.total, self.active = 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if self.active and event in self.EVENTS:
            self.total += duration


def run_size(name: str, s: Size, args: argparse.Namespace, ctimer: CompileTimer) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from flax import nnx

    from director_jax.models.dit import DirectorGen, WanDiT
    from director_jax.models.timeline import Timeline
    from director_jax.pipeline.gen import generate_latents
    from director_jax.pytorch.modules import DirectorWanTransformer3DModel
    from director_jax.pytorch.pipeline import TorchDirectorPipeline, jax_noise

    res: dict = {"name": name, "size": s}
    cfg = dit_config(s)
    lf, lh, lw = s.latent_shape
    log(f"[{name}] building DirectorGen dim {cfg.inner_dim}, {s.layers} layers, latents {lf}x{lh}x{lw}x16 "
        f"({s.tokens} tokens), text {s.text_len}x{s.text_dim}")
    gen = DirectorGen(WanDiT(cfg, rngs=nnx.Rngs(args.seed)))
    res["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(gen, nnx.Param)))
    layout = Timeline.from_keyframes(s.frames, [0]).layout
    assert layout.num_latents == lf, (layout.num_latents, lf)
    rng = np.random.RandomState(args.seed)
    text = rng.randn(1, s.text_len, s.text_dim).astype(np.float32)
    negative = rng.randn(1, s.text_len, s.text_dim).astype(np.float32)
    given = np.zeros((1, lf, lh, lw, 16), np.float32)
    key = jax.random.key(args.seed)
    sampling = dict(steps=args.steps, sampler="unipc", shift=args.shift, guidance_scale=args.guidance)

    # (a) JAX generate_latents
    def jax_run():
        out = generate_latents(gen, layout, jnp.asarray(given), jnp.asarray(text), key=key,
                               negative_text=jnp.asarray(negative), progress=False, **sampling)
        return out.block_until_ready()

    ctimer.total, ctimer.active = 0.0, True
    t0 = time.perf_counter()
    jax_run()
    res["jax_first"] = time.perf_counter() - t0
    ctimer.active = False
    res["jax_compile"] = ctimer.total
    log(f"[{name}] JAX warm-up run {res['jax_first']:.2f} s (compile {res['jax_compile']:.2f} s)")
    res["jax"], out = timed(jax_run, args.repeats)
    res["jax_out"] = np.asarray(out)
    log(f"[{name}] JAX runs: {', '.join(f'{t:.2f}' for t in res['jax'])} s")

    # the same weights in PyTorch
    twin = DirectorWanTransformer3DModel.from_jax(gen)
    plain = WanTransformer3DModel(**{k: v for k, v in twin.config.items() if not k.startswith("_")})
    plain.load_state_dict(twin.state_dict(), strict=True)
    plain.eval()

    # (b) diffusers WanPipeline, output_type="latent"
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()  # never run
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=plain,
                       scheduler=TorchDirectorPipeline.scheduler("unipc", args.shift))
    pipe.set_progress_bar_config(disable=True)
    text_t, negative_t = torch.from_numpy(text), torch.from_numpy(negative)

    def diffusers_run():
        return pipe(prompt_embeds=text_t, negative_prompt_embeds=negative_t, height=s.height, width=s.width,
                    num_frames=s.frames, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    generator=torch.Generator().manual_seed(args.seed), output_type="latent",
                    max_sequence_length=s.text_len, return_dict=False)[0]

    t0 = time.perf_counter()
    diffusers_run()
    res["diffusers_first"] = time.perf_counter() - t0
    res["diffusers"], out = timed(diffusers_run, args.repeats)
    res["diffusers_out"] = out.float().permute(0, 2, 3, 4, 1).numpy()  # (B, C, F, h, w) -> channels-last
    log(f"[{name}] diffusers runs: {', '.join(f'{t:.2f}' for t in res['diffusers'])} s")

    # (c) our PyTorch twin, TorchDirectorPipeline.sample (same noise and keyframe as JAX)
    if args.torch_twin:
        ours = TorchDirectorPipeline(vae=None, transformer=twin)
        noise = jax_noise(key, given.shape)

        def twin_run():
            return ours.sample(layout, given, text, noise, negative_text=negative, **sampling)

        t0 = time.perf_counter()
        twin_run()
        res["twin_first"] = time.perf_counter() - t0
        res["twin"], res["twin_out"] = timed(twin_run, args.repeats)
        log(f"[{name}] TorchDirectorPipeline runs: {', '.join(f'{t:.2f}' for t in res['twin'])} s")
    return res


def check(res: dict) -> str:
    outs = {k: res[f"{k}_out"] for k in ("jax", "diffusers", "twin") if f"{k}_out" in res}
    shapes = {k: tuple(v.shape) for k, v in outs.items()}
    finite = {k: bool(np.all(np.isfinite(v))) for k, v in outs.items()}
    ok = len(set(shapes.values())) == 1 and all(finite.values())
    line = (f"{'OK' if ok else 'FAILED'}: shapes {', '.join(f'{k} {v}' for k, v in shapes.items())}; finite "
            f"{', '.join(f'{k} {v}' for k, v in finite.items())}")
    if "twin_out" in res:
        d = float(np.max(np.abs(res["jax_out"] - res["twin_out"])))
        scale = float(np.max(np.abs(res["jax_out"])))
        line += f"; JAX vs TorchDirectorPipeline max abs diff {d:.1e} (max abs latent {scale:.3g})"
    res["ok"] = ok
    return line


def report(results: list[dict], args: argparse.Namespace, machine: list[str], wall: float) -> list[str]:
    lines = [
        "### Sampling speed: JAX generate_latents vs diffusers WanPipeline",
        "",
        *machine,
        f"- Sampling: UniPC (flow sigmas, bh2, order 2), {args.steps} steps, shift {args.shift:g}, CFG guidance "
        f"{args.guidance:g} with a negative caption (random embeddings, same length as the caption), batch 1; "
        f"float32; random weights (seed {args.seed}), the same network on every side. Latents only: **no VAE "
        "decode on either side** (diffusers `output_type=\"latent\"`; JAX `generate_latents`).",
        f"- Timing: one warm-up run, then the median of {args.repeats} timed runs of the whole sampler call; "
        f"per step = median total / {args.steps} (solver and guidance arithmetic included). JAX on "
        f"{results[0]['jax_devices']} (XLA's own CPU thread pool); PyTorch with torch.set_num_threads({args.threads}).",
        "",
    ]
    for r in results:
        s = r["size"]
        lf, lh, lw = s.latent_shape
        lines.append(f"- `{r['name']}`: dim {s.heads * s.head_dim} ({s.heads} heads x {s.head_dim}), {s.layers} "
                     f"layers, ffn {s.ffn}, text {s.text_len} x {s.text_dim}, freq_dim {s.freq_dim}, "
                     f"{r['params'] / 1e6:.2f}M parameters; {s.frames} frames at {s.height}x{s.width} -> latents "
                     f"{lf}x{lh}x{lw}x16 -> {s.tokens} video tokens")
    lines += [
        "",
        "| Size | Side | per step (s) | total, median (min) (s) | JAX / this | warm-up run (s) | JAX compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        jm = statistics.median(r["jax"])
        rows = [("JAX `generate_latents`", "jax"), ("diffusers `WanPipeline` (baseline)", "diffusers")]
        if "twin" in r:
            rows.append(("ours, PyTorch `TorchDirectorPipeline.sample`", "twin"))
        for label, k in rows:
            m = statistics.median(r[k])
            ratio = "1" if k == "jax" else (f"**{jm / m:.2f}**" if k == "diffusers" else f"{jm / m:.2f}")
            comp = fmt_s(r["jax_compile"]) if k == "jax" else "n/a"
            lines.append(f"| {r['name']} | {label} | {fmt_t(m / args.steps)} | {fmt_t(m)} ({fmt_t(min(r[k]))}) | "
                         f"{ratio} | {fmt_t(r[f'{k}_first'])} | {comp} |")
    lines += [
        "",
        "- JAX / this < 1: JAX is faster (ratio of median totals); the bold one is against diffusers' WanPipeline.",
        "- JAX compile: jaxpr trace + MLIR lowering + XLA compile summed from `jax.monitoring` events during the "
        "warm-up run (cold, no persistent cache); not in the timed runs. PyTorch has none; its warm-up run is shown.",
        "- Work per step differs in form, not amount: JAX and `TorchDirectorPipeline` run cond + uncond as one batch-2 "
        "model call with per-frame timesteps (0 on the keyframe); WanPipeline runs two batch-1 calls with one "
        "timestep per sample and no keyframe.",
        "",
        "Checks:",
        "",
        *[f"- {r['name']}: {r['check']}" for r in results],
        "",
        f"Total benchmark wall time: {wall:.0f} s.",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,mid", help=f"comma-separated, of {sorted(SIZES)} [default tiny,mid]")
    p.add_argument("--steps", type=int, default=4, help="sampler steps [default 4]")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side after one warm-up [default 3]")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (must be != 1) [default 5]")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift [default 5]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads [default: usable cores]")
    p.add_argument("--no-torch-twin", dest="torch_twin", action="store_false",
                   help="skip our TorchDirectorPipeline.sample row")
    p.add_argument("--xla-default", action="store_true",
                   help="XLA's own CPU flags, without director_jax/xla_flags.py's (the configuration before them)")
    args = p.parse_args(argv)
    args.sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    if not args.sizes or set(args.sizes) - set(SIZES):
        p.error(f"--sizes takes a comma-separated subset of {sorted(SIZES)}")
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be >= 2 and --repeats >= 1")
    if args.guidance == 1.0:
        p.error("--guidance must be != 1 (this benchmarks sampling with CFG on)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not args.xla_default:
        from director_jax.xla_flags import apply_cpu_flags

        apply_cpu_flags()  # what the commands run with; before JAX's backend starts
    machine = machine_description("benchmarks/sampling.py", ("director_jax", "benchmarks/sampling.py"))
    t_start = time.perf_counter()

    import jax
    import torch

    torch.set_num_threads(args.threads)
    ctimer = CompileTimer()
    results = []
    for name in args.sizes:
        r = run_size(name, SIZES[name], args, ctimer)
        r["jax_devices"] = ", ".join(str(d) for d in jax.devices())
        r["check"] = check(r)
        log(f"[{name}] check: {r['check']}")
        results.append(r)
    text = "\n".join(report(results, args, machine, time.perf_counter() - t_start)) + "\n"
    print(text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
