"""PyTorch twins of Director-Gen and Director-SR, on diffusers' ``WanTransformer3DModel``.

A Director export (``export_transformer(gen.dit, dir)`` / ``export_sr(sr, dir)``) is a plain diffusers
Wan transformer directory, but running it as the JAX model does needs two things diffusers' forward
lacks: **MC-RoPE**, real-valued temporal RoPE positions (a keyframe at pixel frame 13 sits at 3.25;
diffusers builds its RoPE from integer frame indices), and **per-frame timesteps** (the clean
keyframe frames at 0). ``DirectorWanTransformer3DModel`` is diffusers' class with the same modules,
parameter names and config (so ``from_pretrained`` loads the export directly) and a forward that
takes ``positions`` and per-frame timesteps (expanded to diffusers' per-token form). Integer
positions 0..F-1 give diffusers' own forward.

This module imports torch: it is for users taking checkpoints to PyTorch and for the parity tests;
nothing in the JAX training or inference path imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401 -- ModelMixin: see below
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from director_jax.convert.dit_weights import diffusers_param_table
from director_jax.convert.param_table import export_state_dict
from director_jax.models.layers import rope_axis_dims, rope_inverse_frequencies

# A pipeline's model_index.json names components as [module, class]; diffusers picks the loader by looking up its
# base classes (ModelMixin, ...) as attributes of that module, so ModelMixin is importable from here.
__all__ = ["DirectorWanTransformer3DModel", "ModelMixin"]

NUM_TRAIN_TIMESTEPS = 1000  # the DiT's timestep = 1000 * flow time sigma, as in the JAX models


def mc_rope(positions: torch.Tensor, height: int, width: int, head_dim: int,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-RoPE (cos, sin), each (B, F*height*width, 1, head_dim) float32, in diffusers' interleaved form.

    ``positions`` (B, F) are real temporal positions; height and width positions are the integer
    token grid. The split of head_dim among (time, height, width), the frequencies theta^(-2i/d)
    and the token order (f, h, w) are ``director_jax.models.layers.rope_angles``'; each angle is
    repeated for its channel pair, which is the layout diffusers' ``WanAttnProcessor`` reads
    (``cos[..., 0::2]``, ``sin[..., 1::2]``). Angles are computed in float64, as diffusers builds its
    integer tables, then cos / sin cast to float32.
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    device = positions.device
    inv = [torch.from_numpy(rope_inverse_frequencies(d, theta)).to(device) for d in (t_dim, h_dim, w_dim)]
    b, f = positions.shape
    ang_t = positions.to(torch.float64)[..., None] * inv[0]  # (B, F, t_dim/2)
    ang_h = torch.arange(height, dtype=torch.float64, device=device)[:, None] * inv[1]  # (H, h_dim/2)
    ang_w = torch.arange(width, dtype=torch.float64, device=device)[:, None] * inv[2]  # (W, w_dim/2)
    grid = (b, f, height, width)
    angles = torch.cat([
        ang_t[:, :, None, None, :].expand(*grid, -1),
        ang_h[None, None, :, None, :].expand(*grid, -1),
        ang_w[None, None, None, :, :].expand(*grid, -1),
    ], dim=-1).reshape(b, f * height * width, 1, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def per_token_timesteps(timestep: torch.Tensor | float, batch: int, frames: int, tokens_per_frame: int
                        ) -> torch.Tensor:
    """(B,) stays (B,); per-frame (B, F) -> per-token (B, F * tokens_per_frame); per-token (B, S) stays."""
    t = torch.as_tensor(timestep)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim == 1 and t.shape[0] == batch:
        return t
    if t.ndim == 2 and t.shape[0] == batch:
        if t.shape[1] == frames:
            return t.repeat_interleave(tokens_per_frame, dim=1)
        if t.shape[1] == frames * tokens_per_frame:
            return t
    raise ValueError(f"timestep has shape {tuple(t.shape)}; expected ({batch},), ({batch}, {frames}) per latent frame "
                     f"or ({batch}, {frames * tokens_per_frame}) per token.")


class DirectorWanTransformer3DModel(WanTransformer3DModel):
    """diffusers' Wan T2V DiT with MC-RoPE positions and per-frame timesteps (the JAX ``WanDiT``'s forward).

    Same config, modules and parameter names as ``WanTransformer3DModel``: load a Director export
    with ``DirectorWanTransformer3DModel.from_pretrained(dir)`` or ``from_jax(model)``. Tensors are
    diffusers' channels-first (B, C, F, H, W). ``gen_forward`` / ``sr_forward`` take flow times sigma
    per latent frame as ``DirectorGen`` / ``DirectorSR`` do.
    """

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict[str, Any] | None = None, *, positions: torch.Tensor | np.ndarray | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor | Transformer2DModelOutput:
        """``timestep`` (B,), (B, F) or (B, S) on the 0..1000 scale; ``positions`` (F,) or (B, F) real
        temporal RoPE positions (default 0..F-1); ``text_mask`` (B, L) zeroes padded text embeddings.

        diffusers' arguments are kept so ``WanPipeline`` can drive it (integer positions), but image
        embeddings (Wan I2V) and attention kwargs (LoRA scale) are refused rather than ignored.
        """
        cfg = self.config
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None or encoder_hidden_states_image is not None:
            raise ValueError("Wan image-to-video inputs are not supported: Director models are text-to-video DiTs "
                             "with keyframes in the sequence.")
        if attention_kwargs:
            raise ValueError(f"attention_kwargs {sorted(attention_kwargs)} are not supported by the Director twin.")
        b, c, f, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels or f % pt or h % ph or w % pw:
            raise ValueError(f"hidden_states must be (B, {cfg.in_channels}, F, H, W) with (F, H, W) divisible by "
                             f"patch_size {tuple(cfg.patch_size)}; got {tuple(hidden_states.shape)}.")
        ppf, pph, ppw = f // pt, h // ph, w // pw
        rotary_emb = mc_rope(self._positions(positions, b, ppf, hidden_states.device), pph, ppw,
                             cfg.attention_head_dim)
        if text_mask is not None:
            mask = torch.as_tensor(text_mask, dtype=torch.bool, device=encoder_hidden_states.device)
            encoder_hidden_states = torch.where(mask[..., None], encoder_hidden_states, 0)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        timestep = per_token_timesteps(timestep, b, ppf, pph * ppw).to(hidden_states.device)
        ts_seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, context, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=ts_seq_len)
        timestep_proj = timestep_proj.unflatten(timestep_proj.ndim - 1, (6, -1))

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, timestep_proj, rotary_emb)
            else:
                x = block(x, context, timestep_proj, rotary_emb)

        if temb.ndim == 3:  # per token: (B, S, D)
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, ppf, pph, ppw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _positions(positions: Any, batch: int, frames: int, device: torch.device) -> torch.Tensor:
        if positions is None:
            return torch.arange(frames, dtype=torch.float64, device=device).expand(batch, frames)
        positions = torch.as_tensor(np.asarray(positions) if not torch.is_tensor(positions) else positions,
                                    device=device)
        if positions.ndim == 1:
            positions = positions.expand(batch, -1)
        if tuple(positions.shape) != (batch, frames):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({frames},) or ({batch}, "
                             f"{frames}): one temporal position per latent frame (after temporal patching).")
        return positions

    # -- the Director conventions: flow time sigma per latent frame, 0 on given frames -----------

    def gen_forward(self, latents: torch.Tensor, sigma_frames: torch.Tensor, text: torch.Tensor, *,
                    positions: Any, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``DirectorGen``'s forward: latents (B, C, L, h, w), sigma_frames (B, L) -> velocity (B, C, L, h, w)."""
        sigma_frames = torch.as_tensor(sigma_frames, dtype=torch.float32, device=latents.device)
        if tuple(sigma_frames.shape) != (latents.shape[0], latents.shape[2]):
            raise ValueError(f"sigma_frames has shape {tuple(sigma_frames.shape)}; it needs one flow time per latent "
                             f"frame, shape {(latents.shape[0], latents.shape[2])}.")
        return self(latents, NUM_TRAIN_TIMESTEPS * sigma_frames, text, positions=positions, text_mask=text_mask,
                    return_dict=False)[0]

    def sr_forward(self, noisy_latents: torch.Tensor, lowres_latents: torch.Tensor, sigma_frames: torch.Tensor,
                   text: torch.Tensor, *, positions: Any, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``DirectorSR``'s forward: noisy and low-res latents (B, z, L, h, w) concatenated on channels."""
        z = self.config.out_channels
        if self.config.in_channels != 2 * z:
            raise ValueError(f"sr_forward needs an SR transformer (in_channels = 2 * out_channels); this one has "
                             f"in_channels {self.config.in_channels}, out_channels {z}.")
        if noisy_latents.shape != lowres_latents.shape or noisy_latents.ndim != 5 or noisy_latents.shape[1] != z:
            raise ValueError(f"noisy and low-res latents must both be (B, {z}, L, h, w) on one grid; got "
                             f"{tuple(noisy_latents.shape)} and {tuple(lowres_latents.shape)}.")
        x = torch.cat([noisy_latents, lowres_latents.to(noisy_latents.dtype)], dim=1)
        return self.gen_forward(x, sigma_frames, text, positions=positions, text_mask=text_mask)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], config: Mapping[str, Any]) -> DirectorWanTransformer3DModel:
        """The model for a diffusers ``config`` dict with ``state`` (diffusers names) loaded strictly."""
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        missing, unexpected = model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()},
                                                    strict=False)
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the transformer: missing {sorted(missing)}, unexpected "
                             f"{sorted(unexpected)}.")
        return model.eval()

    @classmethod
    def from_jax(cls, model: Any) -> DirectorWanTransformer3DModel:
        """The PyTorch twin of a JAX ``WanDiT``, ``DirectorGen`` or ``DirectorSR`` (weights copied in float32)."""
        dit = getattr(model, "dit", model)
        state = export_state_dict(dit, diffusers_param_table(dit))
        return cls.from_state_dict(state, dit.config.to_diffusers_config())
