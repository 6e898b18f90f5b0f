"""One device's attention: the implementations behind a name, ``auto``'s choice, the per-shard wrapper.

The leaf of the attention stack: ``sequence_parallel.py`` runs these per device inside its
``shard_map``, and ``attention.py`` (the public entry point) sits on top of both. Implementations of
(B, S, H, D) queries and (B, L, H, D) keys and values, keys past ``kv_len[b]`` masked:

* ``xla``: the plain ``jnp`` reference (``xla_attention``; materialises the (B, H, S, L) scores);
* ``blockwise``: flash attention in plain jnp (``blockwise.py``);
* ``rows``: blocks of query rows with an exact full-row softmax, in plain jnp (``row_blocks.py``):
  the CPU's implementation while a block's score rows fit in cache;
* ``pallas``: this project's Pallas flash kernels (``flash_tpu.py`` on TPU, ``flash_gpu.py`` on GPU;
  on the CPU the TPU kernel in interpret mode, for tests);
* ``splash``: JAX's TPU splash-attention kernel (``splash.py``);
* ``tokamax``: the flash attention of DeepMind's ``tokamax`` kernel library, when it is installed
  (``splash.py``: its splash fork on TPU, and interpreted on the CPU; its Mosaic GPU / Triton kernel on GPU);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs).

The Pallas modules import on any machine (their lowering needs the backend, their import does not),
so they are imported here at module level.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from director_jax.kernels import blockwise, flash, flash_gpu, flash_tpu, row_blocks, splash
from director_jax.kernels.flash import BlockSizes
from director_jax.parallel.rules import logical_to_mesh_spec, place

LOCAL_IMPLEMENTATIONS = ("xla", "rows", "blockwise", "pallas", "splash", "tokamax", "cudnn")
# ``auto`` never holds more than this many score elements per (batch, head) at once:
# 8192^2 float32 scores are 256 MiB per head, already more than a kernel's whole working set.
MAX_MATERIALIZED = 8192 * 8192
# ``rows`` takes as many query rows per block as keep one head's (rows, L) float32 scores at 1 MiB (a
# core's L2 cache; 256 rows for 1024 keys, fastest of 128 / 256 / 512 / 1024 there, benchmarks/RESULTS.md).
ROW_TILE_ELEMENTS = 256 * 1024
MIN_ROW_BLOCK = 32  # ``auto`` needs room for this many rows under ``max_materialized``, else ``blockwise``


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
    """Reference attention in plain jnp: scores and softmax in float32, output in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = jnp.einsum("bshd,blhd->bhsl", q, k, preferred_element_type=jnp.float32) * scale
    valid = None
    if kv_len is not None:
        kv_len = jnp.broadcast_to(jnp.asarray(kv_len), (k.shape[0],))
        valid = (jnp.arange(k.shape[1])[None, :] < kv_len[:, None])[:, None, None, :]  # (B, 1, 1, L)
        scores = jnp.where(valid, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if valid is not None:  # a row with no valid key attends to nothing: 0, as the flash contract says
        probs = jnp.where(valid.any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhsl,blhd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                    scale: float | None = None) -> jax.Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/f16 inputs)."""
    key_lengths = None
    if kv_len is not None:
        key_lengths = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (q.shape[0],))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=key_lengths,
                                        implementation="cudnn")


def kernel_pair(backend: str | None = None) -> tuple[flash.ForwardFn, flash.BackwardFn, bool]:
    """This project's Pallas (forward, backward) for a backend, and whether it runs interpreted."""
    backend = flash.target_backend() if backend is None else backend
    if backend == "gpu":
        return flash_gpu.forward, flash_gpu.backward, False
    return flash_tpu.forward, flash_tpu.backward, backend != "tpu"


def local_pair(impl: str) -> tuple[flash.ForwardFn, flash.BackwardFn, bool]:
    """The (forward, backward, interpret) contract pair behind a flash-type implementation name."""
    if impl == "pallas":
        return kernel_pair()
    if impl == "blockwise":
        return blockwise.forward, blockwise.backward, False
    if impl == "rows":
        return row_blocks.forward, row_blocks.backward, False
    if impl == "xla":
        return flash.reference_forward, flash.reference_backward, False
    raise ValueError(f"Implementation {impl!r} has no forward/backward pair; use pallas, rows, blockwise or xla.")


