"""Director-Gen in PyTorch from exported weights: the JAX ``pipeline.gen.generate_video`` step for step.

Inputs are what ``export_vae`` / ``export_transformer`` write (a diffusers ``AutoencoderKLWan``
directory and a Wan transformer directory, loaded as ``DirectorWanTransformer3DModel`` for MC-RoPE
and per-frame timesteps), the timeline layout (``models.timeline.TimelineLayout``: plain NumPy
metadata), the given frames, text embeddings and the initial noise. The run mirrors the JAX code:

1. **Encode** (``encode_timeline``): every chunk of the layout is cut from the video, padded to
   4n+1 by repeating its last frame, and encoded on its own (chunks of equal padded length in one
   batch); the posterior means are laid end to end and normalized with the VAE config's
   ``latents_mean`` / ``latents_std``.
2. **Sample** (``diffusion.samplers.sample``): diffusers' ``FlowMatchEulerDiscreteScheduler`` or
   ``UniPCMultistepScheduler`` (flow sigmas, bh2, order 2, lower order final: the tables the JAX
   samplers reproduce); given latent frames are written into the sample before every model call
   and after every step, their flow time is 0; CFG ``v_u + s (v_c - v_u)`` with a negative caption.
3. **Decode** (``decode_timeline``): each chunk's latents decoded, padding frames dropped.

The noise is taken from the caller (``noise`` channels-last (B, L, h, w, z), as the JAX side draws
it); ``jax_noise`` draws exactly the tensor ``generate_latents`` draws for a key, so both frameworks
start from the same sample. Tensors at the API are channels-last NumPy, as in the JAX pipeline.

The command line over this, ``python -m director_jax.pytorch``, is in ``pytorch/__main__.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from director_jax.diffusion.diffusers_schedulers import scheduler_config
from director_jax.models.timeline import TimelineLayout

NUM_TRAIN_TIMESTEPS = 1000


def jax_noise(key: Any, shape: Sequence[int]) -> np.ndarray:
    """The initial noise ``pipeline.gen.generate_latents`` draws for ``key`` (an int seed or a JAX key)."""
    import jax

    if isinstance(key, int | np.integer):
        key = jax.random.key(int(key))
    return np.asarray(jax.random.normal(key, tuple(shape), np.float32))


def noise_shape(layout: TimelineLayout, batch: int, height: int, width: int, z_dim: int,
                spatial_factor: int = 8) -> tuple[int, ...]:
    """(B, L, h, w, z) latents for ``batch`` videos of ``height`` x ``width`` pixels (Wan2.1's VAE: 8x)."""
    return (batch, layout.num_latents, height // spatial_factor, width // spatial_factor, z_dim)


def _to_torch(x: Any, device: Any = None):
    """Channels-last (B, F, H, W, C) -> diffusers' (B, C, F, H, W) float32."""
    import torch

    t = x if torch.is_tensor(x) else torch.from_numpy(np.array(x, np.float32))
    return t.to(device=device, dtype=torch.float32).permute(0, 4, 1, 2, 3).contiguous()


def _from_torch(x) -> np.ndarray:
    return x.detach().float().permute(0, 2, 3, 4, 1).cpu().numpy()


@dataclasses.dataclass
class TorchDirectorPipeline:
    """The PyTorch Director-Gen pipeline: a diffusers ``AutoencoderKLWan`` and a ``DirectorWanTransformer3DModel``."""

    vae: Any
    transformer: Any
    device: Any = "cpu"
    # False: diffusers' integer RoPE positions 0..L-1 (plain WanTransformer3DModel behaviour). Only
    # for showing that MC-RoPE matters: the JAX model uses the layout's fractional positions.
    mc_rope: bool = True

    @classmethod
    def from_pretrained(cls, vae_dir: str | os.PathLike, transformer_dir: str | os.PathLike, *,
                        device: Any = "cpu", mc_rope: bool = True) -> TorchDirectorPipeline:
        from diffusers import AutoencoderKLWan

        from director_jax.pytorch.modules import DirectorWanTransformer3DModel

        vae = AutoencoderKLWan.from_pretrained(os.fspath(vae_dir)).to(device).eval()
        transformer = DirectorWanTransformer3DModel.from_pretrained(os.fspath(transformer_dir)).to(device).eval()
        return cls(vae, transformer, device, mc_rope)

    # -- the VAE side: multi-chunk encode / decode ---------------------------------------------------

    def _latent_stats(self):
        import torch

        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode_timeline(self, video: np.ndarray, layout: TimelineLayout) -> np.ndarray:
        """(B, T, H, W, 3) in [-1, 1] -> normalized posterior-mean latents (B, L, h, w, z) (``timeline_latents``)."""
        import torch

        video = np.asarray(video, np.float32)
        if video.ndim != 5 or video.shape[1] != layout.timeline.num_frames:
            raise ValueError(f"video must be (B, {layout.timeline.num_frames}, H, W, C) for this timeline; got "
                             f"{video.shape}.")
        b = video.shape[0]
        means: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for length, chunks in layout.chunks_by_padded_length().items():
                clips = []
                for c in chunks:
                    clip = video[:, c.start:c.end]
                    if clip.shape[1] < length:  # pad to 4n+1 by repeating the last frame (pad_to_length)
                        clip = np.concatenate([clip, np.repeat(clip[:, -1:], length - clip.shape[1], axis=1)], 1)
                    clips.append(clip)
                mean = self.vae.encode(_to_torch(np.concatenate(clips, 0), self.device)).latent_dist.mean
                for k, c in enumerate(chunks):
                    means[c.index] = mean[k * b:(k + 1) * b]
            raw = torch.cat([means[c.index] for c in layout.chunks], dim=2)
            lat_mean, lat_std = self._latent_stats()
            return _from_torch((raw - lat_mean) / lat_std)

    def decode_timeline(self, latents: np.ndarray, layout: TimelineLayout) -> np.ndarray:
        """Normalized latents (B, L, h, w, z) -> video (B, T, H, W, 3) in [-1, 1], chunk padding dropped."""
        import torch

        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5 or latents.shape[1] != layout.num_latents:
            raise ValueError(f"latents must be (B, {layout.num_latents}, h, w, z) for this timeline; got "
                             f"{latents.shape}.")
        b = latents.shape[0]
        lat_mean, lat_std = self._latent_stats()
        z = _to_torch(latents, self.device) * lat_std + lat_mean
        frames: dict[int, np.ndarray] = {}
        with torch.no_grad():
            for _, chunks in layout.chunks_by_padded_length().items():
                batch = torch.cat([z[:, :, c.latent_offset:c.latent_offset + c.num_latents] for c in chunks], 0)
                decoded = _from_torch(self.vae.decode(batch).sample)
                for k, c in enumerate(chunks):
                    frames[c.index] = decoded[k * b:(k + 1) * b, :c.length]
        return np.concatenate([frames[c.index] for c in layout.chunks], axis=1)

    # -- the sampler ---------------------------------------------------------------------------------

    @staticmethod
    def scheduler(sampler: str, shift: float):
        """diffusers' scheduler whose sigma table is ``diffusion.samplers.sampler_sigmas(sampler, steps, shift)``."""
        import diffusers

        config = dict(scheduler_config(sampler, shift))
        return getattr(diffusers, config.pop("_class_name")).from_config(config)

    def sample(self, layout: TimelineLayout, given_latents: np.ndarray, text: np.ndarray, noise: np.ndarray, *,
               text_mask: np.ndarray | None = None, negative_text: np.ndarray | None = None,
               negative_mask: np.ndarray | None = None, steps: int = 50, sampler: str = "unipc",
               shift: float = 5.0, guidance_scale: float = 1.0, keyframe_guidance: float = 1.0,
               lowres_latents: np.ndarray | None = None) -> np.ndarray:
        """``generate_latents`` with the noise given: normalized latents (B, L, h, w, z), given frames exact.

        ``keyframe_guidance`` as ``diffusion.keyframe_guided_velocity``: a second pass with the given
        frames released to the current sigma from their share of ``noise``. ``lowres_latents`` (same
        shape): Director-SR's sampling (``pipeline.sr_sampling.sample_sr``), the transformer an SR one.
        """
        import torch

        noise = np.asarray(noise, np.float32)
        given_latents = np.asarray(given_latents, np.float32)
        if noise.shape != given_latents.shape or noise.shape[1] != layout.num_latents:
            raise ValueError(f"noise {noise.shape} and given latents {given_latents.shape} must both be "
                             f"(B, {layout.num_latents}, h, w, z) for this timeline.")
        if guidance_scale != 1.0 and negative_text is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_text (the negative caption's "
                             "embeddings); pass it or use guidance_scale=1.0.")
        dev = self.device
        b = noise.shape[0]
        given = torch.as_tensor(np.broadcast_to(layout.given, (b, layout.num_latents)).copy(), device=dev)
        mask5 = given[:, None, :, None, None]  # (B, 1, L, 1, 1) for channels-first latents
        given_t = _to_torch(given_latents, dev)
        positions = (np.asarray(layout.position, np.float32) if self.mc_rope
                     else np.arange(layout.num_latents, dtype=np.float32))

        def text_pair(t, m):
            t = torch.as_tensor(np.asarray(t, np.float32), device=dev)
            m = torch.ones(t.shape[:2], dtype=torch.bool, device=dev) if m is None else torch.as_tensor(
                np.asarray(m, bool), device=dev)
            return t, m

        cond = text_pair(text, text_mask)
        if guidance_scale != 1.0:
            uncond = text_pair(negative_text, negative_mask)
            cond = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))

        scheduler = self.scheduler(sampler, shift)
        scheduler.set_timesteps(steps, device=dev)
        sigmas = scheduler.sigmas.to(torch.float32)

        def impose(x):
            return torch.where(mask5, given_t, x)

        noise_t = _to_torch(noise, dev)

        lowres = None if lowres_latents is None else _to_torch(lowres_latents, dev)

        def forward(x, sigma_frames):
            if lowres is None:
                return self.transformer.gen_forward(x, sigma_frames, cond[0], positions=positions, text_mask=cond[1])
            low = lowres if x.shape[0] == lowres.shape[0] else torch.cat([lowres] * (x.shape[0] // lowres.shape[0]))
            return self.transformer.sr_forward(x, low, sigma_frames, cond[0], positions=positions, text_mask=cond[1])

        def velocity(x, sigma_frames):
            if guidance_scale == 1.0:
                return forward(x, sigma_frames).float()
            both = forward(torch.cat([x, x]), torch.cat([sigma_frames, sigma_frames])).float()
            v_c, v_u = both.chunk(2, dim=0)
            return v_u + guidance_scale * (v_c - v_u)

        x = impose(noise_t)
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                sigma = sigmas[i]
                v = velocity(x, torch.where(given, 0.0, sigma).to(torch.float32))
                if keyframe_guidance != 1.0:  # the given frames released to this sigma, as if generated
                    free = torch.where(mask5, (1.0 - sigma) * given_t + sigma * noise_t, x)
                    v_free = velocity(free, torch.full(given.shape, float(sigma), dtype=torch.float32, device=dev))
                    v = v_free + keyframe_guidance * (v - v_free)
                x = impose(scheduler.step(v, t, x, return_dict=False)[0].float())
        return _from_torch(x)

    def __call__(self, layout: TimelineLayout, given_video: np.ndarray, text: np.ndarray, noise: np.ndarray,
                 **sampling: Any) -> tuple[np.ndarray, np.ndarray]:
        """Given frames in a (B, T, H, W, 3) video -> (video in [-1, 1], normalized latents): ``generate_video``."""
        given_latents = self.encode_timeline(given_video, layout)
        latents = self.sample(layout, given_latents, text, noise, **sampling)
        return self.decode_timeline(latents, layout), latents


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """PSNR in dB between two videos in [-1, 1] (``data_range`` 2); inf when equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)
