"""The Wan DiT against diffusers' WanTransformer3DModel: forward parity, weights in every layout, RoPE."""


from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from director_jax.convert import WeightMismatchError, export_transformer, load_transformer
from director_jax.convert.dit_weights import official_key_map
from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.models.layers import apply_rope, rope_angles
from tests.torch_reference import reference_transformer, reference_transformer_forward, state_dict_numpy

TINY = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=8, out_channels=8, text_dim=32,
                    freq_dim=16, ffn_dim=40, num_layers=2)

RNG = np.random.RandomState(0)
LATENTS = RNG.randn(2, 3, 4, 6, 8).astype(np.float32)  # F=3, 2x3 patches per frame: 18 tokens
TEXT = RNG.randn(2, 7, 32).astype(np.float32)
TIMESTEP = np.array([700.0, 35.5], np.float32)


@jax.jit(static_argnums=0)
def _forward(graphdef, state, latents, timestep, text):
    return nnx.merge(graphdef, state)(latents, timestep, text)


def _run(model, latents=LATENTS, timestep=TIMESTEP, text=TEXT):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(text)))


@pytest.fixture(scope="module")
def reference():
    model = reference_transformer(TINY, seed=1)
    return model, state_dict_numpy(model)


def test_forward_matches_diffusers(reference):
    model, state = reference
    ours = load_transformer(state, TINY)
    expected = reference_transformer_forward(model, LATENTS, TIMESTEP, TEXT)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(_run(ours), expected, atol=1e-4, rtol=0)


def test_per_token_and_per_frame_timesteps_match_diffusers(reference):
    model, state = reference
    ours = load_transformer(state, TINY)
    # keyframe-style: frame 0 clean (t = 0), the others noised, one value per token for diffusers
    per_frame = np.array([[0.0, 640.0, 640.0], [0.0, 0.0, 999.0]], np.float32)
    per_token = np.repeat(per_frame, 6, axis=1)  # 6 tokens per latent frame
    expected = reference_transformer_forward(model, LATENTS, per_token, TEXT)
    np.testing.assert_allclose(_run(ours, timestep=per_token), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_run(ours, timestep=per_frame), expected, atol=1e-4, rtol=0)
    # and the clean frame really changes the output versus one shared timestep
    shared = reference_transformer_forward(model, LATENTS, np.array([640.0, 999.0], np.float32), TEXT)
    assert np.abs(shared - expected).max() > 1e-2


def test_export_loads_in_diffusers_and_round_trips(tmp_path, reference):
    model, state = reference
    ours = load_transformer(state, TINY)
    # a tiny shard limit forces diffusers' sharded form (index + several files)
    out = export_transformer(ours, tmp_path / "dit", max_shard_bytes=20_000)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    loaded, info = WanTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    expected = reference_transformer_forward(model, LATENTS, TIMESTEP, TEXT)
    np.testing.assert_allclose(reference_transformer_forward(loaded.eval(), LATENTS, TIMESTEP, TEXT), expected,
                               atol=1e-5)
    again = load_transformer(out)  # the directory, sharded
    np.testing.assert_allclose(_run(again), expected, atol=1e-4, rtol=0)
    # re-export unsharded into the same directory: the stale shards go
    export_transformer(again, out)
    assert not list(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    np.testing.assert_allclose(_run(load_transformer(out)), expected, atol=1e-4, rtol=0)


def test_official_layout_import(tmp_path, reference):
    model, state = reference
    names = official_key_map(load_transformer(state, TINY))
    official = {names[k]: v for k, v in state.items()}
    # diffusers' own single-file converter maps our official names back to its keys
    converted = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v) for k, v in official.items()})
    assert sorted(converted) == sorted(state)
    # an official single file with the ComfyUI prefix and no config: config inferred from shapes + heads
    path = tmp_path / "wan_official.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in official.items()}, str(path))
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "num_heads": 2, "dim": 24}')
    ours = load_transformer(path)
    assert ours.config == TINY
    np.testing.assert_allclose(_run(ours), reference_transformer_forward(model, LATENTS, TIMESTEP, TEXT),
                               atol=1e-4, rtol=0)


