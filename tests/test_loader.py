"""The curated-clip Grain loader and the task sampler: determinism, resumption, host shards, decoding,
fps resampling, aspect buckets, text embeddings, and the task distribution."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import av
import numpy as np
import pytest
from PIL import Image

from director_jax.curation.shards import build_curated_dataset
from director_jax.data.loader import (
    CuratedLoaderConfig,
    batch_plan,
    make_curated_dataset,
    make_iterator,
    resampled_length,
    source_frame_indices,
    window_shots,
)
from director_jax.data.task_sampling import (
    DEFAULT_TASK_WEIGHTS,
    TASKS,
    TaskSamplingConfig,
    sample_task,
    spans_from_masks,
)
from director_jax.data.text_embeddings import TextEmbeddingCache
from director_jax.models.timeline import Timeline
from tests.test_shards import all_captions, make_curated_dir, make_text_cache, psnr, window_counts, window_truth

# ------------------------------------------------------------------------------------------------
# Task sampling


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


def test_task_frequencies_follow_the_weights():
    n, t, cuts = 3000, 33, [10, 21]
    counts = Counter(sample_task(t, cuts, seed=3, index=i).task for i in range(n))
    total = sum(DEFAULT_TASK_WEIGHTS.values())
    for name in TASKS:
        assert _binomial_ok(counts[name], n, DEFAULT_TASK_WEIGHTS[name] / total), (name, counts)
    # no cut inside the clip: multi-shot is impossible, the other weights are renormalised
    counts = Counter(sample_task(t, [0, 40], seed=3, index=i).task for i in range(n))
    rest = total - DEFAULT_TASK_WEIGHTS["multi_shot"]
    assert counts["multi_shot"] == 0
    for name in TASKS:
        if name != "multi_shot":
            assert _binomial_ok(counts[name], n, DEFAULT_TASK_WEIGHTS[name] / rest), (name, counts)


def test_single_shot_keyframes_first_middle_last_have_their_own_probability():
    cfg = TaskSamplingConfig(task_weights={"single_shot": 1.0}, max_keyframes=5, keyframe_first=0.7,
                             keyframe_middle=0.2, keyframe_last=0.4)
    n, t = 2000, 21
    specs = [sample_task(t, [], seed=11, index=(1, i), cfg=cfg) for i in range(n)]
    first = sum(0 in s.keyframes for s in specs)
    middle = sum(10 in s.keyframes for s in specs)
    last = sum(20 in s.keyframes for s in specs)
    assert _binomial_ok(first, n, 0.7) and _binomial_ok(middle, n, 0.2) and _binomial_ok(last, n, 0.4)
    counts = Counter(len(s.spans) for s in specs)
    assert set(counts) <= set(range(1, 6)) and all(len(s.spans) == len(s.keyframes) for s in specs)
    assert {1, 5} <= set(counts)
    # other frames: uniform over the 18 non-anchor frames
    others = Counter(k for s in specs for k in s.keyframes if k not in (0, 10, 20))
    assert set(others) == set(range(1, 20)) - {10}
    assert max(others.values()) < 1.6 * min(others.values())


def test_multi_shot_keyframes_land_on_every_cut():
    cfg = TaskSamplingConfig(task_weights={"multi_shot": 1.0, "single_shot": 1e-12}, max_keyframes=5)
    extras = Counter()
    for i in range(300):
        cuts = sorted({int(c) for c in np.random.default_rng(i).integers(1, 40, size=1 + i % 3)})
        spec = sample_task(41, cuts, seed=0, index=i, cfg=cfg)
        assert spec.task == "multi_shot"
        assert {0, *cuts} <= set(spec.keyframes) and len(spec.keyframes) == len(spec.spans) <= 5
        extras[len(spec.keyframes) - 1 - len(cuts)] += 1
    assert extras[0] > 0 and extras[1] > 0  # extras are drawn, sometimes none
    # more shot starts than max_keyframes allows: not a multi-shot example
    assert sample_task(41, [5, 10, 15, 20, 25], seed=0, index=0, cfg=cfg).task == "single_shot"


def test_cuts_keyframed_puts_a_keyframe_on_every_cut_of_every_window_that_holds_one():
    """With cuts_keyframed no window with a cut takes a task that leaves the cut unkeyed; windows without a cut
    keep every other task; more cuts than max_keyframes allows is an error that names the setting."""
    cfg = TaskSamplingConfig(max_keyframes=3, cuts_keyframed=True)
    plain = TaskSamplingConfig(max_keyframes=3)
    seen_plain, seen_without = Counter(), Counter()
    for i in range(400):
        cut = 1 + i % 15
        spec = sample_task(17, [cut], seed=1, index=i, cfg=cfg)
        assert spec.task == "multi_shot" and {0, cut} <= set(spec.keyframes), (cut, spec)
        seen_plain[sample_task(17, [cut], seed=1, index=i, cfg=plain).task] += 1
        seen_without[sample_task(17, [], seed=1, index=i, cfg=cfg).task] += 1
    assert len(seen_plain) == 5  # the default leaves every task to a window with a cut
    assert "multi_shot" not in seen_without and len(seen_without) == 4
    with pytest.raises(ValueError, match="max_keyframes=3"):
        sample_task(17, [4, 8, 12], seed=0, index=0, cfg=cfg)


def test_specs_are_valid_timelines_and_deterministic():
    seen = set()
    for i in range(400):
        t = 5 + i % 40
        cuts = [t // 3, t // 2] if i % 2 else []
        spec = sample_task(t, cuts, seed=5, index=i)
        again = sample_task(t, cuts, seed=5, index=i)
        assert spec.task == again.task and spec.spans == again.spans
        timeline = Timeline(t, spec.spans)  # raises on anything invalid
        assert timeline.layout.num_latents >= 1
        given = np.zeros(t, bool)
        for s, n in spec.spans:
            given[s:s + n] = True
        np.testing.assert_array_equal(spec.given, given)
        assert spans_from_masks(spec.given, spec.given_start) == list(spec.spans)
        if spec.task == "extend_forward":
            assert spec.spans[0][0] == 0 and len(spec.spans) == 1 and 2 <= spec.spans[0][1] < t
        elif spec.task == "extend_backward":
            assert sum(spec.spans[0]) == t and len(spec.spans) == 1 and 2 <= spec.spans[0][1] < t
        elif spec.task == "in_between":
            (s0, n0), (s1, n1) = spec.spans
            assert s0 == 0 and s1 + n1 == t and n0 >= 2 and n1 >= 2 and n0 + n1 < t
        seen.add((spec.task, spec.spans))
    assert len({task for task, _ in seen}) == len(TASKS)
    assert sample_task(33, [10], seed=6, index=1).spans != sample_task(33, [10], seed=7, index=1).spans or \
        sample_task(33, [10], seed=6, index=2).spans != sample_task(33, [10], seed=7, index=2).spans


# ------------------------------------------------------------------------------------------------
# The loader

# (seed, shots, height, width, fps, start): landscape 48x64 and 32x64, portrait 64x48, square 48x48
MIXED = [(k, shots, h, w, 8.0, 50 * k) for k, (shots, (h, w)) in enumerate([
    ([20], (48, 64)), ([12, 14], (64, 48)), ([24], (48, 48)), ([10, 12], (48, 64)), ([25], (32, 64)),
    ([16, 8], (64, 48)), ([30], (48, 48)), ([8, 14], (48, 64)), ([22], (64, 48)), ([14, 10], (48, 48)),
    ([21], (48, 64)), ([9, 13], (32, 64)), ([23], (64, 48)), ([12, 12], (48, 48))])]
BUCKETS = ((32, 48), (48, 32), (32, 32))
NEAREST = {(48, 64): (32, 48), (32, 64): (32, 48), (64, 48): (48, 32), (48, 48): (32, 32)}  # by hand


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    samples = make_curated_dir(root, MIXED)
    truth = make_text_cache(root / "cache", all_captions([s for s, _ in samples]), dtype="float32", max_length=16)
    build_curated_dataset(root, text_cache=root / "cache", text_max_length=16, validation_fraction=0.0,
                          progress=False)
    return root, samples, truth


def _cfg(root, **kw) -> CuratedLoaderConfig:
    base = dict(data_dir=str(root), clip_frames=9, fps=None, buckets=BUCKETS, caption_dropout=0.3, seed=1)
    return CuratedLoaderConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_batches_and_other_seed_other_order(mixed):
    root = mixed[0]
    a = _take(make_iterator(make_curated_dataset(_cfg(root), global_batch_size=2, shuffle_seed=4)), 4)
    b = _take(make_iterator(make_curated_dataset(_cfg(root), global_batch_size=2, shuffle_seed=4)), 4)
    _same(a, b)
    c = _take(make_iterator(make_curated_dataset(_cfg(root), global_batch_size=2, shuffle_seed=5)), 4)
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]
    assert a[0]["video"].dtype == np.float32 and a[0]["given"].dtype == bool and a[0]["task"].dtype == np.int32
    assert a[0]["index"].dtype == np.int64 and a[0]["text"].shape[1:] == (16, 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_json_state_gives_the_same_next_batches(mixed, workers):
    cfg = _cfg(mixed[0], clip_frames=5, buckets=((16, 16),))
    ds = make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=0)
    it = make_iterator(ds, worker_count=workers)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    want = _take(it, 3)
    resumed = make_iterator(make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=0), worker_count=workers)
    resumed.set_state(state)
    got = _take(resumed, 3)
    _same(want, got)
    if workers:
        it.close()
        resumed.close()
        _same(want, _take(make_iterator(ds), 6)[3:])  # the worker count does not change the batches


@pytest.mark.parametrize("processes", [2, 4])
def test_host_shards_are_disjoint_and_stack_to_the_global_batch(mixed, processes):
    cfg = _cfg(mixed[0], clip_frames=5)
    steps = 4  # one epoch is 3 global batches of 4 (landscape 6, portrait 4, square 4): crosses an epoch
    whole = _take(make_iterator(make_curated_dataset(cfg, global_batch_size=4, shuffle_seed=2)), steps)
    hosts = [_take(make_iterator(make_curated_dataset(cfg, global_batch_size=4, process_index=p,
                                                      process_count=processes, shuffle_seed=2)), steps)
             for p in range(processes)]
    for s in range(steps):
        stacked = {k: np.concatenate([h[s][k] for h in hosts]) for k in whole[s]}
        _same([whole[s]], [stacked])
        rows = [i for h in hosts for i in h[s]["index"].tolist()]
        assert len(set(rows)) == len(rows) == 4
    epoch = [i for b in whole[:3] for i in b["index"].tolist()]
    assert len(set(epoch)) == 12  # no record twice within an epoch


def _decode(path, frames=None) -> np.ndarray:
    with av.open(str(path)) as c:
        out = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return out if frames is None else out[frames]


def test_decoded_frames_equal_the_clip_frames(mixed):
    root, samples, _ = mixed
    sizes = ((48, 64), (64, 48), (48, 48), (32, 64))  # the clips' own sizes: no resizing
    cfg = _cfg(root, clip_frames=12, buckets=sizes)
    batches = _take(make_iterator(make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=0)), 7)
    seen = set()
    for batch in batches:
        for b, record in enumerate(batch["index"].tolist()):
            line, source = samples[record]
            idx = batch["frame_index"][b]
            assert idx.tolist() == list(range(idx[0], idx[0] + 12)) and idx[0] >= 0 and idx[-1] < line["num_frames"]
            video = batch["video"][b]
            assert video.shape == (12, line["height"], line["width"], 3) and -1 <= video.min() <= video.max() <= 1
            reference = _decode(root / line["clip"], idx).astype(np.float32) / 127.5 - 1  # plain PyAV, whole file
            np.testing.assert_array_equal(video, reference)
            assert psnr(video, source[idx]) > 25.0
            seen.add(record)
    assert len(seen) == 14
    starts = {int(b["frame_index"][r][0]) for b in batches for r in range(2)}
    assert len(starts) > 3  # random windows
    raw = next(make_iterator(make_curated_dataset(dataclasses.replace(cfg, video_dtype="uint8"), global_batch_size=2,
                                                  shuffle_seed=0)))
    assert raw["video"].dtype == np.uint8 and raw["index"].tolist() == batches[0]["index"].tolist()
    np.testing.assert_array_equal(raw["video"].astype(np.float32) / 127.5 - 1, batches[0]["video"])


def test_resize_and_center_crop_match_a_reference(mixed):
    root, samples, _ = mixed
    cfg = _cfg(root, clip_frames=6, buckets=((32, 48),), task_weights={"single_shot": 1.0})
    batch = next(make_iterator(make_curated_dataset(cfg, global_batch_size=14, shuffle_seed=0)))
    for b, record in enumerate(batch["index"].tolist()):
        line, _ = samples[record]
        h, w = line["height"], line["width"]
        scale = max(32 / h, 48 / w)
        rh, rw = round(h * scale), round(w * scale)  # 48x64 -> 36x48 (crop 2 rows), 64x48 -> 64x48 (crop 16 rows)
        top, left = (rh - 32) // 2, (rw - 48) // 2
        frames = _decode(root / line["clip"], batch["frame_index"][b])
        ref = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames])
        ref = ref.astype(np.float32) / 127.5 - 1
        good = psnr(batch["video"][b], ref[:, top:top + 32, left:left + 48])
        assert good > 30.0, (line["height"], line["width"], good)
        if rh - 32 >= top + 2:  # a crop 2 rows off is clearly worse
            assert good > psnr(batch["video"][b], ref[:, top + 2:top + 34, left:left + 48]) + 1.0


def test_every_batch_has_one_bucket_the_nearest_aspect(mixed):
    root, samples, _ = mixed
    cfg = _cfg(root, clip_frames=5)
    plan, buckets = batch_plan(cfg, global_batch_size=2, shuffle_seed=9, epoch=1)
    assert plan.shape == (7, 2)  # landscape 6, portrait 4, square 4 records
    assert len(make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=9, num_epochs=2)) == 14
    it = make_iterator(make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=9))
    batches = _take(it, 14)
    for s, batch in enumerate(batches):
        sizes = {(samples[r][0]["height"], samples[r][0]["width"]) for r in batch["index"].tolist()}
        want = {NEAREST[size] for size in sizes}
        assert len(want) == 1 and batch["video"].shape[2:4] == want.pop()
        if s >= 7:
            assert batch["index"].tolist() == plan[s - 7].tolist() and cfg.buckets[buckets[s - 7]] == \
                batch["video"].shape[2:4]
    for epoch in (batches[:7], batches[7:]):
        assert sorted(i for b in epoch for i in b["index"].tolist()) == list(range(14))
    windows = [{r: int(b["frame_index"][k][0]) for b in epoch for k, r in enumerate(b["index"].tolist())}
               for epoch in (batches[:7], batches[7:])]
    assert sum(windows[0][r] != windows[1][r] for r in range(14)) >= 7  # each epoch draws new windows


def _index_frames(seed, n, h, w):
    """Frame i lights cell i of an 8x8-pixel grid (all else dark): the frame says its own index."""
    frames = np.full((n, h, w, 3), -1.0, np.float32)
    cols = w // 8
    for i in range(n):
        r, c = divmod(i, cols)
        frames[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    return frames


def _read_index(video: np.ndarray) -> list[int]:
    t, h, w, _ = video.shape
    cells = video.mean(-1).reshape(t, h // 8, 8, w // 8, 8).mean((2, 4)).reshape(t, -1)
    return cells.argmax(-1).tolist()


def test_resampled_length_by_hand():
    assert resampled_length(40, 24.0, 8.0) == 14  # 3 j <= 39
    assert resampled_length(40, 10.0, 4.0) == 16  # floor(2.5 j + 1/2) <= 39 <=> j <= 15
    assert resampled_length(20, 8.0, 16.0) == 39  # floor(j / 2 + 1/2) <= 19 <=> j <= 38
    assert resampled_length(20, 8.0, None) == 20
    assert source_frame_indices(0, 6, 10.0, 4.0).tolist() == [0, 3, 5, 8, 10, 13]


@pytest.mark.parametrize(("source_fps", "target_fps", "expected"), [
    (24.0, 8.0, lambda k: 3 * k),  # every third frame
    (10.0, 4.0, lambda k: (5 * k + 1) // 2),  # floor(2.5 k + 1/2) in integers
    (8.0, 16.0, lambda k: (k + 1) // 2),  # upsampling: frames shown twice
])
def test_fps_resampling_picks_the_nearest_source_frames(tmp_path, source_fps, target_fps, expected):
    specs = [(k, shots, 48, 64, source_fps, 0) for k, shots in enumerate([[40], [20, 20], [30, 10], [44]])]
    samples = make_curated_dir(tmp_path, specs, frames_fn=_index_frames)
    build_curated_dataset(tmp_path, validation_fraction=0.0, progress=False)
    t = 8
    cfg = CuratedLoaderConfig(data_dir=str(tmp_path), clip_frames=t, fps=target_fps, buckets=((48, 64),),
                              task_weights={"multi_shot": 1.0, "single_shot": 1e-12}, max_keyframes=3,
                              caption_dropout=0.0)
    batches = _take(make_iterator(make_curated_dataset(cfg, global_batch_size=4, shuffle_seed=0)), 3)
    for batch in batches:
        for b, record in enumerate(batch["index"].tolist()):
            shown = _read_index(batch["video"][b])  # what the frames say they are
            assert shown == batch["frame_index"][b].tolist()
            starts = [s for s in range(200) if [expected(s + j) for j in range(t)] == shown]
            assert starts, (shown, record)  # a window of the resampled clip
            cuts = [c - samples[record][0]["start_frame"] for c in samples[record][0]["cuts"]]
            first_of_shot = [j for j in range(1, t) for c in cuts if shown[j] >= c > shown[j - 1]]
            keyframes = np.flatnonzero(batch["given"][b]).tolist()
            if first_of_shot:  # multi-shot: keyframes at frame 0 and on the first frame of every new shot
                assert {0, *first_of_shot} <= set(keyframes) and batch["task"][b] == TASKS.index("multi_shot")


def test_text_embeddings_and_caption_dropout(mixed):
    root, samples, truth = mixed
    cfg = _cfg(root, clip_frames=5, caption_dropout=0.5)
    batches = _take(make_iterator(make_curated_dataset(cfg, global_batch_size=2, shuffle_seed=1)), 14)
    dropped = kept = 0
    for batch in batches:
        for b, record in enumerate(batch["index"].tolist()):
            caption, _ = window_truth(samples[record][0], batch["frame_index"][b])
            want = truth[""] if batch["caption_dropped"][b] else truth[caption]
            assert str(batch["caption"][b]) == ("" if batch["caption_dropped"][b] else caption)
            np.testing.assert_array_equal(batch["text"][b, :len(want)], want)
            assert not batch["text"][b, len(want):].any()
            assert batch["text_mask"][b].tolist() == [True] * len(want) + [False] * (16 - len(want))
            dropped += bool(batch["caption_dropped"][b])
            kept += not batch["caption_dropped"][b]
            Timeline(5, spans_from_masks(batch["given"][b], batch["given_start"][b]))
    assert dropped and kept


def test_window_shots_by_hand():
    cuts = [5, 9]  # shots [0, 5), [5, 9), [9, ...)
    for frames, first, counts in [
        ([5, 6, 7], 1, [3]),  # starts exactly at a cut: the cut's shot only
        ([2, 3, 4, 5], 0, [3, 1]),  # ends one frame after a cut: the next shot, one frame of it
        ([2, 3, 4], 0, [3]),  # ends on the frame before a cut
        ([3, 4, 5, 6, 7, 8, 9, 10], 0, [2, 4, 2]),  # every shot
        ([9, 10, 11], 2, [3]),  # the last shot, from its first frame
        ([4], 0, [1]),
    ]:
        got_first, got_counts = window_shots(np.asarray(frames), cuts)
        assert (got_first, got_counts.tolist()) == (first, counts), frames
    first, counts = window_shots(np.arange(3, 6), [])  # a single-shot sample
    assert (first, counts.tolist()) == (0, [3])
    # fps resampling: 24 -> 8 fps shows source frames 0, 3, 6, 9: the one-frame shot [7, 8) falls between two
    frames = source_frame_indices(0, 4, 24.0, 8.0)
    assert frames.tolist() == [0, 3, 6, 9]
    first, counts = window_shots(frames, [7, 8])
    assert (first, counts.tolist()) == (0, [3, 0, 1])
    # 8 -> 16 fps shows frames twice: frames 4, 5, 5, 6 with a cut at 5
    frames = source_frame_indices(8, 4, 8.0, 16.0)
    assert frames.tolist() == [4, 5, 5, 6]
    first, counts = window_shots(frames, [5])
    assert (first, counts.tolist()) == (0, [1, 3])
    rng = np.random.default_rng(0)
    for _ in range(300):  # random cuts, windows and rates against the brute-force rule
        n = int(rng.integers(8, 60))
        cuts = sorted(rng.choice(np.arange(1, n), size=int(rng.integers(0, 5)), replace=False).tolist())
        fps, target = float(rng.choice([8.0, 24.0, 25.0, 30.0])), float(rng.choice([4.0, 8.0, 12.0, 16.0]))
        t = int(rng.integers(1, 10))
        length = int(resampled_length(n, fps, target))
        if length < t:
            continue
        frames = source_frame_indices(int(rng.integers(0, length - t + 1)), t, fps, target)
        assert frames.max() < n
        want_first, _, want = window_counts(cuts, frames)
        first, counts = window_shots(frames, cuts)
        assert first == want_first and counts.tolist() == want and counts.sum() == t and counts[-1] >= 1


# (seed, shots, height, width, fps, start): samples of 2-4 shots, one with a one-frame shot (frame 5) that 4 fps skips
SHOTS = [(k, shots, 32, 32, 8.0, 40 * k) for k, shots in enumerate(
    [[6, 5, 7], [4, 3, 4, 5], [9, 9], [16], [5, 1, 8], [3, 4, 3, 8]])]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    root = tmp_path_factory.mktemp("shots")
    samples = make_curated_dir(root, SHOTS)
    make_text_cache(root / "cache", all_captions([s for s, _ in samples]), dtype="float32", max_length=16)
    build_curated_dataset(root, text_cache=root / "cache", text_max_length=16, validation_fraction=0.0,
                          progress=False)
    return root, samples


@pytest.mark.parametrize(("fps", "t"), [(None, 7), (4.0, 5)])
def test_window_captions_durations_and_embeddings_over_many_epochs(shots, fps, t):
    root, samples = shots
    cache = TextEmbeddingCache(root / "cache", max_length=16)  # the cache itself is the reference
    cfg = CuratedLoaderConfig(data_dir=str(root), clip_frames=t, fps=fps, buckets=((16, 16),), caption_dropout=0.25,
                              seed=3)
    it = make_iterator(make_curated_dataset(cfg, global_batch_size=3, shuffle_seed=1))
    ranges, dropped, zero_middle = set(), 0, 0
    for batch in _take(it, 24):  # 12 epochs of 6 samples
        assert batch["shot_frames"].shape == (3, t) and batch["shot_frames"].dtype == np.int32
        for b, record in enumerate(batch["index"].tolist()):
            line = samples[record][0]
            caption, counts = window_truth(line, batch["frame_index"][b])
            assert batch["shot_frames"][b].tolist() == counts + [0] * (t - len(counts))
            assert batch["shot_frames"][b].sum() == t
            if batch["caption_dropped"][b]:
                assert str(batch["caption"][b]) == ""
                caption, dropped = "", dropped + 1
            else:
                assert str(batch["caption"][b]) == caption
            want = cache.read(caption)
            np.testing.assert_array_equal(batch["text"][b, :len(want)], want)
            assert not batch["text"][b, len(want):].any()
            assert batch["text_mask"][b].tolist() == [True] * len(want) + [False] * (16 - len(want))
            first, last, _ = window_counts(line["cuts"], batch["frame_index"][b], line["start_frame"])
            ranges.add((len(line["cuts"]) + 1, first, last))
            zero_middle += 0 in counts
    assert 0 < dropped < 72
    proper = {(n, a, z) for n, a, z in ranges if (a, z) != (0, n - 1)}
    assert len(proper) >= 5 and any(a > 0 for _, a, _ in proper) and any(z < n - 1 for n, _, z in proper)
    assert any((a, z) == (0, n - 1) and n > 1 for n, a, z in ranges)  # whole multi-shot samples too
    if fps == 4.0:  # the one-frame shot at frame 5 of [5, 1, 8] is on no window frame: in the caption with 0 frames
        assert zero_middle > 0


def test_dropped_caption_without_empty_embedding_is_masked_out(tmp_path):
    samples = make_curated_dir(tmp_path, MIXED[:4])
    make_text_cache(tmp_path / "cache", all_captions([s for s, _ in samples]), dtype="float32", empty=False)
    build_curated_dataset(tmp_path, text_cache=tmp_path / "cache", text_max_length=16, validation_fraction=0.0,
                          progress=False)
    cfg = _cfg(tmp_path, clip_frames=5, caption_dropout=1.0, buckets=((16, 16),), text_length=20)
    batch = next(make_iterator(make_curated_dataset(cfg, global_batch_size=4, shuffle_seed=0)))
    assert batch["caption_dropped"].all() and batch["text"].shape == (4, 20, 8)
    assert not batch["text"].any() and not batch["text_mask"].any()


def test_clear_errors(mixed, tmp_path):
    root = mixed[0]
    with pytest.raises(FileNotFoundError, match="director_jax.shards --curated"):
        make_curated_dataset(_cfg(tmp_path), global_batch_size=2, shuffle_seed=0)
    with pytest.raises(ValueError, match="no split 'validation'"):
        make_curated_dataset(_cfg(root, split="validation"), global_batch_size=2, shuffle_seed=0)
    with pytest.raises(ValueError, match="fills no global batch"):
        make_curated_dataset(_cfg(root, clip_frames=31), global_batch_size=2, shuffle_seed=0)
    with pytest.raises(ValueError, match="unknown tasks"):
        _cfg(root, task_weights={"zoom": 1.0})


def test_config_from_config_dict(mixed):
    import ml_collections

    c = ml_collections.ConfigDict(dict(data_dir=str(mixed[0]), clip_frames=7, buckets=[[32, 48], [48, 32]],
                                       task_weights={"single_shot": 2.0, "in_between": 1.0}, worker_count=3))
    cfg = CuratedLoaderConfig.from_config(c)
    assert cfg.buckets == ((32, 48), (48, 32)) and cfg.clip_frames == 7
    assert cfg.task_weights == {"single_shot": 2.0, "multi_shot": 0.0, "extend_forward": 0.0,
                                "extend_backward": 0.0, "in_between": 1.0}
