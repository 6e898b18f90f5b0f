"""Synthetic mp4 movies with ground truth: the file decodes to the rendered frames, the truth is exact,
every cut is visible to a content detector, and the captions say what the spec holds."""

import json
from pathlib import Path

import av
import numpy as np
import pytest

from director_jax.data.captions import parse_multishot_caption
from director_jax.data.synthetic import (
    MIN_CUT_SCORE,
    ShotSpec,
    color_name,
    content_score,
    make_movie,
    motion_words,
    read_synthetic_truth,
    render_shot,
    shot_caption,
    truth_path,
    write_synthetic_movie,
)
from director_jax.video_io import to_uint8

H, W, FPS = 48, 64, 8.0
LENGTHS = [8, 10, 9]


def _decode(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "movie.mp4"
    return path, write_synthetic_movie(path, seed=3, shot_lengths=LENGTHS, height=H, width=W, fps=FPS)


def test_mp4_decodes_to_the_rendered_frames(movie):
    path, info = movie
    frames, fps = _decode(path)
    assert frames.shape == (sum(LENGTHS), H, W, 3)
    assert fps == FPS
    ref = to_uint8(info.movie.frames)
    luma = np.array([0.299, 0.587, 0.114])
    for got, want in zip(frames, ref, strict=True):
        # Measured over 40 seeds x 39 frames at crf 12: luma PSNR >= 40.9 dB, RGB PSNR >= 24.2 dB. The RGB
        # floor is 4:2:0 chroma subsampling of saturated shape edges at 48x64 (crf 0 gives the same), so
        # luma is the sharp check of the coding; 36 / 22 dB leave ~4 dB slack and still catch a wrong frame.
        assert _psnr(got @ luma, want @ luma) >= 36.0
        assert _psnr(got, want) >= 22.0
    # Each decoded frame is nearer its own rendered frame than the next one: no frame dropped or doubled.
    for i in range(len(ref) - 1):
        assert _psnr(frames[i], ref[i]) > _psnr(frames[i], ref[i + 1])


def test_rendered_frames_follow_the_specs_and_make_movie(movie):
    _, info = movie
    starts = [0, 8, 18]
    assert info.movie.shot_starts == starts
    for spec, start, n in zip(info.specs, starts, LENGTHS, strict=True):
        shot = render_shot(spec, H, W)
        np.testing.assert_array_equal(info.movie.frames[start:start + n], shot.frames)
    # The first shot is never redrawn, so a one-shot movie is make_movie's movie bit for bit.
    one = write_synthetic_movie(info.path.replace(".mp4", "_one.mp4"), 3, [8], H, W)
    np.testing.assert_array_equal(one.movie.frames, make_movie(3, [8], H, W).frames)


def test_truth_json_matches(movie):
    path, info = movie
    truth = read_synthetic_truth(path)
    assert truth == json.loads(Path(truth_path(path)).read_text()) == info.truth()
    assert truth["shot_starts"] == [0, 8, 18]
    assert (truth["num_frames"], truth["fps"], truth["height"], truth["width"]) == (27, FPS, H, W)
    assert len(truth["centers"]) == 27
    for spec, start in zip(info.specs, truth["shot_starts"], strict=True):
        # At a shot's first frame every object sits at its spec's start (inside the frame: no bounce yet).
        assert len(truth["centers"][start]) == len(spec.shapes)
        for centre, shape in zip(truth["centers"][start], spec.shapes, strict=True):
            np.testing.assert_allclose(centre, shape["start"], atol=1e-3)
        # One frame later: start + velocity (the object is at least one radius from the edge at t=0,
        # and moves < 0.2 of the short side per frame, so a bounce could only occur if it started within
        # that distance; check only the shapes that cannot have bounced).
        for centre, shape in zip(truth["centers"][start + 1], spec.shapes, strict=True):
            want = np.add(shape["start"], shape["velocity"])
            r = shape["radius"]
            if r <= want[0] <= H - r and r <= want[1] <= W - r:
                np.testing.assert_allclose(centre, want, atol=1e-3)
    assert truth["shot_captions"] == info.shot_captions
    assert parse_multishot_caption(truth["caption"]) == truth["shot_captions"]
    assert truth["caption"].startswith("The video features 3 shots. Shot 1: ")


def test_every_cut_is_visible_and_shots_are_smooth(tmp_path):
    for seed in range(6):
        path = tmp_path / f"m{seed}.mp4"
        info = write_synthetic_movie(path, seed, [8, 12, 9, 10], H, W)
        frames, _ = _decode(path)
        cuts = set(info.movie.shot_starts[1:])
        scores = {i: content_score(frames[i - 1], frames[i]) for i in range(1, len(frames))}
        # Rendered cuts score >= MIN_CUT_SCORE (45); coding noise moves a score by ~1 (measured);
        # PySceneDetect's ContentDetector cuts at 27 by default, motion within a shot stays <= 15.
        assert min(scores[c] for c in cuts) >= MIN_CUT_SCORE - 5
        assert max(s for i, s in scores.items() if i not in cuts) <= 20
        rendered = to_uint8(info.movie.frames)
        assert min(content_score(rendered[c - 1], rendered[c]) for c in cuts) >= MIN_CUT_SCORE


def test_content_score_matches_opencv_hsv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(2))
    hsv = [cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.float32) for x in (a, b)]
    # OpenCV rounds H to integers (and maps 180 to 0): at most a few units per pixel, < 1 on the mean.
    assert abs(content_score(a, b) - float(np.abs(hsv[0] - hsv[1]).mean())) < 1.0
    assert content_score(a, a) == 0.0


