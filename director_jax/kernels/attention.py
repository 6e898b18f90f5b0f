"""The one attention entry point used by every model in this project.

``attention(q, k, v, impl=...)`` takes (B, S, H, D) queries and (B, L, H, D) keys and values
(bidirectional, softmax scale 1/sqrt(D) unless given) and dispatches to an implementation:

* ``xla``: the plain ``jnp`` reference (materialises the (B, H, S, L) scores; the ground truth
  every other implementation is tested against);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs);
* ``auto``: cuDNN on GPU where it applies, otherwise ``xla``.

Keys past ``kv_len[b]`` (valid key count per batch row) are masked out, so callers may pad
sequences to any block size without changing the result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (B, S, H, D) arrays; got q {q.shape}, k {k.shape}, v {v.shape}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} disagree: k and v must match, and share "
                         "batch, heads and head_dim with q.")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
    """Reference attention in plain jnp: scores and softmax in float32, output in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = jnp.einsum("bshd,blhd->bhsl", q, k, preferred_element_type=jnp.float32) * scale
    if kv_len is not None:
        valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_len)[:, None]  # (B, L)
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhsl,blhd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                    scale: float | None = None) -> jax.Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/f16 inputs)."""
    key_lengths = None
    if kv_len is not None:
        key_lengths = jnp.asarray(kv_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=key_lengths,
                                        implementation="cudnn")


def _auto(q: jax.Array) -> str:
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None, impl: str = "auto",
              scale: float | None = None) -> jax.Array:
    """Bidirectional multi-head attention; see the module docstring for ``impl``."""
    _check_shapes(q, k, v)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}.")
    if impl == "auto":
        impl = _auto(q)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, kv_len=kv_len, scale=scale)
    return xla_attention(q, k, v, kv_len=kv_len, scale=scale)
