"""The Wan text encoder, umT5's encoder, in Flax NNX: the captions' embeddings without PyTorch.

Numerics follow ``transformers``' ``UMT5EncoderModel`` (and the official Wan ``T5Encoder``, the same
network under other names): T5 RMS norms in float32 without mean subtraction, attention without
the 1/sqrt(d) scale, a relative-position bias table of its own in every layer (what makes it umT5,
not T5), masked keys at the dtype's most negative value, softmax in float32, and a gated-GELU
(tanh approximation) feed-forward. The layers' parameters are stacked on a leading "layers" axis
and run with ``lax.scan``, so compiling the 24-layer XXL encoder costs one layer's compile.

Parameters carry the logical axis names of the DiT ("embed", "heads", "mlp", "vocab"), so the
mesh rules of ``director_jax.parallel`` shard the 5.7B-parameter XXL encoder like the DiT.
Weight files map onto these names in ``director_jax.convert.umt5``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.models.layers import param, torch_normal


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """The encoder's shape; field names are ``transformers``' ``UMT5Config``'s (defaults: umT5-XXL, Wan's)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> UMT5Config:
        """From a ``UMT5EncoderModel`` ``config.json``; other encoders (plain T5, another activation) are refused."""
        if config.get("model_type") != "umt5":
            raise ValueError(f"{source} has model_type {config.get('model_type')!r}; the Wan text encoder is a umT5 "
                             "encoder (model_type 'umt5', UMT5EncoderModel).")
        proj = config.get("feed_forward_proj", "gated-gelu")
        if proj not in ("gated-gelu", "gated-gelu_new"):
            raise ValueError(f"{source} has feed_forward_proj {proj!r}; umT5 (and this encoder) use 'gated-gelu'.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in names if config.get(k) is not None}
        return cls(**kwargs)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of key position j seen from query i, bidirectional (T5's scheme).

    Half the buckets for keys after the query, half for keys before; the nearest ``num_buckets // 4``
    distances exactly, the rest logarithmically up to ``max_distance``. Computed in float32 as the
    PyTorch code does, so the bucket edges agree exactly.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    safe = np.maximum(distance, 1).astype(np.float32)
    scaled = (np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5's layer norm: x / sqrt(mean(x^2) + eps) in float32 (no mean, no bias), cast to the weight's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if weight.dtype != jnp.float32:
        y = y.astype(weight.dtype)
    return weight * y


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class UMT5Encoder(nnx.Module):
    """``UMT5EncoderModel``: token ids (B, L) and their attention mask -> hidden states (B, L, d_model).

    ``param_dtype`` is the weights' dtype (bfloat16 as Wan runs it, or float32); activations take it
    too, norms and softmax run in float32 as in the PyTorch code.
    """

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.cfg = cfg
        n, d, inner, ff = cfg.num_layers, cfg.d_model, cfg.inner_dim, cfg.d_ff
        keys = iter(jax.random.split(rngs.params(), 9))

        def dense(shape: tuple[int, ...], fan_in: int, axes: tuple[str | None, ...]) -> nnx.Param:
            return param(torch_normal(next(keys), shape, fan_in**-0.5, param_dtype), axes)

        self.embedding = param(torch_normal(next(keys), (cfg.vocab_size, d), 1.0, param_dtype), ("vocab", "embed"))
        self.norm1 = param(jnp.ones((n, d), param_dtype), ("layers", "embed"))
        self.q = dense((n, d, inner), d, ("layers", "embed", "heads"))
        self.k = dense((n, d, inner), d, ("layers", "embed", "heads"))
        self.v = dense((n, d, inner), d, ("layers", "embed", "heads"))
        self.o = dense((n, inner, d), inner, ("layers", "heads", "embed"))
        self.position_bias = dense((n, cfg.relative_attention_num_buckets, cfg.num_heads), 1,
                                   ("layers", None, "heads"))
        self.norm2 = param(jnp.ones((n, d), param_dtype), ("layers", "embed"))
        self.wi_gate = dense((n, d, ff), d, ("layers", "embed", "mlp"))
        self.wi_linear = dense((n, d, ff), d, ("layers", "embed", "mlp"))
        self.wo = dense((n, ff, d), ff, ("layers", "mlp", "embed"))
        self.final_norm = param(jnp.ones((d,), param_dtype), ("embed",))

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, length = ids.shape
        h, dk, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        x = jnp.take(self.embedding[...], ids, axis=0)
        dtype = x.dtype
        buckets = jnp.asarray(relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                                        cfg.relative_attention_max_distance))
        key_mask = jnp.where(mask.astype(bool)[:, None, None, :], 0.0, jnp.finfo(dtype).min).astype(dtype)

        def layer(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
            y = _rms_norm(x, p["norm1"], eps)
            q, k, v = ((y @ p[name]).reshape(b, length, h, dk) for name in ("q", "k", "v"))
            bias = jnp.transpose(p["position_bias"][buckets], (2, 0, 1))[None].astype(dtype)  # (1, H, L, L)
            scores = jnp.einsum("binc,bjnc->bnij", q, k) + (bias + key_mask)
            weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
            attended = jnp.einsum("bnij,bjnc->binc", weights, v).reshape(b, length, h * dk)
            x = x + attended @ p["o"]
            y = _rms_norm(x, p["norm2"], eps)
            x = x + (_gelu_tanh(y @ p["wi_gate"]) * (y @ p["wi_linear"])) @ p["wo"]
            return x, None

        stacked = {name: getattr(self, name)[...] for name in LAYER_PARAMS}
        x, _ = jax.lax.scan(layer, x, stacked)
        return _rms_norm(x, self.final_norm[...], eps)


LAYER_PARAMS = ("norm1", "q", "k", "v", "o", "position_bias", "norm2", "wi_gate", "wi_linear", "wo")
