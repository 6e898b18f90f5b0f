"""The curated suite's cases (``eval/curated.py``) on real shards: fixed-seed windows of held-out clips, keyframes
at the shot starts of multi-shot windows, the true frames as references, saved case lists rebuilt exactly.

The footage is the shards tests' synthetic movies written as real mp4 clips (``tests/test_shards.py``), so every
clip's cuts and frames are known; the suite is checked against those, not against its own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from director_jax.configs_common import load_config
from director_jax.curation.shards import build_curated_dataset
from director_jax.eval.compare import compare_runs
from director_jax.eval.curated import MULTI_SHOT, VideoShape, case_list, cases_from_list, curated_cases
from director_jax.eval.metrics import psnr
from director_jax.eval.run import run_evaluation
from tests.test_generate import save_gen_checkpoint
from tests.test_shards import DEFAULT_SPECS, make_curated_dir, window_counts

ROOT = Path(__file__).resolve().parents[1]

SHAPE = VideoShape(height=32, width=32, fps=8.0, frames=17)  # gen_tiny's clip


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    """12 curated clips of 20-40 frames at 48x64 (six with cuts), half of them in the validation split."""
    root = tmp_path_factory.mktemp("footage")
    samples = make_curated_dir(root)
    build_curated_dataset(root, validation_fraction=0.5, progress=False)
    return root, {line["id"]: (line, frames) for line, frames in samples}


def suite_config(root, **fields) -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "eval_curated.py")
    cfg.data = str(root)
    cfg.update(fields)
    return cfg


def cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover height x width keeping the aspect ratio, then centre-crop (PIL bicubic: an independent
    resampler from the loader's swscale)."""
    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (rh - height) // 2, (rw - width) // 2
    out = []
    for f in frames:
        img = Image.fromarray(np.round((f + 1) * 127.5).clip(0, 255).astype(np.uint8)).resize((rw, rh),
                                                                                              Image.BICUBIC)
        out.append(np.asarray(img)[top:top + height, left:left + width])
    return np.stack(out).astype(np.float32) / 127.5 - 1


def test_cases_are_windows_of_the_true_clips_with_keyframes_at_their_shot_starts(footage):
    root, truth = footage
    cases, skipped = curated_cases(suite_config(root, split="all", max_clips=12), SHAPE)
    assert skipped == [] and len(cases) == len(DEFAULT_SPECS) == len({c.clip_id for c in cases})
    assert [c.clip_id for c in cases] == sorted(truth)  # by id
    multi = 0
    for case in cases:
        line, frames = truth[case.clip_id]
        window = np.arange(case.start, case.start + SHAPE.frames)  # 8 fps clips at 8 fps: frame for frame
        rel_cuts = [c - line["start_frame"] for c in line["cuts"]]
        shot_of = np.searchsorted(rel_cuts, window, side="right")
        true_cuts = [j for j in range(1, SHAPE.frames) if shot_of[j] != shot_of[j - 1]]
        assert list(case.cuts) == true_cuts
        if case.template == MULTI_SHOT:
            multi += 1
            assert true_cuts and list(case.keyframes) == [0, *true_cuts]
        else:
            assert not rel_cuts  # a clip with a cut always has a 17-frame window around it here
            k = len(case.keyframes)
            assert case.template == f"single shot: {k} keyframe{'s' if k > 1 else ''}"
            assert k in (1, 2, 3)  # the config's min_keyframes..max_keyframes
            assert len(set(case.keyframes)) == k and all(0 <= f < SHAPE.frames for f in case.keyframes)
        # the reference is the true window, resized and cropped (mp4 and resampler differences only)
        expected = cover_crop(frames[window], SHAPE.height, SHAPE.width)
        assert case.reference.shape == (SHAPE.frames, 32, 32, 3)
        assert float(np.mean(psnr(case.reference, expected, axis=(1, 2, 3)))) > 26
        first, last, _ = window_counts(rel_cuts, window)
        assert case.caption.count("Shot ") == last - first + 1
    assert multi == 6  # every clip with a cut holds a window around one at 17 frames


