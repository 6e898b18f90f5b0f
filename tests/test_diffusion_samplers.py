"""Euler and UniPC against diffusers' schedulers; the sampling loop, given frames and CFG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from director_jax.diffusion import (
    UniPCSolver,
    euler_sigmas,
    euler_step,
    guided_velocity,
    keyframe_guided_velocity,
    sample,
    unipc_sigmas,
)

SHAPE = (2, 3, 2, 2, 2)  # (B, T', h, w, C)


def _unipc(steps, shift, order=2, solver_type="bh2", **kw):
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                    num_train_timesteps=1000, solver_order=order, solver_type=solver_type,
                                    lower_order_final=True, **kw)
    sched.set_timesteps(steps)
    return sched


def _euler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 5, 12, 30, 50])
def test_sigma_tables_match_diffusers(steps):
    for shift in (0.7, 1.0, 3.0, 5.0, 12.0):
        np.testing.assert_allclose(unipc_sigmas(steps, shift), _unipc(steps, shift).sigmas.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(euler_sigmas(steps, shift), _euler(steps, shift).sigmas.numpy(), atol=1e-6, rtol=0)
        dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        dyn.set_timesteps(steps, mu=math.log(shift))
        np.testing.assert_allclose(euler_sigmas(steps, shift, dynamic_shifting=True), dyn.sigmas.numpy(), atol=1e-6)
    # The first UniPC sigma sits just below 1 (its log-SNR is finite); both tables end in 0.
    assert unipc_sigmas(steps, 3.0)[0] == np.float32(1 - 1e-6) and unipc_sigmas(steps, 3.0)[-1] == 0.0


def test_euler_steps_match_diffusers():
    sched = _euler(7, 3.0)
    sigmas = euler_sigmas(7, 3.0)
    rng = np.random.RandomState(0)
    x_ref = torch.from_numpy(rng.randn(*SHAPE).astype(np.float32))
    x = jnp.asarray(x_ref.numpy())
    for i, t in enumerate(sched.timesteps):
        v = rng.randn(*SHAPE).astype(np.float32)
        x_ref = sched.step(torch.from_numpy(v), t, x_ref).prev_sample
        x = euler_step(x, jnp.asarray(v), sigmas[i], sigmas[i + 1])
        np.testing.assert_allclose(np.asarray(x), x_ref.numpy(), atol=1e-6, rtol=1e-6)


def _unipc_trajectories(steps, shift, order, solver_type, field):
    """Run diffusers (float64) and ours (float64 NumPy and float32 JAX) on the same model outputs.

    ``field(x, sigma, i)`` gives the model output; it may depend on the sample, so the runs only stay
    together if every update agrees.
    """
    sched = _unipc(steps, shift, order, solver_type)
    sched.sigmas = sched.sigmas.double()  # the same float32 table values, arithmetic in float64
    ours64 = UniPCSolver(unipc_sigmas(steps, shift), order=order, solver_type=solver_type)
    ours32 = UniPCSolver(unipc_sigmas(steps, shift), order=order, solver_type=solver_type)
    x0 = np.random.RandomState(1).randn(*SHAPE)
    x_ref, x64, x32 = torch.from_numpy(x0), x0.copy(), jnp.asarray(x0, jnp.float32)
    out = []
    for i, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[i])
        v_ref = field(x_ref.numpy(), sigma, i)
        x_ref = sched.step(torch.from_numpy(v_ref), t, x_ref).prev_sample
        x64 = ours64.step(field(x64, sigma, i), x64)
        x32 = ours32.step(jnp.asarray(field(np.asarray(x32, np.float64), sigma, i), jnp.float32), x32)
        out.append((x_ref.numpy(), x64, np.asarray(x32, np.float64)))
    return out


def _random_field(x, sigma, i):
    return np.random.RandomState(100 + i).randn(*SHAPE)


def _linear_field(x, sigma, i):
    return 0.7 * x + np.sin(np.arange(x.size)).reshape(x.shape) * (1 + sigma)


@pytest.mark.parametrize("order,steps", [(1, 6), (2, 4), (2, 10), (2, 25), (3, 10), (3, 20)])
def test_unipc_bh2_matches_diffusers_every_step(order, steps):
    for field in (_random_field, _linear_field):
        for x_ref, x64, x32 in _unipc_trajectories(steps, 3.0, order, "bh2", field):
            scale = max(1.0, np.abs(x_ref).max())
            np.testing.assert_allclose(x64, x_ref, atol=1e-12 * scale, rtol=0)
            np.testing.assert_allclose(x32, x_ref, atol=1e-5 * scale, rtol=0)


def test_unipc_bh1_matches_diffusers_except_its_nan_final_step():
    traj = _unipc_trajectories(8, 5.0, 2, "bh1", _random_field)
    for x_ref, x64, x32 in traj[:-1]:
        np.testing.assert_allclose(x64, x_ref, atol=1e-12, rtol=0)
        np.testing.assert_allclose(x32, x_ref, atol=1e-5 * max(1.0, np.abs(x_ref).max()), rtol=0)
    # diffusers' order-1 bh1 step to sigma 0 computes -inf * 0 and returns NaN; ours returns the x0
    # prediction at the last input (the previous step's output): x - sigma v.
    x_ref, x64, x32 = traj[-1]
    assert np.isnan(x_ref).all()
    sigma_last = float(unipc_sigmas(8, 5.0)[7])
    x_in = traj[-2][1]
    np.testing.assert_allclose(x64, x_in - sigma_last * _random_field(x_in, sigma_last, 7), atol=1e-12)
    assert np.isfinite(x32).all()


def test_unipc_disable_corrector_matches_diffusers():
    steps = 8
    sched = _unipc(steps, 3.0, disable_corrector=[0, 1, 2])
    sched.sigmas = sched.sigmas.double()
    ours = UniPCSolver(unipc_sigmas(steps, 3.0), disable_corrector=[0, 1, 2])
    ref_on = UniPCSolver(unipc_sigmas(steps, 3.0))
    x_ref = torch.from_numpy(np.random.RandomState(2).randn(*SHAPE))
    x, x_on = x_ref.numpy().copy(), x_ref.numpy().copy()
    for i, t in enumerate(sched.timesteps):
        v = _random_field(None, 0, i)
        x_ref = sched.step(torch.from_numpy(v), t, x_ref).prev_sample
        x, x_on = ours.step(v, x), ref_on.step(v, x_on)
        np.testing.assert_allclose(x, x_ref.numpy(), atol=1e-12)
    assert np.abs(x - x_on).max() > 1e-3  # the corrector does change the result


def test_unipc_final_step_returns_x0_prediction_and_solver_is_exhausted():
    sigmas = unipc_sigmas(3, 1.0)
    solver = UniPCSolver(sigmas)
    x = np.ones(SHAPE)
    for _ in range(2):
        x = solver.step(np.full(SHAPE, 0.5), x)
    v = np.random.RandomState(0).randn(*SHAPE)
    sched = _unipc(3, 1.0)
    sched.sigmas = sched.sigmas.double()
    x_ref = torch.ones(SHAPE, dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(torch.from_numpy(np.full(SHAPE, 0.5) if i < 2 else v), t, x_ref).prev_sample
    final = solver.step(v, x)
    np.testing.assert_allclose(final, x_ref.numpy(), atol=1e-12)
    # With lower_order_final the last step lands on the x0 prediction at its input.
    np.testing.assert_allclose(final, x - float(sigmas[2]) * v, atol=1e-12)
    with pytest.raises(RuntimeError, match="steps are done"):
        solver.step(v, x)


# --------------------------------------------------------------------------------------------------
# The sampling loop, on a field with a known exact flow


def _gaussian_problem(seed=0, shape=SHAPE):
    """Data ~ N(mu, s^2) per element: the exact flow is x(sigma) = (1 - sigma) mu + sqrt(g(sigma)) z."""
    rng = np.random.RandomState(seed)
    mu = rng.uniform(-0.5, 0.5, shape)
    s = rng.uniform(0.3, 0.8, shape)
    noise = rng.randn(*shape)

    def g(sig):
        return (1 - sig) ** 2 * s**2 + sig**2

    def velocity_np(x, sig):
        return -mu + (sig - (1 - sig) * s**2) / g(sig) * (x - (1 - sig) * mu)

    mu_j, s_j = jnp.asarray(mu, jnp.float32), jnp.asarray(s, jnp.float32)

    @jax.jit
    def denoise(x, sigma_frames, cond):
        sig = sigma_frames.reshape(sigma_frames.shape + (1,) * (x.ndim - 2))
        gg = (1 - sig) ** 2 * s_j**2 + sig**2
        return -mu_j + (sig - (1 - sig) * s_j**2) / gg * (x - (1 - sig) * mu_j)

    def exact(sigma_start):
        z = (noise - (1 - sigma_start) * mu) / np.sqrt(g(sigma_start))
        return mu + s * z

    return noise.astype(np.float32), denoise, velocity_np, exact


def test_sample_converges_to_the_exact_flow():
    noise, denoise, _, exact = _gaussian_problem()
    errs = {}
    for sampler, start in (("euler", 1.0), ("unipc", 1 - 1e-6)):
        for steps in (8, 16, 32):
            out = sample(denoise, jnp.asarray(noise), steps=steps, sampler=sampler, shift=1.0, progress=False)
            errs[sampler, steps] = float(np.abs(np.asarray(out) - exact(start)).max())
    # Euler is first order: the error halves when the steps double.
    assert 1.6 < errs["euler", 8] / errs["euler", 16] < 2.4, errs
    assert 1.6 < errs["euler", 16] / errs["euler", 32] < 2.4, errs
    assert errs["euler", 32] < 0.1
    # UniPC (order 2 + corrector) is much closer at the same cost and converges faster.
    assert errs["unipc", 32] < errs["euler", 32] / 10
    assert errs["unipc", 16] / errs["unipc", 32] > 3


def test_sample_matches_a_diffusers_loop():
    noise, denoise, velocity_np, _ = _gaussian_problem(1)
    for sampler, sched in (("unipc", _unipc(10, 3.0)), ("euler", _euler(10, 3.0))):
        x = torch.from_numpy(noise.astype(np.float64))
        if sampler == "unipc":
            sched.sigmas = sched.sigmas.double()
        for i, t in enumerate(sched.timesteps):
            v = velocity_np(x.numpy(), float(sched.sigmas[i]))
            x = sched.step(torch.from_numpy(v), t, x).prev_sample
        out = sample(denoise, jnp.asarray(noise), steps=10, sampler=sampler, shift=3.0, progress=False)
        np.testing.assert_allclose(np.asarray(out), x.numpy(), atol=1e-5 * max(1.0, np.abs(x.numpy()).max()))


def test_given_frames_stay_exact_and_enter_the_model_clean():
    noise, denoise, _, _ = _gaussian_problem(2)
    rng = np.random.RandomState(5)
    given = rng.randn(*SHAPE).astype(np.float32)
    mask = np.array([[True, False, False], [False, True, True]])
    seen = []

    def recording(x, sigma_frames, cond):
        seen.append((np.asarray(x), np.asarray(sigma_frames)))
        return denoise(x, sigma_frames, cond)

    for sampler in ("unipc", "euler"):
        seen.clear()
        out = np.asarray(sample(recording, jnp.asarray(noise), steps=6, sampler=sampler, shift=2.0,
                                given_latents=jnp.asarray(given), given_mask=jnp.asarray(mask), progress=False))
        np.testing.assert_array_equal(out[mask], given[mask])
        sigmas = unipc_sigmas(6, 2.0) if sampler == "unipc" else euler_sigmas(6, 2.0)
        assert len(seen) == 6
        for i, (x_in, sig) in enumerate(seen):
            np.testing.assert_array_equal(x_in[mask], given[mask])
            np.testing.assert_array_equal(sig, np.where(mask, 0.0, sigmas[i]).astype(np.float32))
        # The field is elementwise, so generated frames are those of a run with no given frames.
        free = np.asarray(sample(denoise, jnp.asarray(noise), steps=6, sampler=sampler, shift=2.0, progress=False))
        np.testing.assert_allclose(out[~mask], free[~mask], atol=1e-6)
        assert np.abs(out[mask] - free[mask]).max() > 0.1


def test_guidance_one_is_unguided_and_cfg_is_one_batched_call():
    noise, denoise, _, _ = _gaussian_problem(3)
    rng = np.random.RandomState(6)
    cond = {"emb": jnp.asarray(rng.randn(2, 5, 4), jnp.float32), "scale": jnp.asarray([1.0, 2.0])}
    uncond = {"emb": jnp.asarray(rng.randn(2, 5, 4), jnp.float32), "scale": jnp.asarray([0.5, -1.0])}
    calls = []

    def model(x, sigma_frames, c):
        calls.append(x.shape[0])
        text = jnp.tanh(c["emb"].mean((1, 2)) * c["scale"]).reshape(-1, 1, 1, 1, 1)
        return -0.5 * x * sigma_frames[:, :, None, None, None] + text * jnp.cos(x)

    plain = sample(model, jnp.asarray(noise), steps=5, cond=cond, progress=False)
    calls.clear()
    one = sample(model, jnp.asarray(noise), steps=5, cond=cond, uncond=uncond, guidance_scale=1.0, progress=False)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(plain))
    assert calls == [2] * 5

    # guided_velocity against a manual computation with two separate calls.
    x = jnp.asarray(noise)
    sig = jnp.full(SHAPE[:2], 0.4)
    calls.clear()
    got = guided_velocity(model, x, sig, cond, uncond, guidance_scale=4.0)
    assert calls == [4]  # one call, batch 2B
    v_c, v_u = np.asarray(model(x, sig, cond)), np.asarray(model(x, sig, uncond))
    np.testing.assert_allclose(np.asarray(got), v_u + 4.0 * (v_c - v_u), atol=1e-5)

    # The whole guided Euler loop against a NumPy loop with separate cond / uncond calls.
    out = sample(model, jnp.asarray(noise), steps=4, sampler="euler", shift=3.0, cond=cond, uncond=uncond,
                 guidance_scale=5.0, progress=False)
    sigmas = euler_sigmas(4, 3.0)
    xr = noise.copy()
    for i in range(4):
        s = jnp.full(SHAPE[:2], sigmas[i])
        vc = np.asarray(model(jnp.asarray(xr), s, cond))
        vu = np.asarray(model(jnp.asarray(xr), s, uncond))
        xr = xr + (sigmas[i + 1] - sigmas[i]) * (vu + 5.0 * (vc - vu))
    np.testing.assert_allclose(np.asarray(out), xr, atol=1e-4)
    assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-2


def _coupled_model(x, sigma_frames, c):
    """A velocity field in which every frame sees the others (as attention does) and the caption."""
    mix = jnp.mean(x * (1.0 - sigma_frames)[:, :, None, None, None], axis=1, keepdims=True)
    text = jnp.tanh(c["emb"].mean((1, 2))).reshape(-1, 1, 1, 1, 1)
    return -0.7 * x * sigma_frames[:, :, None, None, None] + jnp.sin(mix) + 0.3 * text


def test_keyframe_guidance_matches_a_numpy_loop_and_one_is_off():
    rng = np.random.RandomState(8)
    noise = rng.randn(*SHAPE).astype(np.float32)
    given = rng.randn(*SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE[:2], bool)
    mask[:, 0] = True
    mask[1, 2] = True
    cond = {"emb": jnp.asarray(rng.randn(2, 5, 4), jnp.float32)}
    uncond = {"emb": jnp.asarray(rng.randn(2, 5, 4), jnp.float32)}
    kw = dict(steps=5, sampler="euler", shift=2.0, given_latents=jnp.asarray(given), given_mask=jnp.asarray(mask),
              cond=cond, progress=False)
    plain = np.asarray(sample(_coupled_model, jnp.asarray(noise), **kw))
    off = np.asarray(sample(_coupled_model, jnp.asarray(noise), keyframe_guidance=1.0, **kw))
    np.testing.assert_array_equal(off, plain)

    def reference(scale, text_scale):
        def v_text(x, s):
            vc = np.asarray(_coupled_model(jnp.asarray(x), jnp.asarray(s), cond))
            if text_scale == 1.0:
                return vc
            vu = np.asarray(_coupled_model(jnp.asarray(x), jnp.asarray(s), uncond))
            return vu + text_scale * (vc - vu)

        sig = euler_sigmas(5, 2.0)
        m = mask[:, :, None, None, None]
        x = np.where(m, given, noise)
        for i in range(5):
            v_kf = v_text(x, np.where(mask, 0.0, sig[i]).astype(np.float32))
            released = np.where(m, (1 - sig[i]) * given + sig[i] * noise, x)
            v_free = v_text(released, np.full(mask.shape, sig[i], np.float32))
            x = np.where(m, given, x + (sig[i + 1] - sig[i]) * (v_free + scale * (v_kf - v_free)))
        return x

    guided = np.asarray(sample(_coupled_model, jnp.asarray(noise), keyframe_guidance=3.0, **kw))
    np.testing.assert_allclose(guided, reference(3.0, 1.0), atol=1e-4)
    np.testing.assert_array_equal(guided[mask], given[mask])  # given frames still exact
    assert np.abs(guided - plain)[~mask].max() > 1e-2
    both = np.asarray(sample(_coupled_model, jnp.asarray(noise), keyframe_guidance=2.5, uncond=uncond,
                             guidance_scale=4.0, **kw))
    np.testing.assert_allclose(both, reference(2.5, 4.0), atol=1e-4)

    # One step's velocity directly: the released branch sees the given frames noised from `noise`.
    x = jnp.asarray(np.where(mask[:, :, None, None, None], given, noise))
    got = keyframe_guided_velocity(_coupled_model, x, jnp.float32(0.6), jnp.asarray(given), jnp.asarray(mask),
                                   jnp.asarray(noise), 2.0, cond)
    released = np.where(mask[:, :, None, None, None], 0.4 * given + 0.6 * noise, np.asarray(x))
    v_kf = np.asarray(_coupled_model(x, jnp.asarray(np.where(mask, 0.0, 0.6), jnp.float32), cond))
    v_free = np.asarray(_coupled_model(jnp.asarray(released), jnp.full(mask.shape, 0.6), cond))
    np.testing.assert_allclose(np.asarray(got), v_free + 2.0 * (v_kf - v_free), atol=1e-5)


def test_sample_is_deterministic():
    noise, denoise, _, _ = _gaussian_problem(4)
    a = sample(denoise, jnp.asarray(noise), steps=4, progress=False)
    b = sample(denoise, jnp.asarray(noise), steps=4, progress=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_raise_clear_errors():
    noise, denoise, _, _ = _gaussian_problem(0)
    x = jnp.asarray(noise)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(denoise, x, steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample(denoise, x, steps=2, sampler="heun", progress=False)
    with pytest.raises(ValueError, match=r"one bool per latent frame, shape \(2, 3\)"):
        sample(denoise, x, steps=2, given_latents=x, given_mask=jnp.zeros((2, 4), bool), progress=False)
    with pytest.raises(ValueError, match="go together"):
        sample(denoise, x, steps=2, given_mask=jnp.zeros((2, 3), bool), progress=False)
    with pytest.raises(ValueError, match="needs uncond"):
        sample(denoise, x, steps=2, guidance_scale=5.0, cond={"a": jnp.zeros((2, 1))}, progress=False)
    with pytest.raises(ValueError, match="same structure"):
        guided_velocity(denoise, x, jnp.zeros((2, 3)), {"a": jnp.zeros((2, 1))}, {"b": jnp.zeros((2, 1))}, 2.0)
    with pytest.raises(ValueError, match="pad both captions"):
        guided_velocity(denoise, x, jnp.zeros((2, 3)), {"a": jnp.zeros((2, 3))}, {"a": jnp.zeros((2, 5))}, 2.0)
    with pytest.raises(ValueError, match="none are given"):
        sample(denoise, x, steps=2, keyframe_guidance=2.0, progress=False)
    with pytest.raises(ValueError, match="finite"):
        sample(denoise, x, steps=2, keyframe_guidance=float("nan"), given_latents=x,
               given_mask=jnp.zeros((2, 3), bool), progress=False)
    with pytest.raises(ValueError, match="decrease strictly"):
        UniPCSolver([1.0, 0.5, 0.0])
