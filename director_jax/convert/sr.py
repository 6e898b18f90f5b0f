"""Director-SR weights: the SR DiT is a Wan transformer with 2 z input channels, so it converts as one.

An export is a diffusers ``WanTransformer3DModel`` directory (``in_channels = 2 * out_channels``;
``pytorch.modules.DirectorWanTransformer3DModel`` runs it with MC-RoPE); loading checks that the
checkpoint really is an SR transformer before wrapping it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from director_jax.convert.checkpoint import Checkpoint
from director_jax.convert.dit import (
    ConfigLike,
    export_transformer,
    read_transformer_checkpoint,
    transformer_from_checkpoint,
)
from director_jax.models.sr import DirectorSR


def check_sr_config(ckpt: Checkpoint) -> None:
    """A ValueError unless ``ckpt`` holds an SR transformer (in_channels = 2 * out_channels)."""
    cfg = ckpt.config
    if cfg.in_channels != 2 * cfg.out_channels:
        raise ValueError(f"{ckpt.source} holds a transformer with in_channels {cfg.in_channels} and out_channels "
                         f"{cfg.out_channels}: not an SR model (in = 2 * out). To start SR from a Gen checkpoint use "
                         "DirectorSR.from_gen(load_transformer(src)).")


def sr_from_checkpoint(ckpt: Checkpoint, **kw: Any) -> DirectorSR:
    """Director-SR from a transformer checkpoint, checked to be SR (``kw``: see ``transformer_from_checkpoint``)."""
    check_sr_config(ckpt)
    return DirectorSR(transformer_from_checkpoint(ckpt, **kw))


def load_sr(src: str | os.PathLike | Mapping[str, Any], config: ConfigLike | None = None, *,
            allow_nonfinite: bool = False, **kw: Any) -> DirectorSR:
    """Director-SR from any source ``load_transformer`` reads (``kw``: dtype, param_dtype, model options)."""
    return sr_from_checkpoint(read_transformer_checkpoint(src, config, allow_nonfinite=allow_nonfinite), **kw)


def export_sr(sr: DirectorSR, out_dir: str | os.PathLike, **kw: Any) -> Path:
    """Writes ``sr`` as a diffusers transformer directory (see ``export_transformer``)."""
    return export_transformer(sr.dit, out_dir, **kw)