def choose_implementation(q: jax.Array, k: jax.Array, *, backend: str | None = None,
                          max_materialized: int = MAX_MATERIALIZED) -> str:
    """``auto``: cuDNN on GPU where it applies, our kernel on TPU. On the CPU ``rows`` (faster than XLA's own
    attention at every size measured, ``benchmarks/attention.py``) while a block of MIN_ROW_BLOCK query rows
    fits the cache-sized tile (up to 8192 keys) and ``max_materialized``; beyond, ``blockwise``, whose tiles
    do not grow with the keys."""
    backend = flash.target_backend() if backend is None else backend
    if backend == "tpu":
        return "pallas"
    if backend == "gpu":
        if q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
            return "cudnn"
        return "pallas"
    tile = min(MIN_ROW_BLOCK, q.shape[1]) * k.shape[1]
    return "rows" if tile <= min(ROW_TILE_ELEMENTS, max_materialized) else "blockwise"


def row_block_size(s: int, l: int) -> int:
    """Query rows per ``rows`` block: the fewest blocks whose (rows, l) float32 tile stays within
    ROW_TILE_ELEMENTS per head, split evenly (576 rows under a 448-row cap: 2 blocks of 288, not 448 + 128
    padded to 448), rounded up to a multiple of 8 (at least 8)."""
    cap = max(8, ROW_TILE_ELEMENTS // max(l, 1) // 8 * 8)
    blocks = math.ceil(s / cap)
    rows = math.ceil(s / blocks)
    return max(8, math.ceil(rows / 8) * 8)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None, impl: str,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """One device's attention with a concrete ``impl`` (no ``auto``, no sequence parallelism)."""
    if impl == "xla":
        return xla_attention(q, k, v, kv_len=kv_len, scale=scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, kv_len=kv_len, scale=scale)
    if impl == "tokamax" and flash.target_backend() == "gpu":
        return per_shard(lambda q, k, v, n: splash.tokamax_gpu_attention(q, k, v, kv_len=n, scale=scale),
                         q, k, v, kv_len)
    if impl in ("splash", "tokamax"):
        library = "jax" if impl == "splash" else "tokamax"
        return per_shard(lambda q, k, v, n: splash.splash_attention(q, k, v, kv_len=n, scale=scale,
                                                                    interpret=interpret, library=library),
                         q, k, v, kv_len)
    forward, backward, default_interpret = local_pair(impl)
    interpret = default_interpret if interpret is None else interpret
    if impl == "rows" and block_sizes is None:
        rows = row_block_size(q.shape[1], k.shape[1])
        block_sizes = flash.BlockSizes(rows, rows, rows, rows)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, n: jax.Array) -> jax.Array:
        return flash.flash_attention(forward, backward, q, k, v, kv_len=n, scale=scale, block_sizes=block_sizes,
                                     interpret=interpret)

    return per_shard(attend, q, k, v, kv_len) if impl == "pallas" else attend(q, k, v, kv_len)


def per_shard(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
              kv_len: jax.Array | None) -> jax.Array:
    """Runs a Pallas kernel ``fn(q, k, v, kv_len)`` on each device's (batch, heads) shard under the active mesh.

    Mosaic and Triton kernels are opaque to XLA's SPMD partitioner, so on a mesh they go inside
    ``jax.shard_map``: batch and heads sharded as the active logical-axis rules place "batch" and
    "act_heads", the sequence whole on every device (sequence sharding is ``sequence_parallel``'s
    job). Without a mesh this is a plain call.
    """
    kv_len = flash.full_kv_len(k, kv_len)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:  # manual axes: already inside a shard_map (Ulysses)
        return fn(q, k, v, kv_len)
    spec = logical_to_mesh_spec(("batch", None, "act_heads", None), mesh=mesh, shape=q.shape)
    kv_spec = jax.sharding.PartitionSpec(spec[0])
    q, k, v = (place(x, spec, auto=False) for x in (q, k, v))  # Explicit mesh axes must match in_specs already
    return jax.shard_map(fn, in_specs=(spec, spec, spec, kv_spec), out_specs=spec, check_vma=False)(
        q, k, v, place(kv_len, kv_spec, auto=False))
