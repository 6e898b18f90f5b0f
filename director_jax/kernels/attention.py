"""The one attention entry point used by every model in this project.

``attention(q, k, v, impl=...)`` takes (B, S, H, D) queries and (B, L, H, D) keys and values
(bidirectional, softmax scale 1/sqrt(D) unless given) and dispatches to an implementation
(``dispatch.py`` runs them on one device):

* ``xla``: the plain ``jnp`` reference (materialises the (B, H, S, L) scores; the ground truth
  every other implementation is tested against);
* ``rows``: blocks of query rows, each with an exact softmax over all its keys, in plain jnp: never
  stores the (S, L) scores, and the fastest choice on a CPU while a block's rows fit in cache;
* ``blockwise``: flash attention in plain jnp (a scan over key blocks with an online softmax and a
  blockwise backward): never materialises the scores, runs anywhere, slower than a kernel;
* ``pallas``: this project's Pallas flash kernels (``flash_tpu.py`` on TPU, ``flash_gpu.py`` on
  GPU; on the CPU the TPU kernel in interpret mode, for tests);
* ``splash``: JAX's TPU splash-attention kernel;
* ``tokamax``: the ``tokamax`` library's flash attention (optional package; its splash fork on TPU,
  its Mosaic GPU / Triton kernel on GPU, interpreted on the CPU);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs);
* ``auto``: by backend and shape (see ``dispatch.choose_implementation``): ``rows`` or ``blockwise``
  on the CPU, never holding more than ``max_materialized`` score elements per head at once.

Keys past ``kv_len[b]`` (valid key count per batch row) are masked out, so callers may pad
sequences to any block size without changing the result.

``sequence_parallel`` (``"ulysses"``, ``"ring"`` or ``"auto"``) runs the attention over the
``sequence`` axis of the active mesh (``jax.set_mesh``, any mesh with such an axis) with
``jax.shard_map``; see ``sequence_parallel.py``. Without a mesh it is a no-op; on a mesh whose
``sequence`` axis is missing or of size 1, ``"auto"`` is local attention and ``"ulysses"`` /
``"ring"`` raise a ValueError.

The kernels form a DAG: ``flash`` (the contract) <- ``row_blocks``, ``blockwise``, ``flash_tpu``,
``flash_gpu``, ``splash`` <- ``dispatch`` (one device) <- ``sequence_parallel`` <- ``attention`` (this module).
"""

from __future__ import annotations

import jax

from director_jax.kernels import dispatch
from director_jax.kernels import sequence_parallel as sp  # the module; `sequence_parallel` is a flag below
from director_jax.kernels.flash import BlockSizes

IMPLEMENTATIONS = ("auto", *dispatch.LOCAL_IMPLEMENTATIONS)
SEQUENCE_PARALLEL_MODES = (None, *sp.MODES)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (B, S, H, D) arrays; got q {q.shape}, k {k.shape}, v {v.shape}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} disagree: k and v must match, and share "
                         "batch, heads and head_dim with q.")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None, impl: str = "auto",
              scale: float | None = None, block_sizes: BlockSizes | None = None, interpret: bool | None = None,
              sequence_parallel: str | None = None, max_materialized: int = dispatch.MAX_MATERIALIZED) -> jax.Array:
    """Bidirectional multi-head attention; see the module docstring for ``impl`` and ``sequence_parallel``."""
    _check_shapes(q, k, v)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}.")
    if sequence_parallel not in SEQUENCE_PARALLEL_MODES:
        raise ValueError(f"Unknown sequence_parallel {sequence_parallel!r}; choose one of {SEQUENCE_PARALLEL_MODES}.")
    if impl == "auto":
        impl = dispatch.choose_implementation(q, k, max_materialized=max_materialized)
    if sp.wants_sequence_parallel(sequence_parallel):
        return sp.sequence_parallel_attention(
            q, k, v, kv_len=kv_len, mode=sequence_parallel, impl=impl, scale=scale, block_sizes=block_sizes,
            interpret=interpret)
    return dispatch.local_attention(q, k, v, kv_len=kv_len, impl=impl, scale=scale, block_sizes=block_sizes,
                                    interpret=interpret)
