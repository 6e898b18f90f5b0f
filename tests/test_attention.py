"""The attention entry point: the XLA reference against NumPy, key-length masking, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from director_jax.kernels.attention import attention


def _numpy_attention(q, k, v, kv_len=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bshd,blhd->bhsl", q, k) / np.sqrt(q.shape[-1])
    if kv_len is not None:
        for b, n in enumerate(kv_len):
            scores[b, :, :, n:] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhsl,blhd->bshd", p, v)


def test_xla_attention_matches_numpy_and_masks_padding():
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(2, 13, 3, 16).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")),
                               _numpy_attention(q, k, v), atol=1e-5)
    # keys padded from 9 / 13 valid to 13: the padded keys must not change anything
    kv_len = np.array([9, 13])
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_len=jnp.asarray(kv_len), impl="xla")
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, kv_len), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[0], _numpy_attention(q[:1], k[:1, :9], v[:1, :9])[0], atol=1e-5)
    # auto (rows on the CPU) agrees with the reference to float32 rounding
    np.testing.assert_allclose(np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))),
                               np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")),
                               atol=1e-6)


def test_bad_input():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        attention(x, x, x, impl="flash")
    with pytest.raises(ValueError, match=r"takes \(B, S, H, D\) arrays"):
        attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="disagree"):
        attention(x, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))


def test_kernels_import_each_other_at_module_level_and_without_a_cycle():
    """Every import of a project module in kernels/ is at module level, and they form a DAG with the
    entry point on top: flash <- pallas kernels / blockwise / splash <- dispatch <- sequence_parallel <- attention."""
    import ast
    import graphlib
    from pathlib import Path

    import director_jax.kernels

    root = Path(director_jax.kernels.__file__).parent
    graph = {}
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("director_jax"):
                assert id(node) in top, f"{path.name}:{node.lineno} imports {node.module} inside a function"
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n.split(".")[2] for n in names if n.startswith("director_jax.kernels.")}
            elif isinstance(node, ast.Import) and any(a.name.startswith("director_jax") for a in node.names):
                assert id(node) in top, f"{path.name}:{node.lineno} imports director_jax inside a function"
        graph[path.stem] = deps - {path.stem}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("flash") < order.index("dispatch") < order.index("sequence_parallel") < order.index("attention")
    assert graph["dispatch"] >= {"flash_tpu", "flash_gpu", "splash", "blockwise"}
    assert not graph["dispatch"] & {"attention", "sequence_parallel"} and "attention" not in graph["sequence_parallel"]


# ----------------------------------------------------------------------------------------------
# The flash contract, the jnp blockwise pair, splash, and ``auto``

import jax  # noqa: E402

from director_jax.kernels import blockwise, flash, row_blocks  # noqa: E402
from director_jax.kernels.dispatch import choose_implementation, row_block_size, xla_attention  # noqa: E402
from director_jax.kernels.flash import BlockSizes  # noqa: E402


def _qkv(seed, b, s, l, h, d, dtype=np.float32):
    rng = np.random.RandomState(seed)
    q = rng.randn(b, s, h, d).astype(dtype)
    k, v, w = (rng.randn(b, l, h, d).astype(dtype) for _ in range(3))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(rng.randn(b, s, h, d).astype(np.float32))


def _grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), w), argnums=(0, 1, 2))(q, k, v)


def test_contract_reference_pair_matches_autodiff_and_numpy():
    q, k, v, w = _qkv(1, 2, 13, 11, 3, 16)
    kv_len = jnp.array([0, 7])  # row 0 has no valid key at all
    o, lse = flash.reference_forward(q, k, v, kv_len, scale=0.25)
    assert not np.any(np.isnan(np.asarray(o))) and np.all(np.asarray(o)[0] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0]))
    np.testing.assert_allclose(np.asarray(o)[1], _numpy_attention(q[1:] * 0.25 * 4, k[1:, :7], v[1:, :7])[0],
                               atol=1e-5)
    # the custom-VJP glue with the reference backward == autodiff of the plain reference
    full = jnp.array([11, 7])
    ours = _grads(lambda q, k, v: flash.reference_flash(q, k, v, kv_len=full), q, k, v, w)
    auto = _grads(lambda q, k, v: xla_attention(q, k, v, kv_len=full), q, k, v, w)
    for a, b in zip(ours, auto, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_backward_with_global_lse_splits_over_key_blocks():
    """Ring attention's premise: the backward of each key block with the global lse sums to the whole."""
    q, k, v, do = _qkv(2, 1, 40, 40, 2, 16)
    kv_len, scale = jnp.array([37]), 0.25
    o, lse = flash.reference_forward(q, k, v, kv_len, scale=scale)
    dq, dk, dv = flash.reference_backward(q, k, v, o, lse, do, kv_len, scale=scale)
    sizes = BlockSizes(16, 16, 16, 8)
    for back in (flash.reference_backward, blockwise.backward, row_blocks.backward):
        a = back(q, k[:, :16], v[:, :16], o, lse, do, jnp.array([16]), scale=scale, block_sizes=sizes)
        b = back(q, k[:, 16:], v[:, 16:], o, lse, do, kv_len - 16, scale=scale, block_sizes=sizes)
        np.testing.assert_allclose(np.asarray(a[0] + b[0]), np.asarray(dq), atol=1e-5)
        np.testing.assert_allclose(np.asarray(jnp.concatenate([a[1], b[1]], 1)), np.asarray(dk), atol=1e-5)
        np.testing.assert_allclose(np.asarray(jnp.concatenate([a[2], b[2]], 1)), np.asarray(dv), atol=1e-5)
    assert np.all(np.asarray(dk)[:, 37:] == 0) and np.all(np.asarray(dv)[:, 37:] == 0)


