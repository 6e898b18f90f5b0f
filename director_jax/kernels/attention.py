"""The one attention entry point used by every model in this project.

``attention(q, k, v, impl=...)`` takes (B, S, H, D) queries and (B, L, H, D) keys and values
(bidirectional, softmax scale 1/sqrt(D) unless given) and dispatches to an implementation:

* ``xla``: the plain ``jnp`` reference (materialises the (B, H, S, L) scores; the ground truth
  every other implementation is tested against);
* ``blockwise``: flash attention in plain jnp (a scan over key blocks with an online softmax and a
  blockwise backward): never materialises the scores, runs anywhere, slower than a kernel;
* ``pallas``: this project's Pallas flash kernels (``flash_tpu.py`` on TPU, ``flash_gpu.py`` on
  GPU; on the CPU the TPU kernel in interpret mode, for tests);
* ``splash``: JAX's TPU splash-attention kernel;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs);
* ``auto``: by backend and shape (see ``choose_implementation``); it never picks ``xla`` when the
  score matrix would exceed ``max_materialized`` elements per head.

Keys past ``kv_len[b]`` (valid key count per batch row) are masked out, so callers may pad
sequences to any block size without changing the result.

``sequence_parallel`` (``"ulysses"``, ``"ring"`` or ``"auto"``) runs the attention over the
``sequence`` axis of the active mesh (``jax.set_mesh``) with ``jax.shard_map``; see
``sequence_parallel.py``. Without a mesh, or with a sequence axis of size 1, it is a no-op.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from director_jax.kernels import blockwise, flash
from director_jax.kernels.flash import BlockSizes

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas", "splash", "cudnn")
SEQUENCE_PARALLEL_MODES = (None, "ulysses", "ring", "auto")
# Above this many score elements per (batch, head), ``auto`` does not materialise the matrix:
# 8192^2 float32 scores are 256 MiB per head, already more than a kernel's whole working set.
MAX_MATERIALIZED = 8192 * 8192


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (B, S, H, D) arrays; got q {q.shape}, k {k.shape}, v {v.shape}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} disagree: k and v must match, and share "
                         "batch, heads and head_dim with q.")


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


def target_backend() -> str:
    """The platform the program is built for: the active mesh's devices (a TPU topology compiled from
    a CPU host, say), else JAX's default backend."""
    device = flash.mesh_device()
    if device is not None:
        return "gpu" if device.platform in ("cuda", "rocm") else device.platform
    return jax.default_backend()


def kernel_pair(backend: str | None = None) -> tuple[flash.ForwardFn, flash.BackwardFn, bool]:
    """This project's Pallas (forward, backward) for a backend, and whether it runs interpreted."""
    backend = target_backend() if backend is None else backend
    if backend == "gpu":
        from director_jax.kernels import flash_gpu

        return flash_gpu.forward, flash_gpu.backward, False
    from director_jax.kernels import flash_tpu

    return flash_tpu.forward, flash_tpu.backward, backend != "tpu"


def local_pair(impl: str) -> tuple[flash.ForwardFn, flash.BackwardFn, bool]:
    """The (forward, backward, interpret) contract pair behind a flash-type implementation name."""
    if impl == "pallas":
        return kernel_pair()
    if impl == "blockwise":
        return blockwise.forward, blockwise.backward, False
    if impl == "xla":
        return flash.reference_forward, flash.reference_backward, False
    raise ValueError(f"Implementation {impl!r} has no forward/backward pair; use pallas, blockwise or xla.")


def choose_implementation(q: jax.Array, k: jax.Array, *, backend: str | None = None,
                          max_materialized: int = MAX_MATERIALIZED) -> str:
    """``auto``: cuDNN on GPU where it applies, our kernel on TPU, else xla while the scores are small."""
    backend = target_backend() if backend is None else backend
    if backend == "tpu":
        return "pallas"
    if backend == "gpu":
        if q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
            return "cudnn"
        return "pallas"
    return "xla" if q.shape[1] * k.shape[1] <= max_materialized else "blockwise"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None, impl: str = "auto",
              scale: float | None = None, block_sizes: BlockSizes | None = None, interpret: bool | None = None,
              sequence_parallel: str | None = None, max_materialized: int = MAX_MATERIALIZED) -> jax.Array:
    """Bidirectional multi-head attention; see the module docstring for ``impl`` and ``sequence_parallel``."""
    _check_shapes(q, k, v)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}.")
    if sequence_parallel not in SEQUENCE_PARALLEL_MODES:
        raise ValueError(f"Unknown sequence_parallel {sequence_parallel!r}; choose one of {SEQUENCE_PARALLEL_MODES}.")
    if impl == "auto":
        impl = choose_implementation(q, k, max_materialized=max_materialized)
    if sequence_parallel is not None:
        from director_jax.kernels import sequence_parallel as sp

        if sp.sequence_axis_size() > 1:
            return sp.sequence_parallel_attention(q, k, v, kv_len=kv_len, mode=sequence_parallel, impl=impl,
                                                  scale=scale, block_sizes=block_sizes, interpret=interpret)
    return local_attention(q, k, v, kv_len=kv_len, impl=impl, scale=scale, block_sizes=block_sizes,
                           interpret=interpret)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None, impl: str,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """One device's attention with a concrete ``impl`` (no ``auto``, no sequence parallelism)."""
    if impl == "xla":
        return xla_attention(q, k, v, kv_len=kv_len, scale=scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, kv_len=kv_len, scale=scale)
    if impl == "splash":
        from director_jax.kernels import splash

        return _per_shard(lambda q, k, v, n: splash.splash_attention(q, k, v, kv_len=n, scale=scale,
                                                                     interpret=interpret), q, k, v, kv_len)
    forward, backward, default_interpret = local_pair(impl)
    interpret = default_interpret if interpret is None else interpret

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, n: jax.Array) -> jax.Array:
        return flash.flash_attention(forward, backward, q, k, v, kv_len=n, scale=scale, block_sizes=block_sizes,
                                     interpret=interpret)

    return _per_shard(attend, q, k, v, kv_len) if impl == "pallas" else attend(q, k, v, kv_len)


def _per_shard(fn, q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None) -> jax.Array:
    """Runs a Pallas kernel on each device's (batch, heads) shard under the active mesh.

    Mosaic and Triton kernels are opaque to XLA's SPMD partitioner, so on a mesh they go inside
    ``jax.shard_map``: batch over the "batch" rule's axes, heads over "act_heads" (tensor), the
    sequence whole on every device (sequence sharding is ``sequence_parallel``'s job). Without a
    mesh this is a plain call.
    """
    from director_jax.parallel.rules import logical_to_mesh_spec

    kv_len = flash.full_kv_len(k, kv_len)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:  # manual axes: already inside a shard_map (Ulysses)
        return fn(q, k, v, kv_len)
    spec = logical_to_mesh_spec(("batch", None, "act_heads", None), mesh=mesh, shape=q.shape)
    kv_spec = jax.sharding.PartitionSpec(spec[0])
    return jax.shard_map(fn, in_specs=(spec, spec, spec, kv_spec), out_specs=spec, check_vma=False)(q, k, v, kv_len)
