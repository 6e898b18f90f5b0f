"""Flow matching: noising path, target, loss on generated frames, and timestep sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from director_jax.diffusion import (
    T_EPS,
    flow_matching_loss,
    noisy_latents,
    resolution_mu,
    resolution_shift,
    sample_timesteps,
    shift_sigmas,
    velocity_target,
)

SHAPE = (3, 4, 2, 3, 2)  # (B, T', h, w, C)


def _arrays(seed=0, shape=SHAPE):
    rng = np.random.RandomState(seed)
    return rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)


def test_noisy_latents_per_sample_and_per_frame_match_numpy():
    x0, eps = _arrays()
    t_sample = np.array([0.1, 0.5, 0.9], np.float32)
    got = noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t_sample))
    t = t_sample[:, None, None, None, None]
    np.testing.assert_allclose(got, (1 - t) * x0 + t * eps, rtol=1e-6, atol=1e-6)

    t_frame = np.random.RandomState(1).uniform(size=SHAPE[:2]).astype(np.float32)
    t_frame[:, 0] = 0.0  # a given (clean) first frame per sample
    got = np.asarray(noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t_frame)))
    t = t_frame[:, :, None, None, None]
    np.testing.assert_allclose(got, (1 - t) * x0 + t * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, 0], x0[:, 0])  # t = 0 is exactly clean

    # The velocity target is d x_t / dt of the same path.
    dt = 1e-2
    x_a = noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.full((3,), 0.3))
    x_b = noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.full((3,), 0.3 + dt))
    np.testing.assert_allclose((x_b - x_a) / dt, velocity_target(jnp.asarray(x0), jnp.asarray(eps)), atol=1e-3)
    np.testing.assert_allclose(velocity_target(jnp.asarray(x0), jnp.asarray(eps)), eps - x0, atol=1e-7)


def test_noisy_latents_rejects_bad_time_shape():
    x0, eps = _arrays()
    with pytest.raises(ValueError, match="one time per sample"):
        noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.zeros((4,)))


def _loss_reference(pred, target, mask, weights=None):
    """Per-sample MSE over generated frames, averaged over samples that have one."""
    per_frame = ((pred.astype(np.float64) - target) ** 2).reshape(*mask.shape, -1).mean(-1)
    if weights is not None:
        w = np.asarray(weights, np.float64)
        per_frame = per_frame * (w[:, None] if w.ndim == 1 else w)
    losses = [per_frame[b][mask[b]].mean() for b in range(mask.shape[0]) if mask[b].any()]
    return float(np.mean(losses)) if losses else 0.0


def test_flow_matching_loss_matches_numpy_and_ignores_given_frames():
    pred, target = _arrays(2)
    mask = np.array([[False, True, True, True],
                     [False, True, False, True],
                     [True, True, True, True]])
    loss = float(flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
    assert loss == pytest.approx(_loss_reference(pred, target, mask), rel=1e-6)

    pred2 = pred.copy()
    pred2[~mask] += 100.0  # anything on given frames
    loss2 = float(flow_matching_loss(jnp.asarray(pred2), jnp.asarray(target), jnp.asarray(mask)))
    assert loss2 == pytest.approx(loss, rel=1e-6)
    pred3 = pred.copy()
    pred3[0, 1] += 10.0  # a generated frame does count
    loss3 = float(flow_matching_loss(jnp.asarray(pred3), jnp.asarray(target), jnp.asarray(mask)))
    assert loss3 > loss + 5.0 and loss3 == pytest.approx(_loss_reference(pred3, target, mask), rel=1e-6)

    for w in (np.array([0.5, 2.0, 1.0], np.float32), np.random.RandomState(3).uniform(size=(3, 4)).astype(np.float32)):
        got = float(flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), jnp.asarray(w)))
        assert got == pytest.approx(_loss_reference(pred, target, mask, w), rel=1e-6)


def test_flow_matching_loss_leaves_out_samples_without_generated_frames():
    pred, target = _arrays(4)
    mask = np.array([[False, True, True, False], [False] * 4, [True] * 4])
    loss = float(flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
    assert loss == pytest.approx(_loss_reference(pred, target, mask), rel=1e-6)
    only = [0, 2]
    sub = float(flow_matching_loss(jnp.asarray(pred[only]), jnp.asarray(target[only]), jnp.asarray(mask[only])))
    assert loss == pytest.approx(sub, rel=1e-6)  # the all-given sample does not dilute the mean
    none = float(flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.zeros((3, 4), bool)))
    assert none == 0.0
    # bfloat16 inputs reduce in float32.
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (pred, target)]
    loss_bf16 = flow_matching_loss(*bf16, jnp.asarray(mask))
    assert loss_bf16.dtype == jnp.float32 and float(loss_bf16) == pytest.approx(loss, rel=2e-2)
    with pytest.raises(ValueError, match="one bool per latent frame"):
        flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask[:, :3]))


def test_shift_and_resolution_shift_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for shift in (0.5, 1.0, 3.0, 5.0):
        # The scheduler's training table is the shift of linspace(1, 1000) / 1000.
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas.numpy()
        t = np.linspace(1, 1000, 1000)[::-1] / 1000
        np.testing.assert_allclose(shift_sigmas(t, shift), ref, rtol=1e-6, atol=1e-7)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = np.linspace(0.01, 0.99, 50)
    for tokens in (256, 1024, 4096, 8000):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert resolution_mu(tokens) == pytest.approx(mu, rel=1e-12)
        assert math.log(resolution_shift(tokens)) == pytest.approx(mu, rel=1e-12)
        np.testing.assert_allclose(shift_sigmas(t, resolution_shift(tokens)), sched.time_shift(mu, 1.0, t), rtol=1e-12)
    assert resolution_mu(1000, 100, 2000, 0.2, 2.0) == pytest.approx(calculate_shift(1000, 100, 2000, 0.2, 2.0))
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigmas(0.5, 0.0)


def test_logit_normal_median_and_shift():
    key = jax.random.key(0)
    n = 200_000
    for mean, std in ((0.0, 1.0), (-0.8, 1.2), (0.5, 0.5)):
        t = np.asarray(sample_timesteps(key, n, kind="logit_normal", mean=mean, std=std))
        assert t.dtype == np.float32 and t.shape == (n,)
        assert np.median(t) == pytest.approx(1 / (1 + math.exp(-mean)), abs=5e-3)
        # logit(t) is N(mean, std): check the spread too.
        assert np.std(np.log(t / (1 - t))) == pytest.approx(std, rel=1e-2)
    # The shift is monotone, so it moves the median to shift(median).
    t = np.asarray(sample_timesteps(key, n, shift=3.0))
    assert np.median(t) == pytest.approx(shift_sigmas(0.5, 3.0), abs=5e-3)
    u = np.asarray(jax.jit(lambda k: sample_timesteps(k, (64, 5), kind="uniform"))(key))
    assert u.shape == (64, 5) and u.min() >= T_EPS and u.max() <= 1 - T_EPS
    u = np.asarray(sample_timesteps(key, n, kind="uniform"))
    assert np.mean(u < 0.25) == pytest.approx(0.25, abs=5e-3)
    extreme = np.asarray(sample_timesteps(key, 1000, mean=0.0, std=30.0))
    assert extreme.min() >= T_EPS and extreme.max() <= 1 - T_EPS
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        sample_timesteps(key, 4, kind="beta")
