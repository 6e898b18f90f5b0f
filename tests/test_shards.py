"""The curated-dir -> TFDS ArrayRecord shards: every field read back, frames decoded, rebuilds, splits, the command.

The curated directories here are made by hand in the format the curation writes (real H.264 clips
written with PyAV from synthetic movies, manifest lines per the spec), so the ground truth (frames,
cuts, captions, embeddings) is known exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from director_jax.curation.shards import build_curated_dataset
from director_jax.curation.text_embeddings import write_entry
from director_jax.data.captions import format_multishot_caption, parse_multishot_caption
from director_jax.data.shards import BUILD_FILE, EMPTY_CAPTION_FILE, index_file
from director_jax.data.synthetic import make_movie
from director_jax.data.text_embeddings import ENCODER_FILE, MissingTextEmbeddingsError, TextEmbeddingCache, entry_hash
from director_jax.video_io import write_mp4

# (seed, shot lengths, height, width, fps, source start frame): 12 samples of 20..40 frames, 48x64
DEFAULT_SPECS = [(k, shots, 48, 64, 8.0, 100 * k + 7) for k, shots in enumerate(
    [[20], [12, 14], [30], [10, 10, 12], [25], [16, 24], [40], [8, 12], [22], [14, 6, 10], [33], [18, 18]])]


# The documented order of a sample's proper shot ranges (first, last), written out by hand per shot count.
PROPER_RANGES = {1: [], 2: [(0, 0), (1, 1)], 3: [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]}


def make_curated_dir(root: Path, specs=DEFAULT_SPECS, frames_fn=None) -> list[tuple[dict, np.ndarray]]:
    """Writes clips/<id>.mp4 and manifest.jsonl; returns (manifest line, source frames in [-1, 1]) per sample.

    ``frames_fn(seed, num_frames, height, width)`` replaces the synthetic movie's frames (shot cuts stay).
    """
    root = Path(root)
    out = []
    for seed, shots, h, w, fps, start in specs:
        n = sum(shots)
        frames = make_movie(seed, shots, h, w, fps).frames if frames_fn is None else frames_fn(seed, n, h, w)
        source = f"/movies/movie_{seed}.mp4"
        end = start + n
        sid = hashlib.sha1(f"{source}:{start}:{end}".encode()).hexdigest()[:16]
        rel_cuts = np.cumsum(shots)[:-1].tolist()
        line = {"id": sid, "source": source, "start_frame": start, "end_frame": end, "fps": fps,
                "cuts": [start + c for c in rel_cuts], "kind": "multi_shot" if len(shots) > 1 else "single_shot",
                "caption": format_multishot_caption([f"shot {i} of movie {seed}, {h}x{w}." for i in range(len(shots))]),
                "clip": f"clips/{sid}.mp4", "width": w, "height": h, "num_frames": n,
                "keyframe_candidates": {"shot_starts": [0, *rel_cuts],
                                        "even": np.linspace(0, n - 1, 4).round().astype(int).tolist(),
                                        "motion_peaks": [n // 3]}}
        write_mp4(root / line["clip"], frames, fps)
        out.append((line, frames))
    write_manifest(root, [line for line, _ in out])
    return out


def range_caption(caption: str, first: int, last: int) -> str:
    """The caption of shots first..last (0-based, inclusive), built here from the caption's shots: the caption
    itself for all of them, else those shots' captions re-numbered from Shot 1 (the documented rule)."""
    shots = parse_multishot_caption(caption)
    return caption if (first, last) == (0, len(shots) - 1) else format_multishot_caption(shots[first:last + 1])


def window_truth(line: dict, frame_index) -> tuple[str, list[int]]:
    """A window's caption and its frames per shot, from the manifest line alone (``window_counts``)."""
    first, last, counts = window_counts(line["cuts"], frame_index, line["start_frame"])
    return range_caption(line["caption"], first, last), counts


def window_counts(cuts, frame_index, start: int = 0) -> tuple[int, int, list[int]]:
    """The first and last shot a window shows and its frames in each: frame f is in shot k = the number of cuts at
    or before f; the window shows the shots from its first frame's to its last frame's."""
    frames = [int(f) for f in frame_index]
    assert frames == sorted(frames)
    shot_of = [sum(c - start <= f for c in cuts) for f in frames]
    first, last = shot_of[0], shot_of[-1]
    return first, last, [shot_of.count(k) for k in range(first, last + 1)]


