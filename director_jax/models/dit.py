"""The Wan2.1 text-to-video DiT in Flax NNX, and Director-Gen on top of it.

``WanDiT`` is diffusers' ``WanTransformer3DModel`` (same config fields, same parameter names up to
a transpose, see ``director_jax.convert.dit_weights``), channels-last, with three extensions the
keyframe method needs:

* **timesteps per latent frame or per token**: ``timestep`` may be (B,), (B, F) (one per latent
  frame: the clean keyframe frames get 0) or (B, S) (one per token, diffusers' form). A frame's
  tokens share one modulation vector, so per-frame timesteps cost (B, F, 6, D), not (B, S, 6, D);
* **real-valued temporal RoPE positions** (MC-RoPE), ``positions`` (F,) or (B, F);
* **scanned layers**: the blocks' parameters are stacked on a leading "layers" axis and run with
  ``nnx.scan`` under a configurable remat policy, so compile time does not grow with depth;
* **sequence parallelism** (``sequence_parallel="ulysses" | "ring" | "auto"``): the self-attention
  runs over the mesh's "sequence" axis (``kernels/sequence_parallel.py``). When the token count does
  not divide by that axis, the tokens are padded to a multiple, the padded keys masked (kv_len) and
  the padded tokens dropped before the output head, so the result is that of the unpadded model.

``DirectorGen`` wraps a ``WanDiT`` with the flow-matching conventions of this project: flow time
sigma in [0, 1] per latent frame (given frames at 0), the DiT's timestep = 1000 * sigma.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from director_jax.kernels.attention import SEQUENCE_PARALLEL_MODES
from director_jax.kernels.flash import BlockSizes
from director_jax.kernels.sequence_parallel import sequence_axis_size
from director_jax.models.layers import (
    Attention,
    FeedForward,
    LayerNorm,
    Linear,
    layer_norm,
    modulate,
    param,
    rope_angles,
    timestep_sinusoid,
    torch_normal,
    torch_uniform,
)
from director_jax.parallel.rules import constrain

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' timestep scale: timestep = 1000 * sigma
# Parameters kept in float32 whatever ``param_dtype`` is: the modulation tables, the time embedding and its
# projection, the cross-attention LayerNorm (diffusers' ``_keep_in_fp32_modules`` for Wan) and the q / k RMS
# norms. They are a few vectors per block, and a bfloat16 ``param_dtype`` (the low-memory training recipe)
# would otherwise round the per-timestep shifts and scales every block applies.
FLOAT32_PARAMS = jnp.float32


@dataclasses.dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of the DiT; field names and defaults are diffusers' ``WanTransformer3DModel``'s."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.image_dim is not None or self.added_kv_proj_dim is not None or self.pos_embed_seq_len is not None:
            raise ValueError("This config is a Wan image-to-video transformer (image_dim / added_kv_proj_dim set); "
                             "only the text-to-video DiT is supported: keyframes enter as in-sequence tokens.")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; Wan2.1 uses 'rms_norm_across_heads'.")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be even and >= 6 for 3D RoPE.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_diffusers_config(self) -> dict[str, Any]:
        """The config dict diffusers' ``WanTransformer3DModel(**cfg)`` / ``config.json`` takes."""
        cfg = dataclasses.asdict(self)
        cfg["patch_size"] = list(self.patch_size)
        return cfg

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> WanDiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


# Logical axes of the (B, S, D) activations between blocks (see director_jax.parallel.rules).
ACTIVATION_AXES = ("batch", "length", "act_embed")

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    # recompute the whole block, but keep each block's input in host memory instead of HBM (maxdiffusion's
    # HIDDEN_STATE_WITH_OFFLOAD; on the CPU there is no pinned host memory, so only for accelerators)
    "offload_hidden": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("block_input",), offload_src="device",
        offload_dst="pinned_host"),
}


