"""``SmartDirectorPipeline``: Director-Gen (and Director-SR) as a diffusers ``DiffusionPipeline`` for PyTorch users.

    pipe = SmartDirectorPipeline.from_pretrained("export/pipeline")
    out = pipe({"0": "first.png", "1s": "mid.png", "#16": "last.png"}, num_frames=17, seed=0, sr=True)
    out.frames  # (T, H, W, 3) float in [0, 1]

The directory is what ``python -m director_jax.convert export --model pipeline`` writes from trainer
runs: ``model_index.json`` (the components and the run's settings: video size and fps, sampler
defaults, text conditioning), ``vae/`` (diffusers ``AutoencoderKLWan``), ``transformer/`` (a Wan
transformer loaded as ``DirectorWanTransformer3DModel``: MC-RoPE, per-frame timesteps),
``scheduler/``, and with SR ``sr_transformer/``, ``sr_scheduler/`` (``sr_vae/`` when SR encodes with
another VAE); ``text_encoder/`` + ``tokenizer/`` when exported with a umT5 encoder.

A call does what ``python -m director_jax.generate`` does, step for step, in PyTorch: keyframes at
times (seconds, ``"1.5s"``, or ``"#12"`` for a frame) set the timeline and the pacing, the run's
sampler tables (diffusers' schedulers), the same initial noise for the same ``seed`` (drawn with
JAX's generator, as the JAX pipeline draws it), and SR anchored on the full-resolution keyframes;
so the video is the JAX ``generate``'s (tests/test_smart_pipeline.py: >= 40 dB).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from diffusers import DiffusionPipeline

from director_jax.data.captions import format_multishot_caption
from director_jax.data.degradations import bicubic_upsample
from director_jax.data.prompts import prompt_clean
from director_jax.models.timeline import Timeline, TimelineLayout, place_given_frames
from director_jax.pipeline.media import read_image, resized, to_float
from director_jax.pipeline.request import frame_of
from director_jax.pytorch import modules  # noqa: F401 -- imported, so diffusers loads the components it names
from director_jax.pytorch.pipeline import TorchDirectorPipeline, _to_torch, jax_noise, noise_shape


@dataclasses.dataclass
class SmartDirectorOutput:
    """``frames`` (T, H, W, 3) in [0, 1] (SR's when asked), ``lowres`` Director-Gen's, ``settings`` what was used."""

    frames: np.ndarray
    lowres: np.ndarray
    settings: dict


def _pixels(image: Any, height: int, width: int, resize: bool, what: str) -> np.ndarray:
    """A path, PIL image or (H, W, 3) uint8 array -> uint8 pixels at height x width."""
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        return read_image(str(image), height, width, resize=resize, what=what)
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"{what}: give an image path, a PIL image or an (H, W, 3) uint8 array; got "
                         f"{pixels.dtype} {pixels.shape}.")
    if pixels.shape[:2] != (height, width):
        if not resize:
            raise ValueError(f"{what} is {pixels.shape[1]}x{pixels.shape[0]} (width x height) but the video is "
                             f"{width}x{height}: pass images of that size, or resize=True.")
        pixels = resized(pixels, height, width)
    return pixels


def _spatial_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.dim_mult) - 1)


class SmartDirectorPipeline(DiffusionPipeline):
    """Keyframes at times (+ captions) -> video, with optional Director-SR; see the module docstring."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["sr_transformer", "sr_vae", "sr_scheduler", "text_encoder", "tokenizer"]

    def __init__(self, vae: Any, transformer: Any, scheduler: Any, sr_transformer: Any = None, sr_vae: Any = None,
                 sr_scheduler: Any = None, text_encoder: Any = None, tokenizer: Any = None,
                 director_config: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, sr_transformer=sr_transformer,
                              sr_vae=sr_vae, sr_scheduler=sr_scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(director_config=dict(director_config or {}))

    @property
    def settings(self) -> dict:
        return dict(self.config.director_config)

    # -- text ----------------------------------------------------------------------------------------

    def _embed(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """umT5 embeddings as ``WanPipeline._get_t5_prompt_embeds`` makes them: (B, max_length, D) and masks."""
        import torch

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("the model is text-conditioned and this pipeline has no text encoder: pass "
                             "prompt_embeds (and negative_prompt_embeds for guidance), or export the pipeline with "
                             "--text_encoder.")
        length = int(self.settings["text_max_length"])
        inputs = self.tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        with torch.no_grad():
            hidden = self.text_encoder(inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device))
        mask = inputs.attention_mask.bool().cpu().numpy()
        return np.where(mask[..., None], hidden.last_hidden_state.float().cpu().numpy(), 0.0), mask

    def _text(self, prompt: str | None, prompt_embeds: Any, negative_prompt_embeds: Any, guidance: float,
              dim: int) -> dict[str, Any]:
        """The text arguments of the sampler: the caption's and (for guidance) the negative caption's."""
        if not self.settings.get("text_conditioning", False):
            empty, empty_mask = np.zeros((1, 1, dim), np.float32), np.zeros((1, 1), bool)
            negative = dict(negative_text=empty, negative_mask=empty_mask) if guidance != 1.0 else {}
            return dict(text=empty, text_mask=empty_mask, **negative)
        if prompt_embeds is not None:
            text = np.asarray(prompt_embeds, np.float32).reshape(1, -1, dim)
            out = dict(text=text, text_mask=np.ones(text.shape[:2], bool))
            if guidance != 1.0:
                if negative_prompt_embeds is None:
                    raise ValueError("guidance_scale != 1 with prompt_embeds needs negative_prompt_embeds.")
                neg = np.asarray(negative_prompt_embeds, np.float32).reshape(1, -1, dim)
                out.update(negative_text=neg, negative_mask=np.ones(neg.shape[:2], bool))
            return out
        if not prompt:
            raise ValueError("the model is text-conditioned: give prompt (or shot_prompts), or prompt_embeds.")
        text, mask = self._embed([prompt])
        out = dict(text=text, text_mask=mask)
        if guidance != 1.0:
            neg, neg_mask = self._embed([str(self.settings.get("negative_prompt", ""))])
            out.update(negative_text=neg, negative_mask=neg_mask)
        return out

    # -- the call ------------------------------------------------------------------------------------

    def __call__(self, keyframes: Mapping[Any, Any] | Sequence[tuple[Any, Any]], *, num_frames: int | None = None,
                 fps: float | None = None, prompt: str | None = None, shot_prompts: Sequence[str] | None = None,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 keyframe_guidance: float | None = None, seed: int = 0, sr: bool = False,
                 sr_steps: int | None = None, resize: bool = False) -> SmartDirectorOutput:
        """``keyframes``: {time: image} (or (time, image) pairs); images as paths, PIL images or uint8 arrays at
        the output size (the SR size with ``sr``). Other settings default to the exported run's."""
        cfg = self.settings
        fps = float(cfg["fps"] if fps is None else fps)
        num_frames = int(cfg["num_frames"] if num_frames is None else num_frames)
        steps = int(cfg["steps"] if num_inference_steps is None else num_inference_steps)
        guidance = float(cfg["guidance_scale"] if guidance_scale is None else guidance_scale)
        kf_guidance = float(cfg["keyframe_guidance"] if keyframe_guidance is None else keyframe_guidance)
        if sr and self.sr_transformer is None:
            raise ValueError("sr=True needs a pipeline exported with a Director-SR run (--sr_src).")
        height, width = int(cfg["height"]), int(cfg["width"])
        scale = int(cfg["sr_scale"]) if sr else 1
        pairs = list(keyframes.items()) if isinstance(keyframes, Mapping) else list(keyframes)
        if not pairs:
            raise ValueError("give at least one keyframe: {time: image}.")
        given, full_res, times = {}, {}, {}
        for when, image in pairs:
            frame = frame_of(str(when), fps, num_frames, "keyframe")
            if frame in given:
                raise ValueError(f"two keyframes at frame {frame}.")
            big = _pixels(image, height * scale, width * scale, resize, f"keyframe at {when}")
            given[frame] = to_float(resized(big, height, width) if sr else big)
            full_res[frame], times[frame] = to_float(big), str(when)
        timeline = Timeline.from_keyframes(num_frames, sorted(given))
        layout = timeline.layout
        if shot_prompts:
            prompt = format_multishot_caption(list(shot_prompts))
        text = self._text(prompt, prompt_embeds, negative_prompt_embeds, guidance, self.transformer.config.text_dim)
        gen = TorchDirectorPipeline(self.vae, self.transformer, self.device)
        noise = jax_noise(int(seed), noise_shape(layout, 1, height, width, self.vae.config.z_dim,
                                                 _spatial_factor(self.vae)))
        video, _ = gen(layout, place_given_frames(num_frames, given)[None], noise=noise, steps=steps,
                       sampler=cfg["sampler"], shift=float(cfg["shift"]), guidance_scale=guidance,
                       keyframe_guidance=kf_guidance, **text)
        lowres = np.clip(video[0], -1.0, 1.0)
        frames = self._super_resolve(lowres, full_res, layout, scale, seed, sr_steps) if sr else lowres
        settings = dict(seed=int(seed), num_frames=num_frames, fps=fps, steps=steps, guidance_scale=guidance,
                        keyframe_guidance=kf_guidance, keyframes={f: times[f] for f in sorted(times)}, sr=sr,
                        caption=prompt)
        return SmartDirectorOutput((frames + 1.0) / 2.0, (lowres + 1.0) / 2.0, settings)

    def _super_resolve(self, lowres: np.ndarray, keyframes: dict[int, np.ndarray], layout: TimelineLayout,
                       scale: int, seed: int, steps: int | None) -> np.ndarray:
        """Director-SR as ``pipeline.sr.super_resolve`` runs it: the bicubic-upsampled video's latents beside the
        noisy ones, the full-resolution keyframes held clean, SR's own noise (the seed's key folded with 1)."""
        import jax
        import torch

        cfg = self.settings
        vae = self.sr_vae if self.sr_vae is not None else self.vae
        sr = TorchDirectorPipeline(vae, self.sr_transformer, self.device)
        upsampled = bicubic_upsample(np.clip(np.rint((lowres + 1.0) * 127.5), 0, 255).astype(np.uint8), scale)
        lowres_latents = sr.encode_timeline(upsampled[None].astype(np.float32) / 127.5 - 1.0, layout)
        given = np.zeros_like(lowres_latents)
        frames = sorted(keyframes)
        images = np.stack([keyframes[f] for f in frames])[:, None]  # (K, 1, H, W, 3): each keyframe alone
        with torch.no_grad():
            mean = vae.encode(_to_torch(images, self.device)).latent_dist.mean
        lat_mean, lat_std = sr._latent_stats()
        encoded = ((mean - lat_mean) / lat_std).permute(0, 2, 3, 4, 1).cpu().numpy()[:, 0]
        mask = np.zeros(layout.num_latents, bool)
        for k, f in enumerate(frames):
            given[0, layout.latent_of_frame(f)] = encoded[k]
            mask[layout.latent_of_frame(f)] = True
        sr_layout = dataclasses.replace(layout, given=mask)
        noise = jax_noise(jax.random.fold_in(jax.random.key(int(seed)), 1), lowres_latents.shape)
        dim = self.sr_transformer.config.text_dim
        latents = sr.sample(sr_layout, given, np.zeros((1, 1, dim), np.float32), noise,
                            text_mask=np.zeros((1, 1), bool), steps=int(cfg["sr_steps"] if steps is None else steps),
                            sampler=cfg["sr_sampler"], shift=float(cfg["sr_shift"]), lowres_latents=lowres_latents)
        return np.clip(sr.decode_timeline(latents, layout)[0], -1.0, 1.0)
