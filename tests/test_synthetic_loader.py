"""The synthetic-clip Grain pipeline: determinism, resumption, host sharding and the clip contents."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from director_jax.data.synthetic import make_movie
from director_jax.data.synthetic_loader import SyntheticClipsConfig, make_dataset, make_iterator, synthetic_clip
from director_jax.data.task_sampling import TASK_IDS, TASKS, TaskSamplingConfig, sample_task, spans_from_masks

CFG = SyntheticClipsConfig(num_movies=50, height=12, width=16, fps=8.0, clip_frames=9, shot_lengths=(3, 6),
                           shots_per_movie=3, hflip=True, seed=7)
TASK_CFG = dataclasses.replace(CFG, tasks=True)
TASK_KEYS = ("given", "given_start", "task")


def _by_hand(i: int, cfg: SyntheticClipsConfig = CFG):
    """Example ``i``'s movie, window start and flip, re-derived from the documented seed recipe."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, i]))
    lengths = [int(n) for n in rng.integers(cfg.shot_lengths[0], cfg.shot_lengths[1] + 1, size=cfg.shots_per_movie)]
    movie_seed = int(rng.integers(0, 2**63 - 1))
    start = int(rng.integers(0, sum(lengths) - cfg.clip_frames + 1))
    flip = bool(rng.random() < 0.5)
    return make_movie(movie_seed, lengths, cfg.height, cfg.width, fps=cfg.fps), start, flip


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["video"], y["video"])


def test_clip_matches_make_movie_by_hand():
    """Re-derives each example from its documented seed recipe and renders the whole movie."""
    crossed_cut = flipped = unflipped = False
    for i in range(12):
        movie, start, flip = _by_hand(i)
        want = movie.frames[start:start + 9]
        if flip:
            want = want[:, :, ::-1]
        got = synthetic_clip(i, CFG)
        assert got["video"].dtype == np.float32 and got["video"].shape == (9, 12, 16, 3)
        assert got["index"].dtype == np.int64 and got["index"] == i
        np.testing.assert_array_equal(got["video"], want)
        noflip = synthetic_clip(i, dataclasses.replace(CFG, hflip=False))["video"]
        np.testing.assert_array_equal(noflip, movie.frames[start:start + 9])
        crossed_cut |= any(start < s < start + 9 for s in movie.shot_starts)
        flipped |= flip
        unflipped |= not flip
    assert crossed_cut and flipped and unflipped  # the cases above were all exercised


def test_same_seed_same_batches_and_other_seed_other_order():
    a = _take(make_iterator(make_dataset(CFG, global_batch_size=4, shuffle_seed=3)), 5)
    b = _take(make_iterator(make_dataset(CFG, global_batch_size=4, shuffle_seed=3)), 5)
    _assert_same(a, b)
    assert a[0]["video"].shape == (4, 9, 12, 16, 3)
    c = _take(make_iterator(make_dataset(CFG, global_batch_size=4, shuffle_seed=4)), 5)
    assert not np.array_equal(np.concatenate([x["index"] for x in a]), np.concatenate([x["index"] for x in c]))
    for x in a:  # the batch holds exactly the examples its indices name
        for row, i in enumerate(x["index"]):
            np.testing.assert_array_equal(x["video"][row], synthetic_clip(int(i), CFG)["video"])


def test_epochs_cover_every_movie_once_in_new_orders():
    cfg = dataclasses.replace(CFG, num_movies=12)
    ds = make_dataset(cfg, global_batch_size=4, shuffle_seed=0, num_epochs=2)
    assert len(ds) == 6
    idx = np.concatenate([b["index"] for b in make_iterator(ds)])
    assert idx.shape == (24,)
    np.testing.assert_array_equal(np.sort(idx[:12]), np.arange(12))
    np.testing.assert_array_equal(np.sort(idx[12:]), np.arange(12))
    assert not np.array_equal(idx[:12], idx[12:])


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_json_state(worker_count):
    ds = make_dataset(CFG, global_batch_size=4, shuffle_seed=1)
    it = make_iterator(ds, worker_count=worker_count)
    fresh = make_iterator(ds, worker_count=worker_count)
    try:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        want = _take(it, 3)
        fresh.set_state(state)
        _assert_same(_take(fresh, 3), want)
    finally:
        it.close()  # with workers, stops their processes now rather than at garbage collection
        fresh.close()
    # Workers only change who renders, not what: same batches as the in-process iterator.
    _assert_same(want, _take(make_iterator(ds), 6)[3:])


def test_host_shards_split_each_global_batch_in_order():
    glob = _take(make_iterator(make_dataset(CFG, global_batch_size=6, shuffle_seed=2)), 3)
    hosts = [_take(make_iterator(make_dataset(CFG, global_batch_size=6, shuffle_seed=2, process_index=p,
                                              process_count=2)), 3) for p in range(2)]
    seen = set()
    for step in range(3):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert h0["video"].shape[0] == h1["video"].shape[0] == 3
        np.testing.assert_array_equal(np.concatenate([h0["index"], h1["index"]]), glob[step]["index"])
        np.testing.assert_array_equal(np.concatenate([h0["video"], h1["video"]]), glob[step]["video"])
        assert not set(h0["index"].tolist()) & set(h1["index"].tolist())
        seen |= set(h0["index"].tolist()) | set(h1["index"].tolist())
    assert len(seen) == 18  # no example repeated within the first epoch


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"global_batch_size": 5, "process_count": 2}, "global_batch_size=5 is not divisible by process_count=2"),
    ({"global_batch_size": 4, "process_count": 2, "process_index": 2}, r"process_index must be in \[0, 2\)"),
    ({"global_batch_size": 0}, "must be >= 1"),
    ({"global_batch_size": 64, "num_epochs": 1}, "less than one global batch of 64"),
])
def test_bad_sizes_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(CFG, shuffle_seed=0, **kwargs)


def test_config_validation_and_from_config():
    with pytest.raises(ValueError, match="clip_frames=20"):
        SyntheticClipsConfig(clip_frames=20, shot_lengths=(3, 6), shots_per_movie=3)
    with pytest.raises(ValueError, match="shot_lengths"):
        SyntheticClipsConfig(shot_lengths=(6, 3))
    c = ml_collections.ConfigDict({"height": 32, "width": 48, "shot_lengths": (20, 28), "shots_per_movie": 2,
                                   "clip_frames": 5, "train_movies": 48})
    cfg = SyntheticClipsConfig.from_config(c, num_movies=48)
    assert (cfg.height, cfg.width, cfg.shot_lengths, cfg.clip_frames, cfg.num_movies) == (32, 48, (20, 28), 5, 48)


def _true_cuts(movie, start: int, t: int) -> list[int]:
    """Where the rendered movie changes shot inside the window: a frame whose shot differs from the last's."""
    shot_of_frame = np.repeat(np.arange(len(movie.centers)), [len(c) for c in movie.centers])
    assert len(shot_of_frame) == len(movie.frames)
    changes = np.flatnonzero(np.diff(shot_of_frame)) + 1
    return [int(f) - start for f in changes if start < f < start + t]


def test_tasks_follow_the_true_cuts():
    """The task is sample_task on the window's real shot starts; multi-shot keys every one of them."""
    t, multi, with_cuts = TASK_CFG.clip_frames, 0, 0
    for i in range(40):
        movie, start, _ = _by_hand(i, TASK_CFG)
        cuts = _true_cuts(movie, start, t)
        for c in cuts:  # really a shot change: the frames before and after come from different shots
            assert movie.shot_starts.count(start + c) == 1
        got = synthetic_clip(i, TASK_CFG)
        np.testing.assert_array_equal(got["video"], synthetic_clip(i, CFG)["video"])  # the task changes no pixel
        assert got["given"].shape == got["given_start"].shape == (t,)
        assert got["given"].dtype == got["given_start"].dtype == bool and got["task"].dtype == np.int32
        want = sample_task(t, cuts, seed=TASK_CFG.seed, index=i, cfg=TaskSamplingConfig())
        assert int(got["task"]) == want.task_id
        np.testing.assert_array_equal(got["given"], want.given)
        np.testing.assert_array_equal(got["given_start"], want.given_start)
        with_cuts += bool(cuts)
        if int(got["task"]) == TASK_IDS["multi_shot"]:
            multi += 1
            keys = [s for s, n in spans_from_masks(got["given"], got["given_start"]) if n == 1]
            assert len(keys) == int(got["given"].sum()) <= TASK_CFG.max_keyframes
            assert cuts and set([0, *cuts]) <= set(keys)
    assert multi >= 3 and with_cuts > multi  # multi-shot occurred, and cut windows also took other tasks


def test_tasks_are_deterministic_whatever_the_batching():
    """Same (seed, index) -> same task fields, in any batch size or host count; another seed -> others."""
    def rows(**kwargs):
        out = {}
        for b in _take(make_iterator(make_dataset(TASK_CFG, shuffle_seed=5, **kwargs)), 2):
            for r, i in enumerate(b["index"].tolist()):
                out[i] = tuple(b[k][r].tobytes() for k in TASK_KEYS)
        return out

    single = rows(global_batch_size=6)
    b = _take(make_iterator(make_dataset(TASK_CFG, global_batch_size=6, shuffle_seed=5)), 1)[0]
    assert b["given"].shape == b["given_start"].shape == (6, 9) and b["given"].dtype == bool
    assert b["task"].shape == (6,) and b["task"].dtype == np.int32
    for other in (rows(global_batch_size=2), rows(global_batch_size=6, process_index=1, process_count=2)):
        for i, fields in other.items():
            assert fields == tuple(synthetic_clip(i, TASK_CFG)[k].tobytes() for k in TASK_KEYS)
            if i in single:
                assert fields == single[i]
    reseeded = dataclasses.replace(TASK_CFG, seed=8)
    assert any(synthetic_clip(i, reseeded)["task"] != synthetic_clip(i, TASK_CFG)["task"] for i in range(10))


def test_tasks_off_adds_no_keys():
    assert set(synthetic_clip(0, CFG)) == {"video", "index"}
    b = _take(make_iterator(make_dataset(CFG, global_batch_size=2, shuffle_seed=0)), 1)[0]
    assert set(b) == {"video", "index"}


def test_tasks_and_keyframe_counts_vary():
    tasks, counts = set(), set()
    for i in range(50):
        ex = synthetic_clip(i, TASK_CFG)
        tasks.add(TASKS[int(ex["task"])])
        if TASKS[int(ex["task"])] in ("single_shot", "multi_shot"):
            counts.add(int(ex["given_start"].sum()))
    assert len(tasks) >= 4 and {"single_shot", "multi_shot"} <= tasks
    assert len(counts) >= 3


def test_task_config_fields_from_config_and_validation():
    c = ml_collections.ConfigDict({"clip_frames": 9, "shot_lengths": (3, 6), "tasks": True, "max_keyframes": 3,
                                   "task_weights": {"single_shot": 1.0, "multi_shot": 2.0}, "min_span": 1})
    cfg = SyntheticClipsConfig.from_config(c)
    assert cfg.tasks and cfg.max_keyframes == 3 and cfg.min_span == 1
    assert cfg.task_weights == {"single_shot": 1.0, "multi_shot": 2.0, "extend_forward": 0.0,
                                "extend_backward": 0.0, "in_between": 0.0}
    assert cfg.task_config() == TaskSamplingConfig(task_weights=cfg.task_weights, max_keyframes=3, min_span=1)
    assert hash(cfg) == hash(SyntheticClipsConfig.from_config(c))  # still usable as a cache key
    assert {TASKS[int(synthetic_clip(i, cfg)["task"])] for i in range(20)} == {"single_shot", "multi_shot"}
    with pytest.raises(ValueError, match="unknown tasks"):
        SyntheticClipsConfig(task_weights={"zoom": 1.0})
    with pytest.raises(ValueError, match="keyframe_middle is a probability"):
        SyntheticClipsConfig(keyframe_middle=1.5)