class WanBlock(nnx.Module):
    """One Wan block: modulated self-attention with RoPE, cross-attention to text, modulated FFN."""

    def __init__(self, config: WanDiTConfig, *, rngs: nnx.Rngs, attention_impl: str = "auto",
                 sequence_parallel: str | None = None, block_sizes: BlockSizes | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        dim, heads = config.inner_dim, config.num_attention_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Only the self-attention is sequence parallel: cross-attention's keys (text) are replicated,
        # so its sequence-sharded queries are plain SPMD.
        self.attn1 = Attention(dim, heads, eps=config.eps, attention_impl=attention_impl,
                               sequence_parallel=sequence_parallel, block_sizes=block_sizes, **kw)
        self.attn2 = Attention(dim, heads, eps=config.eps, attention_impl=attention_impl, block_sizes=block_sizes, **kw)
        self.norm2 = LayerNorm(dim, eps=config.eps, param_dtype=FLOAT32_PARAMS) if config.cross_attn_norm else None
        self.ffn = FeedForward(dim, config.ffn_dim, **kw)
        self.scale_shift_table = param(
            torch_normal(rngs.params(), (1, 6, dim), 1.0 / math.sqrt(dim), FLOAT32_PARAMS), (None, None, "embed"))
        self.eps = config.eps

    def __call__(self, x: jax.Array, text: jax.Array, modulation: jax.Array, rope: jax.Array, *,
                 kv_len: jax.Array | None = None, token_group: np.ndarray | None = None) -> jax.Array:
        """x (B, S, D); text (B, L, D); modulation (B, G, 6, D) float32 for G timestep groups.

        By default the S tokens form G equal consecutive groups. ``token_group`` (S,), a static index
        array, instead gives each token's group (padded sequences, whose length G does not divide):
        the modulation is then gathered per token inside the block, never held for all layers.
        ``kv_len`` (B,) masks padded tokens as self-attention keys.
        """
        b, s, d = x.shape
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + modulation  # (B, G, 6, D)
        if token_group is not None:
            mod = jnp.take(mod, jnp.asarray(token_group, jnp.int32), axis=1)  # (B, S, 6, D)
            mod = constrain(mod, ("batch", "length", None, "act_embed"))  # each device gathers its own tokens
        g = mod.shape[1]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))

        def grouped(y: jax.Array) -> jax.Array:
            return y.reshape(b, g, s // g, d)

        h = modulate(grouped(layer_norm(x, self.eps)), shift_msa, scale_msa).reshape(b, s, d).astype(x.dtype)
        attn = self.attn1(h, rope=rope, kv_len=kv_len)
        x = (grouped(x.astype(jnp.float32)) + grouped(attn.astype(jnp.float32)) * gate_msa[:, :, None]).reshape(
            b, s, d).astype(x.dtype)

        h = self.norm2(x) if self.norm2 is not None else x
        x = x + self.attn2(h, context=text)

        h = modulate(grouped(layer_norm(x, self.eps)), c_shift, c_scale).reshape(b, s, d).astype(x.dtype)
        ff = self.ffn(h)
        x = (grouped(x.astype(jnp.float32)) + grouped(ff.astype(jnp.float32)) * c_gate[:, :, None]).reshape(
            b, s, d).astype(x.dtype)
        return x


class PatchEmbedding(nnx.Module):
    """Non-overlapping 3D patches -> tokens: diffusers' strided ``Conv3d`` as a reshape and a matmul.

    ``kernel`` is (pt, ph, pw, C, D); diffusers' ``weight`` is its (D, C, pt, ph, pw) transpose.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_dim: int, dim: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        pt, ph, pw = patch_size
        fan_in = in_dim * pt * ph * pw
        k1, k2 = jax.random.split(rngs.params())
        self.kernel = param(torch_uniform(k1, (pt, ph, pw, in_dim, dim), fan_in, param_dtype),
                            (None, None, None, None, "embed"))
        self.bias = param(torch_uniform(k2, (dim,), fan_in, param_dtype), ("embed",))
        self.patch_size = patch_size
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, T, H, W, C) -> (B, F*h*w, D), tokens in (f, h, w) order."""
        b, t, hh, ww, c = x.shape
        pt, ph, pw = self.patch_size
        f, h, w = t // pt, hh // ph, ww // pw
        patches = x.reshape(b, f, pt, h, ph, w, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        patches = patches.reshape(b, f * h * w, pt * ph * pw * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(pt * ph * pw * c, -1).astype(self.dtype)
        return jnp.dot(patches, kernel) + self.bias[...].astype(self.dtype)


class TimestepEmbedder(nnx.Module):
    """diffusers' ``TimestepEmbedding``: sinusoid -> linear_1 -> SiLU -> linear_2."""

    def __init__(self, freq_dim: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.linear_1 = Linear(freq_dim, dim, axes=(None, "embed"), rngs=rngs, param_dtype=param_dtype)
        self.linear_2 = Linear(dim, dim, axes=("embed", "embed_out"), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """diffusers' ``PixArtAlphaTextProjection``: linear_1 -> GELU (tanh) -> linear_2."""

    def __init__(self, text_dim: int, dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Linear(text_dim, dim, axes=("text_embed", "embed"), **kw)
        self.linear_2 = Linear(dim, dim, axes=("embed", "embed_out"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=True))


class ConditionEmbedder(nnx.Module):
    """Timestep -> (temb, six modulation vectors); text embeddings -> model width."""

    def __init__(self, config: WanDiTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        dim = config.inner_dim
        # The time path and its modulation stay in float32 parameters and compute whatever param_dtype is
        # (diffusers keeps ``time_embedder`` in fp32 too, see FLOAT32_PARAMS).
        self.time_embedder = TimestepEmbedder(config.freq_dim, dim, rngs=rngs, param_dtype=FLOAT32_PARAMS)
        self.time_proj = Linear(dim, 6 * dim, axes=("embed", "embed_out"), rngs=rngs, param_dtype=FLOAT32_PARAMS)
        self.text_embedder = TextProjection(config.text_dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.freq_dim = config.freq_dim

    def __call__(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """timestep (B, G) on the 0..1000 scale -> temb (B, G, D) and modulation (B, G, 6, D), float32."""
        temb = self.time_embedder(timestep_sinusoid(timestep, self.freq_dim))
        proj = self.time_proj(jax.nn.silu(temb))
        return temb, proj.reshape(*proj.shape[:-1], 6, -1)


class WanDiT(nnx.Module):
    """Wan2.1 T2V DiT. ``model(latents, timestep, text, positions=None, text_mask=None)``.

    latents (B, F, h, w, C) channels-last; timestep (B,), (B, F) or (B, F*h*w/4) on diffusers'
    0..1000 scale; text (B, L, text_dim); positions (F,) or (B, F) real temporal RoPE positions
    (default 0..F-1); text_mask (B, L) zeroes padded text embeddings, which is how Wan's pipeline
    pads (it does not mask cross-attention). Returns (B, F, h, w, out_channels).

    ``sequence_parallel`` (None, "ulysses", "ring", "auto") applies under a mesh with a "sequence"
    axis (``jax.set_mesh``); without one the model runs unchanged.
    """

    def __init__(self, config: WanDiTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_impl: str = "auto", remat_policy: str = "none",
                 sequence_parallel: str | None = None, attention_block_sizes: BlockSizes | dict | None = None,
                 scan_unroll: int | bool = 1):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.")
        if sequence_parallel not in SEQUENCE_PARALLEL_MODES:
            raise ValueError(f"Unknown sequence_parallel {sequence_parallel!r}; choose one of "
                             f"{SEQUENCE_PARALLEL_MODES}.")
        if not isinstance(scan_unroll, bool) and (not isinstance(scan_unroll, int) or scan_unroll < 1):
            raise ValueError(f"scan_unroll must be a positive int (layers per loop iteration) or True (no loop); "
                             f"got {scan_unroll!r}.")
        self.config = config
        dim = config.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        block_sizes = attention_block_sizes
        if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
            block_sizes = BlockSizes.from_dict(dict(block_sizes))
        self.patch_embedding = PatchEmbedding(config.patch_size, config.in_channels, dim, rngs=rngs, **kw)
        self.condition_embedder = ConditionEmbedder(config, rngs=rngs, **kw)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> WanBlock:
            return WanBlock(config, rngs=rngs, attention_impl=attention_impl, sequence_parallel=sequence_parallel,
                            block_sizes=block_sizes, **kw)

        self.blocks = make_blocks(rngs)
        self.proj_out = Linear(dim, config.out_channels * math.prod(config.patch_size), axes=("embed", None),
                               rngs=rngs, **kw)
        self.scale_shift_table = param(
            torch_normal(rngs.params(), (1, 2, dim), 1.0 / math.sqrt(dim), FLOAT32_PARAMS), (None, None, "embed"))
        self.remat_policy = remat_policy
        self.scan_unroll = scan_unroll
        self.sequence_parallel = sequence_parallel
        self.dtype = dtype

    # -- input checks ------------------------------------------------------------------------

    def _grid(self, latents: jax.Array) -> tuple[int, int, int]:
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, F, h, w, {cfg.in_channels}) channels-last; got {latents.shape}.")
        _, t, hh, ww, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        if t % pt or hh % ph or ww % pw:
            raise ValueError(f"latent grid (F, h, w) = {(t, hh, ww)} is not divisible by patch_size {cfg.patch_size}; "
                             "crop or pad the video so latent height and width are multiples of the patch.")
        return t // pt, hh // ph, ww // pw

    @staticmethod
    def _timestep_groups(timestep: jax.Array, batch: int, frames: int, tokens: int) -> jax.Array:
        """(B,) / (B, F) / (B, S) -> (B, G) with G in {1, F, S}."""
        timestep = jnp.asarray(timestep)
        if timestep.ndim == 0:
            timestep = jnp.broadcast_to(timestep, (batch,))
        if timestep.ndim == 1 and timestep.shape[0] == batch:
            return timestep[:, None]
        if timestep.ndim == 2 and timestep.shape[0] == batch and timestep.shape[1] in (frames, tokens):
            return timestep
        raise ValueError(f"timestep has shape {timestep.shape}; expected ({batch},), ({batch}, {frames}) per latent "
                         f"frame or ({batch}, {tokens}) per token.")

    @staticmethod
    def _positions(positions: jax.Array | None, batch: int, frames: int) -> jax.Array:
        if positions is None:
            return jnp.broadcast_to(jnp.arange(frames, dtype=jnp.float32), (batch, frames))
        positions = jnp.asarray(positions, jnp.float32)
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions, (batch, positions.shape[0]))
        if positions.shape != (batch, frames):
            raise ValueError(f"positions has shape {positions.shape}; expected ({frames},) or ({batch}, {frames}): "
                             "one temporal position per latent frame (after temporal patching).")
        return positions

    # -- forward -----------------------------------------------------------------------------

    def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array, *,
                 positions: jax.Array | None = None, text_mask: jax.Array | None = None,
                 valid_frames: jax.Array | None = None) -> jax.Array:
        """``valid_frames`` (B,) int: each row's real latent frames, a prefix (rows padded to one length);
        the tokens of the frames after it are masked as self-attention keys, so a row's output on its
        real frames is that of the row alone, unpadded. None: every frame is real."""
        cfg = self.config
        f, h, w = self._grid(latents)
        b = latents.shape[0]
        s = f * h * w
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text must be ({b}, L, {cfg.text_dim}); got {text.shape}.")
        groups = self._timestep_groups(timestep, b, f, s)
        rope = rope_angles(self._positions(positions, b, f), h, w, cfg.attention_head_dim)

        if text_mask is not None:
            text = jnp.where(jnp.asarray(text_mask, bool)[..., None], text, 0)
        x = self.patch_embedding(latents)
        temb, modulation = self.condition_embedder(groups.astype(jnp.float32))
        context = self.condition_embedder.text_embedder(text)

        pad = self._sequence_padding(s)
        kv_len = token_group = None
        if valid_frames is not None:  # padded latent frames: their tokens are keys no query sees
            frames = -(-jnp.asarray(valid_frames, jnp.int32) // cfg.patch_size[0])
            kv_len = jnp.broadcast_to(frames * (h * w), (b,)).astype(jnp.int32)
        if pad:  # sequence parallel with S not divisible by the sequence axis: pad, mask, drop (see above)
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
            rope = jnp.pad(rope, ((0, 0), (0, pad), (0, 0)))  # angle 0: identity rotation
            kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len
            g = groups.shape[1]
            if g > 1:  # padded tokens join the last group: any finite modulation will do, they are dropped
                token_group = np.minimum(np.arange(s + pad) // (s // g), g - 1)

        x = self._run_blocks(constrain(x, ACTIVATION_AXES), context, modulation, rope, kv_len, token_group)
        if pad:
            x = x[:, :s]

        g = groups.shape[1]
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + temb[:, :, None, :]  # (B, G, 2, D)
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        d = x.shape[-1]
        x = modulate(layer_norm(x, cfg.eps).reshape(b, g, s // g, d), shift, scale).reshape(b, s, d).astype(x.dtype)
        x = self.proj_out(x)
        return self._unpatchify(x, f, h, w)

    def _sequence_padding(self, tokens: int) -> int:
        """Tokens to append so sequence-parallel attention can split them evenly (0 when not needed)."""
        if self.sequence_parallel is None:
            return 0
        return -tokens % sequence_axis_size()

    def _run_blocks(self, x: jax.Array, context: jax.Array, modulation: jax.Array, rope: jax.Array,
                    kv_len: jax.Array | None = None, token_group: np.ndarray | None = None) -> jax.Array:
        def body(x: jax.Array, block: WanBlock) -> jax.Array:
            # block boundary: batch over (data, fsdp), tokens over sequence (no-op without a mesh); the name is
            # what the offload_hidden policy moves to host memory
            x = checkpoint_name(constrain(x, ACTIVATION_AXES), "block_input")
            out = block(x, context, modulation, rope, kv_len=kv_len, token_group=token_group)
            return constrain(out, ACTIVATION_AXES)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            body = nnx.remat(body, policy=policy, prevent_cse=False)
        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.scan_unroll)(x, self.blocks)

    def _unpatchify(self, x: jax.Array, f: int, h: int, w: int) -> jax.Array:
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, f * pt, h * ph, w * pw, -1)


class DirectorGen(nnx.Module):
    """Director-Gen: the Wan DiT over a timeline's chunk latents, given latent frames held clean.

    ``gen(latents, sigma_frames, text, positions=..., text_mask=None) -> velocity``: latents
    (B, L, h, w, C) are the normalized chunk latents laid end to end (``TimelineLayout`` order);
    ``sigma_frames`` (B, L) is the flow time of every latent frame, 0 for given (keyframe / video)
    frames, which is how they enter the sequence as clean tokens; ``positions`` (L,) or (B, L) are
    the MC-RoPE positions (``TimelineLayout.position``). The velocity is returned for every frame;
    the loss and the sampler use it on generated frames only.
    """

    def __init__(self, dit: WanDiT):
        self.dit = dit

    @property
    def config(self) -> WanDiTConfig:
        return self.dit.config

    def __call__(self, latents: jax.Array, sigma_frames: jax.Array, text: jax.Array, *, positions: jax.Array,
                 text_mask: jax.Array | None = None, valid_frames: jax.Array | None = None) -> jax.Array:
        sigma_frames = jnp.asarray(sigma_frames, jnp.float32)
        if sigma_frames.shape != latents.shape[:2]:
            raise ValueError(f"sigma_frames has shape {sigma_frames.shape}; it needs one flow time per latent frame, "
                             f"shape {latents.shape[:2]}.")
        return self.dit(latents, NUM_TRAIN_TIMESTEPS * sigma_frames, text, positions=positions, text_mask=text_mask,
                        valid_frames=valid_frames)