def test_mismatched_weights_list_every_bad_key(reference):
    _, state = reference
    broken = dict(state)
    del broken["blocks.1.attn2.to_k.weight"]
    broken["blocks.0.ffn.net.2.weight"] = broken["blocks.0.ffn.net.2.weight"][:, :5]
    broken["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightMismatchError) as err:
        load_transformer(broken, TINY)
    text = str(err.value)
    for key in ("blocks.1.attn2.to_k.weight", "blocks.0.ffn.net.2.weight", "blocks.0.extra.weight"):
        assert key in text
    names = official_key_map(load_transformer(state, TINY))
    official = {names[k]: v for k, v in state.items() if k != "blocks.1.attn2.to_k.weight"}
    with pytest.raises(WeightMismatchError, match=r"blocks\.1\.cross_attn\.k\.weight"):
        load_transformer(official, TINY)  # reported in the file's own (official) names


def test_rope_integer_positions_equal_wan_rope_and_fractional_match_numpy():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, f, h, w = 24, 3, 2, 4
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 64)
    cos, sin = (t.numpy()[0, :, 0] for t in rope(torch.zeros(1, 1, f, 2 * h, 2 * w)))  # (S, D) interleaved
    angles = np.asarray(rope_angles(jnp.arange(f, dtype=jnp.float32)[None], h, w, head_dim))[0]  # (S, D/2)
    np.testing.assert_allclose(np.cos(angles), cos[:, 0::2], atol=1e-6)
    np.testing.assert_allclose(np.sin(angles), sin[:, 1::2], atol=1e-6)

    # fractional MC-RoPE positions: rotate each (x[2i], x[2i+1]) pair by pos * theta^(-2i/d_t) in NumPy
    positions = np.array([0.0, 3.25, 4.5], np.float32)
    x = np.random.RandomState(1).randn(1, f * h * w, 2, head_dim).astype(np.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), rope_angles(jnp.asarray(positions)[None], h, w, head_dim)))
    t_dim = head_dim - 4 * (head_dim // 6)
    expected = x.copy()
    for token in range(f * h * w):
        frame, hi, wi = token // (h * w), (token // w) % h, token % w
        for i in range(head_dim // 2):
            if i < t_dim // 2:
                angle = positions[frame] * 10000.0 ** (-2 * i / t_dim)
            elif i < t_dim // 2 + (head_dim // 6):
                j = i - t_dim // 2
                angle = hi * 10000.0 ** (-2 * j / (2 * (head_dim // 6)))
            else:
                j = i - t_dim // 2 - head_dim // 6
                angle = wi * 10000.0 ** (-2 * j / (2 * (head_dim // 6)))
            a, b = x[0, token, :, 2 * i], x[0, token, :, 2 * i + 1]
            expected[0, token, :, 2 * i] = a * np.cos(angle) - b * np.sin(angle)
            expected[0, token, :, 2 * i + 1] = a * np.sin(angle) + b * np.cos(angle)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_positions_and_remat_and_bad_input():
    model = WanDiT(TINY, rngs=nnx.Rngs(0))
    base = _run(model)
    graphdef, state = nnx.split(model)
    default = model(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT), positions=jnp.arange(3.0))
    np.testing.assert_allclose(np.asarray(default), base, atol=1e-5)
    shifted = model(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT),
                    positions=jnp.array([0, 3.25, 4.25]))
    assert np.abs(np.asarray(shifted) - base).max() > 1e-3  # the positions reach the attention
    # remat changes memory, not results: gradients equal with and without it
    remat = nnx.merge(graphdef, state)
    remat.remat_policy = "full"

    def loss(m):
        return jnp.mean(m(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT)) ** 2)

    g1 = nnx.grad(loss)(model)
    g2 = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # so does unrolling the layer scan
    unrolled = nnx.merge(graphdef, state)
    unrolled.scan_unroll = True

    def program(m):
        gd, st = nnx.split(m)
        return jax.jit(lambda st, x: nnx.merge(gd, st)(x, jnp.asarray(TIMESTEP), jnp.asarray(TEXT))).lower(
            st, jnp.asarray(LATENTS)).as_text()

    # the layer loop is gone (attention keeps loops of its own)
    assert program(unrolled).count("stablehlo.while") == program(model).count("stablehlo.while") - 1
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(nnx.grad(loss)(unrolled)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="scan_unroll must be a positive int"):
        WanDiT(TINY, rngs=nnx.Rngs(0), scan_unroll=0)
    with pytest.raises(ValueError, match="timestep has shape"):
        model(jnp.asarray(LATENTS), jnp.ones((2, 5)), jnp.asarray(TEXT))
    with pytest.raises(ValueError, match="positions has shape"):
        model(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT), positions=jnp.arange(4.0))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(jnp.ones((2, 3, 5, 6, 8)), jnp.asarray(TIMESTEP), jnp.asarray(TEXT))
    with pytest.raises(ValueError, match="text must be"):
        model(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.ones((2, 7, 16)))


def test_text_mask_zeroes_padding_like_the_wan_pipeline(reference):
    model, state = reference
    ours = load_transformer(state, TINY)
    mask = np.zeros((2, 7), bool)
    mask[0, :4] = True
    mask[1, :6] = True
    padded = np.where(mask[..., None], TEXT, 0).astype(np.float32)
    expected = reference_transformer_forward(model, LATENTS, TIMESTEP, padded)
    got = ours(jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT), text_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_cli_imports_official_checkpoint_and_exports_for_diffusers(tmp_path, reference):
    from director_jax.convert.command import convert_weights

    model, state = reference
    names = official_key_map(load_transformer(state, TINY))
    src = tmp_path / "Wan2.1-T2V-tiny"
    src.mkdir()
    save_file({names[k]: v for k, v in state.items()}, str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text('{"_class_name": "WanModel", "model_type": "t2v", "num_heads": 2, "dim": 24}')
    assert convert_weights("import", "dit", src, tmp_path / "ours").startswith("imported dit: ")
    assert convert_weights("export", "dit", tmp_path / "ours", tmp_path / "hf").startswith("exported dit: ")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(reference_transformer_forward(loaded, LATENTS, TIMESTEP, TEXT),
                               reference_transformer_forward(model, LATENTS, TIMESTEP, TEXT), atol=1e-5)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The released Wan2.1 T2V sizes (the Wan2.1 model cards and issue 3): dim, heads, layers, FFN.
RELEASED = {"gen_1_3b": (1536, 12, 30, 8960), "gen_14b": (5120, 40, 40, 13824)}


def test_config_files_build_the_released_sizes():
    """gen_1_3b / gen_14b have the released architectures, and our model has diffusers' parameter count there."""
    from director_jax.build import dit_config
    from director_jax.configs_common import load_config
    from director_jax.convert.dit import empty_transformer, parameter_count

    for name in ("gen_tiny", "gen_1_3b", "gen_14b"):
        cfg = dit_config(load_config(CONFIGS / f"{name}.py").model)
        if name in RELEASED:
            assert (cfg.inner_dim, cfg.num_attention_heads, cfg.num_layers, cfg.ffn_dim) == RELEASED[name]
            assert (cfg.attention_head_dim, cfg.text_dim, cfg.in_channels, cfg.patch_size) == (128, 4096, 16, (1, 2, 2))
        with torch.device("meta"):
            reference = WanTransformer3DModel(**cfg.to_diffusers_config())
        assert parameter_count(empty_transformer(cfg)) == sum(p.numel() for p in reference.parameters()), name


def test_build_from_config_random_and_from_checkpoint(tmp_path, reference):
    from director_jax.build import build_director_gen
    from director_jax.configs_common import load_config

    cfg = load_config(CONFIGS / "gen_tiny.py")
    gen = build_director_gen(cfg)
    assert gen.dit.remat_policy == cfg.model_options.remat_policy
    assert gen.dit.dtype == jnp.dtype(cfg.model_options.dtype)
    # init_from a checkpoint whose config disagrees with the run's: named, not silently used
    _, state = reference
    export_transformer(load_transformer(state, TINY), tmp_path / "wan")
    cfg.init_from = str(tmp_path / "wan")
    with pytest.raises(ValueError, match="but the run's config says"):
        build_director_gen(cfg)
    for key, value in TINY.to_diffusers_config().items():
        if key in cfg.model:
            cfg.model[key] = tuple(value) if isinstance(value, list) else value
    cfg.model_options.dtype = "float32"
    gen = build_director_gen(cfg)
    np.testing.assert_allclose(_run(gen.dit), _run(load_transformer(state, TINY)), atol=1e-6)
