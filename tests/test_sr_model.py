"""Director-SR: init from Gen, PyTorch twin (MC-RoPE, per-frame timesteps) vs JAX and diffusers, sampling, tiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from director_jax.convert import load_transformer
from director_jax.convert.sr import export_sr, load_sr
from director_jax.models.dit import DirectorGen, WanDiTConfig
from director_jax.models.layers import rope_angles
from director_jax.models.sr import DirectorSR, sr_config
from director_jax.models.timeline import Timeline
from director_jax.pipeline.sr_sampling import SpatialTiling, sample_sr, sample_sr_tiled
from director_jax.pytorch.modules import DirectorWanTransformer3DModel, mc_rope
from tests.torch_reference import reference_transformer, state_dict_numpy

Z = 4
GEN = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z, text_dim=16,
                   freq_dim=32, ffn_dim=64, num_layers=2)
# keyframes at 0, 6 and 13: chunks of 6, 7 and 1 frames -> 3 + 3 + 1 latents at positions
# 0, 0.25, 1.25 | 1.5, 1.75, 2.75 | 3.25 (fractional MC-RoPE)
PARITY_LAYOUT = Timeline.from_keyframes(14, [0, 6, 13]).layout
# keyframes at 0 and 8: chunks of 8 and 1 frames -> 3 + 1 latents (a 4 x 8 x 8 latent grid)
SAMPLE_LAYOUT = Timeline.from_keyframes(9, [0, 8]).layout
RNG = np.random.RandomState(0)


def _latents(layout, b=1, h=8, w=8):
    return RNG.randn(b, layout.num_latents, h, w, Z).astype(np.float32)


def _sigmas(layout, values):
    """Per-frame flow times: 0 on the layout's given (keyframe) frames, ``values`` (B,) elsewhere."""
    return np.where(layout.given[None], 0.0, np.asarray(values, np.float32)[:, None]).astype(np.float32)


def to_torch(x):  # channels-last (B, F, h, w, C) -> diffusers' (B, C, F, h, w)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def from_torch(x):
    return x.detach().permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def reference():
    """A diffusers Gen transformer with every parameter random, and its JAX DirectorGen."""
    model = reference_transformer(GEN, seed=3)
    return model, DirectorGen(load_transformer(state_dict_numpy(model), GEN))


@pytest.fixture(scope="module")
def trained_sr(reference):
    """An SR model from the Gen one with non-zero low-res patch weights, as after training."""
    sr = DirectorSR.from_gen(reference[1])
    kernel = sr.dit.patch_embedding.kernel
    value = np.array(kernel.get_value())
    value[..., Z:, :] = 0.2 * np.random.RandomState(7).randn(*value[..., Z:, :].shape)
    kernel.set_value(jnp.asarray(value))
    return sr


def test_sr_at_init_equals_gen(reference):
    gen = reference[1]
    sr = DirectorSR.from_gen(gen)
    assert sr.config == sr_config(GEN) and sr.config.in_channels == 2 * Z and sr.latent_channels == Z
    layout = PARITY_LAYOUT
    noisy, lowres = _latents(layout, 2), _latents(layout, 2)
    sigma = _sigmas(layout, [0.8, 0.3])
    text = RNG.randn(2, 5, GEN.text_dim).astype(np.float32)
    expected = np.asarray(gen(jnp.asarray(noisy), sigma, jnp.asarray(text), positions=layout.position))
    got = np.asarray(sr(jnp.asarray(noisy), jnp.asarray(lowres), sigma, jnp.asarray(text), positions=layout.position))
    np.testing.assert_array_equal(got, expected)  # measured: bitwise equal (zero low-res weights)
    assert np.abs(expected).max() > 0.5
    # from_gen copies: the Gen model keeps its patch embedding
    assert gen.dit.patch_embedding.kernel.get_value().shape[3] == Z


