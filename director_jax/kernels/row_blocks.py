"""Attention by blocks of query rows, each softmax over the whole key row: the CPU's fast path.

The forward/backward contract of ``flash.py`` in plain jnp, laid out for a CPU's caches rather than
for a kernel's on-chip memory. Queries are taken ``block_q`` rows at a time (``lax.map`` forward,
``lax.scan`` backward); each block sees all of its keys at once, so its softmax is exact in one
pass (no online rescaling, unlike ``blockwise.py``), and the (B, H, block_q, L) score tile it makes
stays in cache while the two matmuls on each side of it read it. Nothing of size (S, L) is ever
stored: the forward keeps o and the log-sum-exp, the backward recomputes each tile's
probabilities from them (flash attention's trade: one more q @ k^T for no (S, L) residual).

Why not XLA's own attention on a CPU: autodiff of the plain jnp version stores the (B, H, S, L)
probabilities and, in the backward, transposes them (and their gradient) in memory for the key
gradients; at 1024 x 1024 tokens and 4 heads that is two 16 MiB strided copies per call, measured
as a quarter of the attention's time (``benchmarks/RESULTS.md``, issue 23). Here heads are moved to
the front once, per call, on the (S, D) operands, and every dot is a plain batched matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from director_jax.kernels.flash import BlockSizes

DEFAULT_BLOCK_Q = 256  # rows per block on a CPU: a 256 x 1024 f32 tile per head is 1 MiB (L2-sized)


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, N, H, D) -> (B, H, N, D) float32."""
    return x.astype(jnp.float32).transpose(0, 2, 1, 3)


def _row_blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, H, N, ...) -> (N/block, B, H, block, ...), zero-padded to whole blocks."""
    n = x.shape[2]
    pad = -n % block
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    x = x.reshape(*x.shape[:2], (n + pad) // block, block, *x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _from_row_blocks(x: jax.Array, n: int) -> jax.Array:
    """(N/block, B, H, block, ...) -> (B, H, n, ...)."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :n]


def _block_q(block_sizes: BlockSizes | None, s: int) -> int:
    return min(DEFAULT_BLOCK_Q if block_sizes is None else block_sizes.block_q, s)


def _valid_keys(kv_len: jax.Array, l: int) -> jax.Array:
    """(B, 1, 1, L) bool."""
    return (jnp.arange(l)[None, :] < kv_len[:, None])[:, None, None, :]


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
            block_sizes: BlockSizes | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(o, lse): per query block, the full-row softmax of its scores times v (see ``flash.py``)."""
    del interpret
    s, l = q.shape[1], k.shape[1]
    bq = _block_q(block_sizes, s)
    kh, vh = _heads_first(k), _heads_first(v)
    valid = _valid_keys(kv_len, l)

    def one_block(qblk: jax.Array) -> tuple[jax.Array, jax.Array]:
        sc = jnp.where(valid, jnp.einsum("bhqd,bhkd->bhqk", qblk, kh) * scale, -jnp.inf)
        m = sc.max(-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(sc - m)
        denom = p.sum(-1, keepdims=True)
        has_key = denom > 0
        denom = jnp.where(has_key, denom, 1.0)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vh) / denom
        lse = jnp.where(has_key, jnp.log(denom) + m, -jnp.inf)[..., 0]
        return o, lse

    o, lse = jax.lax.map(one_block, _row_blocks(_heads_first(q), bq))
    o = _from_row_blocks(o, s).transpose(0, 2, 1, 3).astype(q.dtype)
    return o, _from_row_blocks(lse, s)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
             kv_len: jax.Array, *, scale: float, block_sizes: BlockSizes | None = None,
             interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv): a scan over query blocks, dq per block, dk and dv accumulated in the carry."""
    del interpret
    s, l = q.shape[1], k.shape[1]
    bq = _block_q(block_sizes, s)
    qh, kh, vh, doh = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(do)
    delta = jnp.sum(_heads_first(o) * doh, axis=-1)  # (B, H, S)
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows without a valid key: p = exp(s - inf) = 0
    stats = jnp.stack([lse, delta], axis=-1)  # (B, H, S, 2), blocked with the queries
    valid = _valid_keys(kv_len, l)

    def step(carry, block):
        dk, dv = carry
        qblk, doblk, st = block
        p = jnp.where(valid, jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", qblk, kh) * scale - st[..., 0:1]), 0.0)
        dp = jnp.einsum("bhqd,bhkd->bhqk", doblk, vh)
        ds = p * (dp - st[..., 1:2]) * scale
        dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh)
        dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qblk)
        dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, doblk)
        return (dk, dv), dq

    blocks = (_row_blocks(qh, bq), _row_blocks(doh, bq), _row_blocks(stats, bq))
    (dk, dv), dq = jax.lax.scan(step, (jnp.zeros_like(kh), jnp.zeros_like(vh)), blocks)
    dq = _from_row_blocks(dq, s).transpose(0, 2, 1, 3)
    return dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype)
