"""Director-Gen inference on a timeline: given frames -> clean latents -> sampled latents -> video.

The given frames (keyframes, conditioning video spans) are encoded chunk by chunk with the frozen
VAE (``encode_timeline``), normalized with the VAE's latent statistics, and held clean while the
sampler integrates the flow for every other latent frame. The latents are then decoded chunk by
chunk and the chunk padding dropped, so each keyframe lands on the exact frame asked for.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from director_jax.diffusion import sample
from director_jax.models.dit import DirectorGen
from director_jax.models.multichunk import decode_timeline, encode_timeline
from director_jax.models.timeline import TimelineLayout
from director_jax.models.vae import WanVAE, denormalize_latents, normalize_latents
from director_jax.parallel.rules import MeshContext, traced_under


def timeline_latents(vae: WanVAE, video: jax.Array, layout: TimelineLayout, *, encode: Any = None) -> jax.Array:
    """(B, T, H, W, 3) -> normalized posterior-mean latents (B, L, h, w, z) in the layout's order.

    Only the given frames matter to the given latents (the VAE is causal and chunks start at given
    spans), so at inference the generated frames of ``video`` may hold anything.
    """
    mean, _ = encode_timeline(vae, video, layout, encode=encode)
    return normalize_latents(mean, vae.config)


def check_given_latents(latents: jax.Array, layout: TimelineLayout, gen: DirectorGen) -> None:
    """Clear errors for given latents that do not fit the timeline or the model."""
    cfg = gen.config
    _, ph, pw = cfg.patch_size
    if latents.ndim != 5 or latents.shape[1] != layout.num_latents or latents.shape[-1] != cfg.in_channels:
        raise ValueError(f"given latents must be (B, {layout.num_latents}, h, w, {cfg.in_channels}) for this timeline "
                         f"({layout.timeline.num_frames} frames, {len(layout.chunks)} chunks); got {latents.shape}.")
    h, w = latents.shape[2:4]
    if h % ph or w % pw:
        raise ValueError(f"keyframe latents are {h}x{w}, not a multiple of the DiT patch {ph}x{pw}: keyframes must be "
                         f"a multiple of the VAE's spatial factor times {ph}x{pw} pixels; resize or crop them.")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _velocity(graphdef: nnx.GraphDef, context: MeshContext, state: nnx.State, x: jax.Array, sigma_frames: jax.Array,
              positions: jax.Array, cond: tuple[jax.Array, jax.Array]) -> jax.Array:
    text, text_mask = cond
    with traced_under(context):
        return nnx.merge(graphdef, state)(x, sigma_frames, text, positions=positions, text_mask=text_mask)


def _with_mask(text: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    text = jnp.asarray(text)
    mask = jnp.ones(text.shape[:2], bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != text.shape[:2]:
        raise ValueError(f"text mask has shape {mask.shape}; it needs one bool per text token, {text.shape[:2]}.")
    return text, mask


def generate_latents(gen: DirectorGen, layout: TimelineLayout, given_latents: jax.Array, text: jax.Array, *,
                     key: jax.Array, text_mask: jax.Array | None = None, negative_text: jax.Array | None = None,
                     negative_mask: jax.Array | None = None, steps: int = 50, sampler: str = "unipc",
                     shift: float = 5.0, guidance_scale: float = 1.0, keyframe_guidance: float = 1.0,
                     progress: bool = True, mesh_context: MeshContext = None) -> jax.Array:
    """Samples the generated latent frames of ``layout``; given frames come out exactly as given.

    ``given_latents`` (B, L, h, w, C) normalized (values on generated frames are ignored);
    ``text`` (B, Lt, text_dim) caption embeddings; ``negative_text`` the negative caption's,
    needed when ``guidance_scale != 1`` (classifier-free guidance); ``keyframe_guidance != 1``
    guides toward the given frames (``diffusion.keyframe_guided_velocity``; a model trained with
    keyframe dropout). ``key`` seeds the noise: the same key gives the same latents. ``mesh_context``
    ``(mesh, rules)``: the model's weights are sharded on that mesh, and its activations follow the rules
    (sequence-parallel attention included); the same latents as one device, up to float rounding.
    """
    check_given_latents(given_latents, layout, gen)
    b = given_latents.shape[0]
    given = jnp.broadcast_to(jnp.asarray(layout.given), (b, layout.num_latents))
    noise = jax.random.normal(key, given_latents.shape, jnp.float32)
    cond = _with_mask(text, text_mask)
    uncond = _with_mask(negative_text, negative_mask) if negative_text is not None else None
    graphdef, state = nnx.split(gen)
    positions = jnp.asarray(layout.position)

    def denoise(x: jax.Array, sigma_frames: jax.Array, c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return _velocity(graphdef, mesh_context, state, x, sigma_frames, positions, c)

    return sample(denoise, noise, steps=steps, sampler=sampler, shift=shift, given_latents=given_latents,
                  given_mask=given, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                  keyframe_guidance=keyframe_guidance, progress=progress)


def generate_video(gen: DirectorGen, vae: WanVAE, layout: TimelineLayout, given_video: jax.Array,
                   text: jax.Array, *, key: jax.Array, encode: Any = None, decode: Any = None,
                   **sampling: Any) -> tuple[jax.Array, jax.Array]:
    """Given frames in a (B, T, H, W, 3) video -> (generated video in [-1, 1], normalized latents).

    ``given_video`` holds the given frames at their timeline positions (see
    ``timeline.place_given_frames``); its other frames are ignored. ``sampling`` goes to
    ``generate_latents`` (text_mask, negative_text, steps, sampler, shift, guidance_scale,
    keyframe_guidance, ...).
    """
    given_latents = timeline_latents(vae, given_video, layout, encode=encode)
    latents = generate_latents(gen, layout, given_latents, text, key=key, **sampling)
    video = decode_timeline(vae, denormalize_latents(latents, vae.config), layout, decode=decode)
    return video, latents
