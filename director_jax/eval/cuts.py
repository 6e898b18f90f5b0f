"""Cut accuracy: do the shot cuts of a generated clip land on the frames its timeline asked for?

A **cut** is the index of the frame that starts a new shot (``i >= 1``; frame 0 starts the first
shot and is never a cut), the convention of ``EvalCase.cuts`` and ``eval/temporal.py``.

* ``detect_cuts``: the cuts PySceneDetect finds in an in-memory clip. ``ContentDetector`` (default)
  scores each frame by the mean change of hue, saturation and value from the previous frame (0..255)
  and cuts where the score reaches ``threshold``; ``AdaptiveDetector`` cuts where that score is
  ``threshold`` times the average of its ``window`` neighbours on each side (it cannot see a cut in
  the last ``window`` frames). After a cut, no other is reported for ``min_scene_len`` frames, and
  none in the first ``min_scene_len`` frames of the clip (PySceneDetect's ``SUPPRESS`` mode: the cut
  is the first frame over the threshold, so a two-frame transition is one cut at its first frame).
* ``match_cuts``: requested and detected cuts paired one to one within ``tolerance`` frames: the
  most pairs, and among those the smallest total |offset| (on a line, such a matching never
  crosses, so a small dynamic programme finds it exactly; ties go to the earlier detection).
  ``offset = detected - requested`` (positive: the cut came late).
* ``cut_accuracy``: over the match results of many cases (pooled counts, so a case with many cuts
  weighs more): ``cut_precision = matched / detected``, ``cut_recall = matched / requested``,
  ``cut_f1 = 2 matched / (requested + detected)`` and ``cut_offset_frames``, the mean |offset| of
  the matched cuts. A ratio whose denominator is 0 is undefined and NaN: precision when nothing
  was detected (a single-shot clip that stays single-shot has NaN precision and recall, not 1),
  recall when nothing was requested, F1 when neither, the offset when nothing matched.

Defaults (``CONTENT_THRESHOLD``, ``MIN_SCENE_LEN``): PySceneDetect's own content threshold of 27
fires on a hard cut between two different shots (scores of 45 or more for the synthetic movies'
cuts, ``data/synthetic.MIN_CUT_SCORE``) but not on the steady motion inside a shot (below ~15), and
usually not inside a dissolve, whose steps are each a fraction of the cut. Hue is compared without
wrap-around and is undefined on grey, so a dissolve between near-complementary colours (passing
through grey), or a small change of a red near hue 0 / 180, can still score like a cut. The default
minimum scene length (15 frames) would hide the cuts of 17- to 81-frame clips, so it is 3 here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode
from scenedetect.detector import FlashFilter

DETECTORS = ("content", "adaptive")
CONTENT_THRESHOLD = 27.0  # ContentDetector: mean HSV change (0..255) of a cut; PySceneDetect's default
ADAPTIVE_THRESHOLD = 3.0  # AdaptiveDetector: score / neighbours' mean score of a cut; PySceneDetect's default
MIN_SCENE_LEN = 3  # frames between two reported cuts (and before the first)
TOLERANCE = 2  # frames a detected cut may be off its requested frame and still match


def to_bgr_uint8(video: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) RGB in [-1, 1] -> uint8 BGR, the frames OpenCV and PySceneDetect read."""
    video = np.asarray(video, np.float32)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"detect_cuts takes one (T, H, W, 3) RGB clip; got shape {video.shape}.")
    rgb = np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def detect_cuts(video: np.ndarray, *, detector: str = "content", threshold: float | None = None,
                min_scene_len: int = MIN_SCENE_LEN, window: int = 2, fps: float = 24.0) -> list[int]:
    """Frames of a (T, H, W, 3) [-1, 1] clip that PySceneDetect sees starting a new shot (sorted, >= 1).

    ``threshold`` None takes the detector's default (``CONTENT_THRESHOLD`` / ``ADAPTIVE_THRESHOLD``);
    ``window`` is the adaptive detector's neighbours on each side; ``fps`` only labels the timecodes
    (every length here is in frames). Frames are scored at the size given (the score is a mean).
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r}; choose one of {DETECTORS}.")
    if min_scene_len < 1 or window < 1:
        raise ValueError(f"min_scene_len and window must be >= 1 frame; got {min_scene_len} and {window}.")
    frames = to_bgr_uint8(video)
    n = int(min_scene_len)
    if detector == "content":
        det = ContentDetector(threshold=CONTENT_THRESHOLD if threshold is None else float(threshold),
                              min_scene_len=n, filter_mode=FlashFilter.Mode.SUPPRESS)
    else:
        det = AdaptiveDetector(adaptive_threshold=ADAPTIVE_THRESHOLD if threshold is None else float(threshold),
                               min_scene_len=n, window_width=int(window))
    found: list[int] = []
    for i, frame in enumerate(frames):
        found += [int(tc.frame_num) for tc in det.process_frame(FrameTimecode(i, fps=float(fps)), frame)]
    if len(frames):
        found += [int(tc.frame_num) for tc in det.post_process(FrameTimecode(len(frames) - 1, fps=float(fps)))]
    return sorted({c for c in found if 0 < c < len(frames)})


def match_cuts(requested: Iterable[int], detected: Iterable[int], tolerance: int = TOLERANCE) -> dict:
    """Requested and detected cuts paired one to one within ``tolerance`` frames (see the module doc).

    Returns ``{"requested", "detected", "matched"}`` counts, ``offsets`` (detected - requested of each
    pair, in requested order) and ``pairs`` ([requested, detected] lists): all JSON-able.
    """
    req, det = sorted({int(c) for c in requested}), sorted({int(c) for c in detected})
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 frames, got {tolerance}.")
    # best[i][j]: (pairs, -total |offset|) over req[:i] and det[:j]; each step skips one side or pairs both.
    best = [[(0, 0)] * (len(det) + 1) for _ in range(len(req) + 1)]
    for i in range(1, len(req) + 1):
        for j in range(1, len(det) + 1):
            options = [best[i - 1][j], best[i][j - 1]]
            gap = abs(det[j - 1] - req[i - 1])
            if gap <= tolerance:
                m, cost = best[i - 1][j - 1]
                options.append((m + 1, cost - gap))
            best[i][j] = max(options)
    pairs = []
    i, j = len(req), len(det)
    while i and j:  # walk back; prefer skipping a later detection when it ties (earlier detections pair)
        if best[i][j] == best[i][j - 1]:
            j -= 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            pairs.append([req[i - 1], det[j - 1]])
            i, j = i - 1, j - 1
    pairs.reverse()
    return {"requested": len(req), "detected": len(det), "matched": len(pairs),
            "offsets": [d - r for r, d in pairs], "pairs": pairs}


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def cut_accuracy(rows: Iterable[Mapping]) -> dict[str, float]:
    """Pooled cut precision, recall, F1 and mean |offset| over ``match_cuts`` results (NaN where undefined)."""
    rows = list(rows)
    requested = sum(int(r["requested"]) for r in rows)
    detected = sum(int(r["detected"]) for r in rows)
    matched = sum(int(r["matched"]) for r in rows)
    offsets = [abs(float(o)) for r in rows for o in r["offsets"]]
    return {
        "cut_precision": _ratio(matched, detected),
        "cut_recall": _ratio(matched, requested),
        "cut_f1": _ratio(2 * matched, requested + detected),
        "cut_offset_frames": float(np.mean(offsets)) if offsets else float("nan"),
        "cut_requested": requested, "cut_detected": detected, "cut_matched": matched,
    }


def case_cut_fields(requested: Sequence[int], detected: Sequence[int], tolerance: int = TOLERANCE) -> dict:
    """One case's JSON-able cut fields: ``detected_cuts``, ``cut_precision``, ``cut_recall``,
    ``cut_offset_frames`` (NaN where undefined) and ``cut_match`` (the ``match_cuts`` result, which
    ``cut_accuracy`` pools over a suite)."""
    match = match_cuts(requested, detected, tolerance)
    acc = cut_accuracy([match])
    return {"detected_cuts": sorted({int(c) for c in detected}),
            **{k: acc[k] for k in ("cut_precision", "cut_recall", "cut_offset_frames")}, "cut_match": match}
