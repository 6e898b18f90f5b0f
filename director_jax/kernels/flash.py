"""What every flash-attention implementation here shares: the forward/backward contract, block sizes,
the custom-VJP glue, and a plain-jnp reference of both passes.

The contract (kernels in ``flash_tpu.py`` and ``flash_gpu.py`` implement it; ring attention in
``sequence_parallel.py`` composes it across devices):

``forward(q, k, v, kv_len, *, scale, block_sizes, interpret) -> (o, lse)``
    q (B, S, H, D), k and v (B, L, H, D), kv_len (B,) int32: keys at index >= kv_len[b] are masked.
    o (B, S, H, D) in q's dtype; lse (B, H, S) float32, the log-sum-exp of the scaled scores over
    the valid keys. A row with no valid key (kv_len 0) gives o = 0 and lse = -inf, never NaN.
``backward(q, k, v, o, lse, do, kv_len, *, scale, block_sizes, interpret) -> (dq, dk, dv)``
    The gradients given the forward's o and lse. ``lse`` may be a *global* log-sum-exp (over more
    keys than these, as in ring attention): then the result is this key block's share of the
    gradient, because ``delta = rowsum(o * do)`` and ``p = exp(s - lse)`` are both global. Masked
    keys get dk = dv = 0; rows whose lse is -inf contribute nothing.

Any S and L are accepted: implementations pad to their blocks internally and mask the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ForwardFn = Callable[..., tuple[jax.Array, jax.Array]]
BackwardFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a flash kernel: query and key blocks of the forward and of the backward."""

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value <= 0 or value % 8:
                raise ValueError(f"BlockSizes.{name} = {value}: block sizes must be positive multiples of 8.")

    @classmethod
    def from_dict(cls, values: dict[str, int] | None) -> BlockSizes:
        return cls(**(values or {}))


# Tile sizes by chip generation (``jax.devices()[0].device_kind`` substrings, lower case). TPU
# tiles are large (VMEM is 16-128 MiB and the MXU wants >= 128-wide operands); GPU tiles are what
# fits in shared memory with head_dim 128 at bf16 and keeps enough warps busy.
DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {
    "tpu v4": BlockSizes(512, 512, 256, 256),
    "tpu v5 lite": BlockSizes(512, 512, 256, 256),   # v5e
    "tpu v5": BlockSizes(512, 1024, 512, 512),        # v5p
    "tpu v6": BlockSizes(512, 1024, 512, 512),        # v6e (Trillium)
    "tpu": BlockSizes(512, 512, 256, 256),
    "h100": BlockSizes(128, 64, 64, 64),
    "h200": BlockSizes(128, 64, 64, 64),
    "gpu": BlockSizes(64, 64, 64, 64),
    "cpu": BlockSizes(128, 128, 128, 128),            # interpret mode (tests)
}


def mesh_device() -> Any | None:
    """The active mesh's (abstract) device, with ``platform`` and ``device_kind``; None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else getattr(mesh, "abstract_device", None)


def target_backend() -> str:
    """The platform the program is built for: the active mesh's devices (a TPU topology compiled from
    a CPU host, say), else JAX's default backend ("cpu", "gpu" or "tpu")."""
    device = mesh_device()
    if device is not None:
        return "gpu" if device.platform in ("cuda", "rocm") else device.platform
    return jax.default_backend()


def default_block_sizes(device_kind: str | None = None) -> BlockSizes:
    """The table entry whose key is the longest substring of ``device_kind`` (default: the active
    mesh's first device, e.g. a compile-only TPU, else device 0)."""
    if device_kind is None:
        device = mesh_device() or jax.devices()[0]
        device_kind = device.device_kind if device.platform != "cpu" else "cpu"
        if device.platform == "gpu" and not any(k in device_kind.lower() for k in ("h100", "h200")):
            device_kind = "gpu"
    kind = device_kind.lower()
    matches = [key for key in DEFAULT_BLOCK_SIZES if key in kind]
    if not matches:
        return DEFAULT_BLOCK_SIZES["cpu"]
    return DEFAULT_BLOCK_SIZES[max(matches, key=len)]


