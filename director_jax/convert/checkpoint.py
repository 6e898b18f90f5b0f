"""Finding weights and their config in whatever a user hands over, for any of the models.

Sources every loader takes:

* a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or a
  sharded index), or a diffusers pipeline directory with the model's subfolder (``vae/``,
  ``transformer/``);
* a single weight file (``.safetensors``, a ``.safetensors.index.json``, ``.pth``) in the diffusers
  layout or in the official Wan2.1 layout;
* an in-memory state dict (name -> NumPy array / torch tensor / jax array), with a config.

The layout is detected from the key names. Every tensor must be floating point, and finite unless
``allow_nonfinite`` (``state_dict.check_weight_values``): a NaN or infinite weight never loads
silently. A model plugs in through a ``ModelFormat``: its diffusers class, pipeline subfolder,
config parsing and official-layout rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.convert.state_dict import check_weight_values, read_diffusers_dir, read_state_dict, to_numpy

LAYOUT_NAMES = {"diffusers": "diffusers layout", "official": "official Wan2.1 layout"}


@dataclasses.dataclass(frozen=True)
class ModelFormat:
    """How one model's checkpoints look (see the module docstring)."""

    name: str  # for messages: "VAE", "transformer"
    diffusers_class: str
    pipeline_subfolder: str
    config_type: type
    # diffusers config dict -> config; validates and rejects unsupported variants
    parse_config: Callable[[Mapping[str, Any]], Any]
    looks_official: Callable[[Mapping[str, np.ndarray]], bool]
    # (official state dict, official config.json dict beside the file or None) -> config
    official_config: Callable[[Mapping[str, np.ndarray], Mapping[str, Any] | None], Any]
    # keys of a diffusers config.json that are not config fields but are fine to see
    extra_config_keys: frozenset[str] = frozenset()
    # state-dict key prefixes some exporters add (e.g. ComfyUI's "model.diffusion_model.")
    strip_prefixes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Weights as read from a source (not yet checked against a model) and the config for them."""

    config: Any
    state: Mapping[str, np.ndarray]
    layout: str  # "diffusers" or "official"
    source: str  # where the weights came from, for messages

    def describe(self) -> str:
        return f"{LAYOUT_NAMES[self.layout]}, from {self.source}"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from e


def check_class_name(fmt: ModelFormat, config: Mapping[str, Any], where: str) -> None:
    name = config.get("_class_name")
    if name is not None and name != fmt.diffusers_class:
        raise ValueError(f"{where} is for a {name}, not a {fmt.diffusers_class} (the Wan2.1 {fmt.name}).")


def parse_config(fmt: ModelFormat, config: Any) -> Any:
    """A config from a config object, a diffusers config dict, or a path to a config.json."""
    if isinstance(config, fmt.config_type):
        return config
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        config = _read_json(path)
        if not isinstance(config, Mapping):
            raise ValueError(f"config file {path} must hold a JSON object, not {type(config).__name__}.")
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a {fmt.config_type.__name__}, a dict or a config.json path; "
                        f"got {type(config).__name__}.")
    check_class_name(fmt, config, "the config")
    fields = {f.name for f in dataclasses.fields(fmt.config_type)}
    unknown = sorted(k for k in config if k not in fields and k not in fmt.extra_config_keys and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown {fmt.name} config keys {unknown}; the keys are diffusers' {fmt.diffusers_class} "
                         f"arguments: {sorted(fields)}.")
    return fmt.parse_config(dict(config))


def _strip(fmt: ModelFormat, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        for prefix in fmt.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def _layout(fmt: ModelFormat, state: Mapping[str, np.ndarray]) -> str:
    return "official" if fmt.looks_official(state) else "diffusers"


def read_checkpoint(fmt: ModelFormat, src: str | os.PathLike | Mapping[str, Any], config: Any = None, *,
                    allow_nonfinite: bool = False) -> Checkpoint:
    """Reads weights and finds their config; ``config``, when given, wins over any found with them.

    Every tensor must be floating point and, unless ``allow_nonfinite``, finite (a ValueError names the
    first that is not).

    For a bare weight file with no ``config``: an official-layout file's config comes from its
    shapes (and an official ``config.json`` beside it, when there is one); a diffusers-layout file
    takes the diffusers ``config.json`` beside it.
    """
    cfg = parse_config(fmt, config) if config is not None else None
    if isinstance(src, Mapping):
        state = _strip(fmt, {str(k): to_numpy(v) for k, v in src.items()})
        check_weight_values(state, "a state dict", allow_nonfinite=allow_nonfinite)
        layout = _layout(fmt, state)
        if cfg is None and layout == "official":
            cfg = fmt.official_config(state, None)
        if cfg is None:
            raise ValueError(f"a diffusers-layout state dict carries no config: pass config= (a "
                             f"{fmt.config_type.__name__}, a diffusers config dict, or a config.json path).")
        return Checkpoint(cfg, state, layout, "a state dict")

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        directory = path
        sub = directory / fmt.pipeline_subfolder
        if not (directory / "config.json").exists() and (sub / "config.json").exists():
            directory = sub  # a diffusers pipeline directory
        dir_config, state = read_diffusers_dir(directory)
        state = _strip(fmt, state)
        check_weight_values(state, f"directory {directory}", allow_nonfinite=allow_nonfinite)
        layout = _layout(fmt, state)
        if layout == "official":  # e.g. the released Wan2.1 repo: official names, official config.json
            cfg = cfg or fmt.official_config(state, dir_config)
        else:
            check_class_name(fmt, dir_config, str(directory / "config.json"))
            cfg = cfg or fmt.parse_config(dir_config)
        return Checkpoint(cfg, state, layout, f"directory {directory}")

    state = _strip(fmt, read_state_dict(path))
    source = f"{path.suffix or 'weight'} file {path}"
    check_weight_values(state, source, allow_nonfinite=allow_nonfinite)
    layout = _layout(fmt, state)
    if cfg is None:
        beside = path.parent / "config.json"
        beside_config = _read_json(beside) if beside.exists() else None
        if layout == "official":
            cfg = fmt.official_config(state, beside_config)
        elif beside_config is not None:
            cfg = parse_config(fmt, beside)
        else:
            raise ValueError(f"{path} holds diffusers-layout weights but no config: pass the config "
                             "(config= / --config), or put the model's config.json next to the file.")
    return Checkpoint(cfg, state, layout, source)
