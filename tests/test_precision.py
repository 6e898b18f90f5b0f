"""The precision recipe's parts: Adam moments stored in another dtype, the EMA's dtype, float32 exceptions of a
bfloat16 DiT; checked against optax's own AdamW and the float32 model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from director_jax.errors import UserError
from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.train.checks import check_numbers
from director_jax.train.optim import ema_copy, ema_update, make_optimizer


def _optim(**kw) -> ml_collections.ConfigDict:
    base = dict(learning_rate=1e-2, warmup_steps=2, decay_steps=0, end_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8,
                weight_decay=0.01, grad_clip=1.0, ema_decay=0.9)
    return ml_collections.ConfigDict({**base, **kw})


def _run(tx, params, steps=6):
    """Applies ``steps`` updates of fixed pseudo-random gradients; returns the params and the last state."""
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


PARAMS = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32), "b": jnp.zeros((5,))}


def test_float32_stored_moments_equal_optax_adamw():
    ours, state = _run(make_optimizer(_optim(moment_dtype="float32"), 10), PARAMS)
    theirs, ref_state = _run(make_optimizer(_optim(), 10), PARAMS)
    for name in PARAMS:
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(theirs[name]), rtol=1e-6, atol=1e-7)
    # the same state tree (checkpoints of either recipe hold the same array names)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)


def test_bfloat16_moments_are_stored_rounded_and_stay_close():
    ours, state = _run(make_optimizer(_optim(moment_dtype="bfloat16"), 10), PARAMS)
    theirs, _ = _run(make_optimizer(_optim(), 10), PARAMS)
    adam = state[1][0]  # chain(clip, chain(adam, decay, lr)) -> the adam state
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert ours["w"].dtype == jnp.float32
    moved = np.abs(np.asarray(theirs["w"] - PARAMS["w"])).max()
    np.testing.assert_allclose(np.asarray(ours["w"]), np.asarray(theirs["w"]), atol=0.02 * moved)
    assert not np.array_equal(np.asarray(ours["w"]), np.asarray(theirs["w"]))  # the rounding is real


def test_ema_dtype_and_update_in_float32():
    ema = ema_copy(PARAMS, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(ema)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(ema_copy(PARAMS, None))} == {jnp.dtype(jnp.float32)}
    new = ema_update(ema, jax.tree.map(lambda p: p + 1.0, PARAMS), 0.5)
    expected = 0.5 * np.asarray(ema["w"], np.float32) + 0.5 * (np.asarray(PARAMS["w"]) + 1.0)
    assert new["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new["w"], np.float32), expected, rtol=1e-2)


def test_bad_precision_settings_are_one_line_errors():
    cfg = ml_collections.ConfigDict(dict(optim=_optim(moment_dtype="float16"),
                                         train=dict(batch_size=1, micro_batches=1, nonfinite="stop")))
    with pytest.raises(UserError, match="moment_dtype"):
        check_numbers(cfg)
    with pytest.raises(ValueError, match="moment_dtype"):
        make_optimizer(_optim(moment_dtype="int8"), 10)
    cfg.optim = _optim(ema_memory="hbm")
    with pytest.raises(UserError, match=r"ema_memory='hbm': choose device or host"):
        check_numbers(cfg)


def test_bfloat16_dit_keeps_norms_modulation_and_time_path_in_float32():
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=24,
                       freq_dim=32)
    model = WanDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dtypes = {"/".join(map(str, path)): leaf.dtype for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    kept = {name for name, dtype in dtypes.items() if dtype == jnp.float32}
    expected = {name for name in dtypes if any(key in name for key in (
        "scale_shift_table", "time_embedder", "time_proj", "norm2", "norm_q", "norm_k"))}
    assert kept == expected and len(expected) == 14
    assert all(dtypes[name] == jnp.bfloat16 for name in dtypes if name not in kept)  # every other weight is bf16
    # the same draws as float32 storage, rounded (init does not depend on the dtype); with those rounded values
    # stored in float32 (bf16 compute in both) the outputs are equal: storage alone changes nothing
    reference = WanDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours = nnx.state(model, nnx.Param)
    rounded = jax.tree.map(lambda r, b: r.astype(b.dtype).astype(jnp.float32), nnx.state(reference, nnx.Param), ours)
    for (_, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(rounded), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    nnx.update(reference, rounded)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, 6, 24)), jnp.float32)
    out = model(latents, jnp.asarray([400.0]), text)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(reference(latents, jnp.asarray([400.0]), text), np.float32), atol=1e-6)
