"""Training objectives: the VAE's (L1 + small KL), Director-Gen's and Director-SR's (flow matching on generated
frames)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from director_jax.diffusion import flow_matching_loss, noisy_latents, sample_timesteps, velocity_target
from director_jax.models.dit import DirectorGen
from director_jax.models.lpips import LPIPS
from director_jax.models.sr import DirectorSR
from director_jax.models.vae import WanVAE, kl_divergence, sample_posterior


def vae_loss(vae: WanVAE, video: jax.Array, key: jax.Array, kl_weight: float = 1e-6, sample: bool = True, *,
             lpips_weight: float = 0.0, lpips: LPIPS | None = None, mse_weight: float = 0.0,
             anchor_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean absolute error of the reconstruction, plus ``kl_weight`` * KL, plus ``lpips_weight`` * LPIPS.

    ``sample=True`` decodes a posterior sample (the VAE recipe); ``sample=False`` decodes the
    posterior mean, which converges much faster from scratch (short CPU fits) and matches how a
    frozen VAE is used downstream (the DiT is trained on posterior means or samples near them).
    The KL is summed over latent elements and averaged over the batch, so ``kl_weight`` is
    comparable with Wan / Stable Diffusion VAE recipes. With ``lpips_weight`` > 0 the perceptual
    term (``lpips``: an eval.lpips.LPIPS, built once by the caller) is the mean over clips and
    frames of LPIPS(reconstruction, video): L1 alone gives blurry detail (Wan's VAE adds it too).
    At weight 0 LPIPS is not computed and the loss and aux are exactly the L1 + KL ones. ``mse_weight``
    adds the mean squared error (L1's gradient does not shrink with the error, MSE's does: +0.35 dB
    on a short CPU fit); ``anchor_weight`` the ``temporal_anchor_loss`` of multi-frame clips.
    """
    if lpips_weight > 0 and lpips is None:
        raise ValueError(f"vae_loss: lpips_weight={lpips_weight} needs an LPIPS (director_jax.models.lpips.LPIPS).")
    mean, logvar = vae.encode(video)
    if sample:
        if key.ndim == 1:
            z = jax.vmap(lambda m, lv, k: sample_posterior(m[None], lv[None], k)[0])(mean, logvar, key)
        else:
            z = sample_posterior(mean, logvar, key)
    else:
        z = mean
    recon = vae.decode(z, clip=False)
    l1 = jnp.mean(jnp.abs(recon - video))
    kl = jnp.mean(kl_divergence(mean, logvar))
    loss, aux = l1 + kl_weight * kl, {"l1": l1, "kl": kl}
    if lpips_weight > 0:
        aux["lpips"] = jnp.mean(lpips.video(recon, video))
        loss = loss + lpips_weight * aux["lpips"]
    if mse_weight > 0:
        aux["mse"] = jnp.mean(jnp.square(recon - video))
        loss = loss + mse_weight * aux["mse"]
    if anchor_weight > 0 and video.shape[1] > 1:
        aux["anchor"] = temporal_anchor_loss(vae, video, mean)
        loss = loss + anchor_weight * aux["anchor"]
    return loss, aux


def temporal_anchor_loss(vae: WanVAE, video: jax.Array, mean: jax.Array) -> jax.Array:
    """Relative squared distance of each later latent of ``video`` to the image latent of its newest frame.

    Keyframes enter Director-Gen as single-frame (image) latents, the frames between them as 4-frame
    latents; when the 4-frame latents of a clip stay close to the image latents of their frames,
    Gen can carry a keyframe's content to its neighbours by copying. The image latents (each frame
    encoded alone) are the fixed target (no gradient); the distance is divided by their mean square
    so the encoder cannot shrink it by shrinking every latent.
    """
    factor = 2 ** sum(vae.config.temperal_downsample)
    b, t = video.shape[:2]
    frames = video[:, factor::factor]  # latent k >= 1 covers frames factor*(k-1)+1 .. factor*k
    k = frames.shape[1]
    image, _ = vae.encode(frames.reshape(b * k, 1, *frames.shape[2:]))
    image = jax.lax.stop_gradient(image.reshape(b, k, *image.shape[2:]))
    return jnp.mean(jnp.square(mean[:, 1:1 + k] - image)) / (jnp.mean(jnp.square(image)) + 1e-6)


_KEYFRAME_DROP_TAG = 0x4B44  # folds the keyframe-dropout draw out of the step key, apart from the flow draws


