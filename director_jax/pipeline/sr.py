"""Director-SR inference: a low-res video (and high-res keyframes) -> the high-res video.

The steps mirror training (``train.tasks.SRTask``): the low-res video is rounded to 8 bits and
bicubic-upsampled by ``scale`` (``data.degradations.bicubic_upsample``, the same resize the
training pairs got), encoded by the frozen VAE over the timeline layout, and conditions every
token; the high-res keyframes are encoded alone (each is the first frame of its chunk, which the
causal VAE encodes on its own) and held clean at their chunk starts; ``sample_sr`` integrates the
flow in a few steps; the timeline decoder decodes chunk by chunk and drops the padding.

``keyframes=None`` runs the same layout with no given frame (every latent generated), so the value
of the anchors can be measured against the same model and chunking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from director_jax.data.degradations import bicubic_upsample
from director_jax.models.multichunk import decode_timeline, encode_timeline
from director_jax.models.sr import DirectorSR
from director_jax.models.timeline import Timeline, TimelineLayout
from director_jax.models.vae import WanVAE, denormalize_latents, normalize_latents
from director_jax.parallel.rules import MeshContext
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.sr_sampling import sample_sr

_RANGE_TOLERANCE = 1e-3  # float frames may overshoot [-1, 1] by rounding, not by a wrong convention


def as_float_frames(x: Any, name: str) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] frames -> float32 [-1, 1]; anything else is refused with the fix."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} has dtype {x.dtype}; pass uint8 frames in [0, 255] or float frames in [-1, 1].")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    if x.size and (x.min() < -1 - _RANGE_TOLERANCE or x.max() > 1 + _RANGE_TOLERANCE):
        raise ValueError(f"{name} has values in [{x.min():.3g}, {x.max():.3g}]; float frames must lie in [-1, 1] "
                         "(map [0, 1] frames with 2 x - 1, or pass uint8 [0, 255]).")
    return np.clip(x.astype(np.float32), -1.0, 1.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 as ``degradations.degrade_float`` rounds (the training pairs' low-res clips are 8-bit)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_scale(scale: Any) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1 (the SR factor per side), got {scale!r}.")
    return int(scale)


def _resolve_layout(layout: TimelineLayout | Timeline | None, num_frames: int,
                    keyframes: Mapping[int, Any] | None) -> TimelineLayout:
    """The layout to run on; every keyframe must start a chunk of it (its first latent is that frame alone)."""
    if layout is None:
        return Timeline.from_keyframes(num_frames, sorted(keyframes or {})).layout
    if isinstance(layout, Timeline):
        layout = layout.layout
    if not isinstance(layout, TimelineLayout):
        raise TypeError(f"layout must be a TimelineLayout, a Timeline or None, got {type(layout).__name__}.")
    if layout.timeline.num_frames != num_frames:
        raise ValueError(f"the layout's timeline has {layout.timeline.num_frames} frames but the low-res video has "
                         f"{num_frames}: build it for this video, e.g. Timeline.from_keyframes({num_frames}, ...).")
    starts = [c.start for c in layout.chunks]
    off = sorted(set(keyframes or ()) - set(starts))
    if off:
        raise ValueError(f"keyframes at frames {off} do not start a chunk of the layout (chunks start at {starts}), so "
                         "they cannot be held clean: pass layout=None (built from the keyframes) or a layout built "
                         f"with them, e.g. Timeline.from_keyframes({num_frames}, {sorted(set(keyframes) | {0})}).")
    return layout


def given_mask(layout: TimelineLayout, frames: Any) -> np.ndarray:
    """(L,) bool: the first latent of each chunk starting at one of ``frames`` (chunk starts) is given."""
    mask = np.zeros(layout.num_latents, bool)
    for frame in frames:
        mask[layout.latent_of_frame(int(frame))] = True
    return mask


def _check_keyframes(keyframes: Mapping[int, Any], batch: int, num_frames: int, size: tuple[int, int],
                     lowres_size: tuple[int, int], scale: int) -> dict[int, np.ndarray]:
    """Keyframe images -> {frame: (B, H, W, 3) float32 [-1, 1]}, with errors naming the expected value."""
    if not isinstance(keyframes, Mapping):
        raise TypeError(f"keyframes must be a dict {{frame index: high-res image}} or None, got "
                        f"{type(keyframes).__name__}.")
    out = {}
    for frame, image in keyframes.items():
        if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
            raise TypeError(f"keyframe frame indices must be integers; got {frame!r} ({type(frame).__name__}). "
                            "Convert times with models.timeline.frame_at_time.")
        if not 0 <= frame < num_frames:
            raise ValueError(f"keyframe at frame {frame} is outside the video: valid frames are 0..{num_frames - 1}.")
        image = as_float_frames(image, f"keyframe {frame}")
        if image.ndim == 3:
            image = np.broadcast_to(image, (batch, *image.shape))
        if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != 3:
            raise ValueError(f"keyframe {frame} must be one RGB image (H, W, 3) or one per video (B={batch}, H, W, 3); "
                             f"got shape {image.shape}.")
        if image.shape[1:3] != size:
            raise ValueError(f"keyframe {frame} is {image.shape[1]}x{image.shape[2]}; with scale {scale} the "
                             f"{lowres_size[0]}x{lowres_size[1]} low-res video needs {size[0]}x{size[1]} keyframes.")
        out[int(frame)] = image
    return out


def _overlap(tile: tuple[int, int] | int | None, overlap: tuple[int, int] | int | None,
             patch: tuple[int, int]) -> tuple[int, int] | int:
    """The default overlap: two latent pixels (one patch row) where the tile leaves room, else none."""
    if tile is None or overlap is not None:
        return 0 if overlap is None else overlap
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    return tuple(p if t > p else 0 for t, p in zip(tile, patch, strict=True))


def keyframe_latents(vae: WanVAE, keyframes: dict[int, np.ndarray], layout: TimelineLayout, shape: tuple[int, ...],
                     encode: Any) -> jax.Array:
    """Normalized given latents (B, L, h, w, z): each keyframe encoded alone at its chunk's first latent, 0 elsewhere.

    Equal to encoding the whole timeline (``timeline_latents``) at the given latents, since a chunk's
    first latent depends only on its first frame, at a fraction of the cost.
    """
    frames = sorted(keyframes)
    images = jnp.asarray(np.stack([keyframes[f] for f in frames], axis=1))  # (B, K, H, W, 3)
    b, k = images.shape[:2]
    mean, _ = encode(images.reshape(b * k, 1, *images.shape[2:]))
    mean = normalize_latents(mean[:, 0], vae.config).reshape(b, k, *mean.shape[2:])
    given = jnp.zeros(shape, jnp.float32)
    return given.at[:, jnp.asarray([layout.latent_of_frame(f) for f in frames])].set(mean)


def super_resolve(sr: DirectorSR, vae: WanVAE, lowres_video: Any, keyframes: Mapping[int, Any] | None = None, *,
                  scale: int, key: jax.Array, layout: TimelineLayout | Timeline | None = None,
                  text: jax.Array | None = None, text_mask: jax.Array | None = None, steps: int = 4,
                  sampler: str = "euler", shift: float = 1.0, tile: tuple[int, int] | int | None = None,
                  overlap: tuple[int, int] | int | None = None, negative_text: jax.Array | None = None,
                  negative_mask: jax.Array | None = None, guidance_scale: float = 1.0,
                  return_latents: bool = False, mesh_context: MeshContext = None
                  ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """The high-res video (float32 in [-1, 1]) of ``lowres_video`` (T, h, w, 3) or (B, T, h, w, 3): shape x ``scale``.

    ``lowres_video``: uint8 [0, 255] or float [-1, 1]. ``keyframes``: {frame index: high-res image
    (H, W, 3) (or (B, H, W, 3)) with H = h * scale}, the anchors held clean; None samples every
    frame from the low-res video alone. ``layout`` (or a ``Timeline``, e.g. Director-Gen's) sets the
    chunking; None builds it from the keyframes. Each keyframe must start a chunk of it; chunks
    without a high-res keyframe (a Gen conditioning video, or every chunk when ``keyframes`` is
    None) are generated, so "with" and "without" anchors compare on one layout.
    ``text`` (B, Lt, text_dim) caption embeddings; None: unconditional (one masked token, as SR
    training without captions). ``steps`` sampler steps (1, 4 or 12 are the intended budgets)
    from noise drawn with ``key``; ``tile`` / ``overlap`` in latent pixels run the DiT on
    overlapping spatial tiles (``sample_sr_tiled``; overlap defaults to one patch).
    ``return_latents=True`` also returns the normalized latents (B, L, h, w, z) as a dict:
    ``"sampled"`` (the output's), ``"lowres"`` (the upsampled input's) and ``"given"`` (the mask, (B, L)),
    for measuring the SR model apart from the VAE decoder. ``mesh_context`` ``(mesh, rules)``: the model's
    weights are sharded on that mesh (``pipeline.gen.generate_latents``).
    """
    scale = _check_scale(scale)
    video = as_float_frames(lowres_video, "lowres_video")
    single = video.ndim == 4
    video = video[None] if single else video
    if video.ndim != 5 or video.shape[-1] != 3 or min(video.shape[:4]) < 1:
        raise ValueError(f"lowres_video must be (T, h, w, 3) or (B, T, h, w, 3) RGB frames; got shape "
                         f"{np.shape(lowres_video)}.")
    b, t, h, w, _ = video.shape
    size = (h * scale, w * scale)
    _, ph, pw = sr.config.patch_size
    factor = vae.config.spatial_factor
    unit = (factor * ph, factor * pw)  # VAE compression times the DiT patch, in high-res pixels
    if size[0] % unit[0] or size[1] % unit[1]:
        need = tuple(u // math.gcd(u, scale) for u in unit)
        raise ValueError(f"low-res {h}x{w} x scale {scale} = {size[0]}x{size[1]} high-res, which must be a multiple of "
                         f"{unit[0]}x{unit[1]} (VAE {factor}x times the DiT patch): crop the low-res video to a "
                         f"multiple of {need[0]}x{need[1]}.")
    if keyframes is not None:
        keyframes = _check_keyframes(keyframes, b, t, size, (h, w), scale)
    layout = _resolve_layout(layout, t, keyframes)

    encode, decode = jitted_codec(vae)
    upsampled = np.stack([bicubic_upsample(_to_uint8(clip), scale) for clip in video])
    mean, _ = encode_timeline(vae, jnp.asarray(upsampled.astype(np.float32) / 127.5 - 1.0), layout, encode=encode)
    lowres_latents = normalize_latents(mean, vae.config)
    if keyframes:
        given_latents = keyframe_latents(vae, keyframes, layout, lowres_latents.shape, encode)
    else:
        given_latents = jnp.zeros_like(lowres_latents)
    mask = jnp.broadcast_to(jnp.asarray(given_mask(layout, keyframes or ())), (b, layout.num_latents))
    if text is None:
        text = jnp.zeros((b, 1, sr.config.text_dim), jnp.float32)
        text_mask = jnp.zeros((b, 1), bool)
    latents = sample_sr(sr, layout, lowres_latents, given_latents, text, key=key, text_mask=text_mask,
                        given_mask=mask, steps=steps, shift=shift, sampler=sampler, tile=tile,
                        overlap=_overlap(tile, overlap, (ph, pw)), negative_text=negative_text,
                        negative_mask=negative_mask, guidance_scale=guidance_scale, mesh_context=mesh_context)
    out = decode_timeline(vae, denormalize_latents(latents, vae.config), layout, decode=decode)
    out = np.clip(np.asarray(out, np.float32), -1.0, 1.0)
    out = out[0] if single else out
    if return_latents:
        return out, {"sampled": np.asarray(latents), "lowres": np.asarray(lowres_latents), "given": np.asarray(mask)}
    return out