def test_scenedetect_finds_every_cut(tmp_path):
    scenedetect = pytest.importorskip("scenedetect")
    path = tmp_path / "cuts.mp4"
    info = write_synthetic_movie(path, 11, [8, 10, 12, 9], H, W)
    scenes = scenedetect.detect(str(path), scenedetect.ContentDetector(threshold=27.0, min_scene_len=4))
    assert [s[0].frame_num for s in scenes] == info.movie.shot_starts == [0, 8, 18, 30]


def test_same_seed_same_movie(tmp_path):
    a = write_synthetic_movie(tmp_path / "a.mp4", 5, [8, 8], H, W)
    b = write_synthetic_movie(tmp_path / "b.mp4", 5, [8, 8], H, W)
    np.testing.assert_array_equal(a.movie.frames, b.movie.frames)
    assert a.truth() == b.truth()
    assert write_synthetic_movie(tmp_path / "c.mp4", 6, [8, 8], H, W).truth() != a.truth()


def test_caption_of_a_hand_built_shot():
    spec = ShotSpec(
        num_frames=10, background_top=(-1.0, -1.0, -0.1), background_bottom=(-0.9, -1.0, 0.1),  # navy, navy
        shapes=({"kind": "disc", "color": (0.9, -0.8, -0.9), "radius": 5.0, "start": (20.0, 30.0),
                 "velocity": (-3.0, -3.0)},  # red, up and left, travels 42 px over 10 frames of a 48 side
                {"kind": "square", "color": (-0.9, -0.9, 0.95), "radius": 5.0, "start": (10.0, 10.0),
                 "velocity": (1.0, 0.1)}))  # blue, down, travels 10 px: slowly
    assert shot_caption(spec, H, W) == ("a red circle moves to the upper left and a blue square moves slowly down, "
                                        "on a navy background.")
    assert shot_caption(spec) == ("a red circle moves to the upper left and a blue square moves down, "
                                  "on a navy background.")
    gradient = ShotSpec(10, (1.0, 1.0, -1.0), (1.0, -1.0, -1.0), spec.shapes[:1])
    assert shot_caption(gradient).endswith("on a yellow to red gradient background.")


def test_colour_and_motion_words():
    assert color_name((1, -1, -1)) == "red"
    assert color_name((0.9, 0.9, 0.9)) == "white"
    assert color_name((0.05, -0.05, 0.0)) == "grey"
    assert color_name((1, 0.1, -0.9)) == "orange"
    assert color_name((-0.9, 0.8, 0.9)) == "cyan"
    assert motion_words((0.0, 2.0)) == "moves right"
    assert motion_words((0.5, -2.0)) == "moves left"
    assert motion_words((-2.0, 0.3)) == "moves up"
    assert motion_words((2.0, 2.0)) == "moves to the lower right"
    assert motion_words((-1.0, 1.5)) == "moves to the upper right"
    assert motion_words((0.1, 0.1), num_frames=10, size=48) == "moves slowly to the lower right"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="positive frame counts"):
        write_synthetic_movie(tmp_path / "x.mp4", 0, [8, 0], H, W)
    with pytest.raises(FileNotFoundError, match="write_synthetic_movie"):
        read_synthetic_truth(tmp_path / "missing.mp4")


def test_movies_command_writes_movies_stills_and_truth(tmp_path):
    """``python -m director_jax.movies``: mp4s decode to the rendered frames, stills are those frames exactly,
    the truth records the cut; a rerun keeps every file; a bad flag is one line and writes nothing."""
    import os
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "movies"
    cmd = [sys.executable, "-m", "director_jax.movies", f"--out={out}", "--count=2", "--seed=5", "--size=32",
           "--stills=0,9", "--noprogress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for seed in (5, 6):
        path = out / f"movie_{seed}.mp4"
        truth = read_synthetic_truth(path)
        lengths = truth["settings"]["shot_lengths"]
        assert truth["shot_starts"] == [0, lengths[0]] and truth["num_frames"] == sum(lengths)
        rendered = write_synthetic_movie(tmp_path / "ref.mp4", seed, lengths, 32, 32, 8.0, max_shapes=2).movie.frames
        frames, fps = _decode(path)
        assert fps == 8.0 and frames.shape == (sum(lengths), 32, 32, 3)
        assert _psnr(frames, to_uint8(rendered)) > 28  # H.264 yuv420 at 32x32 (chroma at 16x16): ~30 dB
        for f in (0, 9):
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"movie_{seed}_f{f}.png")), to_uint8(rendered[f]))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    bad = subprocess.run([*cmd[:3], f"--out={tmp_path / 'bad'}", "--stills=500"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --stills [500]")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
