"""Curation on real mp4 files: cuts against the synthetic ground truth, bad inputs, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from director_jax.configs_common import load_config
from director_jax.curation.decode import read_frames
from director_jax.curation.pipeline import curate
from director_jax.data.synthetic import write_synthetic_movie

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "curate.py")


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    root = tmp_path_factory.mktemp("movies")
    infos = []
    for seed in range(4):
        lengths = [int(n) for n in np.random.default_rng(seed).integers(12, 30, size=4)]
        infos.append(write_synthetic_movie(root / f"movie{seed}.mp4", seed, lengths, 48, 64))
    return root, infos


def _config():
    cfg = load_config(CONFIG)
    cfg.progress = False
    return cfg


def test_cuts_match_ground_truth_and_samples_carry_them(movies, tmp_path):
    root, infos = movies
    summary = curate([str(root)], tmp_path / "out", _config())
    shots = {line["source"]: line for line in _lines(tmp_path / "out" / "shots.jsonl")}
    assert len(shots) == len(infos)
    for info in infos:
        found = shots[os.path.realpath(info.path)]["shot_starts"]
        truth = info.movie.shot_starts
        assert len(found) == len(truth), (found, truth)  # no false and no missed cuts
        assert max(abs(a - b) for a, b in zip(found, truth, strict=True)) <= 1
    manifest = _lines(tmp_path / "out" / "manifest.jsonl")
    assert summary["samples"]["total"] == len(manifest) > 0
    assert {m["kind"] for m in manifest} == {"single_shot", "multi_shot"}
    by_source = {os.path.realpath(i.path): i for i in infos}
    for m in manifest:
        truth = by_source[m["source"]].movie.shot_starts
        inside = [s for s in truth if m["start_frame"] < s < m["end_frame"]]
        assert len(m["cuts"]) == len(inside) and all(abs(a - b) <= 1 for a, b in zip(m["cuts"], inside, strict=True))
        assert (m["kind"] == "multi_shot") == bool(m["cuts"])
    # a clip holds exactly its span of the source
    m = next(x for x in manifest if x["kind"] == "multi_shot")
    clip = read_frames(tmp_path / "out" / m["clip"]).astype(np.float64)
    source = read_frames(m["source"])[m["start_frame"]:m["end_frame"]].astype(np.float64)
    assert clip.shape == source.shape
    psnr = 10 * np.log10(255**2 / np.mean((clip - source) ** 2))
    assert psnr > 30, psnr


def test_bad_inputs_are_skipped_counted_and_resume_adds_nothing(movies, tmp_path):
    root, infos = movies
    bad = tmp_path / "in"
    bad.mkdir()
    good = bad / "good.mp4"
    good.write_bytes(Path(infos[0].path).read_bytes())
    data = good.read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (bad / "notes.txt").write_text("not a video")
    os.symlink(bad / "loop", bad / "loop")  # a directory entry nothing can read (ELOOP), even as root
    out = tmp_path / "out"
    summary = curate([str(bad)], out, _config())
    skipped = {os.path.basename(s["source"]): s["reason"] for s in _lines(out / "skipped.jsonl")}
    assert set(skipped) == {"truncated.mp4", "zero.mp4", "random.mp4", "notes.txt", "loop"}, skipped
    assert skipped["zero.mp4"] == "empty_file"
    assert sum(summary["sources"]["skipped"].values()) == 5 and summary["sources"]["done"] == 1, summary

    manifest = (out / "manifest.jsonl").read_text()
    clips = sorted(os.listdir(out / "clips"))
    again = curate([str(bad)], out, _config())
    assert again["sources"]["done"] == 0 and sum(again["sources"]["skipped"].values()) == 0, again
    assert (out / "manifest.jsonl").read_text() == manifest
    assert sorted(os.listdir(out / "clips")) == clips

    # a crash after a source's manifest lines but before its shots.jsonl line: the rerun redoes it once
    lines = _lines(out / "shots.jsonl")
    (out / "shots.jsonl").write_text("")
    (out / "manifest.jsonl").write_text(manifest + manifest.splitlines()[0] + "\n")
    curate([str(bad)], out, _config())
    assert (out / "manifest.jsonl").read_text() == manifest
    assert _lines(out / "shots.jsonl") == lines


def test_black_static_and_fading_shots_are_dropped_with_their_reason(tmp_path):
    from director_jax.data.synthetic import distinct_shots
    from director_jax.video_io import write_mp4

    rng = np.random.default_rng(7)
    a, b, c, d = (shot.frames for shot in distinct_shots(rng, [20, 20, 20, 20], 48, 64))
    black = np.full((16, 48, 64, 3), -1.0, np.float32)
    noise = np.random.default_rng(0).normal(0, 0.01, (20, 48, 64, 3)).astype(np.float32)
    still = np.clip(np.repeat(b[:1], 20, axis=0) + noise, -1, 1)  # one frame held, with grain
    ramp = np.linspace(1.0, 0.0, 20, dtype=np.float32)[:, None, None, None]
    fade = (c + 1) * ramp - 1  # fades out to black
    parts = [a, black, still, fade, d]
    path = tmp_path / "filters.mp4"
    write_mp4(path, np.concatenate(parts), 8.0, crf=12)
    curate([str(path)], tmp_path / "out", _config())
    (line,) = _lines(tmp_path / "out" / "shots.jsonl")
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()  # [0, 20, 36, 56, 76]
    assert len(line["shot_starts"]) == len(starts) and all(
        abs(x - y) <= 1 for x, y in zip(line["shot_starts"], starts, strict=True)), line["shot_starts"]
    reasons = [dropped["reason"] for dropped in line["dropped_shots"]]
    assert reasons == ["black", "static", "fading"], line["dropped_shots"]
    assert len(line["kept_shots"]) == 2
    # every sample lies inside one kept shot (the two kept shots are not adjacent: no multi-shot sample)
    kept = line["kept_shots"]
    for m in _lines(tmp_path / "out" / "manifest.jsonl"):
        assert any(s <= m["start_frame"] and m["end_frame"] <= e for s, e in kept), (m, kept)


def test_command_missing_required_flag(movies, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "director_jax.curate", "--input", str(movies[0])], cwd=repo,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: --out is required") and len(result.stderr.strip().splitlines()) == 1