@pytest.mark.parametrize("impl,s,d,sizes", [("blockwise", 333, 64, BlockSizes(128, 256, 128, 128)),
                                             ("blockwise", 1031, 128, BlockSizes(128, 256, 128, 128)),
                                             ("rows", 333, 64, BlockSizes(64, 64, 96, 96)),
                                             ("rows", 1031, 128, None)])  # None: row_block_size: 5 blocks of 208 rows
def test_flash_pairs_match_reference(impl, s, d, sizes):
    q, k, v, w = _qkv(s, 1, s, s, 2, d)
    kv_len = jnp.array([s - 17])
    got = attention(q, k, v, kv_len=kv_len, impl=impl, block_sizes=sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, kv_len=kv_len)), atol=1e-5)
    ours = _grads(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl=impl, block_sizes=sizes), q, k, v, w)
    ref = _grads(lambda q, k, v: xla_attention(q, k, v, kv_len=kv_len), q, k, v, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5 * float(np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize("impl", ["blockwise", "rows"])
def test_flash_pairs_bf16_and_cross_attention_shapes(impl):
    q, k, v, w = _qkv(3, 2, 333, 77, 2, 64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    kv_len = jnp.array([77, 30])
    got = attention(q, k, v, kv_len=kv_len, impl=impl, block_sizes=BlockSizes(64, 32, 64, 32))
    assert got.dtype == jnp.bfloat16
    ref = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), kv_len=kv_len)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("impl", ["splash", "tokamax"])
def test_splash_kernels_interpret_match_reference(impl):
    """JAX's splash and tokamax's fork of it, interpreted on the CPU, under jit then under grad of jit: the
    second trace reuses the cached kernel, which must not hold the first trace's tracers."""
    q, k, v, w = _qkv(4, 2, 130, 130, 1, 64)
    kv_len = jnp.array([100, 0])
    got = jax.jit(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl=impl, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, kv_len=kv_len)), atol=1e-5)
    assert np.all(np.asarray(got)[1] == 0)
    kv_len = jnp.array([100, 130])
    ours = _grads(jax.jit(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl=impl, interpret=True)), q, k, v, w)
    ref = _grads(lambda q, k, v: xla_attention(q, k, v, kv_len=kv_len), q, k, v, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "tokamax"])
