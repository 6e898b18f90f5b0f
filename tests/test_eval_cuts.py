"""Cut accuracy (eval/cuts.py) and pacing adherence (eval/pacing.py) against known answers.

Known answers: an mp4 written and decoded with PyAV whose three shots start at frames 0, 12 and 25
(cut scores ~47-52 against PySceneDetect's threshold of 27, steady motion inside each shot at most
~7), the same shots joined by 8-frame linear dissolves instead (no frame-to-frame step reaches 27,
and the colours are chosen not to pass through grey), synthetic 32x32 movies with a known cut,
hand-worked cut matchings, and clips built from a reference by shifting it in time.
"""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest

from director_jax.data.synthetic import distinct_shots, make_movie
from director_jax.eval.cuts import case_cut_fields, cut_accuracy, detect_cuts, match_cuts
from director_jax.eval.metrics import psnr
from director_jax.eval.pacing import keyframe_landing
from director_jax.eval.temporal import MAX_PSNR

CUTS = (12, 25)
FRAMES = 36
SIZE = 64

# ------------------------------------------------------------------------------------------------
# A real clip: three shots with motion, coded and decoded with PyAV


def three_shots() -> list[np.ndarray]:
    """Each shot drawn for the whole clip length (the dissolves need both sides): (FRAMES, SIZE, SIZE, 3) in [-1, 1]."""
    t = np.arange(FRAMES, dtype=np.float32)[:, None, None]
    yy = np.arange(SIZE, dtype=np.float32)[None, :, None]
    xx = np.arange(SIZE, dtype=np.float32)[None, None, :]
    disc = np.sqrt((yy - 32) ** 2 + (xx - 10 - 1.5 * t) ** 2) < 9  # orange, a white disc moving right
    orange = np.where(disc[..., None], [0.9, 0.9, 0.9], [0.9, 0.1, -0.8])
    ramp = ((yy + 0.8 * t) % SIZE) / SIZE  # green, a vertical gradient panning, a dark square moving down
    green = np.stack([-0.6 + 0 * ramp, -0.2 + 0.9 * ramp, -0.8 + 0 * ramp], -1)
    square = (np.abs(yy - 20 - 0.7 * t) < 7) & (np.abs(xx - 40) < 7)
    green = np.where(square[..., None], [-0.9, -0.9, 0.2], green)
    stripes = np.sin(2 * np.pi * (xx + yy + t) / 16)[..., None]  # blue, diagonal stripes scrolling
    blue = np.array([-0.8, -0.4, 0.7]) + 0.25 * stripes * np.array([1.0, 1.0, 0.3])
    return [np.broadcast_to(s, (FRAMES, SIZE, SIZE, 3)).astype(np.float32) for s in (orange, green, blue)]


def hard_cuts(shots: list[np.ndarray]) -> np.ndarray:
    shot = np.searchsorted(np.asarray(CUTS), np.arange(FRAMES), side="right")
    return np.stack([shots[s][t] for t, s in enumerate(shot)])


