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

Both run the layers of ``models.vae_blocks`` in a ``Stream`` of causal caches: the full pass is
the stream's first step over all frames, so the two paths agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.models.timeline import TEMPORAL_FACTOR
from director_jax.models.vae_blocks import (
    AttentionBlock,
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    RMSNorm,
    Stream,
    UpBlock,
)

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
# Encoder and decoder


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

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        x = self.conv_in(x, stream)
        for block in self.down_blocks:
            x = block(x, stream)
        x = self.mid_block(x, stream)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


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
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks + 1, cfg.dropout, mode, rngs=rngs,
                                  **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw.get("param_dtype", jnp.float32))
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
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
        return self._posterior(self.encoder(video, Stream()))

    def decode(self, z: jax.Array, *, clip: bool = True) -> jax.Array:
        """Raw latents (B, n+1, h, w, z) -> video (B, 4n+1, 8h, 8w, 3), clipped to [-1, 1] unless
        ``clip=False`` (training: clipping would zero the gradient of out-of-range pixels)."""
        self.check_latents(z)
        video = self.decoder(self.post_quant_conv(z), Stream())
        return jnp.clip(video, -1.0, 1.0) if clip else video

    def _posterior(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = jnp.split(self.quant_conv(h), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    # -- streaming steps (traceable; driven by the methods below) ---------------------------------

    def encode_step(self, frames: jax.Array, caches: list[jax.Array] | None):
        """One streaming encoder step: returns (mean, logvar, new caches)."""
        stream = Stream(caches)
        mean, logvar = self._posterior(self.encoder(frames, stream))
        return mean, logvar, stream.written

    def decode_step(self, z: jax.Array, caches: list[jax.Array] | None):
        """One streaming decoder step over latent frames ``z``: returns (frames, new caches)."""
        stream = Stream(caches)
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
