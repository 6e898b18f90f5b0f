"""The Wan2.1 causal 3D VAE in Flax NNX (8x spatial, 4x temporal, 16 latent channels).

Module and parameter names follow diffusers' ``AutoencoderKLWan`` so that weight conversion is a
rename plus a transpose (see ``director_jax.convert.vae_weights``). Tensors are channels-last:
video ``(B, T, H, W, 3)`` in [-1, 1], latents ``(B, T', H/8, W/8, z_dim)``.

Two execution paths share every layer:

* the **full-sequence pass** (``encode`` / ``decode``): one traceable pass over all frames, for
  training and for short clips;
* the **streaming pass** (``encode_streaming`` / ``decode_streaming`` / ``iter_decode``): frame 0,
  then 4 frames at a time to encode; one latent frame at a time to decode. Each causal convolution
  carries the last frames of its input from one step to the next, so working memory is that of one
  step, whatever the clip length.

Both are built on ``_Stream``: a layer takes its cache from the stream and gives back the new one.
The full pass is exactly the stream's first step run over all frames, which is why the two paths
agree. Diffusers' behaviour that a plain causal 3D conv would miss is reproduced on purpose: the
first frame skips the temporal downsampling conv in the encoder, and in the decoder the temporal
upsampling conv runs causally over latent frames 1.. only (frame 0 becomes one frame, every later
latent frame four).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.models.layers import torch_uniform

# Wan2.1's per-channel latent statistics (diffusers' AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps log-variance here
TEMPORAL_FACTOR = 4  # frames per latent frame after the first


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the VAE; field names and defaults are those of diffusers' AutoencoderKLWan."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries but dim_mult has "
                f"{len(self.dim_mult)}: it needs len(dim_mult) - 1 (one per downsampling stage)."
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean / latents_std have {len(self.latents_mean)} / {len(self.latents_std)} "
                f"entries but z_dim is {self.z_dim}: give one per latent channel."
            )

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The config dict diffusers' ``AutoencoderKLWan(**cfg)`` / ``config.json`` takes."""
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            cfg[key] = list(cfg[key])
        cfg.update(is_residual=False, patch_size=None, scale_factor_temporal=self.temporal_factor,
                   scale_factor_spatial=self.spatial_factor)
        return cfg

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> WanVAEConfig:
        """Reads a diffusers ``config.json`` dict; rejects the Wan2.2 variants this VAE is not."""
        if cfg.get("is_residual"):
            raise ValueError("This config is a Wan2.2 VAE (is_residual=True); only the Wan2.1 VAE is supported.")
        if cfg.get("patch_size") not in (None, 1):
            raise ValueError(f"patch_size={cfg['patch_size']} (Wan2.2 VAE) is not supported; use a Wan2.1 VAE.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Streaming caches


class _Stream:
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

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
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

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
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

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
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

    def _upsample_time(self, x: jax.Array, stream: _Stream) -> jax.Array:
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

    def _downsample_time(self, x: jax.Array, stream: _Stream) -> jax.Array:
        """Halves time with a stride-2 conv; the stream's first frame passes through unchanged."""
        if stream.first:
            stream.give(x[:, -1:])
            if x.shape[1] < 3:
                return x[:, :1]
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        cache = stream.take()
        stream.give(x[:, -1:])
        return self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
        stream = stream if stream is not None else _Stream()
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

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
        x = self.resnets[0](x, stream)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x), stream)
        return x


class Encoder3d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, **kw: Any):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, rngs=rngs, **kw)
        blocks: list[nnx.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout, rngs=rngs, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim, rngs=rngs, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, rngs=rngs, **kw))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout, rngs=rngs, **kw)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw.get("param_dtype", jnp.float32))
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
        x = self.conv_in(x, stream)
        for block in self.down_blocks:
            x = block(x, stream)
        x = self.mid_block(x, stream)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


class UpBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: WanVAEConfig, upsample_mode: str | None, *,
                 rngs: nnx.Rngs, **kw: Any):
        resnets = []
        for _ in range(cfg.num_res_blocks + 1):
            resnets.append(ResidualBlock(in_dim, out_dim, cfg.dropout, rngs=rngs, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(out_dim, upsample_mode, rngs=rngs, **kw)] if upsample_mode else [])

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, stream)
        for upsampler in self.upsamplers:
            x = upsampler(x, stream)
        return x


class Decoder3d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, **kw: Any):
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, rngs=rngs, **kw)
        self.mid_block = MidBlock(dims[0], cfg.dropout, rngs=rngs, **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # the previous block's upsampler halved the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg, mode, rngs=rngs, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw.get("param_dtype", jnp.float32))
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, stream: _Stream | None = None) -> jax.Array:
        x = self.conv_in(x, stream)
        x = self.mid_block(x, stream)
        for block in self.up_blocks:
            x = block(x, stream)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


# ----------------------------------------------------------------------------------------------
# The VAE