def test_torch_twin_matches_jax_sr_with_fractional_positions(tmp_path, trained_sr):
    sr, layout = trained_sr, PARITY_LAYOUT
    assert not np.array_equal(layout.position, np.round(layout.position))  # really fractional
    noisy, lowres = _latents(layout, 2), _latents(layout, 2)
    sigma = _sigmas(layout, [0.9, 0.35])
    text = RNG.randn(2, 6, GEN.text_dim).astype(np.float32)
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    ours = np.asarray(sr(jnp.asarray(noisy), jnp.asarray(lowres), sigma, jnp.asarray(text),
                         positions=layout.position, text_mask=mask))
    without_lowres = np.asarray(sr(jnp.asarray(noisy), jnp.zeros_like(jnp.asarray(lowres)), sigma,
                                   jnp.asarray(text), positions=layout.position, text_mask=mask))
    assert np.abs(ours - without_lowres).max() > 0.1  # the low-res channels matter

    out = export_sr(sr, tmp_path / "sr")
    twin, info = DirectorWanTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    with torch.no_grad():
        got = from_torch(twin.eval().sr_forward(to_torch(noisy), to_torch(lowres), torch.from_numpy(sigma),
                                                torch.from_numpy(text), positions=layout.position,
                                                text_mask=torch.from_numpy(mask)))
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)  # measured max |diff| ~5e-7
    # per-sample (B, L) positions: the second sample's timeline shifted by 2.5 latent frames
    positions = np.stack([layout.position, layout.position + 2.5])
    ours_b = np.asarray(sr(jnp.asarray(noisy), jnp.asarray(lowres), sigma, jnp.asarray(text), positions=positions))
    with torch.no_grad():
        got_b = from_torch(twin.sr_forward(to_torch(noisy), to_torch(lowres), torch.from_numpy(sigma),
                                           torch.from_numpy(text), positions=torch.from_numpy(positions)))
    np.testing.assert_allclose(got_b, ours_b, atol=1e-4, rtol=0)
    # and the export loads back into JAX as the same SR model
    again = load_sr(out)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(noisy), jnp.asarray(lowres), sigma, jnp.asarray(text),
                                                positions=positions)), ours_b, atol=1e-6)


def test_torch_mc_rope_with_integer_positions_is_diffusers(reference):
    model, _ = reference
    twin = DirectorWanTransformer3DModel.from_state_dict(state_dict_numpy(model), GEN.to_diffusers_config())
    latents = RNG.randn(2, 3, 4, 6, Z).astype(np.float32)
    text = torch.from_numpy(RNG.randn(2, 5, GEN.text_dim).astype(np.float32))
    per_frame = torch.tensor([[0.0, 640.0, 640.0], [0.0, 0.0, 999.0]])
    with torch.no_grad():
        for timestep in (torch.tensor([700.0, 35.5]), per_frame):
            per_token = timestep.repeat_interleave(6, dim=1) if timestep.ndim == 2 else timestep  # 6 tokens a frame
            expected = model(to_torch(latents), per_token, text, return_dict=False)[0]
            got = twin(to_torch(latents), timestep, text, positions=np.arange(3.0), return_dict=False)[0]
            np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6, rtol=0)  # measured: 0
        # fractional positions reach the attention
        moved = twin(to_torch(latents), per_frame, text, positions=np.array([0.0, 1.25, 2.5]), return_dict=False)[0]
    assert (moved - expected).abs().max() > 1e-3
    # the rotation angles are the JAX model's (cos / sin of rope_angles, each repeated per channel pair)
    positions = np.array([[0.0, 3.25, 4.5], [1.0, 2.75, 9.5]], np.float32)
    cos, sin = mc_rope(torch.from_numpy(positions), 2, 3, 24)
    angles = np.asarray(rope_angles(jnp.asarray(positions), 2, 3, 24))
    np.testing.assert_allclose(cos[:, :, 0, 0::2].numpy(), np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(sin[:, :, 0, 1::2].numpy(), np.sin(angles), atol=2e-6)


def test_bad_inputs_name_the_fix(reference, trained_sr):
    gen, sr, layout = reference[1], trained_sr, SAMPLE_LAYOUT
    x = jnp.asarray(_latents(layout))
    sigma = _sigmas(layout, [0.5])
    text = jnp.ones((1, 3, GEN.text_dim))
    with pytest.raises(ValueError, match="upsampled to the high-res size"):
        sr(x, x[:, :, :6], sigma, text, positions=layout.position)
    with pytest.raises(ValueError, match="lowres_latents must be"):
        sr(x, jnp.concatenate([x, x], -1), sigma, text, positions=layout.position)
    with pytest.raises(ValueError, match="noisy_latents must be"):
        sr(x[0], x[0], sigma, text, positions=layout.position)
    with pytest.raises(ValueError, match="one flow time per latent frame"):
        sr(x, x, sigma[:, :2], text, positions=layout.position)
    with pytest.raises(ValueError, match="2 \\* out_channels"):
        DirectorSR(gen.dit)
    with pytest.raises(ValueError, match="already an SR"):
        sr_config(sr.config)
    with pytest.raises(ValueError, match="already an SR"):
        DirectorSR.from_gen(sr.dit)
    with pytest.raises(ValueError, match="timeline layout has"):
        sample_sr(sr, PARITY_LAYOUT, x, x, text, key=jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of the DiT patch"):
        sample_sr_tiled(sr, layout, x, x, text, key=jax.random.key(0), tile=(5, 4))
    with pytest.raises(ValueError, match="overlap height 4"):
        SpatialTiling.build((8, 8), (4, 4), 4, (2, 2))
    twin = DirectorWanTransformer3DModel.from_jax(gen)
    t = torch.zeros(1, Z, 4, 8, 8)
    with pytest.raises(ValueError, match="needs an SR transformer"):
        twin.sr_forward(t, t, torch.zeros(1, 4), torch.zeros(1, 3, GEN.text_dim), positions=layout.position)
    with pytest.raises(ValueError, match="positions has shape"):
        twin(t, torch.zeros(1), torch.zeros(1, 3, GEN.text_dim), positions=np.arange(3.0))
    with pytest.raises(ValueError, match="timestep has shape"):
        twin(t, torch.zeros(1, 5), torch.zeros(1, 3, GEN.text_dim))


@pytest.fixture(scope="module")
def sampling_inputs():
    layout = SAMPLE_LAYOUT
    return layout, jnp.asarray(_latents(layout)), jnp.asarray(_latents(layout)), jnp.asarray(
        RNG.randn(1, 5, GEN.text_dim).astype(np.float32))


@pytest.mark.parametrize("steps", [1, 4])
def test_few_step_sampling_keeps_given_frames_clean(trained_sr, sampling_inputs, steps):
    layout, lowres, given, text = sampling_inputs
    out = np.asarray(sample_sr(trained_sr, layout, lowres, given, text, key=jax.random.key(1), steps=steps))
    assert out.shape == given.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, layout.given], np.asarray(given)[0, layout.given])
    generated = out[0, ~layout.given]
    assert np.abs(generated - np.asarray(given)[0, ~layout.given]).max() > 0.1  # generated, not copied
    again = np.asarray(sample_sr(trained_sr, layout, lowres, given, text, key=jax.random.key(1), steps=steps))
    np.testing.assert_array_equal(again, out)


