"""The Wan VAE against diffusers' AutoencoderKLWan, and its streaming path against its full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.convert.vae_weights import load_diffusers_state_dict
from director_jax.models.vae import (
    WanVAE,
    WanVAEConfig,
    denormalize_latents,
    normalize_latents,
    sample_posterior,
)
from tests.torch_reference import reference_decode, reference_encode, reference_vae, state_dict_numpy

TINY_CONFIGS = {
    # num_res_blocks=1, uniform deep stages, temporal downsampling in the early stages
    "plain": WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                          temperal_downsample=(True, True, False),
                          latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)),
    # the acceptance config: attention in the encoder stages, two res blocks, non-uniform dim_mult
    "attn": WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 3, 4), num_res_blocks=2, attn_scales=(0.5,),
                         latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    cfg = TINY_CONFIGS[request.param]
    ref = reference_vae(cfg, seed=1)
    vae = WanVAE(cfg, rngs=nnx.Rngs(7))
    load_diffusers_state_dict(vae, state_dict_numpy(ref))
    return cfg, ref, vae


def _clip(frames, seed, h=32, w=24):
    return np.random.RandomState(seed).uniform(-1, 1, (2, frames, h, w, 3)).astype(np.float32)


# 1 and 9 frames (3 latents: the causal cache across two chunks) by default; 5 and 13 in the slow set
@pytest.mark.parametrize("frames", [1, pytest.param(5, marks=pytest.mark.slow), 9,
                                    pytest.param(13, marks=pytest.mark.slow)])
def test_matches_diffusers(pair, frames):
    cfg, ref, vae = pair
    video = _clip(frames, seed=frames)
    ref_mean, ref_logvar = reference_encode(ref, video)
    mean, logvar = vae.encode(jnp.asarray(video))
    assert mean.shape == (2, (frames - 1) // 4 + 1, 32 // 8, 24 // 8, cfg.z_dim)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=0)
    # decode the reference posterior mean, so decoder error is measured on its own
    decoded = vae.decode(jnp.asarray(ref_mean))
    ref_decoded = reference_decode(ref, ref_mean)
    assert decoded.shape == video.shape
    assert np.abs(ref_decoded).max() > 0.1  # a real signal, not an all-zero output
    np.testing.assert_allclose(decoded, ref_decoded, atol=1e-4, rtol=0)


@pytest.mark.parametrize("frames", [1, pytest.param(9, marks=pytest.mark.slow), 17])
def test_streaming_equals_full_pass(pair, frames):
    _, _, vae = pair
    video = _clip(frames, seed=100 + frames)
    mean, logvar = vae.encode(jnp.asarray(video))
    s_mean, s_logvar = vae.encode_streaming(video)
    np.testing.assert_allclose(s_mean, mean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(s_logvar, logvar, atol=1e-5, rtol=0)
    full = vae.decode(mean)
    chunks = list(vae.iter_decode(np.asarray(mean)))
    assert [c.shape[1] for c in chunks] == [1] + [4] * (mean.shape[1] - 1)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-5, rtol=0)


def test_streaming_step_memory_does_not_grow_with_clip_length():
    """The decoder step's compiled working set is fixed; only the carried caches cross steps."""
    vae = WanVAE(TINY_CONFIGS["plain"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    z = jnp.zeros((1, 1, 4, 3, 4))
    _, caches = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_step(z, None))(state, z)
    step = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode_step(z, c))
    # the carried caches have the same shapes step after step: the loop cannot accumulate state
    _, caches2 = step(state, z, caches)
    assert [c.shape for c in caches2] == [c.shape for c in caches]
    # and each holds at most the two frames a kernel-3 causal conv looks back at
    assert caches and max(c.shape[1] for c in caches) <= 2


def test_latent_normalisation_roundtrip():
    cfg = TINY_CONFIGS["plain"]
    z = jax.random.normal(jax.random.key(0), (1, 3, 2, 2, 4)) * 3 + 1
    n = normalize_latents(z, cfg)
    expected = (np.asarray(z) - np.array(cfg.latents_mean)) / np.array(cfg.latents_std)
    np.testing.assert_allclose(n, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize_latents(n, cfg), z, rtol=1e-6, atol=1e-5)


def test_posterior_sample_statistics():
    mean = jnp.full((1, 1, 64, 64, 4), 0.5)
    logvar = jnp.full_like(mean, np.log(4.0))
    draws = sample_posterior(mean, logvar, jax.random.key(3))
    assert abs(float(draws.mean()) - 0.5) < 0.05
    assert abs(float(draws.std()) - 2.0) < 0.05


@pytest.fixture(scope="module")
def tiny_vae():
    return WanVAE(TINY_CONFIGS["plain"], rngs=nnx.Rngs(0))


def test_rejects_wrong_channel_count(tiny_vae):
    with pytest.raises(ValueError, match=r"4 channels .* expects 3"):
        tiny_vae.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match="channels-last"):
        tiny_vae.encode(jnp.zeros((1, 3, 5, 16, 16)))


def test_rejects_frame_count_not_4n_plus_1_pointing_to_timeline(tiny_vae):
    for frames in (2, 4, 6, 12):
        with pytest.raises(ValueError, match=r"4n\+1.*timeline"):
            tiny_vae.encode(jnp.zeros((1, frames, 16, 16, 3)))
        with pytest.raises(ValueError, match=r"4n\+1.*timeline"):
            tiny_vae.encode_streaming(np.zeros((1, frames, 16, 16, 3), np.float32))


def test_rejects_bad_frame_size_and_latents(tiny_vae):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_vae.encode(jnp.zeros((1, 5, 20, 16, 3)))
    with pytest.raises(ValueError, match="latents must be"):
        tiny_vae.decode(jnp.zeros((1, 2, 4, 4, 3)))


def test_config_roundtrips_through_diffusers_dict():
    for cfg in TINY_CONFIGS.values():
        assert WanVAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    with pytest.raises(ValueError, match="Wan2.2"):
        WanVAEConfig.from_diffusers_config({**WanVAEConfig().to_diffusers_config(), "is_residual": True})