def test_splash_kernels_compile_for_v5p_under_a_mesh(impl):
    """Forward and backward compiled by libtpu / Mosaic for v5p (no TPU needed), per (batch, head) shard on a
    mesh of compile-only devices, where the kernel's mask info cannot be made as eager arrays."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from director_jax.train import aot

    mesh = aot.topology_mesh("v5p:2x2x1", {"fsdp": -1})
    batch, s, heads, d = 4, 640, 2, 128
    x = jax.ShapeDtypeStruct((batch, s, heads, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))

    def grads(q, k, v):
        return jax.grad(lambda *a: jnp.sum(attention(*a, impl=impl).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
        report = aot.compile_report(jax.jit(grads), x, x, x, topology="v5p:2x2x1", mesh=mesh)
    shard_bytes = s * heads * d * 2  # one batch row per device
    assert report.num_devices == 4 and report.argument_bytes == 3 * shard_bytes and report.fits
    assert 3 * shard_bytes <= report.output_bytes < 3 * shard_bytes + 4096  # the grads (and a tuple header)


def test_rows_handle_a_batch_row_without_valid_keys():
    """kv_len 0: o = 0 and lse = -inf, gradients finite (0 for that row), as the contract says."""
    q, k, v, w = _qkv(5, 2, 40, 24, 2, 16)
    kv_len = jnp.array([0, 19])
    o, lse = row_blocks.forward(q, k, v, kv_len, scale=0.25, block_sizes=BlockSizes(16, 16, 16, 16))
    ref_o, ref_lse = flash.reference_forward(q, k, v, kv_len, scale=0.25)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref_o), atol=1e-6)
    assert np.all(np.asarray(o)[0] == 0) and np.all(np.isneginf(np.asarray(lse)[0]))
    np.testing.assert_allclose(np.asarray(lse)[1], np.asarray(ref_lse)[1], atol=1e-5)
    ours = _grads(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl="rows"), q, k, v, w)
    ref = _grads(lambda q, k, v: flash.reference_flash(q, k, v, kv_len=kv_len), q, k, v, w)
    for a, b in zip(ours, ref, strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_auto_never_materialises_scores_above_the_limit():
    s = 2048
    q = jnp.zeros((1, s, 1, 32), jnp.float32)
    assert choose_implementation(q, q, backend="cpu") == "rows"
    assert choose_implementation(q, q[:, :8192], backend="cpu") == "rows"
    assert choose_implementation(q, jnp.zeros((1, 8200, 1, 32)), backend="cpu") == "blockwise"  # tile > 1 MiB
    assert choose_implementation(q, q, backend="cpu", max_materialized=32 * s - 1) == "blockwise"
    assert choose_implementation(q, q, backend="tpu") == "pallas"
    assert choose_implementation(q, q, backend="gpu") == "pallas"  # float32: cuDNN flash needs bf16/f16
    assert choose_implementation(q.astype(jnp.bfloat16), q, backend="gpu") == "cudnn"
    assert row_block_size(s, s) == 128 and row_block_size(100, 512) == 104 and row_block_size(s, 10**6) == 8

    def hlo(q):
        return jax.jit(jax.grad(lambda q: attention(q, q, q).sum())).lower(q).as_text()

    # rows: no (S, S) buffer, only (128, S) tiles; a short sequence is one tile, (S, S)
    text = hlo(q)
    assert f"{s}x{s}x" not in text and f"128x{s}x" in text
    assert "256x256x" in hlo(q[:, :256])


def test_block_size_table():
    assert flash.default_block_sizes("TPU v5") == flash.DEFAULT_BLOCK_SIZES["tpu v5"]
    assert flash.default_block_sizes("TPU v5 lite") == flash.DEFAULT_BLOCK_SIZES["tpu v5 lite"]
    assert flash.default_block_sizes("NVIDIA H100 80GB HBM3") == flash.DEFAULT_BLOCK_SIZES["h100"]
    assert flash.default_block_sizes() == flash.DEFAULT_BLOCK_SIZES["cpu"]  # the test machine
    with pytest.raises(ValueError, match="multiples of 8"):
        BlockSizes(block_q=100)


def test_kernels_run_per_shard_under_a_mesh():
    """On a mesh a Mosaic kernel goes inside shard_map over batch and heads and gives the same numbers."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from director_jax.parallel.mesh import create_mesh

    mesh = create_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2})
    q, k, v, _ = _qkv(5, 2, 130, 130, 2, 64)
    kv_len = jnp.array([100, 130])
    want = np.asarray(xla_attention(q, k, v, kv_len=kv_len))
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", "sequence", "tensor", None))
        q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
        fn = jax.jit(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl="splash", interpret=True))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        np.testing.assert_allclose(np.asarray(fn(q, k, v)), want, atol=1e-5)


def test_block_sizes_from_the_config_reach_every_attention():
    from pathlib import Path

    from director_jax.build import build_director_gen
    from director_jax.configs_common import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gen_tiny.py")
    cfg.model_options.attention_block_sizes = dict(block_q=64, block_kv=128, block_q_bwd=64, block_kv_bwd=64)
    dit = build_director_gen(cfg).dit
    assert dit.blocks.attn1.block_sizes == dit.blocks.attn2.block_sizes == BlockSizes(64, 128, 64, 64)
