"""This project's flash attention for TPU: Pallas kernels compiled by Mosaic (interpreted on the CPU for tests).

Implements the contract of ``flash.py``: ``forward`` (online softmax over key blocks) and ``backward``
(a dk/dv kernel and a dq kernel, both recomputing the probabilities from ``lse``), with float32
accumulation whatever the input dtype (bf16 or f32).

Why it looks the way it does:

* Grids are (batch, head, outer block, inner block); the inner axis is the reduction (``arbitrary``)
  and accumulates in VMEM scratch, the others are ``parallel`` (split over megacore TensorCores).
* ``kv_len`` is a scalar-prefetch operand: key blocks wholly past ``kv_len[b]`` are skipped with
  ``pl.when`` and their index maps are clamped to the last valid block, so they cost no DMA either.
  The same mask hides the padding of ragged sequence lengths (everything is padded to the blocks).
* ``lse`` and ``delta = rowsum(o * do)`` travel as lane-dense (B, H, 1, S) rows. The dk/dv kernel
  works on transposed scores (keys x queries) so it uses them as rows directly; the forward and the
  dq kernel (queries x keys) transpose them once per query block.
* With a head_dim that is a multiple of 128, q/k/v are read in place as (B, S, H * D) (a free
  reshape: one head is one 128-lane-aligned column block); otherwise they are transposed to
  (B, H, S, D), where a (block, D) tile spans the full minor dimension.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from director_jax.kernels import flash
from director_jax.kernels.flash import BlockSizes

_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # dot_general contracting both operands' last dim: a @ b.T
IndexFn = Callable[..., Any]  # (b, outer, inner, kv_len_ref) -> a block index along the sequence


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int, block: int) -> tuple[int, int]:
    """The block used for a length-n axis and n padded to it.

    A sequence that fits in one block is one block (of n rounded up to 8). Otherwise the block is
    rounded up to a multiple of 128: Mosaic needs lane-aligned (1, block) tiles of the lse / delta
    rows when there are several of them, and score tiles are best lane-dense anyway.
    """
    block = _round_up(block, _LANES)
    if block >= n:
        block = _round_up(n, 8)
    return block, _round_up(n, block)


def _heads_last(d: int) -> bool:
    return d % _LANES == 0


def _to_kernel(x: jax.Array, padded: int) -> jax.Array:
    """(B, N, H, D) padded to ``padded`` rows, in the kernel layout (see the module docstring)."""
    b, n, h, d = x.shape
    if padded != n:
        x = jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
    return x.reshape(b, padded, h * d) if _heads_last(d) else x.transpose(0, 2, 1, 3)


def _from_kernel(x: jax.Array, n: int, heads: int) -> jax.Array:
    """The inverse of ``_to_kernel``: (B, n, H, D)."""
    if x.ndim == 3:
        return x.reshape(x.shape[0], x.shape[1], heads, -1)[:, :n]
    return x.transpose(0, 2, 1, 3)[:, :n]


def _rows(x: jax.Array, padded: int, fill: float) -> jax.Array:
    """A (B, H, N) float32 per-row statistic as (B, H, 1, padded) rows."""
    x = x.astype(jnp.float32)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[-1])), constant_values=fill)
    return x[:, :, None, :]


def _seq_spec(block: int, d: int, index: IndexFn) -> pl.BlockSpec:
    """(block, D) tiles of one head; grid is (b, h, outer, inner) plus the kv_len prefetch ref."""
    if _heads_last(d):
        return pl.BlockSpec((None, block, d), lambda b, h, o, i, kvl: (b, index(b, o, i, kvl), h))
    return pl.BlockSpec((None, None, block, d), lambda b, h, o, i, kvl: (b, h, index(b, o, i, kvl), 0))


def _row_spec(block: int, index: IndexFn) -> pl.BlockSpec:
    """(1, block) tiles of a (B, H, 1, N) row statistic."""
    return pl.BlockSpec((None, None, 1, block), lambda b, h, o, i, kvl: (b, h, 0, index(b, o, i, kvl)))


def _last_kv_block(kvl: jax.Array, b: jax.Array, block_kv: int) -> jax.Array:
    return jnp.maximum((kvl[b] + block_kv - 1) // block_kv - 1, 0)


def _params(*semantics: str, interpret: Any) -> dict[str, Any]:
    return dict(interpret=interpret, compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _cost(flops: int, transcendentals: int, *arrays: Any) -> pl.CostEstimate:
    """What XLA's cost model sees of a kernel (every operand read or written once: a lower bound)."""
    nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(nbytes))


