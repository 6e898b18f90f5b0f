"""Independent PyTorch references (diffusers) shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan

from director_jax.models.vae import WanVAEConfig

_attention_forward = autoencoder_kl_wan.WanAttentionBlock.forward


def _attention_forward_accepting_cache(self, x, feat_cache=None, feat_idx=None, **_):
    # diffusers 0.42.1's encoder passes feat_cache/feat_idx to every down block, but
    # WanAttentionBlock.forward takes only x (a crash whenever attn_scales is non-empty). Per-frame
    # attention needs no cache, so letting the arguments through leaves the reference math unchanged.
    return _attention_forward(self, x)


autoencoder_kl_wan.WanAttentionBlock.forward = _attention_forward_accepting_cache


def reference_vae(cfg: WanVAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """A diffusers AutoencoderKLWan with random weights (norm gains perturbed away from 1)."""
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def to_torch_video(x: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, C) NumPy -> (B, C, T, H, W) torch."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def from_torch_video(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def reference_encode(model: AutoencoderKLWan, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = model.encode(to_torch_video(video)).latent_dist
    return from_torch_video(dist.mean), from_torch_video(dist.logvar)


@torch.no_grad()
def reference_decode(model: AutoencoderKLWan, z: np.ndarray) -> np.ndarray:
    return from_torch_video(model.decode(to_torch_video(z)).sample)


def reference_transformer(cfg, seed: int = 0):
    """A diffusers WanTransformer3DModel with every parameter random (norm gains and biases too)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def reference_transformer_forward(model, latents: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Channels-last latents (B, F, h, w, C) through the diffusers DiT; returns channels-last."""
    out = model(to_torch_video(latents), timestep=torch.from_numpy(np.asarray(timestep)),
                encoder_hidden_states=torch.from_numpy(np.asarray(text)), return_dict=False)[0]
    return from_torch_video(out)
