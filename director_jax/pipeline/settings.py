"""What a sampling run needs besides the models, resolved once for ``generate`` and ``evaluate`` alike.

``SamplingSettings`` are the sampler, steps, shift and guidance scales: the model config's
``sampler`` section, with any value the user gave instead. ``TextInputs`` are the caption
embeddings of each row, computed by the umT5 encoder in JAX (``pipeline.text_encoder``) or read
from a text-embedding cache, or the trainer's empty caption for a model trained without captions
(``text.conditioning = False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from director_jax.data.text_embeddings import load_text_embeddings
from director_jax.diffusion.samplers import SAMPLERS
from director_jax.errors import UserError

EMBED_COMMAND = "python -m director_jax.embed_text --captions FILE --cache DIR"
MAX_STEPS = 10_000  # sampler steps; more is a typo (and the sigma tables grow with them)
MAX_GUIDANCE = 100.0  # guidance scales beyond this only overflow the velocities


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    sampler: str
    steps: int
    shift: float
    guidance_scale: float
    keyframe_guidance: float = 1.0


def sampling_settings(model_cfg: ml_collections.ConfigDict, *, sampler: str | None = None, steps: int | None = None,
                      shift: float | None = None, guidance_scale: float | None = None,
                      keyframe_guidance: float | None = None) -> SamplingSettings:
    """The model config's ``sampler`` section, each field replaced by the value given (``None``: the config's)."""
    m = model_cfg.sampler

    def pick(value, fallback):
        return fallback if value is None else value

    name = str(pick(sampler, m.name))
    if name not in SAMPLERS:
        raise UserError(f"sampler={name!r} is not a sampler: choose one of {', '.join(SAMPLERS)}.")
    raw_steps = pick(steps, m.steps)
    whole = isinstance(raw_steps, int | np.integer) or (isinstance(raw_steps, float) and raw_steps.is_integer())
    if isinstance(raw_steps, bool) or not whole:
        raise UserError(f"steps={raw_steps!r}: give a whole number of sampler steps.")
    n = int(raw_steps)
    if not 1 <= n <= MAX_STEPS:
        raise UserError(f"steps={n}: sample with 1 to {MAX_STEPS} steps.")
    values = {}
    for field, value in (("shift", pick(shift, m.shift)), ("guidance_scale", pick(guidance_scale, m.guidance_scale)),
                         ("keyframe_guidance", pick(keyframe_guidance, m.get("keyframe_guidance", 1.0)))):
        try:
            values[field] = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{field}={value!r}: give a number.") from None
        if not np.isfinite(values[field]):
            raise UserError(f"{field}={value}: give a finite number (guidance scales: 1 = off).")
    if not values["shift"] > 0:
        raise UserError(f"shift={values['shift']:g}: the timestep shift is a positive number (1 = no shift).")
    for field in ("guidance_scale", "keyframe_guidance"):
        if not 0 <= values[field] <= MAX_GUIDANCE:
            raise UserError(f"{field}={values[field]:g}: give a scale from 0 to {MAX_GUIDANCE:g} (1 = off).")
    return SamplingSettings(sampler=name, steps=n, **values)


@dataclasses.dataclass(frozen=True)
class TextInputs:
    """Caption embeddings per row (B, Lt, D) + masks, and the negative caption's (1, Lt, D) for guidance."""

    text: np.ndarray
    mask: np.ndarray
    negative: np.ndarray | None = None
    negative_mask: np.ndarray | None = None


def text_inputs(model_cfg: ml_collections.ConfigDict, captions: Sequence[str | None], *, text_cache: str | None,
                guidance_scale: float, cache_setting: str = "--config.text_cache",
                text_encoder: Any = None) -> TextInputs:
    """Embeddings of ``captions`` (one row each), or the empty caption for unconditional models.

    ``text_encoder`` (a ``pipeline.text_encoder.JaxTextEncoder``) computes them; without it they are read
    from ``text_cache``. The negative caption (``sampler.negative_prompt``) is embedded only when
    classifier-free guidance is on; ``cache_setting`` is how the caller's user sets the cache (named in the
    error when neither is given).
    """
    n, dim = len(captions), int(model_cfg.model.text_dim)
    if not model_cfg.text.conditioning:
        empty, empty_mask = np.zeros((1, 1, dim), np.float32), np.zeros((1, 1), bool)
        return TextInputs(np.repeat(empty, n, 0), np.repeat(empty_mask, n, 0),
                          *((empty, empty_mask) if guidance_scale != 1.0 else (None, None)))
    missing = [i for i, c in enumerate(captions) if not c]
    if missing:
        raise UserError(f"the model is text-conditioned but {len(missing)} of {n} rows have no caption (first: row "
                        f"{missing[0]}): give a caption for each.")
    length = int(model_cfg.text.max_length)
    negative_prompt = [str(model_cfg.sampler.negative_prompt)]
    if text_encoder is not None:
        if text_encoder.dim != dim or text_encoder.max_length != length:
            raise UserError(f"the text encoder gives {text_encoder.max_length} x {text_encoder.dim} embeddings, the "
                            f"model reads text.max_length={length} x model.text_dim={dim}: pass the umT5 encoder "
                            "the model was trained with.")
        text, mask = text_encoder.encode(list(captions))
        negative = text_encoder.encode(negative_prompt) if guidance_scale != 1.0 else (None, None)
        return TextInputs(text, mask, *negative)
    if not text_cache:
        raise UserError(f"the model is text-conditioned: set {cache_setting} to a text-embedding cache holding the "
                        f"captions ({EMBED_COMMAND}).")
    try:
        text, mask = load_text_embeddings(text_cache, list(captions), max_length=length)
        negative = negative_mask = None
        if guidance_scale != 1.0:
            negative, negative_mask = load_text_embeddings(text_cache, negative_prompt, max_length=length)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return TextInputs(text, mask, negative, negative_mask)