def drop_keyframes(given: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Keyframe dropout: each row's given frames all become generated frames with probability ``rate``.

    The model then also learns the timeline without its keyframes, the unconditional branch that
    keyframe guidance (``diffusion.keyframe_guided_velocity``) steers away from. ``key`` is one key
    or one per example (B,), as ``_flow_loss`` takes it; the draw is folded out of it.
    """
    given = jnp.asarray(given, bool)
    if rate <= 0.0:
        return given
    if key.ndim == 1:
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _KEYFRAME_DROP_TAG)))(key)
    else:
        u = jax.random.uniform(jax.random.fold_in(key, _KEYFRAME_DROP_TAG), (given.shape[0],))
    return given & (u >= rate)[:, None]


def _flow_loss(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array, given: jax.Array,
               key: jax.Array, *, timestep_sampling: str, logit_mean: float, logit_std: float, shift: float,
               valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow matching on the generated frames of a timeline, given frames clean; shared by Gen and SR.

    ``velocity_fn(x_t, sigma_frames)`` is the model with its conditioning bound. One flow time per
    sample is drawn (logit-normal or uniform, then shifted) and shared by all its generated frames,
    as in Wan's training. ``key`` is one key, or one key per example (B,), which the trainer uses
    so micro-batching does not change the draws. ``valid`` (B, L) bool: each row's real latent frames
    (rows padded to one length); padding is out of the loss.
    """
    given = jnp.asarray(given, bool)
    if given.shape != latents.shape[:2]:
        raise ValueError(f"given has shape {given.shape}; it needs one bool per latent frame, shape "
                         f"{latents.shape[:2]}.")
    def draw(k, rows, shape):
        k_time, k_noise = jax.random.split(k)
        t = sample_timesteps(k_time, rows, kind=timestep_sampling, mean=logit_mean, std=logit_std, shift=shift)
        return t, jax.random.normal(k_noise, shape, jnp.float32)

    def draw_example(k):
        # one noise key per latent frame: a row padded to more frames draws the same noise on its own ones
        k_time, k_noise = jax.random.split(k)
        t = sample_timesteps(k_time, 1, kind=timestep_sampling, mean=logit_mean, std=logit_std, shift=shift)
        frames = jnp.arange(latents.shape[1])
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), latents.shape[2:]))(frames)
        return t, noise

    if key.ndim == 1:  # one key per example
        t, noise = jax.vmap(draw_example)(key)
        t = t[:, 0]
    else:
        t, noise = draw(key, latents.shape[0], latents.shape)
    sigma_frames = jnp.where(given, 0.0, t[:, None])
    x_t = noisy_latents(latents, noise, sigma_frames)
    velocity = velocity_fn(x_t, sigma_frames)
    generated = ~given if valid is None else ~given & jnp.asarray(valid, bool)
    loss = flow_matching_loss(velocity, velocity_target(latents, noise), generated)
    return loss, {"flow_mse": loss, "t_mean": jnp.mean(t)}


def _valid_frames(valid: jax.Array | None) -> jax.Array | None:
    """(B, L) prefix mask -> (B,) counts, the models' ``valid_frames``."""
    return None if valid is None else jnp.sum(jnp.asarray(valid, jnp.int32), axis=1)


def gen_loss(gen: DirectorGen, latents: jax.Array, given: jax.Array, positions: jax.Array, text: jax.Array,
             key: jax.Array, *, text_mask: jax.Array | None = None, timestep_sampling: str = "logit_normal",
             logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss of Director-Gen on one batch of timelines.

    ``latents`` (B, L, h, w, C): clean normalized chunk latents; ``given`` (B, L) bool: keyframe /
    video frames, which stay clean (sigma 0) and are left out of the loss; ``positions`` (L,) or
    (B, L): MC-RoPE positions. ``key``: one key or one per example (see ``_flow_loss``). ``valid``
    (B, L) bool: real latent frames of rows padded to one length (a prefix of each row).
    """
    valid_frames = _valid_frames(valid)

    def velocity(x_t, sigma_frames):
        return gen(x_t, sigma_frames, text, positions=positions, text_mask=text_mask, valid_frames=valid_frames)

    return _flow_loss(velocity, latents, given, key, timestep_sampling=timestep_sampling, logit_mean=logit_mean,
                      logit_std=logit_std, shift=shift, valid=valid)


def sr_loss(sr: DirectorSR, latents: jax.Array, lowres_latents: jax.Array, given: jax.Array, positions: jax.Array,
            text: jax.Array, key: jax.Array, *, text_mask: jax.Array | None = None,
            timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
            shift: float = 1.0, valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss of Director-SR: ``gen_loss`` with the low-res latents as a second input.

    ``latents`` (B, L, h, w, z): the high-res clip's normalized chunk latents, the target;
    ``lowres_latents`` (same shape): the degraded, bicubic-upsampled clip's latents over the same
    layout, never noised (they condition every frame); ``given`` (B, L): high-res keyframe latents
    held clean and left out of the loss (per example, so keyframe dropout can turn them off);
    ``valid`` as for ``gen_loss``.
    """
    valid_frames = _valid_frames(valid)

    def velocity(x_t, sigma_frames):
        return sr(x_t, lowres_latents, sigma_frames, text, positions=positions, text_mask=text_mask,
                  valid_frames=valid_frames)

    loss, aux = _flow_loss(velocity, latents, given, key, timestep_sampling=timestep_sampling,
                           logit_mean=logit_mean, logit_std=logit_std, shift=shift, valid=valid)
    return loss, {**aux, "keyframes_given": jnp.mean(jnp.any(jnp.asarray(given, bool), axis=1).astype(jnp.float32))}