def all_captions(lines: list[dict]) -> list[str]:
    """Every caption a text cache must hold for these manifest lines: each caption and all its shot ranges'."""
    out = []
    for line in lines:
        n = len(line["cuts"]) + 1
        out += [range_caption(line["caption"], a, b) for a in range(n) for b in range(a, n)]
    return out


def write_manifest(root: Path, lines: list[dict]) -> None:
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def make_text_cache(root: Path, captions, *, dtype: str = "bfloat16", dim: int = 8, max_length: int = 16,
                    empty: bool = True) -> dict[str, np.ndarray]:
    """A text-embedding cache (the real on-disk layout and writer) holding known embeddings; returns them."""
    fingerprint = hashlib.sha256(f"test-encoder-{dtype}-{dim}-{max_length}".encode()).hexdigest()
    folder = Path(root) / fingerprint[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENCODER_FILE).write_text(json.dumps({"format": 1, "fingerprint": fingerprint, "dim": dim,
                                                   "dtype": dtype, "max_length": max_length,
                                                   "checkpoint": "none (test)"}))
    truth = {}
    for caption in dict.fromkeys([*captions, *([""] if empty else [])]):
        seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(1 + seed % max_length, dim)).astype(np.float32)
        if dtype == "bfloat16":
            import ml_dtypes

            emb = emb.astype(ml_dtypes.bfloat16)
        h = entry_hash(fingerprint, caption)
        write_entry(folder / h[:2] / f"{h}.safetensors", caption, emb, len(emb), fingerprint)
        truth[caption] = emb
    return truth


def decode_all(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32) / 127.5 - 1


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _in_validation(sample_id: str, fraction: float) -> bool:  # the documented rule, computed independently
    return int(hashlib.sha256(("validation:" + sample_id).encode()).hexdigest(), 16) >> 192 < fraction * 2**64


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curated")
    return root, make_curated_dir(root)


def _copy(curated, tmp_path) -> tuple[Path, list]:
    root, samples = curated
    dst = tmp_path / "out"
    shutil.copytree(root, dst)
    return dst, samples