def test_single_shot_windows_draw_the_configured_number_of_keyframes(footage):
    root, truth = footage
    for count in (1, 2, 4):
        cases, _ = curated_cases(suite_config(root, split="all", max_clips=12, min_keyframes=count,
                                              max_keyframes=count), SHAPE)
        single = [c for c in cases if not truth[c.clip_id][0]["cuts"]]  # clips without a cut (the manifest says)
        assert len(single) == 6 and all(len(c.keyframes) == count for c in single)
        assert all(c.template != MULTI_SHOT for c in single)


def test_the_draw_is_a_pure_function_of_seed_and_clip(footage):
    root, _ = footage
    a, _ = curated_cases(suite_config(root, split="all", max_clips=12), SHAPE)
    b, _ = curated_cases(suite_config(root, split="all", max_clips=12), SHAPE)
    assert [x.describe() for x in a] == [y.describe() for y in b]
    assert all(np.array_equal(x.reference, y.reference) for x, y in zip(a, b, strict=True))
    validation, _ = curated_cases(suite_config(root), SHAPE)  # the default split
    by_id = {c.clip_id: c for c in a}
    assert 0 < len(validation) < len(a)
    for case in validation:  # a clip's case does not depend on which other clips the suite holds
        other = by_id[case.clip_id]
        assert (case.start, case.keyframes, case.cuts, case.caption) == (other.start, other.keyframes, other.cuts,
                                                                         other.caption)
    reseeded, _ = curated_cases(suite_config(root, split="all", max_clips=12, seed=1), SHAPE)
    assert [(c.start, c.keyframes) for c in reseeded] != [(c.start, c.keyframes) for c in a]


def test_short_clips_are_counted_skips_and_a_suite_with_none_is_refused(footage):
    root, truth = footage
    shape = VideoShape(32, 32, 8.0, 30)
    cases, skipped = curated_cases(suite_config(root, split="all", max_clips=12), shape)
    short = sorted(i for i, (line, _) in truth.items() if line["num_frames"] < 30)
    assert sorted(s["clip_id"] for s in skipped) == short and len(cases) == 12 - len(short)
    assert all("needs 30" in s["reason"] for s in skipped)
    with pytest.raises(ValueError, match="none of the 12 clips .* holds 60 frames"):
        curated_cases(suite_config(root, split="all"), VideoShape(32, 32, 8.0, 60))


def test_a_saved_case_list_rebuilds_the_same_cases(footage, tmp_path):
    root, truth = footage
    cases, _ = curated_cases(suite_config(root, split="all", max_clips=5), SHAPE)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(case_list(cases, SHAPE, str(root), "all", 0)))
    again = cases_from_list(path, str(root), SHAPE)
    assert [c.describe() for c in again] == [c.describe() for c in cases]
    assert all(np.array_equal(x.reference, y.reference) for x, y in zip(again, cases, strict=True))
    reused, _ = curated_cases(suite_config(root, cases_file=str(path)), SHAPE)  # the split does not matter
    assert [c.describe() for c in reused] == [c.describe() for c in cases]
    with pytest.raises(ValueError, match="made for clips"):
        cases_from_list(path, str(root), VideoShape(32, 32, 8.0, 9))
    saved = json.loads(path.read_text())
    saved["cases"][2]["clip_id"] = "0123456789abcdef"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="case 2 of .* uses clip '0123456789abcdef'"):
        cases_from_list(path, str(root), SHAPE)
    saved["cases"][2]["clip_id"] = cases[2].clip_id
    saved["cases"][2]["start"] = 10_000
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="do not fit the clip"):
        cases_from_list(path, str(root), SHAPE)


# ---- the suite end to end on a Director-Gen checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gens")
    return tuple(save_gen_checkpoint(root / name, configure=lambda c, s=seed: setattr(c, "seed", s))
                 for name, seed in (("a", 0), ("b", 1)))


