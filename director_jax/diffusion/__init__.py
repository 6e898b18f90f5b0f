"""Flow matching for Director-Gen / Director-SR: noising, timesteps, the loss, samplers and guidance."""

from director_jax.diffusion.flow import flow_matching_loss, noisy_latents, velocity_target
from director_jax.diffusion.samplers import (
    SAMPLERS,
    UniPCSolver,
    euler_sigmas,
    euler_step,
    guided_velocity,
    keyframe_guided_velocity,
    sample,
    sampler_sigmas,
    unipc_sigmas,
)
from director_jax.diffusion.timesteps import (
    T_EPS,
    resolution_mu,
    resolution_shift,
    sample_timesteps,
    shift_sigmas,
)

__all__ = [
    "SAMPLERS",
    "T_EPS",
    "UniPCSolver",
    "euler_sigmas",
    "euler_step",
    "flow_matching_loss",
    "guided_velocity",
    "keyframe_guided_velocity",
    "noisy_latents",
    "resolution_mu",
    "resolution_shift",
    "sample",
    "sample_timesteps",
    "sampler_sigmas",
    "shift_sigmas",
    "unipc_sigmas",
    "velocity_target",
]
