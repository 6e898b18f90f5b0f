"""Sequence-parallel attention over the ``sequence`` mesh axis: Ulysses (all-to-all) and ring.

Both run inside ``jax.shard_map`` over the active mesh (``jax.set_mesh``), with q, k, v (B, S, H, D)
sharded as the DiT's activations are: batch and heads by the active rules table's "batch" and
"act_heads" rules (by default ``("data", "fsdp")`` and "tensor", with the divisibility fallbacks of
``parallel/rules.py``), tokens over "sequence". The per-device attention is ``dispatch.py``'s.
``check_vma=False`` because Mosaic kernels do not carry varying-axis types.

* **Ulysses** swaps sequence shards for head shards with one ``all_to_all`` per tensor, runs any
  local implementation on the full sequence with H / n heads, and swaps back. Cheap (4 all-to-alls of
  the activation size / n per pass) but needs the heads per tensor shard to divide by n.
* **Ring** keeps every device's queries and passes key/value blocks around the ring: n steps of the
  contract forward of ``flash.py``, merged by log-sum-exp; the backward is a second ring pass with
  the *global* lse, the dk/dv accumulators travelling with their blocks back to their owner. Works
  for any head count; needs a flash-type local implementation (pallas, blockwise, xla): ``cudnn`` and
  ``splash`` expose no (o, lse) pair, so ring runs this project's Pallas kernel in their place.
* **auto** picks Ulysses when the heads allow it, else ring. An explicit ``"ulysses"`` with heads that
  do not divide raises (the fix is named in the error) rather than silently changing the algorithm.

Any mesh with a "sequence" axis works (``jax.make_mesh((2, 4), ("data", "sequence"))``, a 1-axis
``("sequence",)`` mesh, or the project's ``create_mesh``): rules naming project axes the mesh lacks
shard nothing over them. Without a mesh the flag is a no-op; on a mesh whose "sequence" axis is
missing or of size 1, ``"auto"`` runs local attention and ``"ulysses"`` / ``"ring"`` raise a
ValueError (``wants_sequence_parallel``).

``kv_len`` is the global count of valid keys: Ulysses uses it as is (each device sees every key),
ring clips it to the key block held at each step. The token count must divide by the sequence axis
size: callers pad (``WanDiT`` does, masking the padding with ``kv_len``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from director_jax.kernels import dispatch, flash
from director_jax.kernels.flash import BlockSizes
from director_jax.parallel.rules import logical_to_mesh_spec, place

SEQUENCE_AXIS = "sequence"
MODES = ("ulysses", "ring", "auto")
FLASH_IMPLS = ("pallas", "rows", "blockwise", "xla")  # implementations with a (forward, backward) contract pair
log = logging.getLogger(__name__)


def _mesh() -> Any:
    return jax.sharding.get_abstract_mesh()


def sequence_axis_size() -> int:
    """Size of the "sequence" axis of the active mesh (``jax.set_mesh``); 1 without a mesh or axis."""
    mesh = _mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return int(dict(mesh.shape)[SEQUENCE_AXIS])


def wants_sequence_parallel(mode: str | None) -> bool:
    """Whether ``attention(..., sequence_parallel=mode)`` runs sharded over the active mesh's "sequence" axis.

    ``None`` and no active mesh: no (single-device code runs unchanged). On a mesh whose "sequence"
    axis is missing or of size 1, ``"auto"`` is local attention and an explicit ``"ulysses"`` /
    ``"ring"`` raises a ValueError saying so (the mesh cannot do what was asked).
    """
    if mode is None:
        return False
    mesh = _mesh()
    if mesh.empty or sequence_axis_size() > 1:
        return not mesh.empty
    if mode == "auto":
        return False
    axes = dict(mesh.shape)
    what = (f"its '{SEQUENCE_AXIS}' axis has size 1" if SEQUENCE_AXIS in axes
            else f"it has no '{SEQUENCE_AXIS}' axis")
    raise ValueError(f"sequence_parallel={mode!r} needs a '{SEQUENCE_AXIS}' mesh axis of size > 1, but the active "
                     f"mesh is {axes}: {what}. Use a mesh with one (e.g. jax.make_mesh((2, 4), ('data', "
                     f"'{SEQUENCE_AXIS}')), or mesh.sequence > 1 in a config), or sequence_parallel=None (or "
                     "'auto', which runs local attention on such a mesh).")


def _axes_size(mesh: Any, axes: Any) -> int:
    if axes is None:
        return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _specs(mesh: Any, q: jax.Array) -> tuple[PartitionSpec, PartitionSpec]:
    """(B, S, H, D) spec and the (B,) kv_len spec: batch and heads by the rules, tokens on "sequence"."""
    spec = logical_to_mesh_spec(("batch", None, "act_heads", None), mesh=mesh, shape=q.shape)

    def off_sequence(axes: Any) -> Any:  # a rules table may put "sequence" on batch or heads: tokens have it here
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != SEQUENCE_AXIS)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    batch, heads = off_sequence(spec[0]), off_sequence(spec[2])
    return PartitionSpec(batch, SEQUENCE_AXIS, heads, None), PartitionSpec(batch)


def resolve_mode(mode: str, num_heads: int, head_shards: int, n: int) -> str:
    """``auto`` -> ulysses when the heads per tensor shard divide by n, else ring; checks ``ulysses``."""
    if mode not in MODES:
        raise ValueError(f"Unknown sequence_parallel mode {mode!r}; choose one of {MODES}.")
    local_heads = num_heads // head_shards
    if mode == "auto":
        return "ulysses" if local_heads % n == 0 else "ring"
    if mode == "ulysses" and local_heads % n:
        raise ValueError(f"Ulysses sequence parallelism needs the heads per tensor shard ({num_heads} heads / "
                         f"{head_shards} tensor shards = {local_heads}) to divide by the sequence axis size {n}; "
                         "use sequence_parallel='ring' (or 'auto'), or change the mesh's tensor/sequence sizes.")
    return mode


def ring_implementation(impl: str) -> str:
    """The local implementation ring attention uses for ``impl``: itself, or "pallas" for cudnn / splash / tokamax."""
    if impl in FLASH_IMPLS:
        return impl
    if impl in ("cudnn", "splash", "tokamax"):
        log.info("Ring attention: %s has no (o, lse) kernel pair; using the pallas flash kernel.", impl)
        return "pallas"
    raise ValueError(f"Ring attention has no local implementation for {impl!r}; use one of {FLASH_IMPLS}.")


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None, mode: str,
                                impl: str, scale: float | None = None, block_sizes: BlockSizes | None = None,
                                interpret: bool | None = None) -> jax.Array:
    """Attention of (B, S, H, D) q and (B, L, H, D) k, v over the active mesh's "sequence" axis.

    ``impl`` is the per-device implementation (``auto`` is resolved on the global shapes); ``kv_len``
    (B,) the global number of valid keys. S and L must divide by the sequence axis size.
    """
    mesh = _mesh()
    n = sequence_axis_size()
    for name, length in (("query", q.shape[1]), ("key", k.shape[1])):
        if length % n:
            raise ValueError(f"Sequence-parallel attention: the {name} length {length} does not divide by the "
                             f"'{SEQUENCE_AXIS}' mesh axis size {n}; pad the tokens to a multiple of {n} and mask "
                             "the padded keys with kv_len (WanDiT does this itself).")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qkv_spec, len_spec = _specs(mesh, q)
    mode = resolve_mode(mode, q.shape[2], _axes_size(mesh, qkv_spec[2]), n)
    kv_len = flash.full_kv_len(k, kv_len)
    if impl == "auto":
        impl = dispatch.choose_implementation(q, k)

    if mode == "ulysses":
        def local(q, k, v, kv_len):
            return dispatch.local_attention(q, k, v, kv_len=kv_len, impl=impl, scale=scale,
                                                 block_sizes=block_sizes, interpret=interpret)

        body = _ulysses(local)
    else:
        forward, backward, default_interpret = dispatch.local_pair(ring_implementation(impl))
        interpret = default_interpret if interpret is None else bool(interpret)
        block_sizes = flash.default_block_sizes() if block_sizes is None else block_sizes
        body = _ring(forward, backward, n=n, scale=scale, block_sizes=block_sizes, interpret=interpret)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, len_spec), out_specs=qkv_spec,
                            check_vma=False)
    # Explicit mesh axes (jax.make_mesh's default) must already match in_specs; Auto ones shard_map reshards
    q, k, v = (place(x, qkv_spec, auto=False) for x in (q, k, v))
    return sharded(q, k, v, place(kv_len, len_spec, auto=False))


# ----------------------------------------------------------------------------------------------
# Ulysses


def _ulysses(local: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Per-device body: sequence shards -> head shards, full-sequence local attention, and back."""

    def to_heads(x: jax.Array) -> jax.Array:  # (B, S/n, H, D) -> (B, S, H/n, D)
        return jax.lax.all_to_all(x, SEQUENCE_AXIS, split_axis=2, concat_axis=1, tiled=True)

    def body(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array) -> jax.Array:
        out = local(to_heads(q), to_heads(k), to_heads(v), kv_len)
        return jax.lax.all_to_all(out, SEQUENCE_AXIS, split_axis=1, concat_axis=2, tiled=True)

    return body


