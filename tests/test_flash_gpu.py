"""The Pallas/Triton GPU flash kernel (``flash_gpu.py``) in interpret mode on the CPU, against the
contract's jnp reference (``flash.reference_forward`` / ``reference_backward``) and ``jax.grad`` of
``xla_attention``; plus a check, needing no GPU, that both passes lower to Triton kernels for CUDA.

Tolerances (max absolute error; scores are O(1), outputs and gradients O(0.1-3)):
float32: o and lse 1e-5, dq / dk / dv 2e-5. bfloat16 (p rounded to bf16 before the PV and dS
products, outputs rounded to bf16): o 2e-3, lse 1e-5 (float32 statistics), dq / dk / dv 2e-2 (the
gradients' own bf16 rounding at magnitude ~3 is ~1e-2).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from director_jax.kernels import dispatch, flash, flash_gpu
from director_jax.kernels.flash import BlockSizes

F32_TOL = {"o": 1e-5, "lse": 1e-5, "grad": 2e-5}
BF16_TOL = {"o": 2e-3, "lse": 1e-5, "grad": 2e-2}
BLOCKS = BlockSizes(block_q=64, block_kv=128, block_q_bwd=128, block_kv_bwd=64)
BLOCKS_T = BlockSizes(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=128)  # the other way round
# jitted references: one compile per shape instead of op-by-op dispatch (most of this file's CPU time)
reference_forward = jax.jit(flash.reference_forward, static_argnames="scale")
reference_backward = jax.jit(flash.reference_backward, static_argnames="scale")


def _inputs(seq, keys, heads, dim, dtype, batch=1, seed=0):
    rng = np.random.RandomState(seed)
    q, do = (jnp.asarray(rng.randn(batch, seq, heads, dim), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(batch, keys, heads, dim), dtype) for _ in range(2))
    return q, k, v, do


def _max_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # -inf lse exactly where expected
    finite = np.isfinite(want)
    return float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0


def _check_both_passes(q, k, v, do, kv_len, tol, blocks=BLOCKS):
    """Kernel forward vs reference forward, and kernel backward vs reference backward (same o, lse)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kw = dict(scale=scale, block_sizes=blocks, interpret=True)
    o, lse = flash_gpu.forward(q, k, v, kv_len, **kw)
    ro, rlse = reference_forward(q, k, v, kv_len, scale=scale)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    errors = {"o": _max_err(o, ro), "lse": _max_err(lse, rlse)}
    grads = flash_gpu.backward(q, k, v, ro, rlse, do, kv_len, **kw)
    want = reference_backward(q, k, v, ro, rlse, do, kv_len, scale=scale)
    for name, g, w, x in zip(("dq", "dk", "dv"), grads, want, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        errors[name] = _max_err(g, w)
    for name, err in errors.items():
        assert err <= tol["grad" if name.startswith("d") else name], (name, errors)
    return grads


def _param_id(value):
    if isinstance(value, BlockSizes):
        return f"q{value.block_q}kv{value.block_kv}"
    return getattr(value, "__name__", None)  # dtypes by name, numbers by pytest


@pytest.mark.parametrize("seq,heads,dim,dtype,blocks", [
    (128, 2, 64, jnp.float32, BLOCKS),
    (333, 2, 64, jnp.float32, BLOCKS),
    (1000, 2, 64, jnp.float32, BLOCKS),
    (1031, 2, 64, jnp.float32, BLOCKS),
    (333, 1, 128, jnp.float32, BLOCKS_T),
    (1031, 1, 128, jnp.float32, BLOCKS_T),
    (333, 2, 64, jnp.bfloat16, BLOCKS),
    (1031, 1, 128, jnp.bfloat16, BLOCKS_T),
], ids=_param_id)
def test_matches_reference(seq, heads, dim, dtype, blocks):
    """Full key length (every key valid), S = L, one test per shape: both passes against the reference."""
    q, k, v, do = _inputs(seq, seq, heads, dim, dtype)
    kv_len = jnp.array([seq], jnp.int32)
    _check_both_passes(q, k, v, do, kv_len, F32_TOL if dtype == jnp.float32 else BF16_TOL, blocks)


def test_kv_len_masking_and_cross_lengths():
    """A row with no valid key (o = 0, lse = -inf, no NaN, no gradient) and a partial row, S != L."""
    q, k, v, do = _inputs(333, 77, 2, 64, jnp.float32, batch=3)
    kv_len = jnp.array([0, 50, 77], jnp.int32)
    o, lse = flash_gpu.forward(q, k, v, kv_len, scale=0.125, block_sizes=BLOCKS, interpret=True)
    assert not np.asarray(o[0]).any() and np.isneginf(np.asarray(lse[0])).all()
    dq, dk, dv = _check_both_passes(q, k, v, do, kv_len, F32_TOL)
    assert not np.asarray(dq[0]).any() and not np.asarray(dk[0]).any() and not np.asarray(dv[0]).any()
    assert not np.asarray(dk[1, 50:]).any() and not np.asarray(dv[1, 50:]).any()  # masked keys
    assert np.asarray(dk[1, :50]).any()


def test_global_lse_splits_the_gradient():
    """With the full-key lse (as ring attention passes it), the backward of each half of the keys is that
    half's share: the halves' dq sum, and their dk / dv concatenate, to the full gradient."""
    q, k, v, do = _inputs(200, 300, 1, 64, jnp.float32, batch=2, seed=1)
    kv_len = jnp.array([300, 130], jnp.int32)  # row 1: the second half is all masked
    kw = dict(scale=0.125, block_sizes=BLOCKS, interpret=True)
    o, lse = flash_gpu.forward(q, k, v, kv_len, **kw)
    half = 150
    first = flash_gpu.backward(q, k[:, :half], v[:, :half], o, lse, do, jnp.minimum(kv_len, half), **kw)
    second = flash_gpu.backward(q, k[:, half:], v[:, half:], o, lse, do, jnp.maximum(kv_len - half, 0), **kw)
    dq, dk, dv = reference_backward(q, k, v, o, lse, do, kv_len, scale=0.125)
    np.testing.assert_allclose(first[0] + second[0], dq, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([first[1], second[1]], axis=1), dk, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([first[2], second[2]], axis=1), dv, atol=2e-5)
    assert np.asarray(first[0][1]).any() and not np.asarray(second[0][1]).any()


def test_flash_attention_grad_matches_xla():
    """End to end through the custom-VJP glue, under jit and jax.grad, against grad of xla_attention."""
    q, k, v, w = _inputs(160, 96, 2, 64, jnp.float32, batch=2, seed=2)
    kv_len = jnp.array([96, 41], jnp.int32)

    def kernel_loss(q, k, v):
        o = flash.flash_attention(flash_gpu.forward, flash_gpu.backward, q, k, v, kv_len=kv_len,
                                  block_sizes=BLOCKS, interpret=True)
        return jnp.sum(o * w)

    def xla_loss(q, k, v):
        return jnp.sum(dispatch.xla_attention(q, k, v, kv_len=kv_len) * w)

    value, grads = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1, 2)))(q, k, v)
    want_value, want = jax.jit(jax.value_and_grad(xla_loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-5)


@pytest.mark.parametrize("seq,dim,dtype", [(4096, 128, jnp.bfloat16), (1000, 64, jnp.float32), (333, 80, jnp.bfloat16)])
def test_lowers_to_triton_for_cuda(seq, dim, dtype):
    """No GPU needed: trace forward + backward and lower for CUDA; the Triton lowering runs in Python,
    so unsupported ops or non-power-of-two tiles fail here. Each pass must be a Triton custom call."""
    x = jax.ShapeDtypeStruct((2, seq, 3, dim), dtype)

    def loss(q, k, v, kv_len):
        o = flash.flash_attention(flash_gpu.forward, flash_gpu.backward, q, k, v, kv_len=kv_len,
                                  block_sizes=BlockSizes(128, 64, 64, 64))
        return o.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, jax.ShapeDtypeStruct((2,), jnp.int32))
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)", num_stages = (\d+) : i32, '
                       r"num_warps = (\d+)", text)
    names = sorted(name for name, _, _ in calls)
    assert names == ["director_flash_bwd_dkv", "director_flash_bwd_dq", "director_flash_fwd"], calls
    fwd = next(c for c in calls if c[0] == "director_flash_fwd")
    assert fwd[1:] == ("3", "8" if dim > 64 else "4")


def test_rejects_non_power_of_two_blocks():
    q, k, v, _ = _inputs(64, 64, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        flash_gpu.forward(q, k, v, jnp.array([64]), scale=0.125, block_sizes=BlockSizes(96, 64, 64, 64),
                          interpret=True)
