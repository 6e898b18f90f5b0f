"""This project's Pallas flash attention for NVIDIA GPUs (Hopper), lowered through Triton.

Implements the forward/backward contract of ``flash.py`` on the (B, S, H, D) layout directly: a
(sequence block, batch * head) grid whose BlockSpecs pick one head's rows out of the interleaved
layout, so no transposes. Softmax runs in base 2 (``exp2`` with log2(e) folded into the scale, the
cheap instruction on NVIDIA GPUs) with float32 statistics and accumulators; ``lse`` is converted
to the natural log at the boundary.

* Forward: each program holds one query block and loops over key blocks up to
  ceil(kv_len / block_kv) only; just the block that straddles ``kv_len`` is masked.
* Backward: ``delta = rowsum(o * do)`` in XLA, then a dK/dV kernel (grid over key blocks, loop over
  query blocks) and a dQ kernel (grid over query blocks, loop over key blocks). ``p = exp(s - lse)``
  uses the given lse, so a global lse (ring attention) yields this key block's share of the
  gradient. Key blocks wholly past ``kv_len`` skip their loop and write zeros.

Any S, L and head_dim are accepted: sequences are padded to block multiples and head_dim to a
power of two (Triton tiles are powers of two); padded keys are masked by ``kv_len`` and padded
queries get lse = +inf in the backward, so they contribute nothing. ``interpret=True`` runs the
same kernels on the CPU (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from director_jax.kernels.flash import BlockSizes

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_BLOCK = 16  # the smallest tile Triton's dot accepts


def _block(block: int, length: int) -> int:
    """A power-of-two tile no larger than the padded sequence needs (short sequences, small tiles)."""
    if block & (block - 1):
        raise ValueError(f"flash_gpu block sizes must be powers of two (Triton tiles); got {block}.")
    return max(MIN_BLOCK, min(block, pl.next_power_of_2(length)))


def _pad_to(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _precision(dtype: jnp.dtype) -> lax.Precision:
    """float32 inputs get IEEE dots (Triton would use TF32 by default); bf16/f16 use the tensor cores."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _specs(num_heads: int, rows: int, head_dim: int, *, whole: bool = False):
    """BlockSpecs on a (row block i, batch * head) grid: a (rows, D) tile of one head of (B, S, H, D),
    the matching slice of one head of (B, H, S), and the batch row's kv_len as a scalar. ``whole``:
    block 0 whatever i (``rows`` is then the whole padded sequence, which the kernel loops over)."""

    def tile(i, bh):
        return lax.div(bh, num_heads), 0 if whole else i, lax.rem(bh, num_heads), 0

    def row(i, bh):
        return lax.div(bh, num_heads), lax.rem(bh, num_heads), 0 if whole else i

    return (pl.BlockSpec((None, rows, None, head_dim), tile), pl.BlockSpec((None, None, rows), row),
            pl.BlockSpec((None,), lambda i, bh: (lax.div(bh, num_heads),)))


def _masked_loops(body, n_valid: jax.Array, block: int, carry):
    """Run ``body(j, carry, masked)`` over the ceil(n_valid / block) blocks holding a valid index:
    unmasked over the full ones, masked only over the one that straddles ``n_valid``."""
    n_full = lax.div(n_valid, block)
    n_all = lax.div(n_valid + block - 1, block)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)


def _key_mask(s: jax.Array, start: jax.Array, kv_len: jax.Array) -> jax.Array:
    cols = start + jnp.arange(s.shape[1], dtype=jnp.int32)
    return jnp.where((cols < kv_len)[None, :], s, -jnp.inf)