class WanVAE(nnx.Module):
    """Wan2.1 causal video VAE. ``encode`` gives the raw posterior, ``decode`` takes raw latents."""

    def __init__(self, config: WanVAEConfig | None = None, *, rngs: nnx.Rngs | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.config = config or WanVAEConfig()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config, rngs=rngs, **kw)
        self.quant_conv = CausalConv3d(z * 2, z * 2, 1, rngs=rngs, **kw)
        self.post_quant_conv = CausalConv3d(z, z, 1, rngs=rngs, **kw)
        self.decoder = Decoder3d(self.config, rngs=rngs, **kw)

    # -- checks ---------------------------------------------------------------------------------

    def check_video(self, video: jax.Array | np.ndarray) -> None:
        """Raises a ValueError naming the problem when ``video`` cannot be encoded as one clip."""
        cfg = self.config
        if video.ndim != 5:
            raise ValueError(f"video must be (B, T, H, W, C) channels-last; got shape {tuple(video.shape)}.")
        b, t, h, w, c = video.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"video has {c} channels in its last axis, the VAE expects {cfg.in_channels} (RGB). "
                "Tensors are channels-last (B, T, H, W, C): transpose a (B, C, T, H, W) array first."
            )
        if (t - 1) % TEMPORAL_FACTOR != 0:
            raise ValueError(
                f"a clip of {t} frames cannot be encoded alone: the causal VAE takes 4n+1 frames "
                f"(1, 5, 9, ...). Use director_jax.models.timeline, which pads each chunk to 4n+1 and "
                "drops the padding after decoding."
            )
        s = cfg.spatial_factor
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {s}: resize or crop the video first.")

    def check_latents(self, z: jax.Array | np.ndarray) -> None:
        if z.ndim != 5 or z.shape[-1] != self.config.z_dim:
            raise ValueError(
                f"latents must be (B, T', h, w, {self.config.z_dim}) channels-last; got shape {tuple(z.shape)}."
            )

    # -- full-sequence pass ---------------------------------------------------------------------

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, 4n+1, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, n+1, H/8, W/8, z)."""
        self.check_video(video)
        return self._posterior(self.encoder(video, _Stream()))

    def decode(self, z: jax.Array, *, clip: bool = True) -> jax.Array:
        """Raw latents (B, n+1, h, w, z) -> video (B, 4n+1, 8h, 8w, 3), clipped to [-1, 1] unless
        ``clip=False`` (training: clipping would zero the gradient of out-of-range pixels)."""
        self.check_latents(z)
        video = self.decoder(self.post_quant_conv(z), _Stream())
        return jnp.clip(video, -1.0, 1.0) if clip else video

    def _posterior(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = jnp.split(self.quant_conv(h), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    # -- streaming steps (traceable; driven by the methods below) ---------------------------------

    def encode_step(self, frames: jax.Array, caches: list[jax.Array] | None):
        """One streaming encoder step: returns (mean, logvar, new caches)."""
        stream = _Stream(caches)
        mean, logvar = self._posterior(self.encoder(frames, stream))
        return mean, logvar, stream.written

    def decode_step(self, z: jax.Array, caches: list[jax.Array] | None):
        """One streaming decoder step over latent frames ``z``: returns (frames, new caches)."""
        stream = _Stream(caches)
        video = self.decoder(self.post_quant_conv(z), stream)
        return jnp.clip(video, -1.0, 1.0), stream.written

    # -- streaming pass -------------------------------------------------------------------------

    def encode_streaming(self, video: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Same result as ``encode``; frame 0 then 4 frames per step, so memory is one step's."""
        self.check_video(video)
        graphdef, state = nnx.split(self)
        means, logvars, caches = [], [], None
        for start in range(0, video.shape[1], TEMPORAL_FACTOR):
            lo = 0 if start == 0 else start - TEMPORAL_FACTOR + 1
            chunk = jnp.asarray(video[:, lo : start + 1])
            mean, logvar, caches = _jit_encode_step(graphdef, state, chunk, caches)
            means.append(mean)
            logvars.append(logvar)
        return jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1)

    def iter_decode(self, z: jax.Array | np.ndarray) -> Iterator[np.ndarray]:
        """Decodes one latent frame per step; yields host arrays of 1 (first) then 4 frames each."""
        self.check_latents(z)
        graphdef, state = nnx.split(self)
        caches = None
        for i in range(z.shape[1]):
            frames, caches = _jit_decode_step(graphdef, state, jnp.asarray(z[:, i : i + 1]), caches)
            yield np.asarray(frames)

    def decode_streaming(self, z: jax.Array | np.ndarray) -> np.ndarray:
        """Same result as ``decode``, assembled on the host from ``iter_decode``."""
        return np.concatenate(list(self.iter_decode(z)), axis=1)


@jax.jit(static_argnums=0)
def _jit_encode_step(graphdef, state, frames, caches):
    return nnx.merge(graphdef, state).encode_step(frames, caches)


@jax.jit(static_argnums=0)
def _jit_decode_step(graphdef, state, z, caches):
    return nnx.merge(graphdef, state).decode_step(z, caches)


# ----------------------------------------------------------------------------------------------
# Latent normalisation and sampling (separate, named steps)


def normalize_latents(z: jax.Array, config: WanVAEConfig) -> jax.Array:
    """Raw latents -> the unit-scale latents the DiT sees: (z - mean) / std per channel."""
    mean = jnp.asarray(config.latents_mean, z.dtype)
    std = jnp.asarray(config.latents_std, z.dtype)
    return (z - mean) / std


def denormalize_latents(z: jax.Array, config: WanVAEConfig) -> jax.Array:
    """Inverse of ``normalize_latents``."""
    mean = jnp.asarray(config.latents_mean, z.dtype)
    std = jnp.asarray(config.latents_std, z.dtype)
    return z * std + mean


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A reparameterised draw mean + exp(logvar / 2) * eps from the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(posterior || N(0, I)) summed over latent dims, per batch element (diffusers' formula)."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))
