"""The measuring workers of ``benchmarks/vae.py``: each runs in its own process (``--worker SPEC``), so
every measurement starts from a fresh interpreter and its peak RSS is its own."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import numpy as np
from bench_common import (
    RSSMonitor,
    make_log,
    release_free_memory,
)

log = make_log("vae-bench")


# ------------------------------------------------------------------------------------------------
# Peak-memory measurement (used inside the workers)


# ------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def make_inputs(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """The clip (B, T, H, W, 3) in [-1, 1] and a latent (B, (T-1)/4+1, H/8, W/8, z) of the matching shape."""
    rng = np.random.default_rng(spec["seed"])
    b, t, h, w = spec["batch"], spec["frames"], spec["height"], spec["width"]
    video = rng.uniform(-1.0, 1.0, (b, t, h, w, 3)).astype(np.float32)
    z = rng.standard_normal((b, (t - 1) // 4 + 1, h // 8, w // 8, spec["z_dim"])).astype(np.float32)
    return video, z


def worker_prep(spec: dict, mon: RSSMonitor) -> dict:
    """Random Wan2.1-sized weights as a diffusers state dict (.npz) plus the config both frameworks build from."""
    import torch
    from diffusers import AutoencoderKLWan

    from director_jax.models.vae import WanVAEConfig

    cfg = WanVAEConfig().to_diffusers_config()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKLWan(**cfg).state_dict().items()}
    rng = np.random.default_rng(spec["seed"])
    state = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("gamma"):  # RMS-norm gains: ones, perturbed so that they are not a no-op
            state[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            continue
        weight_shape = shapes[key[: -len("bias")] + "weight"] if key.endswith("bias") else shape
        bound = 1.0 / math.sqrt(math.prod(weight_shape[1:]))  # PyTorch's / WanVAE's default conv init
        state[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    np.savez(spec["weights"], **state)
    with open(spec["config"], "w") as f:
        json.dump(cfg, f)
    n_params = int(sum(v.size for v in state.values()))
    log(f"prep: {n_params / 1e6:.1f}M parameters written to {spec['weights']}")
    return {"params": n_params}


def _load_weights(spec: dict) -> dict[str, np.ndarray]:
    with np.load(spec["weights"]) as f:
        return {k: f[k] for k in f.files}


def _build_jax(spec: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from director_jax.convert.vae_weights import load_diffusers_state_dict
    from director_jax.models.vae import WanVAE, WanVAEConfig

    with open(spec["config"]) as f:
        cfg = WanVAEConfig.from_diffusers_config(json.load(f))
    # Build with zeros (no random init: the weights come from the shared state dict) and load them.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    vae = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    load_diffusers_state_dict(vae, _load_weights(spec), source=spec["weights"])
    return vae


def _memory_stats(compiled: Any) -> dict | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}


def _timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _time_loop(spec: dict, mon: RSSMonitor, baseline: int, encode, decode, label: str) -> dict:
    """Warm-up runs, then timed runs of ``encode`` (None in decode-only mode) and ``decode``.

    Each returns its output once it is computed. Returns the timings and the peak RSS increases over
    ``baseline``: over the timed runs (encode and decode phases separately) and including what came before.
    """
    out: dict[str, Any] = {"enc_s": [], "dec_s": [], "warmup_s": []}
    for i in range(spec["warmup"]):
        log(f"{label}: warm-up run {i + 1}/{spec['warmup']}")
        enc_s = _timed(encode)[0] if encode is not None else 0.0
        out["warmup_s"].append(enc_s + _timed(decode)[0])
    peak_before = mon.peak() - baseline
    peaks = {"enc": 0, "dec": 0}
    mean = video = None
    for i in range(spec["repeats"]):
        mean = video = None  # drop the previous run's outputs before the next run
        enc_s = 0.0
        for phase, fn in (("enc", encode), ("dec", decode)):
            if fn is None:
                continue
            release_free_memory()  # freed heap back to the OS, then restart the high-water mark
            mon.reset_peak()
            secs, result = _timed(fn)
            peaks[phase] = max(peaks[phase], mon.peak() - baseline)
            if phase == "enc":
                enc_s, mean = secs, result
            else:
                video = result
                out["dec_s"].append(secs)
        out["enc_s"].append(enc_s)
        log(f"{label}: timed run {i + 1}/{spec['repeats']}: encode {enc_s:.2f} s, decode {out['dec_s'][-1]:.2f} s")
    out["peak_enc"] = peaks["enc"] if encode is not None else None
    out["peak_dec"] = peaks["dec"]
    out["peak_runs"] = max(peaks.values())
    out["peak_incl_warmup"] = max(peak_before, out["peak_runs"])
    if spec.get("save"):
        for name, arr in (("mean", mean), ("video", video)):
            if arr is None:
                continue
            if spec["kind"] == "torch":  # (B, C, T, H, W) -> channels-last
                arr = arr.permute(0, 2, 3, 4, 1).numpy()
            np.save(f"{spec['save']}_{name}.npy", np.asarray(arr))
    return out


def worker_jax_full(spec: dict, mon: RSSMonitor) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    label = spec["label"]
    vae = _build_jax(spec)
    graphdef, state = nnx.split(vae)
    video, z = make_inputs(spec)
    do_encode = spec["mode"] == "encode+decode"
    x = jnp.asarray(video) if do_encode else None
    zj = jnp.asarray(z)
    del video, z
    release_free_memory()
    baseline = mon.rss()
    mon.reset_peak()
    res: dict[str, Any] = {"baseline_rss": baseline, "jax_backend": jax.default_backend()}

    def encode(state, x):
        return nnx.merge(graphdef, state).encode(x)

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z)

    compile_s, stats = {}, {}
    compiled = {}
    for name, fn, arg in (("encode", encode, x), ("decode", decode, zj)):
        if arg is None:
            continue
        log(f"{label}: compiling {name}")
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(state, arg).compile()
        compile_s[name] = time.perf_counter() - t0
        stats[name] = _memory_stats(compiled[name])
    res["compile_s"] = compile_s
    res["xla_memory"] = stats
    res["peak_compile"] = mon.peak() - baseline
    need = max((s["argument"] + s["output"] + s["temp"] for s in stats.values() if s), default=0)
    if need > spec["budget_bytes"]:
        res["skipped"] = (f"XLA needs {need / 2**30:.1f} GiB (arguments + outputs + temp) > budget "
                          f"{spec['budget_bytes'] / 2**30:.1f} GiB (--mem-budget-gib); not run")
        log(f"{label}: {res['skipped']}")
        return res

    def encode_once():
        return jax.block_until_ready(compiled["encode"](state, x))[0]  # posterior mean (logvar dropped)

    def decode_once():
        return jax.block_until_ready(compiled["decode"](state, zj))

    res.update(_time_loop(spec, mon, baseline, encode_once if do_encode else None, decode_once, label))
    return res


def worker_jax_stream(spec: dict, mon: RSSMonitor) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    label = spec["label"]
    vae = _build_jax(spec)
    video, z = make_inputs(spec)
    do_encode = spec["mode"] == "encode+decode"
    if not do_encode:
        video = None
    release_free_memory()
    baseline = mon.rss()
    mon.reset_peak()
    res: dict[str, Any] = {"baseline_rss": baseline, "jax_backend": jax.default_backend()}

    # The streaming steps have the same shapes whatever the clip length, so a short clip (frame 0 plus one
    # 4-frame chunk; latent frame 0 plus one more) compiles every step the full clip will use.
    log(f"{label}: compiling the streaming steps (short-clip warm-up)")
    t0 = time.perf_counter()
    if do_encode:
        jax.block_until_ready(vae.encode_streaming(video[:, : min(5, video.shape[1])]))
    vae.decode_streaming(z[:, : min(2, z.shape[1])])
    res["compile_s"] = {"streaming steps (short-clip warm-up)": time.perf_counter() - t0}
    res["peak_compile"] = mon.peak() - baseline

    def encode_once():
        return jax.block_until_ready(vae.encode_streaming(video))[0]

    def decode_once():
        return vae.decode_streaming(z)  # host NumPy, assembled from the per-step frames

    res.update(_time_loop(spec, mon, baseline, encode_once if do_encode else None, decode_once, label))

    if spec.get("step_memory"):
        log(f"{label}: XLA memory_analysis of one decode step")
        graphdef, state = nnx.split(vae)
        z1 = jnp.asarray(z[:, :1])
        try:  # the very jitted step decode_streaming runs: lowering it again reuses its compiled executables
            from director_jax.models.vae import _jit_decode_step

            def step_lower(s, z, c):
                return _jit_decode_step.lower(graphdef, s, z, c)
        except ImportError:
            step_lower = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode_step(z, c)).lower
        _, cache_shapes = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode_step(z, None), state, z1)
        res["step_memory"] = {
            "first": _memory_stats(step_lower(state, z1, None).compile()),
            "steady": _memory_stats(step_lower(state, z1, cache_shapes).compile()),
            "cache_bytes": int(sum(math.prod(c.shape) * c.dtype.itemsize for c in cache_shapes)),
        }
    return res


def worker_torch(spec: dict, mon: RSSMonitor) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    label = spec["label"]
    torch.set_num_threads(spec["threads"])
    with open(spec["config"]) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    weights = {k: torch.from_numpy(v) for k, v in _load_weights(spec).items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()
    del weights
    video, z = make_inputs(spec)
    x = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()  # channels-last -> (B, C, T, H, W)
    zt = torch.from_numpy(z).permute(0, 4, 1, 2, 3).contiguous()
    del video, z
    release_free_memory()
    baseline = mon.rss()
    mon.reset_peak()
    res: dict[str, Any] = {"baseline_rss": baseline, "threads": torch.get_num_threads()}

    # diffusers runs the clip in chunks of the same shapes whatever its length (frame 0, then 4 frames; one
    # latent frame at a time), so a short clip warms up every kernel / oneDNN primitive the full clip uses.
    log(f"{label}: short-clip warm-up (first calls)")
    t0 = time.perf_counter()
    with torch.no_grad():
        model.encode(x[:, :, : min(5, x.shape[2])])
        model.decode(zt[:, :, : min(2, zt.shape[2])])
    res["compile_s"] = {"short-clip warm-up": time.perf_counter() - t0}
    res["peak_compile"] = mon.peak() - baseline

    @torch.no_grad()
    def encode_once():
        return model.encode(x).latent_dist.mean  # channels-first; converted for the comparison after timing

    @torch.no_grad()
    def decode_once():
        return model.decode(zt).sample

    res.update(_time_loop(spec, mon, baseline, encode_once, decode_once, label))
    return res


WORKERS = {"prep": worker_prep, "jax-full": worker_jax_full, "jax-stream": worker_jax_stream, "torch": worker_torch}


def worker_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    mon = RSSMonitor()
    result = WORKERS[spec["kind"]](spec, mon)
    result["rss_method"] = mon.method
    with open(spec["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    worker_main(sys.argv[sys.argv.index("--worker") + 1])