def model_config(root, **fields) -> ml_collections.ConfigDict:
    cfg = suite_config(root, **{"split": "all", "max_clips": 4, "model_config": str(ROOT / "configs" / "gen_tiny.py"),
                                **fields})
    cfg.sampler.steps = 2
    cfg.metrics.fvd_size = 64
    cfg.metrics.fvd_bootstrap = 20
    return cfg


def test_a_checkpoint_on_the_suite_reruns_byte_identically_on_any_device_count(footage, checkpoints, tmp_path):
    root, _ = footage
    cfg = model_config(root)
    results = {}
    for name, devices in (("a", jax.devices()), ("b", jax.devices()), ("one", jax.devices()[:1])):
        results[name] = run_evaluation(cfg, tmp_path / name, ckpt=checkpoints[0], devices=devices, progress=False)
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (tmp_path / "a" / "cases.json").read_bytes() == (tmp_path / "one" / "cases.json").read_bytes()
    eight, one = results["a"], results["one"]
    assert [c["clip_id"] for c in eight["cases"]] == [c["clip_id"] for c in one["cases"]]
    for got, want in [(one["aggregate"], eight["aggregate"]), *zip(one["cases"], eight["cases"], strict=True)]:
        for key, value in want.items():
            if isinstance(value, float):  # float32 rounding of the partitioned programs (test_evaluate.py)
                rel = 2e-4 if key.startswith("fvd_ci") else 1e-5  # percentiles of resamples amplify it (test_evaluate)
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-6, nan_ok=True), key
    agg = eight["aggregate"]
    for key in ("psnr", "lpips", "keyframe_psnr", "pacing_offset_frames", "flicker", "fvd", "fvd_ci_low"):
        assert np.isfinite(agg[key]), key
    assert "trajectory_error_px" not in agg  # real footage has no object truth
    assert eight["by_distance"]["distance"][0] == 0 and sum(eight["by_distance"]["frames"]) == 4 * SHAPE.frames
    assert any("FVD from 4 clips" in w for w in eight["warnings"])
    page = (tmp_path / "a" / "report.html").read_text()
    assert "media/distance.png" in page and (tmp_path / "a" / "media" / "distance.png").stat().st_size > 1000


def test_a_second_checkpoint_reuses_the_case_list(footage, checkpoints, tmp_path):
    root, _ = footage
    first = run_evaluation(model_config(root), tmp_path / "a", ckpt=checkpoints[0], progress=False)
    cases_file = tmp_path / "a" / "cases.json"
    # the second run is told another split and seed for the draw: the case list decides the cases
    cfg = model_config(root, cases_file=str(cases_file), split="validation", seed=5)
    second = run_evaluation(cfg, tmp_path / "b", ckpt=checkpoints[1], progress=False)
    describe = ("clip_id", "start", "keyframes", "cuts", "caption", "template")
    assert [{k: c[k] for k in describe} for c in second["cases"]] == \
        [{k: c[k] for k in describe} for c in first["cases"]]
    assert second["aggregate"]["psnr"] != first["aggregate"]["psnr"]  # another model, same footage
    page = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "compare")
    assert page.is_file() and (tmp_path / "compare" / "compare.json").is_file()


def test_the_cli_names_bad_footage(footage, tmp_path):
    root, _ = footage
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "director_jax.evaluate", "--suite", "curated", "--baseline", "reference",
            f"--config.model_config={ROOT / 'configs' / 'gen_tiny.py'}", f"--workdir={tmp_path / 'out'}"]

    def fails(*extra: str) -> str:
        proc = subprocess.run([*base, *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    assert "needs footage: --data" in fails()
    assert "no curated TFDS dataset" in fails(f"--data={tmp_path}")
    assert "none of the" in fails(f"--data={root}", "--config.frames=80")
    assert "--config.split='test'" in fails(f"--data={root}", "--config.split=test")
    assert "does not exist" in fails(f"--data={root}", f"--config.cases_file={tmp_path / 'nope.json'}")
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass
