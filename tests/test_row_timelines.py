"""Per-example timelines in one static-shape step (``data/row_timelines.py``): every row's chunks, latents,
masks and padding.

References: ``TimelineLayout`` of each row's own spans (given mask, MC-RoPE positions, latent count),
``encode_timeline`` of each row alone (the slots' encode), and the same row run alone, unpadded
(the padded row's loss and gradients).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.data.row_timelines import (
    RowTimelineShapes,
    crop_to_bucket,
    max_chunks,
    max_latents,
    plan_rows,
)
from director_jax.data.task_sampling import TaskSamplingConfig, sample_task
from director_jax.models.dit import DirectorGen, WanDiT, WanDiTConfig
from director_jax.models.multichunk import encode_slots, encode_timeline
from director_jax.models.timeline import latent_count
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.pipeline.codec import jitted_codec
from director_jax.train.losses import gen_loss

T = 17
TASKS = TaskSamplingConfig(max_keyframes=4)


def _drawn_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """``n`` task draws over 17 frames, with a cut at frame 9 for half of them (multi-shot windows)."""
    specs = [sample_task(T, [9] if i % 2 else [], seed=seed, index=i, cfg=TASKS) for i in range(n)]
    return np.stack([s.given for s in specs]), np.stack([s.given_start for s in specs]), specs


def test_latent_bound_is_the_most_any_partition_gives():
    for frames, chunks in [(17, 5), (9, 3), (21, 2), (33, 4)]:
        brute = max(sum(latent_count(b - a) for a, b in itertools.pairwise((0, *cuts, frames)))
                    for c in range(chunks) for cuts in itertools.combinations(range(1, frames), c))
        assert max_latents(frames, chunks) == brute


def test_plans_hold_every_rows_own_layout():
    shapes = RowTimelineShapes(T, max_chunks(TASKS.max_keyframes), ())
    given, start, specs = _drawn_rows(64)
    assert len({s.task for s in specs}) == 5  # every task is in these rows
    plan = plan_rows(given, start, shapes)
    size = shapes.buckets[-1]
    for row, spec in enumerate(specs):
        layout = spec.timeline().layout
        n = layout.num_latents
        assert plan["latent_count"][row] == n
        np.testing.assert_array_equal(plan["latent_valid"][row], np.arange(size) < n)
        np.testing.assert_array_equal(plan["latent_given"][row, :n], layout.given)
        np.testing.assert_array_equal(plan["latent_position"][row, :n], layout.position)
        assert not plan["latent_given"][row, n:].any()
    kept = np.arange(64) % 3 > 0
    dropped = plan_rows(given, start, shapes, keyframes_kept=kept)
    assert not dropped["latent_given"][~kept].any()
    np.testing.assert_array_equal(dropped["latent_given"][kept], plan["latent_given"][kept])
    small = crop_to_bucket(plan, int(plan["latent_count"].max()))
    assert small["latent_given"].shape == (64, int(plan["latent_count"].max()))
    with pytest.raises(ValueError, match="more than the bucket"):
        crop_to_bucket(plan, int(plan["latent_count"].max()) - 1)
    with pytest.raises(ValueError, match="add a bucket of 11"):
        RowTimelineShapes(T, 5, (7, 9))


def test_slot_encode_equals_each_rows_own_timeline_encode():
    vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                              temperal_downsample=(True, True), latents_mean=(0.0,) * 4,
                              latents_std=(1.0,) * 4), rngs=nnx.Rngs(0))
    shapes = RowTimelineShapes(T, 5, ())
    given, start, specs = _drawn_rows(6, seed=3)
    plan = plan_rows(given, start, shapes)
    video = jax.random.uniform(jax.random.key(1), (6, T, 8, 8, 3), minval=-1, maxval=1)
    slots = [jnp.asarray(plan[f"slot_frames_{i}"]) for i in range(5)]
    encode = jitted_codec(vae)[0]
    got = np.asarray(encode_slots(vae, video, slots, jnp.asarray(plan["latent_source"]), encode=encode))
    for row, spec in enumerate(specs):
        layout = spec.timeline().layout
        want, _ = encode_timeline(vae, video[row:row + 1], layout, encode=encode)
        np.testing.assert_allclose(got[row, :layout.num_latents], np.asarray(want[0]), atol=1e-5)


def _gen() -> DirectorGen:
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8,
                       freq_dim=32, ffn_dim=64, num_layers=1)
    return DirectorGen(WanDiT(cfg, rngs=nnx.Rngs(2)))


def test_a_padded_rows_loss_and_gradients_equal_the_row_alone():
    gen = _gen()
    graphdef, params = nnx.split(gen)
    shapes = RowTimelineShapes(T, 5, ())
    given, start, specs = _drawn_rows(3, seed=7)
    plan = plan_rows(given, start, shapes)
    size = shapes.buckets[-1]
    latents = jax.random.normal(jax.random.key(3), (3, size, 4, 4, 4))
    text = jax.random.normal(jax.random.key(4), (3, 3, 8))
    keys = jax.random.split(jax.random.key(5), 3)

    def loss(p, lat, g, pos, txt, k, valid):
        return gen_loss(nnx.merge(graphdef, p), lat, g, pos, txt, k, valid=valid)[0]

    grad = jax.jit(jax.value_and_grad(loss))
    assert int(plan["latent_count"].min()) < size  # some row really is padded
    for row in range(3):
        n = int(plan["latent_count"][row])
        sl = slice(row, row + 1)
        padded = grad(params, latents[sl], plan["latent_given"][sl], plan["latent_position"][sl], text[sl],
                      keys[sl], plan["latent_valid"][sl])
        alone = grad(params, latents[sl, :n], plan["latent_given"][sl, :n], plan["latent_position"][sl, :n],
                     text[sl], keys[sl], None)
        np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(padded[1]), jax.tree.leaves(alone[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
