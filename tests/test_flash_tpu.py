"""The Pallas TPU flash kernels (``flash_tpu.py``): interpret mode on the CPU against the jnp reference
of the contract, and a compile-only (AOT) build for a v5p slice with libtpu.

Tolerances, as max |kernel - reference| / max(1, max |reference|):
  f32: forward (o and lse) 1e-5, gradients 1e-5 (observed ~1e-6);
  bf16: forward 1e-2 (o is rounded to bf16: one ulp at |o| ~ 1 is 8e-3) with mean |error| <= 1e-3,
  gradients 1e-2 (the kernels feed bf16 p / ds to the MXU, as flash kernels do; observed ~4e-3).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from director_jax.kernels import dispatch, flash, flash_tpu
from director_jax.kernels.flash import BlockSizes

BLOCKS = BlockSizes(128, 128, 128, 128)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
FWD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(s: int, l: int, d: int, dtype, *, batch: int = 1, heads: int = 2, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, s, heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, l, heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, l, heads, d), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (batch, s, heads, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _err(x: jax.Array, ref: jax.Array) -> float:
    """Max abs error relative to max(1, max |ref|); -inf entries must match exactly."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(x).any()
    np.testing.assert_array_equal(np.isneginf(x), np.isneginf(ref))
    fin = np.isfinite(ref)
    return float(np.abs(x[fin] - ref[fin]).max(initial=0.0) / max(1.0, np.abs(ref[fin]).max(initial=0.0)))


@functools.partial(jax.jit, static_argnames=("scale", "blocks"))
def _kernel_and_reference(q, k, v, do, kv_len, *, scale: float, blocks: BlockSizes):
    """Both passes of the kernel and of the reference, in one program (one XLA compile per case). The
    kernel's backward starts from the reference's (o, lse), so that it is tested on its own."""
    kw = dict(scale=scale, block_sizes=blocks, interpret=True)
    o, lse = flash_tpu.forward(q, k, v, kv_len, **kw)
    ro, rlse = flash.reference_forward(q, k, v, kv_len, scale=scale)
    grads = flash_tpu.backward(q, k, v, ro, rlse, do, kv_len, **kw)
    ref_grads = flash.reference_backward(q, k, v, ro, rlse, do, kv_len, scale=scale)
    return (o, lse, *grads), (ro, rlse, *ref_grads)


def _check_against_reference(s, l, d, dtype, kv_len=None, blocks=BLOCKS, batch=1):
    q, k, v, do = _inputs(s, l, d, dtype, batch=batch)
    kv_len = flash.full_kv_len(k, kv_len)
    out, ref = _kernel_and_reference(q, k, v, do, kv_len, scale=1.0 / math.sqrt(d), blocks=blocks)
    o, lse, dq, dk, dv = out
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == jnp.float32 and lse.shape == (batch, 2, s)
    errors = {name: _err(x, r) for name, x, r in zip(("o", "lse", "dq", "dk", "dv"), out, ref, strict=True)}
    assert errors["o"] <= FWD_TOL[dtype] and errors["lse"] <= FWD_TOL[dtype], errors
    assert max(errors["dq"], errors["dk"], errors["dv"]) <= TOL[dtype], errors
    for g, x in zip((dq, dk, dv), (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
    if dtype == jnp.bfloat16:
        assert float(jnp.abs(o.astype(jnp.float32) - ref[0].astype(jnp.float32)).mean()) <= 1e-3
    return o, lse, (dq, dk, dv)


@pytest.mark.parametrize("s, d, dtype", [
    (128, 64, jnp.float32), (333, 64, jnp.float32), (1000, 64, jnp.float32), (1031, 64, jnp.float32),
    (333, 128, jnp.float32), (1031, 128, jnp.float32),  # head_dim 128: the (B, S, H * D) layout
    (333, 128, jnp.bfloat16), (1000, 64, jnp.bfloat16),
])
def test_matches_reference(s, d, dtype):
    _check_against_reference(s, s, d, dtype)


def test_kv_len_masking():
    """Batch rows with no valid key (o = 0, lse = -inf, no NaN), a partial row, and a full row."""
    s = l = 333
    kv_len = jnp.array([0, 150, l], jnp.int32)
    o, lse, (dq, dk, dv) = _check_against_reference(s, l, 64, jnp.float32, kv_len=kv_len, batch=3)
    assert (o[0] == 0).all() and jnp.isneginf(lse[0]).all() and (dq[0] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dk[1, 150:] == 0).all() and (dv[1, 150:] == 0).all() and (jnp.abs(dk[1, :150]).sum() > 0)


@pytest.mark.parametrize("s, l, blocks", [
    (333, 77, BLOCKS),                                 # text cross-attention: one key block
    (333, 1000, BlockSizes(128, 256, 256, 128)),       # non-square blocks, several of each
])
def test_cross_attention_shapes(s, l, blocks):
    _check_against_reference(s, l, 64, jnp.float32, kv_len=jnp.array([l - 3], jnp.int32), blocks=blocks)


def test_backward_with_global_lse_sums_over_key_shards():
    """Ring attention's use: each key shard's backward with the global (o, lse) is that shard's share."""
    s, l, d, cut = 200, 333, 64, 160
    q, k, v, do = _inputs(s, l, d, jnp.float32)
    kv_len = jnp.array([l - 40], jnp.int32)  # the second shard is partially masked

    @jax.jit
    def full_and_shards(q, k, v, do, kv_len):
        kw = dict(scale=1.0 / math.sqrt(d), block_sizes=BLOCKS, interpret=True)
        o, lse = flash_tpu.forward(q, k, v, kv_len, **kw)
        full = flash_tpu.backward(q, k, v, o, lse, do, kv_len, **kw)
        first = flash_tpu.backward(q, k[:, :cut], v[:, :cut], o, lse, do, jnp.minimum(kv_len, cut), **kw)
        second = flash_tpu.backward(q, k[:, cut:], v[:, cut:], o, lse, do, kv_len - cut, **kw)
        return full, first, second

    (dq, dk, dv), (dq1, dk1, dv1), (dq2, dk2, dv2) = full_and_shards(q, k, v, do, kv_len)
    assert _err(dq1 + dq2, dq) <= 1e-5
    assert _err(jnp.concatenate([dk1, dk2], axis=1), dk) <= 1e-5
    assert _err(jnp.concatenate([dv1, dv2], axis=1), dv) <= 1e-5
    assert _err(dq1, dq) > 1e-2  # each shard alone is only part of the gradient


def test_flash_attention_under_grad_matches_xla():
    s, d = 333, 64
    q, k, v, do = _inputs(s, s, d, jnp.float32)
    kv_len = jnp.array([300], jnp.int32)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v, kv_len=kv_len) * do)

    def kernel(q, k, v, **kw):
        return flash.flash_attention(flash_tpu.forward, flash_tpu.backward, q, k, v, **kw, block_sizes=BLOCKS,
                                     interpret=True)

    @jax.jit
    def both(q, k, v):
        helper = flash_tpu.flash_attention(q, k, v, kv_len=kv_len, block_sizes=BLOCKS, interpret=True)
        return (jax.value_and_grad(loss(kernel), argnums=(0, 1, 2))(q, k, v),
                jax.value_and_grad(loss(dispatch.xla_attention), argnums=(0, 1, 2))(q, k, v),
                helper, dispatch.xla_attention(q, k, v, kv_len=kv_len))

    (value, grads), (ref_value, ref_grads), helper, ref_o = both(q, k, v)
    assert abs(float(value - ref_value)) <= 1e-5 * max(1.0, abs(float(ref_value)))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert _err(g, rg) <= 1e-5
    assert _err(helper, ref_o) <= 1e-5  # the helper: the same pair through the same glue


def test_aot_compiles_forward_and_backward_for_v5p():
    """jax.grad of the kernels inside shard_map, compiled by libtpu/Mosaic for v5p:2x2x1 (no TPU needed)."""
    from director_jax.train import aot

    mesh = aot.topology_mesh("v5p:2x2x1", {"fsdp": -1})  # libtpu is a test requirement: no skip
    batch, s, heads, d = 4, 2048, 2, 128
    blocks = flash.default_block_sizes(mesh.devices.flat[0].device_kind)
    assert blocks == BlockSizes(512, 1024, 512, 512)
    spec = P("fsdp")

    def local_grads(q, k, v):
        return jax.grad(lambda *a: jnp.sum(flash_tpu.flash_attention(*a, block_sizes=blocks).astype(jnp.float32)
                                           ** 2), argnums=(0, 1, 2))(q, k, v)

    step = jax.jit(jax.shard_map(local_grads, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3,
                                 check_vma=False))
    x = jax.ShapeDtypeStruct((batch, s, heads, d), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    report = aot.compile_report(step, x, x, x, topology="v5p:2x2x1", mesh=mesh)

    shard_bytes = s * heads * d * 2  # one batch row per device
    assert report.num_devices == 4 and report.argument_bytes == 3 * shard_bytes
    assert report.output_bytes >= 3 * shard_bytes and report.peak_bytes >= 6 * shard_bytes and report.fits
    # Per device: the kernels' cost estimates (4 + 8 + 6) * S * L * H * D, plus a little elementwise work.
    assert report.flops == pytest.approx(18 * s * s * heads * d, rel=0.01)
    assert report.bytes_accessed > 0 and report.generated_code_bytes > 0