# ----------------------------------------------------------------------------------------------
# Ring


def _merge(o: jax.Array, lse: jax.Array, o_blk: jax.Array, lse_blk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combines two partial softmax results (o float32 (B, S, H, D), lse (B, H, S)); -inf lse is empty."""
    lse_new = jnp.logaddexp(lse, lse_blk)
    ref = jnp.where(jnp.isfinite(lse_new), lse_new, 0.0)  # both empty: weights exp(-inf) = 0, o stays 0

    def weight(x: jax.Array) -> jax.Array:
        return jnp.exp(x - ref).transpose(0, 2, 1)[..., None]  # (B, H, S) -> (B, S, H, 1)

    return o * weight(lse) + o_blk.astype(jnp.float32) * weight(lse_blk), lse_new


def _ring(forward: flash.ForwardFn, backward: flash.BackwardFn, *, n: int, scale: float, block_sizes: BlockSizes,
          interpret: bool) -> Callable[..., jax.Array]:
    """Per-device body: exact ring attention (custom VJP: a forward ring and a backward ring)."""
    kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret)
    perm = [(i, (i + 1) % n) for i in range(n)]  # device i passes its block to i + 1

    def rotate(*xs: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jax.lax.ppermute(x, SEQUENCE_AXIS, perm) for x in xs)

    def local_len(kv_len: jax.Array, step: jax.Array, block: int) -> jax.Array:
        # at step t this device holds the key block of device (i - t) mod n
        owner = (jax.lax.axis_index(SEQUENCE_AXIS) - step) % n
        return jnp.clip(kv_len - owner * block, 0, block).astype(jnp.int32)

    def ring_forward(q, k, v, kv_len):
        block = k.shape[1]

        def attend(carry, k_blk, v_blk, step):
            o, lse = carry
            o_blk, lse_blk = forward(q, k_blk, v_blk, local_len(kv_len, step, block), **kw)
            return _merge(o, lse, o_blk, lse_blk)

        def step_fn(step, state):
            k_blk, v_blk, carry = state
            k_next, v_next = rotate(k_blk, v_blk)  # issued before the compute so the transfer overlaps it
            return k_next, v_next, attend(carry, k_blk, v_blk, step)

        b, s, h, _ = q.shape
        init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, s), -jnp.inf, jnp.float32))
        k_last, v_last, carry = jax.lax.fori_loop(0, n - 1, step_fn, (k, v, init))
        o, lse = attend(carry, k_last, v_last, n - 1)
        return o.astype(q.dtype), lse

    @jax.custom_vjp
    def ring(q, k, v, kv_len):
        return ring_forward(q, k, v, kv_len)[0]

    def ring_fwd(q, k, v, kv_len):
        o, lse = ring_forward(q, k, v, kv_len)
        return o, (q, k, v, kv_len, o, lse)

    def ring_bwd(residuals, do):
        q, k, v, kv_len, o, lse = residuals
        block = k.shape[1]

        def grads(step, k_blk, v_blk, dk_acc, dv_acc, dq_acc):
            dq, dk, dv = backward(q, k_blk, v_blk, o, lse, do, local_len(kv_len, step, block), **kw)
            # the dk/dv accumulators travel with their block: after n hops they are back at its owner
            dk_acc, dv_acc = rotate(dk_acc + dk.astype(jnp.float32), dv_acc + dv.astype(jnp.float32))
            return dk_acc, dv_acc, dq_acc + dq.astype(jnp.float32)

        def step_fn(step, state):
            k_blk, v_blk, *acc = state
            k_next, v_next = rotate(k_blk, v_blk)
            return (k_next, v_next, *grads(step, k_blk, v_blk, *acc))

        zeros = jnp.zeros(k.shape, jnp.float32)
        init = (k, v, zeros, zeros, jnp.zeros(q.shape, jnp.float32))
        k_last, v_last, *acc = jax.lax.fori_loop(0, n - 1, step_fn, init)
        dk, dv, dq = grads(n - 1, k_last, v_last, *acc)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring
