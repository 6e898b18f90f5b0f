"""The diffusers schedulers whose sigma tables are this project's samplers' (``diffusion.samplers``).

The PyTorch pipeline samples with them and the pipeline export writes them as ``scheduler_config.json``,
so a diffusers user's scheduler steps through the same sigmas as ``generate`` (Euler: the flow-matching
Euler scheduler with the same shift; UniPC: flow sigmas, bh2, order 2, lower order final).
"""

from __future__ import annotations

from typing import Any

NUM_TRAIN_TIMESTEPS = 1000


def scheduler_config(sampler: str, shift: float) -> dict[str, Any]:
    """The diffusers scheduler config (``_class_name`` + arguments) of a JAX sampler: the same sigma table."""
    if sampler == "euler":
        return dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                    shift=float(shift))
    if sampler == "unipc":
        return dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=float(shift), solver_order=2,
                    solver_type="bh2", lower_order_final=True)
    raise ValueError(f"unknown sampler {sampler!r}: use 'unipc' or 'euler'.")