def test_build_reads_back_every_field_and_frame(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    truth = make_text_cache(tmp_path / "cache", all_captions([s for s, _ in samples]))
    builder = build_curated_dataset(out, text_cache=tmp_path / "cache", text_max_length=16, validation_fraction=0.25,
                                    progress=False)
    version = out / "tfds" / "curated_clips" / "1.0.0"
    assert Path(builder.data_dir) == version
    want_val = [s["id"] for s, _ in samples if _in_validation(s["id"], 0.25)]
    assert 0 < len(want_val) < len(samples)  # both splits exercised
    by_id = {s["id"]: (s, f) for s, f in samples}
    assert {len(s["cuts"]) + 1 for s, _ in samples} == {1, 2, 3}  # every stored layout of ranges exercised
    seen = []
    for split in ("train", "validation"):
        ds = builder.as_data_source(split)
        ids = [_text(ds[i]["id"]) for i in range(len(ds))]
        # manifest order within the split, and the validation rule by hand
        assert ids == [s["id"] for s, _ in samples if (s["id"] in want_val) == (split == "validation")]
        with np.load(version / index_file(split)) as z:
            assert z["id"].tolist() == ids
            assert z["width"].tolist() == [by_id[i][0]["width"] for i in ids]
            assert z["num_frames"].tolist() == [by_id[i][0]["num_frames"] for i in ids]
        for i, sid in enumerate(ids):
            rec, (line, frames) = ds[i], by_id[sid]
            for key in ("source", "caption", "kind"):
                assert _text(rec[key]) == line[key]
            for key in ("start_frame", "end_frame", "num_frames", "width", "height"):
                assert int(rec[key]) == line[key], key
            assert float(rec["fps"]) == line["fps"]
            assert rec["cuts"].tolist() == [c - line["start_frame"] for c in line["cuts"]]
            for kind, values in line["keyframe_candidates"].items():
                assert rec[f"keyframes_{kind}"].tolist() == values
            assert rec["clip"] == (out / line["clip"]).read_bytes()
            emb = truth[line["caption"]]
            assert rec["text_embedding"].dtype == emb.dtype and rec["text_length"] == len(emb)
            np.testing.assert_array_equal(rec["text_embedding"].view(np.uint16), emb.view(np.uint16))  # bit-exact
            # the proper shot ranges' embeddings, end to end in the documented order (by first shot, then last)
            ranges = PROPER_RANGES[len(line["cuts"]) + 1]
            want = [truth[range_caption(line["caption"], a, b)] for a, b in ranges]
            assert rec["range_text_lengths"].tolist() == [len(w) for w in want]
            got = rec["range_text_embedding"]
            assert got.dtype == emb.dtype and got.shape == (sum(len(w) for w in want), 8)
            if want:
                np.testing.assert_array_equal(got.view(np.uint16), np.concatenate(want).view(np.uint16))
            decoded = decode_all(rec["clip"])
            assert decoded.shape == frames.shape
            assert psnr(decoded, frames) > 25.0  # H.264 4:2:0 of saturated synthetic colours: 27..33 dB
        seen += ids
    assert sorted(seen) == sorted(by_id)
    np.testing.assert_array_equal(np.load(version / EMPTY_CAPTION_FILE), truth[""].astype(np.float32))
    meta = builder.info.metadata
    assert meta["text"]["dim"] == 8 and meta["text"]["dtype"] == "bfloat16" and meta["text"]["empty_caption"]


def test_unchanged_inputs_skip_and_changed_manifest_rebuilds(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    build_curated_dataset(out, validation_fraction=0.25, progress=False)
    version = out / "tfds" / "curated_clips" / "1.0.0"
    first = os.stat(version).st_ino, (out / "tfds" / BUILD_FILE).read_text()
    build_curated_dataset(out, validation_fraction=0.25, progress=False)
    assert (os.stat(version).st_ino, (out / "tfds" / BUILD_FILE).read_text()) == first  # nothing rewritten

    kept = [line for line, _ in samples[:-1]]  # curation dropped the last sample
    write_manifest(out, kept)
    builder = build_curated_dataset(out, validation_fraction=0.25, progress=False)
    assert os.stat(version).st_ino != first[0]
    ids = {_text(r["id"]) for split in builder.info.splits for r in _all(builder.as_data_source(split))}
    assert ids == {line["id"] for line in kept}
    assert json.loads((out / "tfds" / BUILD_FILE).read_text())["digest"] != json.loads(first[1])["digest"]
    # a different validation fraction is a different dataset too
    builder = build_curated_dataset(out, validation_fraction=0.5, progress=False)
    assert builder.info.splits["validation"].num_examples == sum(_in_validation(s["id"], 0.5) for s in kept)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tfds")) == [".tfds.lock"]  # no leftovers


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_failed_build_keeps_the_last_good_one(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    make_text_cache(tmp_path / "cache", all_captions([s for s, _ in samples]), dtype="float32")
    build_curated_dataset(out, text_cache=tmp_path / "cache", text_max_length=16, progress=False)
    version = out / "tfds" / "curated_clips" / "1.0.0"
    inode = os.stat(version).st_ino
    # A damaged cache entry fails the build half way (inside TFDS's example generation).
    cache = TextEmbeddingCache(tmp_path / "cache", max_length=16)
    cache.path(samples[5][0]["caption"]).write_bytes(b"not a safetensors file")
    write_manifest(out, [line for line, _ in samples[1:]])  # so that a rebuild is due
    with pytest.raises(ValueError, match="unreadable"):
        build_curated_dataset(out, text_cache=cache, progress=False)
    assert os.stat(version).st_ino == inode
    import tensorflow_datasets as tfds

    old = tfds.builder_from_directory(str(version))
    assert sum(s.num_examples for s in old.info.splits.values()) == len(samples)
    assert _text(old.as_data_source("train")[0]["id"]) in {s["id"] for s, _ in samples}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tfds")) == [".tfds.lock"]


def test_validation_split_is_deterministic_and_disjoint(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    splits = []
    for name in ("a", "b"):
        builder = build_curated_dataset(out, data_dir=tmp_path / name, validation_fraction=0.3, progress=False)
        splits.append({s: [_text(r["id"]) for r in _all(builder.as_data_source(s))] for s in builder.info.splits})
    assert splits[0] == splits[1]
    train, val = set(splits[0]["train"]), set(splits[0]["validation"])
    assert not train & val and train | val == {s["id"] for s, _ in samples}
    assert val == {s["id"] for s, _ in samples if _in_validation(s["id"], 0.3)}


def test_clear_errors_for_missing_inputs(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    make_text_cache(tmp_path / "cache", all_captions([s for s, _ in samples[1:]]))
    with pytest.raises(MissingTextEmbeddingsError) as e:
        build_curated_dataset(out, text_cache=tmp_path / "cache", text_max_length=16, progress=False)
    assert e.value.missing == [samples[0][0]["caption"]]
    (out / samples[2][0]["clip"]).unlink()
    with pytest.raises(FileNotFoundError, match="rerun curation"):
        build_curated_dataset(out, progress=False)
    with pytest.raises(FileNotFoundError, match="not a curated directory"):
        build_curated_dataset(tmp_path / "nothing", progress=False)
    assert not (out / "tfds").exists()


def test_a_missing_shot_range_caption_is_named_with_the_command(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    three = samples[3][0]  # shots [10, 10, 12]
    gone = range_caption(three["caption"], 1, 2)
    assert gone.startswith("The video features 2 shots. Shot 1: shot 1 of movie 3")
    make_text_cache(tmp_path / "cache", [c for c in all_captions([s for s, _ in samples]) if c != gone])
    with pytest.raises(MissingTextEmbeddingsError) as e:
        build_curated_dataset(out, text_cache=tmp_path / "cache", text_max_length=16, progress=False)
    assert e.value.missing == [gone]
    message = str(e.value)
    assert message.startswith("1 caption(s) have no text embedding") and repr(gone)[:60] in message
    assert f"python -m director_jax.embed_text --checkpoint 'none (test)' --captions {out / 'manifest.jsonl'} " \
           f"--cache {tmp_path / 'cache'}" in message
    assert not (out / "tfds").exists()


def test_a_caption_that_disagrees_with_the_cuts_refuses_the_build(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    lines = [dict(s) for s, _ in samples]
    cases = [
        (1, {"caption": "A plain caption of two shots."}, "the caption describes 1 shot(s) but the video has 2"),
        (0, {"caption": format_multishot_caption(["a.", "b."])}, "the caption describes 2 shot(s) but the video has 1"),
        (3, {"caption": "The video features 3 shots. Shot 1: a. Shot 3: b."}, "its shot markers are Shot 1:, Shot 3:"),
        (5, {"cuts": [lines[5]["start_frame"] + 24, lines[5]["start_frame"] + 16]}, "must be increasing"),
        (7, {"cuts": [lines[7]["start_frame"]]}, "strictly between start_frame"),
    ]
    for i, change, fragment in cases:
        broken = [dict(line) for line in lines]
        broken[i].update(change)
        write_manifest(out, broken)
        with pytest.raises(ValueError) as e:
            build_curated_dataset(out, progress=False)
        message = str(e.value)
        assert f"manifest.jsonl:{i + 1}: sample {lines[i]['id']}" in message and fragment in message, message
        assert "\n" not in message
        assert not (out / "tfds").exists()


def test_shards_of_the_old_format_are_refused_with_the_rebuild_command(curated, tmp_path):
    from director_jax.data.shards import FORMAT, Shards

    out, _ = _copy(curated, tmp_path)
    build_curated_dataset(out, validation_fraction=0.0, progress=False)
    version = out / "tfds" / "curated_clips" / "1.0.0"
    assert len(Shards(out, "train")) == 12
    meta = version / "metadata.json"
    data = json.loads(meta.read_text())
    assert data["format"] == FORMAT == 2
    meta.write_text(json.dumps({**data, "format": 1}))
    with pytest.raises(ValueError, match=r"holds shards of format 1, this loader reads format 2 .* rebuild them: "
                                         r"`python -m director_jax.shards --curated CURATED_DIR`"):
        Shards(out, "train")


def _shards_cli(*args: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "director_jax.shards", *args], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})


def test_command_builds_and_reports_user_errors_in_one_line(curated, tmp_path):
    out, samples = _copy(curated, tmp_path)
    make_text_cache(tmp_path / "cache", all_captions([s for s, _ in samples]), dtype="float32")
    done = _shards_cli("--curated", str(out), "--text_cache", str(tmp_path / "cache"), "--text_max_length", "16",
                       "--validation_fraction", "0.25", "--noprogress")
    assert done.returncode == 0, done.stderr
    n_val = sum(_in_validation(s["id"], 0.25) for s, _ in samples)
    version = out / "tfds" / "curated_clips" / "1.0.0"
    assert done.stdout.strip() == f"{version}: train {len(samples) - n_val}, validation {n_val}"
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(version))
    assert builder.info.metadata["text"]["dim"] == 8 and builder.info.metadata["validation_fraction"] == 0.25

    for args, message in [((), "error: --curated is required"),
                          (("--curated", str(tmp_path / "nothing")), "error: ")]:
        failed = _shards_cli(*args)
        assert failed.returncode == 2, (failed.stdout, failed.stderr)
        assert failed.stderr.startswith(message) and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "not a curated directory" in failed.stderr
