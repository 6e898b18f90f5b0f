"""JAX's TPU splash-attention kernel behind this project's (B, S, H, D) interface.

Splash wants (H, S, D) per example, lengths that are whole blocks, and pre-scaled queries; key
padding becomes a second segment id, so padded keys are never attended to. It has no per-example
key length of its own, which is why padding goes through ``SegmentIds``. A row with no valid key at
all (``kv_len == 0``) is undefined in splash (its softmax denominator is 0): this wrapper returns 0
for it, like the other implementations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from director_jax.kernels.flash import full_kv_len, target_backend

SPLASH_BLOCK = 512


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, s_pad: int, l_pad: int, block_q: int, block_kv: int, interpret: bool):
    """One splash kernel per shape (building the mask info is numpy work at trace time)."""
    mask = splash_lib.MultiHeadMask([splash_lib.FullMask((s_pad, l_pad)) for _ in range(heads)])
    sizes = splash_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                  block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                  block_q_dq=block_q, block_kv_dq=block_kv)
    return splash_lib.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                     scale: float | None = None, block: int = SPLASH_BLOCK, interpret: bool | None = None) -> jax.Array:
    """Splash attention of (B, S, H, D) q and (B, L, H, D) k, v; keys past ``kv_len`` masked."""
    b, s, h, d = q.shape
    l = k.shape[1]
    if interpret is None:
        interpret = target_backend() != "tpu"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Blocks of at most ``block``, at least 128 (the TPU lane width), never longer than needed.
    block_q = min(block, _round_up(s, 128))
    block_kv = min(block, _round_up(l, 128))
    s_pad, l_pad = _round_up(s, block_q), _round_up(l, block_kv)
    kv_len = full_kv_len(k, kv_len)

    def heads_first(x: jax.Array, n_pad: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), s_pad)
    kh, vh = heads_first(k, l_pad), heads_first(v, l_pad)
    q_ids = jnp.zeros((b, s_pad), jnp.int32)
    kv_ids = (jnp.arange(l_pad)[None, :] >= kv_len[:, None]).astype(jnp.int32)  # 1 = padding
    kernel = _kernel(h, s_pad, l_pad, block_q, block_kv, bool(interpret))
    out = jax.vmap(lambda qq, kk, vv, qi, ki: kernel(qq, kk, vv, segment_ids=splash_lib.SegmentIds(q=qi, kv=ki)))(
        qh, kh, vh, q_ids, kv_ids)
    out = out.transpose(0, 2, 1, 3)[:, :s]
    return jnp.where((kv_len > 0)[:, None, None, None], out, 0).astype(q.dtype)