# ----------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(kv_len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, block_kv: int,
                    precision: lax.Precision):
    kv_len = kv_len_ref[...]
    q = q_ref[...]
    block_q, head_dim = q.shape
    qk_scale = scale * LOG2E

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale  # log2-domain scores
        if masked:
            s = _key_mask(s, start, kv_len)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: every visited block has a valid key
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _masked_loops(body, kv_len, block_kv, init)
    nonempty = l > 0  # kv_len == 0: o = 0, lse = -inf
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _default_warps(block_a: int, block_b: int, head_dim: int) -> int:
    """8 warps once a program's f32 tiles (scores and a head_dim-128 accumulator) would spill with 4."""
    return 8 if block_a * block_b >= 128 * 64 and head_dim > 64 else 4


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "num_warps", "num_stages"))
def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
            block_sizes: BlockSizes, interpret: bool = False, num_warps: int | None = None,
            num_stages: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Flash forward: (o (B, S, H, D) in q's dtype, lse (B, H, S) float32); see ``flash.py``.

    Triton ``num_warps`` defaults to 8 for head_dim > 64 at tiles of at least 128 x 64, else 4;
    ``num_stages`` to 3 (three stages of 64 x 128 bf16 K and V tiles plus the Q tile fit easily in
    a Hopper SM's shared memory and hide the load latency).
    """
    batch, seq, heads, head_dim = q.shape
    keys = k.shape[1]
    block_q, block_kv = _block(block_sizes.block_q, seq), _block(block_sizes.block_kv, keys)
    seq_p, keys_p = pl.cdiv(seq, block_q) * block_q, pl.cdiv(keys, block_kv) * block_kv
    dim_p = max(MIN_BLOCK, pl.next_power_of_2(head_dim))
    qp = _pad_to(_pad_to(q, 1, seq_p), 3, dim_p)
    kp, vp = (_pad_to(_pad_to(x, 1, keys_p), 3, dim_p) for x in (k, v))
    kv_len = jnp.clip(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (batch,)), 0, keys)

    q_tile, lse_row, scalar = _specs(heads, block_q, dim_p)
    kv_full, _, _ = _specs(heads, keys_p, dim_p, whole=True)
    params = plgpu.CompilerParams(num_warps=num_warps or _default_warps(block_q, block_kv, dim_p),
                                  num_stages=num_stages or 3)
    kernel = functools.partial(_forward_kernel, scale=float(scale), block_kv=block_kv, precision=_precision(q.dtype))
    o, lse = pl.pallas_call(
        kernel,
        grid=(seq_p // block_q, batch * heads),
        in_specs=[scalar, q_tile, kv_full, kv_full],
        out_specs=[q_tile, lse_row],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_p), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="director_flash_fwd",
    )(kv_len, qp, kp, vp)
    return o[:, :seq, :, :head_dim], lse[:, :, :seq]


# ----------------------------------------------------------------------------------------------
# Backward


def _dkv_kernel(kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float,
                block_q: int, precision: lax.Precision):
    kv_len = kv_len_ref[...]
    k, v = k_ref[...], v_ref[...]
    block_kv, head_dim = k.shape
    start_kv = pl.program_id(0) * block_kv
    qk_scale = scale * LOG2E

    def body(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale
        if masked:
            s = _key_mask(s, start_kv, kv_len)
        p = jnp.exp2(s - lse_ref[rows][:, None])  # lse in log2 units, +inf on rows that contribute nothing
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta_ref[rows][:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        return dk, dv

    # All query blocks, unmasked if every key of this block is valid, masked if it straddles kv_len,
    # not at all if it lies past kv_len (then dk = dv = 0).
    n_q = q_ref.shape[0] // block_q
    straddles = (start_kv < kv_len) & (start_kv + block_kv > kv_len)
    n_unmasked = jnp.where(start_kv + block_kv <= kv_len, n_q, 0)
    n_masked = jnp.where(straddles, n_q, 0)
    zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
    carry = lax.fori_loop(0, n_unmasked, functools.partial(body, masked=False), (zeros, zeros))
    dk, dv = lax.fori_loop(0, n_masked, functools.partial(body, masked=True), carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, block_kv: int,
               precision: lax.Precision):
    kv_len = kv_len_ref[...]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qk_scale = scale * LOG2E

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale
        if masked:
            s = _key_mask(s, start, kv_len)
        p = jnp.exp2(s - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    dq = _masked_loops(body, kv_len, block_kv, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "num_warps", "num_stages"))
def backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
             kv_len: jax.Array, *, scale: float, block_sizes: BlockSizes, interpret: bool = False,
             num_warps: int | None = None, num_stages: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flash backward: (dq, dk, dv) given the forward's o and (possibly global) lse; see ``flash.py``.

    Both kernels use ``block_q_bwd`` x ``block_kv_bwd`` tiles. ``num_warps`` defaults as in the
    forward; ``num_stages`` to 2, as each stage of the backward streams two tiles (q and do, or k and v).
    """
    batch, seq, heads, head_dim = q.shape
    keys = k.shape[1]
    block_q, block_kv = _block(block_sizes.block_q_bwd, seq), _block(block_sizes.block_kv_bwd, keys)
    seq_p, keys_p = pl.cdiv(seq, block_q) * block_q, pl.cdiv(keys, block_kv) * block_kv
    dim_p = max(MIN_BLOCK, pl.next_power_of_2(head_dim))
    kv_len = jnp.clip(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (batch,)), 0, keys)

    # Preprocessing (one fused XLA pass): delta = rowsum(o * do); lse to log2 units with +inf where
    # the row has no key (and on padded rows), so exp2(s - lse) = 0 there.
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse.astype(jnp.float32) * LOG2E)
    delta, lse2 = _pad_to(delta, 2, seq_p), _pad_to(lse2, 2, seq_p, jnp.inf)
    qp, dop = (_pad_to(_pad_to(x, 1, seq_p), 3, dim_p) for x in (q, do))
    kp, vp = (_pad_to(_pad_to(x, 1, keys_p), 3, dim_p) for x in (k, v))

    precision = _precision(q.dtype)
    params = plgpu.CompilerParams(num_warps=num_warps or _default_warps(block_q, block_kv, dim_p),
                                  num_stages=num_stages or 2)
    inputs = (kv_len, qp, kp, vp, dop, lse2, delta)

    kv_tile, _, scalar = _specs(heads, block_kv, dim_p)
    q_full, row_full, _ = _specs(heads, seq_p, dim_p, whole=True)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=float(scale), block_q=block_q, precision=precision),
        grid=(keys_p // block_kv, batch * heads),
        in_specs=[scalar, q_full, kv_tile, kv_tile, q_full, row_full, row_full],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="director_flash_bwd_dkv",
    )(*inputs)

    q_tile, row, scalar = _specs(heads, block_q, dim_p)
    kv_full, _, _ = _specs(heads, keys_p, dim_p, whole=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=float(scale), block_kv=block_kv, precision=precision),
        grid=(seq_p // block_q, batch * heads),
        in_specs=[scalar, q_tile, kv_full, kv_full, q_tile, row, row],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="director_flash_bwd_dq",
    )(*inputs)
    return dq[:, :seq, :, :head_dim], dk[:, :keys, :, :head_dim], dv[:, :keys, :, :head_dim]
