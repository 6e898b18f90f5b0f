"""Multi-chunk encode and decode: a video through the frozen VAE chunk by chunk, over a timeline's layout.

Each chunk of a ``TimelineLayout`` (``models/timeline.py``) is padded to 4n+1 frames and encoded on
its own, so every given span starts a clean latent of its own; decoding drops the padding again,
so keyframes come back on exactly their frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from director_jax.models.timeline import TimelineLayout
from director_jax.models.vae import WanVAE


def pad_to_length(frames: jax.Array, length: int) -> jax.Array:
    """(B, n, ...) -> (B, length, ...) by repeating the last frame (the padding is never shown)."""
    n = frames.shape[1]
    if n == length:
        return frames
    tail = jnp.repeat(frames[:, -1:], length - n, axis=1)
    return jnp.concatenate([frames, tail], axis=1)


def _check_video(video, layout: TimelineLayout) -> None:
    if video.ndim != 5 or video.shape[1] != layout.timeline.num_frames:
        raise ValueError(
            f"video must be (B, {layout.timeline.num_frames}, H, W, C) for this timeline; got {tuple(video.shape)}."
        )


def _scatter(per_chunk: dict[int, jax.Array], layout: TimelineLayout) -> jax.Array:
    return jnp.concatenate([per_chunk[c.index] for c in layout.chunks], axis=1)


def encode_timeline(
    vae: WanVAE,
    video: jax.Array,
    layout: TimelineLayout,
    encode: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(B, T, H, W, 3) -> posterior (mean, logvar), each (B, L, h, w, z) in the layout's order.

    Chunks of equal padded length go through the VAE together (stacked on the batch axis).
    ``encode`` overrides ``vae.encode`` (e.g. a jitted or streaming encoder). Generated frames may
    hold anything at inference time: a given latent depends only on given frames (causality).
    """
    _check_video(video, layout)
    encode = encode or vae.encode
    b = video.shape[0]
    means, logvars = {}, {}
    for length, chunks in layout.chunks_by_padded_length().items():
        clips = jnp.concatenate([pad_to_length(video[:, c.start:c.end], length) for c in chunks], axis=0)
        mean, logvar = encode(clips)
        for k, c in enumerate(chunks):
            means[c.index] = mean[k * b:(k + 1) * b]
            logvars[c.index] = logvar[k * b:(k + 1) * b]
    return _scatter(means, layout), _scatter(logvars, layout)


def decode_timeline(
    vae: WanVAE,
    latents: jax.Array,
    layout: TimelineLayout,
    decode: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """(B, L, h, w, z) raw latents -> (B, T, H, W, 3): each chunk decoded, padding dropped, stitched."""
    if latents.ndim != 5 or latents.shape[1] != layout.num_latents:
        raise ValueError(
            f"latents must be (B, {layout.num_latents}, h, w, z) for this timeline; got {tuple(latents.shape)}."
        )
    decode = decode or vae.decode
    b = latents.shape[0]
    frames = {}
    for _, chunks in layout.chunks_by_padded_length().items():
        batch = jnp.concatenate(
            [latents[:, c.latent_offset:c.latent_offset + c.num_latents] for c in chunks], axis=0)
        decoded = decode(batch)
        for k, c in enumerate(chunks):
            frames[c.index] = decoded[k * b:(k + 1) * b, :c.length]
    return _scatter(frames, layout)


def encode_slots(
    vae: WanVAE,
    video: jax.Array,
    slot_frames: Sequence[jax.Array],
    latent_source: jax.Array,
    encode: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None,
) -> jax.Array:
    """Posterior means (B, L, h, w, z) of rows with their own timelines (``data/row_timelines.py``).

    ``slot_frames[i]`` (B, P_i) int: the clip frames chunk slot ``i`` encodes (a chunk, its last
    frame repeated); slots of one length go through the VAE together. ``latent_source`` (B, L) int
    picks each row latent out of the slots' latents laid end to end. A row's latents equal
    ``encode_timeline`` of its own layout: each chunk is encoded on its own, padded the same way.
    """
    if video.ndim != 5:
        raise ValueError(f"video must be (B, T, H, W, C); got {tuple(video.shape)}.")
    encode = encode or vae.encode
    b = video.shape[0]
    groups: dict[int, list[int]] = {}
    for i, frames in enumerate(slot_frames):
        groups.setdefault(int(frames.shape[1]), []).append(i)
    means: dict[int, jax.Array] = {}
    for slots in groups.values():
        clips = jnp.concatenate([jnp.take_along_axis(video, slot_frames[i][:, :, None, None, None], axis=1)
                                 for i in slots], axis=0)
        mean, _ = encode(clips)
        for k, i in enumerate(slots):
            means[i] = mean[k * b:(k + 1) * b]
    stacked = jnp.concatenate([means[i] for i in range(len(slot_frames))], axis=1)
    return jnp.take_along_axis(stacked, latent_source[:, :, None, None, None], axis=1)
