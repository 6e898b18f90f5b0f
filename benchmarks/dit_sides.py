"""The two sides ``benchmarks/dit.py`` times: our JAX DiT and diffusers' PyTorch one, with their inputs and timer."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_common import (
    RSSMonitor,
    make_log,
    release_free_memory,
)

log = make_log("dit-bench")


# ------------------------------------------------------------------------------------------------
# Measurement helpers


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, mem: RSSMonitor | None, label: str,
               cleanup: Callable[[], None] | None = None) -> dict:
    """``warmup`` untimed calls, then ``repeats`` timed ones (every call after ``cleanup``); returns the seconds of
    the first call, of every timed call, the peak RSS increase over the timed calls, and the last output."""
    out, first_s = None, None
    for i in range(warmup):
        out = None
        if cleanup is not None:
            cleanup()
        t0 = time.perf_counter()
        out = fn()
        if i == 0:
            first_s = time.perf_counter() - t0
        log(f"{label}: warm-up call {i + 1}/{warmup}: {time.perf_counter() - t0:.3f} s")
    times, peak = [], None
    for i in range(repeats):
        out = None  # drop the previous output (JAX buffers, torch grads) before measuring the next call
        if cleanup is not None:
            cleanup()
        base = None
        if mem is not None:
            release_free_memory()  # so earlier calls' freed memory does not hide this call's
            mem.reset_peak()
            base = mem.rss()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        inc = mem.peak() - base if mem is not None else None
        if inc is not None:
            peak = inc if peak is None else max(peak, inc)
        log(f"{label}: timed call {i + 1}/{repeats}: {times[-1]:.3f} s")
    if first_s is None:
        first_s = times[0]
    return {"first_s": first_s, "times": times, "peak_rss": peak, "out": out}


def xla_stats(compiled: Any) -> dict:
    """Temp bytes from ``memory_analysis()`` and flops from ``cost_analysis()`` (None where not implemented)."""
    stats: dict[str, Any] = {"temp": None, "flops": None}
    with contextlib.suppress(Exception):
        ma = compiled.memory_analysis()
        if ma is not None:
            stats["temp"] = int(ma.temp_size_in_bytes)
            stats["argument"] = int(ma.argument_size_in_bytes)
            stats["output"] = int(ma.output_size_in_bytes)
    with contextlib.suppress(Exception):
        ca = compiled.cost_analysis()
        if isinstance(ca, list | tuple):
            ca = ca[0] if ca else None
        if ca and ca.get("flops"):
            stats["flops"] = float(ca["flops"])
    return stats


# ------------------------------------------------------------------------------------------------
# The two models


def build_config(args: argparse.Namespace):
    from director_jax.models.dit import WanDiTConfig

    return WanDiTConfig(num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
                        out_channels=16, text_dim=args.text_dim, freq_dim=256, ffn_dim=args.ffn_dim,
                        num_layers=args.layers)


def build_torch_model(cfg, seed: int):
    """diffusers' WanTransformer3DModel with random weights; norm gains and biases randomised as well, as in
    tests/torch_reference.py, so no parameter is a trivial 1 or 0."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**cfg.to_diffusers_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def model_flops(cfg, tokens: int, text_len: int, groups: int = 1) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward: every linear layer and both attention products.

    Counted from the config because XLA's ``cost_analysis()`` counts a scanned loop's body once: for the
    layer-scanned DiT it reports about one block's work, not ``num_layers`` blocks'. The backward does
    twice the forward's matmuls (input and weight gradients), so forward + backward is 3x this ("model
    FLOPs"; what remat or a flash backward recompute is not counted).
    """
    d, f = cfg.inner_dim, cfg.ffn_dim
    patch = int(np.prod(cfg.patch_size))
    block = (4 * tokens * d * d            # self-attention q, k, v, out
             + 2 * tokens * tokens * d     # q @ k^T and p @ v over all heads
             + 2 * tokens * d * d          # cross-attention q, out
             + 2 * text_len * d * d        # cross-attention k, v (text tokens)
             + 2 * tokens * text_len * d   # cross-attention products
             + 2 * tokens * d * f)         # FFN in and out
    outside = (tokens * patch * cfg.in_channels * d                          # patch embedding
               + text_len * (cfg.text_dim * d + d * d)                       # text projection
               + groups * (cfg.freq_dim * d + d * d + d * 6 * d)             # time embedding and modulation
               + tokens * d * patch * cfg.out_channels)                      # output head
    return 2.0 * (cfg.num_layers * block + outside)


def make_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    b = args.batch
    return {
        "latents": rng.standard_normal((b, args.frames, args.height, args.width, 16)).astype(np.float32),
        "timestep": np.linspace(250.0, 750.0, b).astype(np.float32),
        "text": rng.standard_normal((b, args.text_len, args.text_dim)).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------
# Benchmark


class JaxSide:
    """The JAX model loaded from the diffusers state dict, its compiled forward, and the timed runs."""

    def __init__(self, args: argparse.Namespace, cfg, state: dict[str, np.ndarray], inputs: dict) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from director_jax.convert import load_transformer

        self.args = args
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        self.model = load_transformer(state, cfg, dtype=dtype, param_dtype=jnp.float32, attention_impl=args.attention)
        self.x = {k: jnp.asarray(v) for k, v in inputs.items()}
        self.res: dict[str, Any] = {
            "backend": jax.default_backend(), "devices": str(jax.devices()[0]), "policies": {},
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))}
        graphdef, self.params, rest = nnx.split(self.model, nnx.Param, ...)

        def forward(params, latents, timestep, text):
            return nnx.merge(graphdef, params, rest)(latents, timestep, text)

        log("jax: compiling forward")
        self.fwd, self.res["fwd_compile_s"] = self._aot(forward, self.params)
        self.res["fwd_xla"] = xla_stats(self.fwd)

    def _aot(self, fn, params):
        import jax

        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(params, self.x["latents"], self.x["timestep"], self.x["text"]).compile()
        return compiled, time.perf_counter() - t0

    def forward_call(self):
        import jax

        return jax.block_until_ready(self.fwd(self.params, self.x["latents"], self.x["timestep"], self.x["text"]))

    def run(self, mem: RSSMonitor | None) -> dict:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from director_jax.convert.dit_weights import diffusers_param_table
        from director_jax.convert.param_table import export_state_dict

        args, x, res, model = self.args, self.x, self.res, self.model
        r = time_calls(self.forward_call, args.warmup, args.repeats, mem, "jax forward")
        res["out"] = np.asarray(r.pop("out"), np.float32)
        res["fwd"] = r

        for policy in args.policies:
            model.remat_policy = policy  # a static attribute: part of the graphdef, so a new program
            g_def, g_params, g_rest = nnx.split(model, nnx.Param, ...)

            def loss(params, latents, timestep, text, g_def=g_def, g_rest=g_rest):
                out = nnx.merge(g_def, params, g_rest)(latents, timestep, text)
                return jnp.mean(jnp.square(out.astype(jnp.float32)))

            log(f"jax: compiling forward + backward, remat {policy}")
            try:
                step, compile_s = self._aot(jax.value_and_grad(loss), g_params)
            except Exception as e:  # e.g. the offload policy on a backend without pinned host memory
                res["policies"][policy] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                log(f"jax: remat {policy} failed to compile: {res['policies'][policy]['error']}")
                continue

            def step_call(step=step, g_params=g_params):
                return jax.block_until_ready(step(g_params, x["latents"], x["timestep"], x["text"]))

            r = time_calls(step_call, args.warmup, args.repeats, mem, f"jax fwd+bwd remat {policy}")
            loss_value, grads = r.pop("out")
            grad_model = nnx.merge(g_def, grads, g_rest)
            res["policies"][policy] = {**r, "compile_s": compile_s, "xla": xla_stats(step),
                                       "loss": float(loss_value),
                                       "grads": export_state_dict(grad_model, diffusers_param_table(grad_model))}
        model.remat_policy = "none"
        return res


class TorchSide:
    """diffusers' model on ``--torch-device``: forward under no_grad, forward + backward, timed runs."""

    def __init__(self, args: argparse.Namespace, model, inputs: dict) -> None:
        import torch

        self.args = args
        self.device = torch.device(args.torch_device)
        self.model = model.to(self.device).eval()  # no dropout in Wan; eval() only to be explicit
        self.cuda = self.device.type == "cuda"
        # (B, F, H, W, C) -> diffusers' (B, C, F, H, W)
        self.lat = torch.from_numpy(inputs["latents"]).permute(0, 4, 1, 2, 3).contiguous().to(self.device)
        self.ts = torch.from_numpy(inputs["timestep"]).to(self.device)
        self.text = torch.from_numpy(inputs["text"]).to(self.device)
        self.res: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(self.device)}

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _forward(self):
        import torch

        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.dtype == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            return self.model(self.lat, timestep=self.ts, encoder_hidden_states=self.text, return_dict=False)[0]

    def forward_call(self):
        import torch

        with torch.no_grad():
            out = self._forward()
        self._sync()
        return out

    def fwd_bwd_call(self):
        loss = self._forward().float().square().mean()
        loss.backward()
        self._sync()
        return loss

    @staticmethod
    def to_channels_last(out) -> np.ndarray:
        return out.float().permute(0, 2, 3, 4, 1).cpu().numpy()

    def _drop_grads(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda_peak(self, r: dict) -> None:
        if self.cuda:
            import torch

            r["peak_rss"] = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)

    def run(self, mem: RSSMonitor | None) -> dict:
        args, model, res = self.args, self.model, self.res
        mem = None if self.cuda else mem
        model.disable_gradient_checkpointing()
        self._drop_grads()
        r = time_calls(self.forward_call, args.warmup, args.repeats, mem, "torch forward", cleanup=self._drop_grads)
        self._cuda_peak(r)
        r["first_s"] = res.get("first_fwd_s", r["first_s"])  # the agreement check made the very first call
        res["out"] = self.to_channels_last(r.pop("out"))
        res["fwd"] = r

        model.train()  # diffusers' gradient checkpointing only acts in training mode with grad enabled
        for name, ckpt in (("eager", False), ("grad_ckpt", True)):
            if ckpt and not args.torch_grad_ckpt:
                continue
            if ckpt:
                model.enable_gradient_checkpointing()
            r = time_calls(self.fwd_bwd_call, args.warmup, args.repeats, mem,
                           f"torch fwd+bwd{' (gradient checkpointing)' if ckpt else ''}", cleanup=self._drop_grads)
            self._cuda_peak(r)
            r["loss"] = r.pop("out").item()
            if not ckpt:
                res["grads"] = {k: p.grad.detach().float().cpu().numpy().copy() for k, p in model.named_parameters()}
            res[name] = r
            model.disable_gradient_checkpointing()
        self._drop_grads()
        model.eval()
        return res
