"""Flash attention in plain jnp: the forward/backward contract of ``flash.py`` without a kernel.

Queries are processed in blocks with ``lax.map`` and keys in blocks with ``lax.scan``, so the
largest intermediate is one (B, H, block_q, block_kv) score tile, whatever the sequence length.
This is what ``auto`` uses on the CPU above the materialisation limit, and a portable local
implementation for ring attention; on TPU and GPU the Pallas kernels are faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from director_jax.kernels.flash import BlockSizes


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, N, H, D) -> (N/block, B, H, block, D), zero-padded to a whole number of blocks."""
    b, n, h, d = x.shape
    pad = -n % block
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.reshape(b, (n + pad) // block, block, h, d).transpose(1, 0, 3, 2, 4)


def _unblock(x: jax.Array, n: int) -> jax.Array:
    """(N/block, B, H, block, D) -> (B, n, H, D)."""
    nb, b, h, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, h, d)[:, :n]


def _key_mask(kv_len: jax.Array, start: jax.Array, block: int) -> jax.Array:
    """(B, 1, 1, block): which keys of the block starting at ``start`` are valid."""
    return ((start + jnp.arange(block))[None, :] < kv_len[:, None])[:, None, None, :]


def _sizes(block_sizes: BlockSizes | None, s: int, l: int, backward: bool) -> tuple[int, int]:
    bs = block_sizes or BlockSizes()
    bq, bk = (bs.block_q_bwd, bs.block_kv_bwd) if backward else (bs.block_q, bs.block_kv)
    return min(bq, s), min(bk, l)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
            block_sizes: BlockSizes | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(o, lse) by an online softmax over key blocks (see ``flash.py`` for the contract)."""
    del interpret
    s, l = q.shape[1], k.shape[1]
    bq, bk = _sizes(block_sizes, s, l, backward=False)
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    starts = jnp.arange(kb.shape[0]) * bk

    def one_q_block(qblk: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, _, d = qblk.shape

        def step(carry, inputs):
            m, denom, acc = carry
            kblk, vblk, start = inputs
            sc = jnp.einsum("bhqd,bhkd->bhqk", qblk, kblk, preferred_element_type=jnp.float32) * scale
            sc = jnp.where(_key_mask(kv_len, start, bk), sc, -jnp.inf)
            m_new = jnp.maximum(m, sc.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(sc - m_safe[..., None])
            correction = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            denom = denom * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vblk.dtype), vblk,
                                                           preferred_element_type=jnp.float32)
            return (m_new, denom, acc), None

        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, starts))
        has_key = denom > 0
        o = acc / jnp.where(has_key, denom, 1.0)[..., None]
        lse = jnp.where(has_key, jnp.log(jnp.where(has_key, denom, 1.0)) + jnp.where(has_key, m, 0.0), -jnp.inf)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(one_q_block, _blocks(q, bq))  # (nq, B, H, bq, D), (nq, B, H, bq)
    lse = lse.transpose(1, 2, 0, 3).reshape(q.shape[0], q.shape[2], -1)[:, :, :s]
    return _unblock(o, s), lse


def backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
             kv_len: jax.Array, *, scale: float, block_sizes: BlockSizes | None = None,
             interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv): dq by a scan over key blocks, dk and dv by a scan over query blocks."""
    del interpret
    s, l = q.shape[1], k.shape[1]
    bq, bk = _sizes(block_sizes, s, l, backward=True)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    # Rows without a valid key anywhere (lse = -inf) get p = exp(s - inf) = 0.
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    stats = jnp.stack([lse, delta], axis=-1)  # (B, H, S, 2): blocked along S with q and do
    stats_blocks = _blocks(stats.transpose(0, 2, 1, 3), bq)  # (nq, B, H, bq, 2)
    qb, dob, kb, vb = _blocks(q, bq), _blocks(do, bq), _blocks(k, bk), _blocks(v, bk)
    kv_starts = jnp.arange(kb.shape[0]) * bk

    def tile(qblk, doblk, st, kblk, vblk, start):
        """p and ds of one (query block, key block) tile, float32."""
        sc = jnp.einsum("bhqd,bhkd->bhqk", qblk, kblk, preferred_element_type=jnp.float32) * scale
        p = jnp.where(_key_mask(kv_len, start, bk), jnp.exp(sc - st[..., 0:1]), 0.0)
        dp = jnp.einsum("bhqd,bhkd->bhqk", doblk, vblk, preferred_element_type=jnp.float32)
        return p, p * (dp - st[..., 1:2]) * scale

    def dq_block(inputs):
        qblk, doblk, st = inputs

        def step(dq, kv):
            kblk, vblk, start = kv
            _, ds = tile(qblk, doblk, st, kblk, vblk, start)
            return dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kblk.astype(jnp.float32)), None

        dq, _ = jax.lax.scan(step, jnp.zeros(qblk.shape, jnp.float32), (kb, vb, kv_starts))
        return dq.astype(q.dtype)

    def dkv_block(inputs):
        kblk, vblk, start = inputs

        def step(carry, qs):
            dk, dv = carry
            qblk, doblk, st = qs
            p, ds = tile(qblk, doblk, st, kblk, vblk, start)
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, doblk.astype(jnp.float32))
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qblk.astype(jnp.float32))
            return (dk, dv), None

        zeros = jnp.zeros(kblk.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), (qb, dob, stats_blocks))
        return dk.astype(k.dtype), dv.astype(v.dtype)

    dq = jax.lax.map(dq_block, (qb, dob, stats_blocks))
    dk, dv = jax.lax.map(dkv_block, (kb, vb, kv_starts))
    return _unblock(dq, s), _unblock(dk, l), _unblock(dv, l)
