"""The CPU demo's parts: footage through the real curation, training windows, config files the commands read.

The whole demo (``--quick`` budgets: every stage, numbers not meaningful) runs in the slow set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from director_jax.configs_common import load_config
from director_jax.curation.pipeline import curate
from director_jax.demo import data, stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    cfg = load_config(ROOT / "configs" / "demo.py").data
    cfg.size = 32
    infos = data.write_movies(root / "movies", 500, 3, cfg, max_shapes=1, progress=False)
    curate(sorted(str(p) for p in (root / "movies").glob("*.mp4")), root / "curated",
           data.curation_config(progress=False))
    return infos, data.read_curated(root / "curated")


def test_curated_samples_carry_the_true_cuts(curated):
    infos, samples = curated
    kinds = {s["kind"] for s in samples}
    assert kinds == {"single_shot", "multi_shot"}
    true_lengths = sorted(len(i.movie.frames) - i.movie.shot_starts[1] for i in infos) + sorted(
        i.movie.shot_starts[1] for i in infos)
    for s in samples:
        assert s["frames"].shape[1:] == (32, 32, 3) and s["frames"].dtype == np.float32
        assert s["frames"].min() >= -1.0 and s["frames"].max() <= 1.0
        if s["kind"] == "multi_shot":
            (cut,) = s["cuts"]  # two-shot samples: the cut, in the sample's own frames
            jump = np.abs(np.diff(s["frames"], axis=0)).mean(axis=(1, 2, 3))
            assert int(np.argmax(jump)) + 1 == cut  # the largest frame change is at the cut
    single = sorted(len(s["frames"]) for s in samples if s["kind"] == "single_shot")
    assert single == sorted(true_lengths)  # every shot of every movie, whole


def test_training_windows_come_from_the_samples(curated):
    _, samples = curated
    rng = np.random.default_rng(0)
    windows = data.training_windows(samples, 12, 17, rng, multi_shot_fraction=1.0)
    assert windows.shape == (12, 17, 32, 32, 3)
    for w in windows:  # each is a slice of a multi-shot sample (maybe flipped) that contains its cut
        found = False
        for s in (s for s in samples if s["kind"] == "multi_shot"):
            for clip in (w, w[:, :, ::-1]):
                hits = [i for i in range(len(s["frames"]) - 16) if np.array_equal(s["frames"][i:i + 17], clip)]
                found |= any(i < s["cuts"][0] <= i + 16 for i in hits)
        assert found
    small = data.downscale(windows, 2)
    np.testing.assert_allclose(small[0, 0, 0, 0], windows[0, 0, :2, :2].mean(axis=(0, 1)), rtol=0, atol=1e-6)


def test_single_shot_windows_hold_no_cut(curated):
    _, samples = curated
    cut = data.training_windows(samples, 8, 17, np.random.default_rng(1), multi_shot_fraction=1.0)
    single = data.training_windows(samples, 8, 17, np.random.default_rng(2), multi_shot_fraction=0.0)
    smallest_cut_jump = min(np.abs(np.diff(w, axis=0)).mean(axis=(1, 2, 3)).max() for w in cut)
    for w in single:  # single-shot windows: no frame change anywhere near the smallest cut's
        assert np.abs(np.diff(w, axis=0)).mean(axis=(1, 2, 3)).max() < 0.5 * smallest_cut_jump


def test_config_files_read_back_as_the_commands_read_them(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.py")
    gen = stages.gen_config(cfg, tmp_path)
    path = stages.write_config_file(tmp_path / "config.py", gen, "test")
    back = load_config(path)
    assert isinstance(back, ml_collections.ConfigDict)
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(gen.to_dict(), sort_keys=True)
    assert back.video.height == 32 and back.vae.dim_mult == [1, 2, 2] and back.train.timelines == "per_example"
    # both train through the trainer on their own latent cache of the curated shards, every row its own task
    sr = stages.sr_config(cfg, tmp_path)
    for c, task in ((back, "gen"), (sr, "sr")):
        assert (c.task, c.data.source, c.train.latents) == (task, "latents", "precomputed")
        assert c.data.latents.dir == str((tmp_path / "latents" / task).resolve())
        assert c.data.curated.dir == str((tmp_path / "curated").resolve())
        assert c.data.tasks.cuts_keyframed and c.data.tasks.max_keyframes == cfg.tasks.max_keyframes
    assert tuple(back.train.latent_buckets) == tuple(cfg.gen.latent_buckets)
    assert (sr.video.height, back.video.height) == (cfg.data.size, cfg.data.size // cfg.data.sr_scale)
    # keyframe guidance needs keyframe dropout in training: both reach the files generate / evaluate / train read
    assert back.train.keyframe_dropout == cfg.gen.keyframe_dropout > 0
    assert back.sampler.keyframe_guidance == cfg.gen.keyframe_guidance > 1


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    """``python -m director_jax.demo --quick``: every stage, the report and its JSON (budgets tiny, ~4 min)."""
    out = subprocess.run([sys.executable, "-m", "director_jax.demo", "--workdir", str(tmp_path), "--quick",
                          "--noprogress"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["timings_s"]) >= {"curate", "fit VAE", "train Director-Gen", "train Director-SR", "showcase",
                                        "evaluate", "PyTorch export"}
    assert len(report["showcase"]) == 9
    for row in report["showcase"]:
        assert (tmp_path / "showcase" / row["file"]).stat().st_size > 0
        assert (tmp_path / "showcase" / row["sheet"]).stat().st_size > 0
    assert report["export"]["psnr_db"] >= 40.0  # PyTorch from the exported weights re-makes the JAX video
    assert "keyframe-frame PSNR" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "gen" / "config.py").exists() and (tmp_path / "vae" / "config.json").exists()