def test_tiled_sampling(trained_sr, sampling_inputs):
    layout, lowres, given, text = sampling_inputs
    kw = dict(key=jax.random.key(2), steps=4)
    full = np.asarray(sample_sr(trained_sr, layout, lowres, given, text, **kw))
    # one tile over the whole grid (a larger tile is clipped to it) is the untiled sampler exactly
    whole = np.asarray(sample_sr_tiled(trained_sr, layout, lowres, given, text, tile=(16, 8), overlap=0, **kw))
    np.testing.assert_array_equal(whole, full)
    # with text CFG the low-res latents condition both halves (the batch doubles inside each tile)
    guided_kw = dict(kw, negative_text=jnp.zeros_like(text), guidance_scale=3.0)
    guided = np.asarray(sample_sr(trained_sr, layout, lowres, given, text, **guided_kw))
    np.testing.assert_array_equal(
        np.asarray(sample_sr_tiled(trained_sr, layout, lowres, given, text, tile=8, overlap=0, **guided_kw)), guided)
    np.testing.assert_array_equal(guided[0, layout.given], np.asarray(given)[0, layout.given])
    assert np.abs(guided - full).max() > 1e-2

    # blending mechanics: without self-attention every token is independent, so tiles see exactly what
    # the full grid sees and the normalized blend gives the untiled result (up to float rounding)
    local = nnx.clone(trained_sr)
    for p in (local.dit.blocks.attn1.to_out.kernel, local.dit.blocks.attn1.to_out.bias):
        p.set_value(jnp.zeros_like(p.get_value()))
    local_full = np.asarray(sample_sr(local, layout, lowres, given, text, **kw))
    local_tiled = np.asarray(sample_sr_tiled(local, layout, lowres, given, text, tile=(4, 6), overlap=(2, 2), **kw))
    np.testing.assert_allclose(local_tiled, local_full, atol=1e-5, rtol=0)

    # real tiles with full attention: the documented tolerance (sample_sr_tiled's docstring)
    scale = np.sqrt(np.mean(full ** 2))
    for tile, overlap, max_err, rms_err in (((6, 6), 4, 0.15, 0.03), ((4, 4), 0, 0.3, 0.05)):
        tiled = np.asarray(sample_sr_tiled(trained_sr, layout, lowres, given, text, tile=tile, overlap=overlap, **kw))
        diff = tiled - full
        err_max, err_rms = np.abs(diff).max(), np.sqrt(np.mean(diff ** 2))
        print(f"tile {tile} overlap {overlap}: max |diff| {err_max:.4f}, rms {err_rms:.4f} "
              f"(latent rms {scale:.3f}, max {np.abs(full).max():.3f})")
        np.testing.assert_array_equal(tiled[0, layout.given], np.asarray(given)[0, layout.given])
        assert err_max < max_err and err_rms < rms_err
        assert err_max > 1e-4  # the tiles really cut the attention


def test_tiling_weights_cover_the_grid():
    tiling = SpatialTiling.build((12, 8), (6, 4), (2, 2), (2, 2))
    assert tiling.starts == tuple((y, x) for y in (0, 4, 6) for x in (0, 2, 4))
    assert (tiling.total > 0).all()
    # linear overlap of two tiles: the raised-cosine ramps of neighbours sum to 1 (a partition of unity)
    two = SpatialTiling.build((4, 6), (4, 4), (4, 2), (2, 2))
    np.testing.assert_allclose(two.total, np.ones((4, 6)), atol=1e-6)
