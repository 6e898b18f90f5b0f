"""Splash attention behind this project's (B, S, H, D) interface: JAX's kernel, or tokamax's fork of it.

Splash wants (H, S, D) per example, lengths that are whole blocks, and pre-scaled queries; key
padding becomes a second segment id, so padded keys are never attended to. It has no per-example
key length of its own, which is why padding goes through ``SegmentIds``. A row with no valid key at
all (``kv_len == 0``) is undefined in splash (its softmax denominator is 0): this wrapper returns 0
for it, like the other implementations.

Two kernels fit this wrapper (``library``):

* ``"jax"``: ``jax.experimental.pallas.ops.tpu.splash_attention``, the kernel maxdiffusion trains with;
* ``"tokamax"``: the splash kernel of DeepMind's ``tokamax`` library (its own fork: base-2
  exponentials, a fused dq/dk/dv backward, an experimental softmax scheduler). tokamax's public
  ``dot_product_attention`` refuses per-example key lengths on TPU (``mask.k_end``), so this goes
  to its kernel module with segment ids, the same way as JAX's. tokamax is optional: installed by
  ``requirements-test.txt``; ``impl="tokamax"`` without it raises an ImportError that says so.

On GPU, ``tokamax_gpu_attention`` calls tokamax's public API (its Mosaic GPU kernel on sm90 /
sm100, else its Triton one), which does take key lengths.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from director_jax.kernels.flash import full_kv_len, target_backend

SPLASH_BLOCK = 512
LIBRARIES = ("jax", "tokamax")
TOKAMAX_PIN = "tokamax==0.0.12"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tokamax_modules() -> tuple[ModuleType, ModuleType]:
    """tokamax's splash kernel and mask modules (pinned version; its kernel API is not public)."""
    try:
        from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as kernel_lib
        from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_mask as mask_lib
    except ImportError as e:
        raise ImportError(f"attention impl 'tokamax' needs the tokamax package: pip install {TOKAMAX_PIN} "
                          "(requirements-test.txt pins it), or choose impl 'splash' or 'pallas'.") from e
    return kernel_lib, mask_lib


def _kernel(library: str, heads: int, s_pad: int, l_pad: int, block_q: int, block_kv: int, interpret: bool):
    """A splash kernel and its SegmentIds type, built anew at every trace: the kernel holds its mask info as
    arrays, which inside a trace are that trace's (a cached kernel would leak them into the next trace). The
    costly numpy part, processing the mask into block info, is cached by both libraries themselves."""
    if library == "jax":
        mask = splash_lib.MultiHeadMask([splash_lib.FullMask((s_pad, l_pad)) for _ in range(heads)])
        sizes = splash_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                      block_q_dq=block_q, block_kv_dq=block_kv)
        return splash_lib.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret), \
            splash_lib.SegmentIds
    kernel_lib, mask_lib = tokamax_modules()
    # tokamax's own TPU attention op takes SplashConfig's defaults with its experimental scheduler on
    # (pallas_mosaic_tpu.py); only the block sizes and interpret mode differ here.
    config = dataclasses.replace(kernel_lib.SplashConfig.get_default(), block_q=block_q, block_kv=block_kv,
                                 block_kv_compute=block_kv, block_q_dkv=block_q, block_kv_dkv=block_kv,
                                 block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv,
                                 use_experimental_scheduler=True, interpret=interpret)
    kernel = kernel_lib.make_splash_mha(mask_lib.FullMask((s_pad, l_pad)), config=config, q_seq_shards=1,
                                        mask_value=float(np.finfo(np.float32).min), downcast_smem_data=False)
    return kernel, kernel_lib.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                     scale: float | None = None, block: int = SPLASH_BLOCK, interpret: bool | None = None,
                     library: str = "jax") -> jax.Array:
    """Splash attention of (B, S, H, D) q and (B, L, H, D) k, v; keys past ``kv_len`` masked."""
    if library not in LIBRARIES:
        raise ValueError(f"Unknown splash library {library!r}; choose one of {LIBRARIES}.")
    b, s, h, d = q.shape
    l = k.shape[1]
    if interpret is None:
        interpret = target_backend() != "tpu"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Blocks of at most ``block``, at least 128 (the TPU lane width), never longer than needed.
    block_q = min(block, _round_up(s, 128))
    block_kv = min(block, _round_up(l, 128))
    s_pad, l_pad = _round_up(s, block_q), _round_up(l, block_kv)
    kv_len = full_kv_len(k, kv_len)

    def heads_first(x: jax.Array, n_pad: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), s_pad)
    kh, vh = heads_first(k, l_pad), heads_first(v, l_pad)
    q_ids = jnp.zeros((b, s_pad), jnp.int32)
    kv_ids = (jnp.arange(l_pad)[None, :] >= kv_len[:, None]).astype(jnp.int32)  # 1 = padding
    kernel, segment_ids = _kernel(library, h, s_pad, l_pad, block_q, block_kv, bool(interpret))
    out = jax.vmap(lambda qq, kk, vv, qi, ki: kernel(qq, kk, vv, segment_ids=segment_ids(q=qi, kv=ki)))(
        qh, kh, vh, q_ids, kv_ids)
    out = out.transpose(0, 2, 1, 3)[:, :s]
    return jnp.where((kv_len > 0)[:, None, None, None], out, 0).astype(q.dtype)


def tokamax_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
    """tokamax's GPU flash attention (Mosaic GPU where it applies, else Triton), keys past ``kv_len`` masked."""
    tokamax_modules()  # the clear ImportError when it is missing
    import tokamax

    kv_len = full_kv_len(k, kv_len)
    out = tokamax.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=kv_len,
                                        implementation=("mosaic", "triton"))
    return jnp.where((kv_len > 0)[:, None, None, None], out, 0).astype(q.dtype)