def full_kv_len(k: jax.Array, kv_len: jax.Array | None) -> jax.Array:
    """``kv_len`` as (B,) int32, all keys valid when None."""
    if kv_len is None:
        return jnp.full((k.shape[0],), k.shape[1], jnp.int32)
    return jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (k.shape[0],))


# ----------------------------------------------------------------------------------------------
# The plain-jnp reference of the contract (materialises the scores: tests and small sizes only)


def _scores(q: jax.Array, k: jax.Array, kv_len: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    s = jnp.einsum("bshd,blhd->bhsl", q, k, preferred_element_type=jnp.float32) * scale
    valid = (jnp.arange(k.shape[1])[None, :] < kv_len[:, None])[:, None, None, :]  # (B, 1, 1, L)
    return jnp.where(valid, s, -jnp.inf), valid


def reference_forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
                      block_sizes: BlockSizes | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The contract's forward in jnp: (o, lse) with o = 0, lse = -inf on rows without a valid key."""
    del block_sizes, interpret
    s, _ = _scores(q, k, kv_len, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + m_safe, -jnp.inf)[..., 0]
    o = jnp.einsum("bhsl,blhd->bshd", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
    return o.astype(q.dtype), lse


def reference_backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
                       kv_len: jax.Array, *, scale: float, block_sizes: BlockSizes | None = None,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The contract's backward in jnp (valid with a global ``lse``, see the module docstring)."""
    del block_sizes, interpret
    s, valid = _scores(q, k, kv_len, scale)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)[..., None]  # exp(s - inf) = 0
    p = jnp.where(valid, jnp.exp(s - lse_safe), 0.0)  # (B, H, S, L)
    do32, v32 = do.astype(jnp.float32), v.astype(jnp.float32)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do32)[..., None]
    dv = jnp.einsum("bhsl,bshd->blhd", p, do32)
    dp = jnp.einsum("bshd,blhd->bhsl", do32, v32)
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bhsl,blhd->bshd", ds, k.astype(jnp.float32))
    dk = jnp.einsum("bhsl,bshd->blhd", ds, q.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# Custom-VJP glue: a differentiable attention from a (forward, backward) pair


@functools.cache
def _differentiable(forward: ForwardFn, backward: BackwardFn, scale: float, block_sizes: BlockSizes,
                    interpret: bool) -> Callable[..., jax.Array]:
    kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret)

    @jax.custom_vjp
    def attend(q, k, v, kv_len):
        return forward(q, k, v, kv_len, **kw)[0]

    def attend_fwd(q, k, v, kv_len):
        o, lse = forward(q, k, v, kv_len, **kw)
        return o, (q, k, v, kv_len, o, lse)

    def attend_bwd(residuals, do):
        q, k, v, kv_len, o, lse = residuals
        dq, dk, dv = backward(q, k, v, o, lse, do, kv_len, **kw)
        return dq, dk, dv, None  # kv_len is an integer input: no cotangent

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def flash_attention(forward: ForwardFn, backward: BackwardFn, q: jax.Array, k: jax.Array, v: jax.Array, *,
                    kv_len: jax.Array | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """Differentiable attention from a contract pair: forward kernel, backward kernel as its VJP."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_sizes = default_block_sizes() if block_sizes is None else block_sizes
    attend = _differentiable(forward, backward, scale, block_sizes, bool(interpret))
    return attend(q, k, v, full_kv_len(k, kv_len))


def reference_flash(q: jax.Array, k: jax.Array, v: jax.Array, **kw: Any) -> jax.Array:
    """The reference pair through the same glue (tests the glue and the backward formula)."""
    return flash_attention(reference_forward, reference_backward, q, k, v, **kw)
