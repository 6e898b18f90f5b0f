"""Building blocks shared by the DiTs: linear layers, norms, modulation, RoPE with real positions.

Numerics follow diffusers' Wan modules (``WanTransformerBlock`` and friends): layer norms and the
modulation arithmetic run in float32 whatever the compute dtype, so a bfloat16 model keeps the same
statistics as the PyTorch reference. Every parameter carries logical axis names in its
``out_sharding`` metadata ("embed", "heads", "mlp", ...); the mesh rules that turn them into
partition specs live in ``director_jax.parallel``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.kernels.attention import attention
from director_jax.kernels.flash import BlockSizes


def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    """PyTorch's default Linear / Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Drawn with NumPy from a seed taken off the JAX key: eager ``jax.random.uniform`` compiles once
    per parameter shape, which made building a Wan-sized model take tens of seconds on a CPU. Under
    a transform (``nnx.vmap`` of stacked layers, ``nnx.eval_shape``) the key is traced and the JAX
    sampler is used instead.
    """
    bound = 1.0 / math.sqrt(fan_in)
    if isinstance(key, jax.core.Tracer):  # drawn in float32 and rounded: the same weights whatever the dtype
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
    values = np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)
    return jnp.asarray(values, dtype)


def torch_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    """N(0, std^2), drawn like ``torch_uniform`` (NumPy when eager, JAX under a transform)."""
    if isinstance(key, jax.core.Tracer):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with logical axis names (``out_sharding`` metadata), not sharded eagerly.

    The names are mapped to mesh axes by the rules in ``director_jax.parallel`` when a sharded model
    is built; creating a module needs no mesh.
    """
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; ``kernel`` is (in, out), the transpose of PyTorch's ``weight``."""

    def __init__(self, in_dim: int, out_dim: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        k1, k2 = jax.random.split(rngs.params())
        self.kernel = param(torch_uniform(k1, (in_dim, out_dim), in_dim, param_dtype), axes)
        self.bias = param(torch_uniform(k2, (out_dim,), in_dim, param_dtype), axes[1:])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """``torch.nn.RMSNorm``: x / sqrt(mean(x^2) + eps) * weight, in float32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = None, param_dtype: Any = jnp.float32):
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Layer norm without affine parameters, in float32 (diffusers' ``FP32LayerNorm``); returns f32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    """``FP32LayerNorm`` with affine weight and bias (Wan's cross-attention norm)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.weight = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps) * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def modulate(x_normed: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN modulation ``x * (1 + scale) + shift`` of grouped tokens.

    ``x_normed`` is (B, G, N, D) float32 (G timestep groups of N tokens each); ``shift`` and
    ``scale`` are (B, G, D). Grouping lets one timestep embedding serve a whole latent frame, so
    per-frame timesteps cost (B, T', 6, D) instead of diffusers' per-token (B, S, 6, D).
    """
    return x_normed * (1.0 + scale[:, :, None, :]) + shift[:, :, None, :]


def timestep_sinusoid(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features [cos, sin] (diffusers' ``Timesteps(flip_sin_to_cos=True, shift=0)``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class FeedForward(nnx.Module):
    """Wan's FFN: Linear -> GELU (tanh approximation) -> Linear (diffusers ``ffn.net.0.proj``, ``ffn.net.2``)."""

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.proj_in = Linear(dim, hidden_dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj_out = Linear(hidden_dim, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


# ----------------------------------------------------------------------------------------------
# Rotary position embedding with real-valued positions (MC-RoPE)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim among (time, height, width): h = w = 2 * (head_dim // 6), t the rest."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_inverse_frequencies(dim: int, theta: float = 10000.0) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, in float64 (diffusers' ``get_1d_rotary_pos_embed``)."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)


def rope_angles(time_positions: jax.Array, height: int, width: int, head_dim: int,
                theta: float = 10000.0) -> jax.Array:
    """Rotation angles (B, F*H*W, head_dim/2) for a (F, H, W) token grid, tokens in (f, h, w) order.

    ``time_positions`` (B, F) are real numbers: MC-RoPE puts a latent frame at (first pixel frame
    it covers) / 4, so a keyframe at pixel frame 13 sits at 3.25. Height and width positions are
    the integer grid, as in Wan. Integer time positions 0..F-1 give exactly Wan's RoPE.
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    inv_t = jnp.asarray(rope_inverse_frequencies(t_dim, theta), jnp.float32)
    inv_h = rope_inverse_frequencies(h_dim, theta)
    inv_w = rope_inverse_frequencies(w_dim, theta)
    ang_t = time_positions.astype(jnp.float32)[..., None] * inv_t  # (B, F, t_dim/2)
    # The spatial angles are static: computed in float64 like diffusers' tables, then cast.
    ang_h = jnp.asarray(np.outer(np.arange(height), inv_h), jnp.float32)  # (H, h_dim/2)
    ang_w = jnp.asarray(np.outer(np.arange(width), inv_w), jnp.float32)  # (W, w_dim/2)
    b, f = time_positions.shape
    grid_t = jnp.broadcast_to(ang_t[:, :, None, None, :], (b, f, height, width, t_dim // 2))
    grid_h = jnp.broadcast_to(ang_h[None, None, :, None, :], (b, f, height, width, h_dim // 2))
    grid_w = jnp.broadcast_to(ang_w[None, None, None, :, :], (b, f, height, width, w_dim // 2))
    return jnp.concatenate([grid_t, grid_h, grid_w], axis=-1).reshape(b, f * height * width, head_dim // 2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates interleaved channel pairs (x[2i], x[2i+1]) of x (B, S, H, D) by angles (B, S, D/2).

    The pairing is Wan's (the official code views pairs as complex numbers; diffusers rotates
    ``x[..., 0::2]`` with ``x[..., 1::2]``). Computed in float32.
    """
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention


class Attention(nnx.Module):
    """Wan attention: q, k, v projections, RMSNorm of q and k across all heads, optional RoPE.

    Self-attention when ``context`` is None, cross-attention to ``context`` otherwise. The
    attention itself goes through ``director_jax.kernels.attention.attention`` (the one entry point
    that picks the XLA, cuDNN or Pallas implementation). ``sequence_parallel`` (None, "ulysses",
    "ring", "auto") shards the attention over the mesh's "sequence" axis; ``kv_len`` masks padded keys.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, eps: float, rngs: nnx.Rngs,
                 attention_impl: str = "auto", sequence_parallel: str | None = None,
                 block_sizes: BlockSizes | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        context_dim = dim if context_dim is None else context_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = Linear(dim, dim, axes=("embed", "heads"), **kw)
        self.to_k = Linear(context_dim, dim, axes=("embed", "heads"), **kw)
        self.to_v = Linear(context_dim, dim, axes=("embed", "heads"), **kw)
        self.to_out = Linear(dim, dim, axes=("heads", "embed"), **kw)
        # q / k norm weights stay float32 whatever param_dtype is (models/dit.py: FLOAT32_PARAMS)
        self.norm_q = RMSNorm(dim, eps=eps, axis_name="heads", param_dtype=jnp.float32)
        self.norm_k = RMSNorm(dim, eps=eps, axis_name="heads", param_dtype=jnp.float32)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.block_sizes = block_sizes  # flash-kernel tiles; None: the chip's entry of DEFAULT_BLOCK_SIZES
        self.sequence_parallel = sequence_parallel

    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope: jax.Array | None = None,
                 kv_len: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, s, d = x.shape
        heads = self.num_heads
        q = self.norm_q(self.to_q(x)).reshape(b, s, heads, d // heads)
        k = self.norm_k(self.to_k(context)).reshape(b, context.shape[1], heads, d // heads)
        v = self.to_v(context).reshape(b, context.shape[1], heads, d // heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, kv_len=kv_len, impl=self.attention_impl, sequence_parallel=self.sequence_parallel,
                        block_sizes=self.block_sizes)
        return self.to_out(out.reshape(b, s, d))
