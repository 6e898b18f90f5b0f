"""The trainer on curated shards (``data.source='curated'``): the loader's batches, caption embeddings included,
reach the step in the loader's order, and configs the shards cannot feed are refused by name.

The shards are built here the real way (mp4 clips, a text-embedding cache with known embeddings, the TFDS
builder); the reference for what the trainer must see is the loader itself, iterated on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from director_jax.configs_common import load_config
from director_jax.curation.shards import build_curated_dataset
from director_jax.data.loader import make_curated_dataset, make_iterator
from director_jax.train.trainer import build_run, global_batch, make_data, train
from tests.test_shards import all_captions, make_curated_dir, make_text_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """12 clips of 20-40 frames at 48x64, captions embedded (dim 32 = gen_tiny's text_dim, up to 16 tokens)."""
    root = tmp_path_factory.mktemp("curated")
    samples = make_curated_dir(root)
    truth = make_text_cache(root / "cache", all_captions([s for s, _ in samples]), dtype="float32", dim=32,
                            max_length=16)
    build_curated_dataset(root, text_cache=root / "cache", text_max_length=16, validation_fraction=0.0,
                          progress=False)
    return root, truth


def _cfg(root: Path, steps: int = 3, **overrides):
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.checkpoint.every = steps
    cfg.mesh.update(dict(data=2, fsdp=4, tensor=1))
    cfg.data.source = "curated"
    cfg.data.curated.dir = str(root)
    cfg.data.curated.caption_dropout = 0.25
    cfg.text.conditioning = True
    cfg.train.timelines = "fixed"  # the data path of one timeline; per-example ones: tests/test_train_timelines.py
    for path, value in overrides.items():
        section, key = path.split(".")
        cfg[section][key] = value
    return cfg


def test_batches_hold_the_loaders_clips_and_the_cached_caption_embeddings(curated):
    root, truth = curated
    cfg = _cfg(root)
    run = build_run(cfg, materialize_frozen=False)
    local = next(make_data(run))
    batch = global_batch(run, local)
    assert set(batch) == {"video", "text", "text_mask"}
    assert batch["video"].shape == (8, 17, 32, 32, 3) and batch["text"].shape == (8, 64, 32)
    reference = next(make_iterator(make_curated_dataset(run.task.curated_config(), global_batch_size=8,
                                                        shuffle_seed=int(cfg.seed))))
    np.testing.assert_array_equal(np.asarray(batch["video"]), reference["video"])
    text, mask = np.asarray(batch["text"]), np.asarray(batch["text_mask"])
    for row, caption in enumerate(local["caption"]):
        emb = truth[str(caption)]  # "" for a dropped caption: the cache's empty-caption embedding
        np.testing.assert_array_equal(text[row, :len(emb)], emb)
        assert mask[row].sum() == len(emb) and not text[row, len(emb):].any()
    assert local["caption_dropped"].any() and not local["caption_dropped"].all()  # both kinds of row were checked


def test_training_reads_the_shards_in_the_loaders_order(curated, tmp_path):
    root, _ = curated
    cfg = _cfg(root, steps=3)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    it = make_iterator(make_curated_dataset(build_run(cfg, materialize_frozen=False).task.curated_config(),
                                            global_batch_size=8, shuffle_seed=int(cfg.seed)))
    expected = {step: [int(i) for i in next(it)["index"]] for step in (1, 2, 3)}
    assert result.data_indices == expected
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_configs_the_shards_cannot_feed_are_named(curated, tmp_path):
    root, _ = curated
    cases = [
        ({"train.latents": "precomputed"}, "set --config.train.latents=encode"),
        ({"train.timelines": "per_frame"}, "choose one of ('fixed', 'per_example')"),
        ({"model.text_dim": 48}, "48"),
        ({"data.source": "shards"}, "choose one of ('synthetic', 'curated', 'latents')"),
    ]
    for overrides, message in cases:
        cfg = _cfg(root, **overrides)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            make_data(build_run(cfg, materialize_frozen=False))
    # shards built without caption embeddings, and a text-conditioned model
    bare = tmp_path / "bare"
    make_curated_dir(bare)
    build_curated_dataset(bare, validation_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="built without caption embeddings"):
        make_data(build_run(_cfg(bare), materialize_frozen=False))
    cfg = _cfg(bare)
    cfg.text.conditioning = False  # unconditional training needs none
    run = build_run(cfg, materialize_frozen=False)
    assert set(global_batch(run, next(make_data(run)))) == {"video"}


@pytest.mark.parametrize("config,fields", [
    ("vae_tiny.py", {"video": (8, 5, 32, 32, 3)}),
    # given: one per latent frame, frames 0-15 in 1 + 4 latents and the keyframe 16 in one
    ("sr_tiny.py", {"video": (8, 17, 64, 64, 3), "upsampled": (8, 17, 64, 64, 3), "latent_given": (8, 6)}),
])
def test_vae_and_sr_tasks_take_curated_windows_of_their_size(curated, config, fields):
    root, _ = curated
    cfg = load_config(ROOT / "configs" / config)
    cfg.mesh.update(dict(data=2, fsdp=4, tensor=1))
    cfg.data.source, cfg.data.curated.dir = "curated", str(root)
    cfg.train.timelines = "fixed"
    run = build_run(cfg, materialize_frozen=False)
    batch = global_batch(run, next(make_data(run)))
    assert {k: tuple(v.shape) for k, v in batch.items()} == fields
    reference = next(make_iterator(make_curated_dataset(run.task.curated_config(),
                                                        global_batch_size=int(cfg.train.batch_size),
                                                        shuffle_seed=int(cfg.seed))))
    np.testing.assert_array_equal(np.asarray(batch["video"]), reference["video"])