def dissolves(shots: list[np.ndarray], width: int = 8) -> np.ndarray:
    """Every cut replaced by a ``width``-frame linear blend centred on it."""
    out = hard_cuts(shots)
    for k, cut in enumerate(CUTS):
        for i, t in enumerate(range(cut - width // 2, cut + width // 2)):
            w = (i + 1) / (width + 1)
            out[t] = (1 - w) * shots[k][t] + w * shots[k + 1][t]
    return out


def mp4_roundtrip(video: np.ndarray, path) -> np.ndarray:
    """Writes ``video`` as an H.264 (else MPEG-4 part 2) mp4 with PyAV and decodes it back, [-1, 1]."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=12)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for frame in video:
            rgb = np.clip(np.round((frame + 1) * 127.5), 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    return np.stack(frames).astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    shots, tmp = three_shots(), tmp_path_factory.mktemp("cuts")
    return mp4_roundtrip(hard_cuts(shots), tmp / "cuts.mp4"), mp4_roundtrip(dissolves(shots), tmp / "dissolves.mp4")


def test_real_clip_cuts_found_exactly(clips):
    video, _ = clips
    assert video.shape == (FRAMES, SIZE, SIZE, 3)
    assert detect_cuts(video) == list(CUTS)
    assert detect_cuts(video, detector="adaptive") == list(CUTS)
    fields = case_cut_fields(CUTS, detect_cuts(video))
    assert fields["detected_cuts"] == list(CUTS)
    assert (fields["cut_precision"], fields["cut_recall"], fields["cut_offset_frames"]) == (1.0, 1.0, 0.0)
    acc = cut_accuracy([fields["cut_match"]])
    assert (acc["cut_precision"], acc["cut_recall"], acc["cut_f1"], acc["cut_offset_frames"]) == (1.0, 1.0, 1.0, 0.0)
    json.dumps(fields)  # JSON-able as it is


def test_real_clip_dissolves_are_not_cuts(clips):
    _, faded = clips
    detected = detect_cuts(faded)
    assert detected == []  # no step of an 8-frame dissolve reaches the threshold
    acc = cut_accuracy([match_cuts(CUTS, detected)])
    assert acc["cut_recall"] == 0.0 and math.isnan(acc["cut_precision"]) and acc["cut_f1"] == 0.0
    assert not (acc["cut_recall"] == 1.0 and acc["cut_offset_frames"] == 0.0)


def test_steady_motion_has_no_cuts():
    shots = three_shots()
    for shot in shots:
        assert detect_cuts(shot) == []


# ------------------------------------------------------------------------------------------------
# Synthetic 32x32 movies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_32px_cut(seed):
    first, second = distinct_shots(np.random.default_rng(seed), [10, 9], 32, 32)  # cut score >= 45 at frame 10
    movie = np.concatenate([first.frames, second.frames])
    assert detect_cuts(movie) == [10]
    assert detect_cuts(movie, detector="adaptive") == [10]
    assert detect_cuts(first.frames) == [] and detect_cuts(second.frames) == []
    # Too close to the clip's start for the minimum scene length: PySceneDetect suppresses it.
    early = np.concatenate([first.frames[:2], second.frames])
    assert detect_cuts(early, min_scene_len=3) == [] and detect_cuts(early, min_scene_len=1) == [2]


def test_detect_cuts_bad_inputs():
    with pytest.raises(ValueError, match="choose one of"):
        detect_cuts(np.zeros((4, 8, 8, 3), np.float32), detector="histogram")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        detect_cuts(np.zeros((4, 8, 8), np.float32))


# ------------------------------------------------------------------------------------------------
# Matching, by hand


def test_match_cuts_hand_cases():
    extra = match_cuts([12, 25], [12, 25, 30])
    assert (extra["requested"], extra["detected"], extra["matched"], extra["offsets"]) == (2, 3, 2, [0, 0])
    missed = match_cuts([12, 25], [13])
    assert (missed["matched"], missed["offsets"], missed["pairs"]) == (1, [1], [[12, 13]])
    assert match_cuts([12], [15])["matched"] == 0  # 3 frames off: outside the default tolerance of 2
    assert match_cuts([12], [15], tolerance=3)["offsets"] == [3]
    assert match_cuts([12], [10])["offsets"] == [-2]  # early cuts have negative offsets
    # One to one, and the most pairs: nearest-first would pair 12-12 and leave 10 and 14 alone.
    assert match_cuts([10, 12], [12, 14])["pairs"] == [[10, 12], [12, 14]]
    assert match_cuts([10, 11], [11])["pairs"] == [[11, 11]]  # the nearer requested cut takes it
    assert match_cuts([12], [11, 13])["pairs"] == [[12, 11]]  # a tie goes to the earlier detection
    assert match_cuts([], [])["matched"] == 0


def test_cut_accuracy_pools_cases():
    rows = [match_cuts([12, 25], [12, 25, 30]), match_cuts([8], [9]), match_cuts([20], [])]
    acc = cut_accuracy(rows)
    # requested 4, detected 4, matched 3; |offsets| 0, 0, 1
    assert (acc["cut_requested"], acc["cut_detected"], acc["cut_matched"]) == (4, 4, 3)
    assert acc["cut_precision"] == 0.75 and acc["cut_recall"] == 0.75 and acc["cut_f1"] == 0.75
    assert acc["cut_offset_frames"] == pytest.approx(1 / 3)
    precision_only = cut_accuracy([match_cuts([], [7])])
    assert precision_only["cut_precision"] == 0.0 and math.isnan(precision_only["cut_recall"])
    assert precision_only["cut_f1"] == 0.0 and math.isnan(precision_only["cut_offset_frames"])
    single_shot = case_cut_fields([], [])
    assert all(math.isnan(single_shot[k]) for k in ("cut_precision", "cut_recall", "cut_offset_frames"))
    assert math.isnan(cut_accuracy([])["cut_f1"])


# ------------------------------------------------------------------------------------------------
# Pacing


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    frames = make_movie(3, [24], 32, 32).frames  # one shot, every frame different (shapes in motion)
    assert all(np.abs(frames[t] - frames[t + 1]).max() > 0 for t in range(23))
    return frames


def test_pacing_of_the_reference_itself(reference):
    keys = {0: reference[0], 8: reference[8], 16: reference[16], 23: reference[23]}
    out = keyframe_landing(reference, keys)
    assert out["requested_frames"] == out["landed_frames"] == [0, 8, 16, 23]
    assert out["pacing_offset_frames"] == 0.0 and out["pacing_exact_fraction"] == 1.0
    # Margin: the capped PSNR of the exact frame minus the best PSNR of any other frame, worked out here.
    for k, margin in zip([0, 8, 16, 23], out["margins_db"], strict=True):
        others = [psnr(reference[k], reference[t]) for t in range(24) if t != k]
        assert margin == pytest.approx(MAX_PSNR - max(others))
    assert out["pacing_margin_db"] > 0
    json.dumps(out)


def test_pacing_of_a_clip_three_frames_late(reference):
    late = np.roll(reference, 3, axis=0)  # late[t] = reference[t - 3]: keyframe k shows at frame k + 3
    out = keyframe_landing(late, {k: reference[k] for k in (4, 12, 20)})
    assert out["landed_frames"] == [7, 15, 23]
    assert out["pacing_offset_frames"] == 3.0 and out["pacing_exact_fraction"] == 0.0
    assert out["pacing_margin_db"] < 0  # another frame is closer to each keyframe than the requested one


def test_pacing_of_a_frozen_clip(reference):
    frozen = np.broadcast_to(reference[5], reference.shape)
    out = keyframe_landing(frozen, {5: reference[5], 15: reference[15]})
    assert out["landed_frames"] == [5, 15]  # every frame ties: the requested one wins
    assert out["margins_db"] == [0.0, 0.0] and out["pacing_margin_db"] == 0.0  # but it is not distinguishable


def test_pacing_bad_inputs(reference):
    with pytest.raises(ValueError, match="outside the clip"):
        keyframe_landing(reference, {24: reference[0]})
    with pytest.raises(ValueError, match="keyframes are"):
        keyframe_landing(reference, {0: reference[0, :16]})
    with pytest.raises(ValueError, match="at least one keyframe"):
        keyframe_landing(reference, {})
    assert math.isnan(keyframe_landing(reference[:1], {0: reference[0]})["pacing_margin_db"])
