"""What ``python -m director_jax.convert`` does, as a function: one model's weights imported or exported.

``import`` reads any supported checkpoint (a diffusers directory, a .safetensors or .pth file in the
diffusers or official Wan2.1 layout), checks it against the model and writes this project's format:
a diffusers-layout directory. ``export`` re-writes such a directory for diffusers / PyTorch users.
``config`` is a config.json path or an inline JSON object with diffusers' keys (AutoencoderKLWan for
the VAE, WanTransformer3DModel for the transformers). ``dit`` is the Wan2.1 T2V transformer
(Director-Gen), ``sr`` the Director-SR transformer (in_channels = 2 * out_channels).

Refused as ``UserError`` (one line, nothing written): unreadable files (a truncated ``.pth``, a
malformed or truncated safetensors, an index naming shards outside its directory), tensors that
are not floating point, and NaN / infinite weights unless ``allow_nonfinite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from director_jax.convert import dit as dit_convert
from director_jax.convert import sr as sr_convert
from director_jax.convert import vae as vae_convert
from director_jax.errors import UserError

DIRECTIONS = ("import", "export")


@dataclasses.dataclass(frozen=True)
class Converter:
    """One model's weight functions: read a checkpoint, build the model from it, export, count parameters."""

    read: Callable  # (src, config, *, allow_nonfinite) -> Checkpoint
    build: Callable  # Checkpoint -> model
    export: Callable  # (model, out_dir) -> Path
    parameter_count: Callable  # model -> int


MODELS: dict[str, Converter] = {
    "vae": Converter(vae_convert.read_vae_checkpoint, vae_convert.vae_from_checkpoint, vae_convert.export_vae,
                     vae_convert.parameter_count),
    "dit": Converter(dit_convert.read_transformer_checkpoint, dit_convert.transformer_from_checkpoint,
                     dit_convert.export_transformer, dit_convert.parameter_count),
    "sr": Converter(dit_convert.read_transformer_checkpoint, sr_convert.sr_from_checkpoint, sr_convert.export_sr,
                    lambda sr: dit_convert.parameter_count(sr.dit)),
}


def parse_config_arg(text: str | None) -> dict[str, Any] | Path | None:
    """``--config``: an inline JSON object (``{...}``) or the path of a config.json file."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise UserError("--config must be a JSON object ({...}) or the path of a config.json file.")
        return config
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--config {text}: no such file (give a config.json path or an inline JSON object).")
    return path


def _writable_dir(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; give a directory to write the model into.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not a writable directory.")


def check_inputs(direction: str, model: str, src: str, out: str, config: str | None) -> dict[str, Any] | Path | None:
    """Every argument checked before any weights are read; returns the parsed ``config``."""
    if direction not in DIRECTIONS:
        raise UserError(f"unknown direction {direction!r}: give import or export.")
    if model not in MODELS:
        raise UserError(f"--model {model!r} cannot be converted; supported: {', '.join(sorted(MODELS))}.")
    if not Path(src).exists():
        raise UserError(f"--src {src} does not exist.")
    if direction == "export" and not Path(src).is_dir():
        raise UserError(f"export reads a model directory written by `import`; {src} is not a directory "
                        "(use `import` for weight files).")
    _writable_dir(out)
    return parse_config_arg(config)


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}" if e.strerror else " ".join(str(e).split())


def convert_weights(direction: str, model: str, src: str | os.PathLike, out: str | os.PathLike,
                    config: str | None = None, *, allow_nonfinite: bool = False) -> str:
    """Imports or exports ``model``'s weights from ``src`` into the directory ``out``; returns a one-line summary.

    Bad input (a missing file, weights that do not fit the model, an unreadable file) raises
    ``UserError`` with the reason; nothing is written then.
    """
    src, out = os.fspath(src), os.fspath(out)
    parsed = check_inputs(direction, model, src, out, config)
    conv = MODELS[model]
    try:
        ckpt = conv.read(src, parsed, allow_nonfinite=allow_nonfinite)
        built = conv.build(ckpt)
    except (OSError, ValueError) as e:  # WeightMismatchError is a ValueError: it names every key that does not fit
        raise UserError(str(e) if isinstance(e, ValueError) else _os_error(e)) from e
    written = conv.export(built, out)
    verb = "imported" if direction == "import" else "exported"
    tail = " (diffusers)" if direction == "export" else ""
    return f"{verb} {model}: {conv.parameter_count(built):,} parameters, {ckpt.describe()} -> {written}{tail}"