def _valid_keys(shape: tuple[int, ...], axis: int, kv_block: jax.Array, block_kv: int,
                kv_len: jax.Array) -> jax.Array:
    """Whether each score's key (along ``axis``) is below kv_len; also masks the padding keys."""
    return kv_block * block_kv + lax.broadcasted_iota(jnp.int32, shape, axis) < kv_len


def _column_to_row(x: jax.Array) -> jax.Array:
    """(n, 1) -> (1, n) via a lane-aligned 2D transpose (what Mosaic's XLU does well)."""
    return jnp.broadcast_to(x, (x.shape[0], _LANES)).T[:1]


def _row_to_column(x: jax.Array) -> jax.Array:
    """(1, n) -> (n, 1), the inverse of ``_column_to_row``."""
    return jnp.broadcast_to(x, (_LANES, x.shape[1])).T[:, :1]


def _exp_minus_lse(s: jax.Array, lse: jax.Array) -> jax.Array:
    """exp(s - lse) with lse = -inf (a row without valid keys) giving 0, not NaN."""
    return jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse))


# ----------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(kvl_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale: float,
                block_kv: int) -> None:
    b, j = pl.program_id(0), pl.program_id(3)
    kv_len = kvl_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j * block_kv < kv_len)  # this block holds at least one valid key, so m_new is finite
    def _step():
        v = v_ref[...]
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        s = jnp.where(_valid_keys(s.shape, 1, j, block_kv, kv_len), s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_ref[...] / l_safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = _column_to_row(jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
            block_sizes: BlockSizes | None = None, interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """The contract's forward: (o (B, S, H, D) in q's dtype, lse (B, H, S) float32)."""
    (batch, s_len, heads, d), l_len = q.shape, k.shape[1]
    bs = flash.default_block_sizes() if block_sizes is None else block_sizes
    bq, sp = _block(s_len, bs.block_q)
    bkv, lp = _block(l_len, bs.block_kv)
    kv_len = jnp.minimum(flash.full_kv_len(k, kv_len), l_len)  # keys past L are padding
    qk, kk, vk = _to_kernel(q, sp), _to_kernel(k, lp), _to_kernel(v, lp)

    def kv_index(b, i, j, kvl):
        return jnp.minimum(j, _last_kv_block(kvl, b, bkv))

    o_shape = jax.ShapeDtypeStruct(qk.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((batch, heads, 1, sp), jnp.float32)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_kv=bkv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, sp // bq, lp // bkv),
            in_specs=[_seq_spec(bq, d, lambda b, i, j, kvl: i), _seq_spec(bkv, d, kv_index),
                      _seq_spec(bkv, d, kv_index)],
            out_specs=[_seq_spec(bq, d, lambda b, i, j, kvl: i), _row_spec(bq, lambda b, i, j, kvl: i)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[o_shape, lse_shape],
        cost_estimate=_cost(4 * batch * heads * s_len * l_len * d, batch * heads * s_len * l_len,
                            q, k, v, q, lse_shape),
        name="flash_tpu_forward",
        **_params("parallel", "parallel", "parallel", "arbitrary", interpret=interpret),
    )(kv_len, qk, kk, vk)
    return _from_kernel(o, s_len, heads), lse[:, :, 0, :s_len]


# ----------------------------------------------------------------------------------------------
# Backward: dk/dv over (key block, query blocks), then dq over (query block, key blocks)


def _dkv_kernel(kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                scale: float, block_kv: int) -> None:
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kv_len = kvl_ref[b]

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(j * block_kv < kv_len)
    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale  # (keys, queries)
        valid = _valid_keys(s_t.shape, 0, j, block_kv, kv_len)
        p_t = jnp.where(valid, _exp_minus_lse(s_t, lse_ref[...]), 0.0)
        dv_acc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])  # times scale, applied once at the end
        dk_acc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc, lse_col, delta_col, *,
               scale: float, block_kv: int) -> None:
    b, j = pl.program_id(0), pl.program_id(3)
    kv_len = kvl_ref[b]

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        lse_col[...] = _row_to_column(lse_ref[...])
        delta_col[...] = _row_to_column(delta_ref[...])

    @pl.when(j * block_kv < kv_len)
    def _step():
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        valid = _valid_keys(s.shape, 1, j, block_kv, kv_len)
        p = jnp.where(valid, _exp_minus_lse(s, lse_col[...]), 0.0)
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_col[...])
        dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
             kv_len: jax.Array, *, scale: float, block_sizes: BlockSizes | None = None,
             interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The contract's backward: (dq, dk, dv); ``lse`` may be global (ring attention), see ``flash.py``."""
    (batch, s_len, heads, d), l_len = q.shape, k.shape[1]
    bs = flash.default_block_sizes() if block_sizes is None else block_sizes
    kv_len = jnp.minimum(flash.full_kv_len(k, kv_len), l_len)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    flops = 2 * batch * heads * s_len * l_len * d
    exps = batch * heads * s_len * l_len

    bq, sp = _block(s_len, bs.block_q_bwd)
    bkv, lp = _block(l_len, bs.block_kv_bwd)
    qk, kk, vk, dok = _to_kernel(q, sp), _to_kernel(k, lp), _to_kernel(v, lp), _to_kernel(do, sp)
    lse_rows, delta_rows = _rows(lse, sp, -jnp.inf), _rows(delta, sp, 0.0)

    # dk, dv: grid (b, h, key block j, query block i), queries innermost.
    def q_index(b, j, i, kvl):  # a skipped key block keeps re-reading query block 0: no DMA
        return jnp.where(j * bkv < kvl[b], i, 0)

    def kv_index(b, j, i, kvl):
        return j

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_kv=bkv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, lp // bkv, sp // bq),
            in_specs=[_seq_spec(bq, d, q_index), _seq_spec(bkv, d, kv_index), _seq_spec(bkv, d, kv_index),
                      _seq_spec(bq, d, q_index), _row_spec(bq, q_index), _row_spec(bq, q_index)],
            out_specs=[_seq_spec(bkv, d, kv_index), _seq_spec(bkv, d, kv_index)],
            scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kk.shape, k.dtype), jax.ShapeDtypeStruct(vk.shape, v.dtype)],
        cost_estimate=_cost(4 * flops, exps, q, k, v, do, lse, delta, k, v),
        name="flash_tpu_backward_dkv",
        **_params("parallel", "parallel", "parallel", "arbitrary", interpret=interpret),
    )(kv_len, qk, kk, vk, dok, lse_rows, delta_rows)

    # dq: grid (b, h, query block i, key block j), keys innermost, same blocks.
    def dq_kv_index(b, i, j, kvl):
        return jnp.minimum(j, _last_kv_block(kvl, b, bkv))

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_kv=bkv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, sp // bq, lp // bkv),
            in_specs=[_seq_spec(bq, d, lambda b, i, j, kvl: i), _seq_spec(bkv, d, dq_kv_index),
                      _seq_spec(bkv, d, dq_kv_index), _seq_spec(bq, d, lambda b, i, j, kvl: i),
                      _row_spec(bq, lambda b, i, j, kvl: i), _row_spec(bq, lambda b, i, j, kvl: i)],
            out_specs=_seq_spec(bq, d, lambda b, i, j, kvl: i),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, 1), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
        cost_estimate=_cost(3 * flops, exps, q, k, v, do, lse, delta, q),
        name="flash_tpu_backward_dq",
        **_params("parallel", "parallel", "parallel", "arbitrary", interpret=interpret),
    )(kv_len, qk, kk, vk, dok, lse_rows, delta_rows)

    return _from_kernel(dq, s_len, heads), _from_kernel(dk, l_len, heads), _from_kernel(dv, l_len, heads)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
    """Differentiable attention with these kernels (for benchmarks and AOT checks; models use ``attention.py``)."""
    return flash.flash_attention(forward, backward, q, k, v, kv_len=kv_len, scale=scale, block_sizes=block_sizes,
                                 interpret=interpret)
