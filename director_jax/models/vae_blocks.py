"""Building blocks of the Wan2.1 causal 3D VAE (``models.vae``), in Flax NNX, channels-last.

Causal 3D and per-frame 2D convolutions, Wan's RMS norm, residual, attention, resampling, mid and up
blocks; module and parameter names are those of diffusers' ``AutoencoderKLWan`` parts.

Every causal layer runs in a ``Stream``: it takes its cache from the stream and gives back the new
one, in call order. The full-sequence pass is exactly the stream's first step run over all frames,
which is why the full and streaming passes of ``WanVAE`` agree. Diffusers' behaviour that a plain
causal 3D conv would miss is reproduced on purpose: the first frame skips the temporal downsampling
conv in the encoder, and in the decoder the temporal upsampling conv runs causally over latent frames
1.. only (frame 0 becomes one frame, every later latent frame four).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from director_jax.models.layers import torch_uniform

# ----------------------------------------------------------------------------------------------
# Streaming caches


class Stream:
    """Carries each causal layer's cache between steps, in call order.

    ``caches=None`` marks the first step of a stream (and the full-sequence pass): layers start
    from zero padding and apply their first-frame rules. The caches written by this step are in
    ``written`` and are the next step's ``caches``.
    """

    def __init__(self, caches: Sequence[jax.Array] | None = None):
        self.first = caches is None
        self._caches = list(caches) if caches is not None else None
        self._next = 0
        self.written: list[jax.Array] = []

    def take(self) -> jax.Array | None:
        if self._caches is None:
            return None
        cache = self._caches[self._next]
        self._next += 1
        return cache

    def give(self, cache: jax.Array) -> None:
        self.written.append(cache)


def _last_frames(x: jax.Array, n: int) -> jax.Array:
    """The last ``n`` frames of ``x`` (B, T, ...), left-padded with zeros when T < n."""
    if x.shape[1] >= n:
        return x[:, x.shape[1] - n :]
    pad = jnp.zeros((x.shape[0], n - x.shape[1], *x.shape[2:]), x.dtype)
    return jnp.concatenate([pad, x], axis=1)


# ----------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nnx.Module):
    """3D convolution, causal in time (2 * pad_t zero frames in front, none behind).

    ``kernel`` is (kt, kh, kw, in, out); diffusers' ``weight`` is its (out, in, kt, kh, kw) transpose.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        *,
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: int | tuple[int, int, int] = 0,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        fan_in = in_dim * kt * kh * kw
        k1, k2 = jax.random.split(rngs.params())
        self.kernel = nnx.Param(torch_uniform(k1, (kt, kh, kw, in_dim, out_dim), fan_in, param_dtype))
        self.bias = nnx.Param(torch_uniform(k2, (out_dim,), fan_in, param_dtype))
        self.stride = stride
        self.time_pad = 2 * pt
        self.spatial_pad = ((ph, ph), (pw, pw))
        self.dtype = dtype

    def _conv(self, x: jax.Array, time_padding: tuple[int, int]) -> jax.Array:
        """A sum over the kt time taps of 2D convolutions of the (strided) shifted frames.

        Same result as one 3D convolution; XLA's CPU backend runs it ~4x faster (72 vs 16 GFLOP/s
        forward on a 2-core x86 machine: benchmarks/conv.py), and 2D convolutions are first-class
        on TPU and GPU as well. The price: XLA's CPU backend materialises the kernel slices, one
        transient copy of the conv weights per step (~250 MiB for the Wan-sized decoder).
        """
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        kt, st = kernel.shape[0], self.stride[0]
        bias = self.bias[...].astype(self.dtype)
        if time_padding == (0, 0):
            t_out = (x.shape[1] - kt) // st + 1
            y = sum(self._tap(x[:, i:i + st * (t_out - 1) + 1:st], kernel[i]) for i in range(kt))
            return y + bias
        # Causal zero padding without padding the input: tap i reaches output frame t from input
        # frame t - shift, shift = pad - i, so it adds into the outputs from `shift` on (~15% faster
        # than jnp.pad on the CPU: no copy of the activation per conv).
        pad = time_padding[0]
        if st != 1 or time_padding[1] != 0 or pad != kt - 1:
            raise NotImplementedError(f"causal conv with stride {st} and time padding {time_padding}")
        t = x.shape[1]
        y = self._tap(x, kernel[kt - 1]) + bias
        for i in range(kt - 1):
            shift = pad - i
            if shift < t:
                y = y.at[:, shift:].add(self._tap(x[:, :t - shift], kernel[i]))
        return y

    def _tap(self, frames: jax.Array, kernel: jax.Array) -> jax.Array:
        """One time tap: a 2D convolution of every frame in (B, T, H, W, C)."""
        b, t = frames.shape[:2]
        y = jax.lax.conv_general_dilated(
            frames.reshape(b * t, *frames.shape[2:]), kernel, window_strides=self.stride[1:],
            padding=self.spatial_pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(b, t, *y.shape[1:])

    def valid(self, x: jax.Array) -> jax.Array:
        """The convolution with no temporal padding (the caller put the history in front)."""
        return self._conv(x, (0, 0))

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        if self.time_pad == 0:
            return self._conv(x, (0, 0))
        cache = stream.take() if stream is not None else None
        if cache is None:
            if stream is not None:
                stream.give(_last_frames(x, self.time_pad))
            return self._conv(x, (self.time_pad, 0))
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        stream.give(x[:, -self.time_pad :])
        return self._conv(x, (0, 0))


class Conv2d(nnx.Module):
    """Per-frame 2D convolution over (B, T, H, W, C); ``kernel`` is (kh, kw, in, out)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1, padding: Any = 0,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        fan_in = in_dim * kernel_size * kernel_size
        k1, k2 = jax.random.split(rngs.params())
        self.kernel = nnx.Param(
            torch_uniform(k1, (kernel_size, kernel_size, in_dim, out_dim), fan_in, param_dtype))
        self.bias = nnx.Param(torch_uniform(k2, (out_dim,), fan_in, param_dtype))
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
    """Wan's RMS norm: x / ||x|| * sqrt(C) * gamma over channels, computed in float32."""

    def __init__(self, dim: int, *, images: bool = False, param_dtype: Any = jnp.float32):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
        self.scale = dim**0.5
        self.images = images  # PyTorch keeps gamma as (C, 1, 1) for 2D use, (C, 1, 1, 1) for 3D

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float, *, rngs: nnx.Rngs, **kw: Any):
        self.norm1 = RMSNorm(in_dim, param_dtype=kw.get("param_dtype", jnp.float32))
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, rngs=rngs, **kw)
        self.norm2 = RMSNorm(out_dim, param_dtype=kw.get("param_dtype", jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, rngs=rngs, **kw)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, rngs=rngs, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = self.conv1(jax.nn.silu(self.norm1(x)), stream)
        x = self.dropout(jax.nn.silu(self.norm2(x)))
        x = self.conv2(x, stream)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (over H*W positions)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.norm = RMSNorm(dim, images=True, param_dtype=param_dtype)
        self.to_qkv = Conv2d(dim, dim * 3, 1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = Conv2d(dim, dim, 1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k) / math.sqrt(c)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(b, t, h, w, c)
        return self.proj(out) + x


class Resample(nnx.Module):
    """Spatial (and optionally temporal) down/upsampling: diffusers' WanResample.

    ``resample`` is the 2D conv diffusers calls ``resample.1``; ``time_conv`` the temporal conv.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, *, upsample_out_dim: int | None = None, rngs: nnx.Rngs, **kw: Any):
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}.")
        self.mode = mode
        out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim
        time_conv = None
        if mode.startswith("upsample"):
            self.resample = Conv2d(dim, out_dim, 3, padding=1, rngs=rngs, **kw)
            if mode == "upsample3d":
                time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), rngs=rngs, **kw)
        else:
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, **kw)
            if mode == "downsample3d":
                time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs, **kw)
        self.time_conv = time_conv

    def _upsample_time(self, x: jax.Array, stream: Stream) -> jax.Array:
        """Doubles every frame but the stream's first: 1 + 2(T-1) frames on the first step."""
        b, _, h, w, c = x.shape
        if stream.first:
            head, x = x[:, :1], x[:, 1:]
            cache = jnp.zeros((b, 2, h, w, c), x.dtype)
        else:
            head, cache = None, stream.take()
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        stream.give(x[:, -2:])
        if x.shape[1] == 2:  # the stream's first step held only frame 0
            return head
        y = self.time_conv.valid(x)  # the cache already stands in front: one output per new frame
        t = y.shape[1]
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        return y if head is None else jnp.concatenate([head, y], axis=1)

    def _downsample_time(self, x: jax.Array, stream: Stream) -> jax.Array:
        """Halves time with a stride-2 conv; the stream's first frame passes through unchanged."""
        if stream.first:
            stream.give(x[:, -1:])
            if x.shape[1] < 3:
                return x[:, :1]
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        cache = stream.take()
        stream.give(x[:, -1:])
        return self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        stream = stream if stream is not None else Stream()
        if self.mode == "upsample3d":
            x = self._upsample_time(x, stream)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact 2x == repeat
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, stream)
        return x


class MidBlock(nnx.Module):
    def __init__(self, dim: int, dropout: float, *, rngs: nnx.Rngs, **kw: Any):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dropout, rngs=rngs, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs, **kw)])

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        x = self.resnets[0](x, stream)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x), stream)
        return x


class UpBlock(nnx.Module):
    """``num_res_blocks`` residual blocks, then the upsampler (none in the decoder's last block)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample_mode: str | None,
                 *, rngs: nnx.Rngs, **kw: Any):
        resnets = []
        for _ in range(num_res_blocks):
            resnets.append(ResidualBlock(in_dim, out_dim, dropout, rngs=rngs, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(out_dim, upsample_mode, rngs=rngs, **kw)] if upsample_mode else [])

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, stream)
        for upsampler in self.upsamplers:
            x = upsampler(x, stream)
        return x
