"""Curation as an Apache Beam pipeline (DirectRunner, 1 and 2 worker processes) against the in-process command on
the same real mp4 files: the same samples, cut frames and clips, the same skips, and a rerun that adds nothing."""

import json
import subprocess
import sys

import numpy as np
import pytest

from director_jax.curation.beam_pipeline import BeamRun
from director_jax.curation.decode import read_frames
from director_jax.curation.pipeline import curate
from director_jax.data.synthetic import write_synthetic_movie
from tests.test_curate import CONFIG, _config, _lines


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_movies")
    for seed in range(3):
        lengths = [int(n) for n in np.random.default_rng(10 + seed).integers(14, 30, size=3)]
        write_synthetic_movie(root / f"movie{seed}.mp4", seed, lengths, 48, 64)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a movie")  # one corrupt file among them
    return root


def _outputs(out):
    """What a curation wrote, independent of the order sources finished in."""
    manifest = sorted(_lines(out / "manifest.jsonl"), key=lambda m: m["id"])
    shots = sorted(_lines(out / "shots.jsonl"), key=lambda s: s["source"])
    skipped = sorted(_lines(out / "skipped.jsonl"), key=lambda s: s["source"])
    clips = {m["id"]: read_frames(out / m["clip"]).astype(np.float64) for m in manifest}
    return manifest, shots, skipped, clips


def _same_clips(ours: dict, theirs: dict) -> bool:
    """The same clips, frame for frame, up to the encoder: the in-process command itself does not write the
    same H.264 bytes twice (two runs differ in most clips, by up to ~20 levels in a pixel), so the clips are
    compared decoded, at the PSNR the curation tests ask of a clip against its source (> 30 dB)."""
    if ours.keys() != theirs.keys():
        return False
    for k, a in ours.items():
        b = theirs[k]
        if a.shape != b.shape or 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-9)) <= 30:
            return False
    return True


def _counts(summary):
    return {k: v for k, v in summary.items() if k not in ("seconds", "frames_per_second", "recovered")}


@pytest.fixture(scope="module")
def in_process(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_process") / "out"
    return out, curate([str(inputs)], out, _config())


@pytest.mark.parametrize("workers", [1, 2])
def test_beam_pipeline_writes_what_the_in_process_command_writes(inputs, in_process, tmp_path, workers):
    reference, reference_summary = in_process
    out = tmp_path / "out"
    summary = curate([str(inputs)], out, _config(), runner=BeamRun("direct", workers))
    manifest, shots, skipped, clips = _outputs(out)
    assert (manifest, shots, skipped) == _outputs(reference)[:3]
    assert _same_clips(clips, _outputs(reference)[3]) and len(clips) == summary["samples"]["total"] > 0
    broken = [s for s in skipped if s["source"].endswith("broken.mp4")]  # beside the movies' .truth.json files
    assert [s["reason"] for s in broken] == ["unreadable_container"]
    assert summary["sources"]["skipped"]["unreadable_container"] == 1
    assert _counts(summary) == _counts(reference_summary)
    again = curate([str(inputs)], out, _config(), runner=BeamRun("direct", workers))  # a rerun adds nothing
    assert again["sources"]["already_done"] == 3 and again["sources"]["already_skipped"] == len(skipped)
    assert _outputs(out)[:3] == (manifest, shots, skipped)


def test_command_runs_beam_and_refuses_an_unknown_runner(inputs, in_process, tmp_path):
    reference, _ = in_process
    cmd = [sys.executable, "-m", "director_jax.curate", f"--config={CONFIG}", f"--input={inputs}",
           f"--out={tmp_path / 'out'}", "--config.progress=False", "--runner=direct", "--workers=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(tmp_path / "out")[:3] == _outputs(reference)[:3]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]["done"] == 3
    bad = subprocess.run([*cmd[:-2], "--runner=dataflow", f"--out={tmp_path / 'other'}"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "error: --runner 'dataflow': choose one of direct." in bad.stderr
    assert not (tmp_path / "other").exists()
