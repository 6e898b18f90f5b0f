"""MetricWriter, peak_flops and Progress, checked against independent readers of what they write.

The JSONL is read back with ``json``, the event files with TensorBoard's own ``EventAccumulator`` (not
tensorboardX), and the rates against numbers worked out by hand from a scripted clock.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from director_jax.parallel.chips import chip_spec
from director_jax.train.metrics import MetricWriter, Progress, peak_flops


def _strict_json(line: str) -> dict:
    """json.loads that rejects the non-standard NaN/Infinity tokens Python would otherwise accept."""

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def read_jsonl(workdir: Path) -> list[dict]:
    text = (workdir / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    return [_strict_json(line) for line in text.splitlines()]


def read_tb(workdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(x: float) -> float:
    """What TensorBoard keeps of a scalar: its simple_value field is a float32."""
    return float(np.float32(x))


def test_scalars_round_trip(tmp_path):
    written = {
        step: {"loss": 1 / (step + 1), "grad_norm": np.float32(0.1 * step), "lr": jnp.float32(3e-4), "seen": 64 * step}
        for step in range(10)
    }
    t0 = time.time()
    with MetricWriter(tmp_path) as writer:
        for step, scalars in written.items():
            writer.write_scalars(step, scalars)
        # Flushed after each write: readable before close().
        assert [r["step"] for r in read_jsonl(tmp_path)] == list(range(10))
        assert [s for s, _ in tb_series(read_tb(tmp_path), "loss")] == list(range(10))
    t1 = time.time()

    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == list(range(10))
    for r in records:
        want = written[r["step"]]
        assert t0 <= r["time"] <= t1
        assert set(r) == {"step", "time", *want}
        assert r["loss"] == want["loss"]  # full precision in the JSONL
        assert r["grad_norm"] == float(want["grad_norm"])
        assert r["lr"] == float(np.float32(3e-4))
        assert r["seen"] == want["seen"] and isinstance(r["seen"], int)

    acc = read_tb(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"loss", "grad_norm", "lr", "seen"}
    for tag in ("loss", "grad_norm", "lr", "seen"):
        assert tb_series(acc, tag) == [(s, f32(float(written[s][tag]))) for s in range(10)]


def test_nan_and_inf_round_trip(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(0, {"loss": float("nan"), "up": float("inf"), "down": -np.inf, "ok": 2.5})
    (record,) = read_jsonl(tmp_path)  # strict JSON: NaN/Infinity tokens would raise
    assert record["loss"] == "nan" and record["up"] == "inf" and record["down"] == "-inf" and record["ok"] == 2.5

    acc = read_tb(tmp_path)
    assert math.isnan(acc.Scalars("loss")[0].value)
    assert acc.Scalars("up")[0].value == math.inf
    assert acc.Scalars("down")[0].value == -math.inf


def test_resume_drops_later_steps(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(10):
            writer.write_scalars(step, {"v": float(step)})

    with MetricWriter(tmp_path, resume_step=4) as writer:
        assert [r["step"] for r in read_jsonl(tmp_path)] == [0, 1, 2, 3, 4]
        for step in range(5, 8):
            writer.write_scalars(step, {"v": 100.0 + step})

    records = read_jsonl(tmp_path)
    assert [(r["step"], r["v"]) for r in records] == [(s, float(s)) for s in range(5)] + [
        (s, 100.0 + s) for s in range(5, 8)
    ]
    # TensorBoard hides the abandoned steps 5..9 of the first event file.
    assert tb_series(read_tb(tmp_path), "v") == [(s, float(s)) for s in range(5)] + [
        (s, 100.0 + s) for s in range(5, 8)
    ]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # the restart did not overwrite the first file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _download(remote: str, local: Path) -> Path:
    """A gs:// directory copied to ``local`` with gcsfs directly (not through the code under test)."""
    import gcsfs

    gcsfs.GCSFileSystem().get(remote.rstrip("/") + "/", str(local), recursive=True)
    return local


def test_cloud_workdir_stages_and_uploads_whole_files(gcs_emulator, tmp_path):
    """gs://: nothing reaches the bucket between syncs; a sync, a resume and close leave what a local run would."""
    remote = f"gs://{gcs_emulator.bucket}/metrics-{time.time_ns()}"
    with MetricWriter(remote, sync_every_s=3600) as writer:
        writer.write_config({"seed": 3})
        for step in range(10):
            writer.write_scalars(step, {"v": float(step)})
        before_sync = read_jsonl(_download(remote, tmp_path / "before"))
        writer.sync()
        after_sync = read_jsonl(_download(remote, tmp_path / "after"))
    assert before_sync == [] and [r["step"] for r in after_sync] == list(range(10))

    with MetricWriter(remote, resume_step=4, sync_every_s=0) as writer:  # sync_every_s=0: every write uploads
        assert [r["step"] for r in read_jsonl(_download(remote, tmp_path / "resumed"))] == [0, 1, 2, 3, 4]
        for step in range(5, 8):
            writer.write_scalars(step, {"v": 100.0 + step})
        live = read_jsonl(_download(remote, tmp_path / "live"))
    assert [r["step"] for r in live] == list(range(8))

    final = _download(remote, tmp_path / "final")
    expected = [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]
    assert [(r["step"], r["v"]) for r in read_jsonl(final)] == expected
    assert tb_series(read_tb(final), "v") == expected  # the second run's event file hides the abandoned steps
    assert len(list((final / "tensorboard").iterdir())) == 2
    assert json.loads((final / "config.json").read_text()) == {"seed": 3}


def test_resume_without_dropping_keeps_every_line(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(3):
            writer.write_scalars(step, {"v": float(step)})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    MetricWriter(tmp_path, resume_step=2).close()
    MetricWriter(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("resume_step", [None, 10])
def test_torn_last_line_is_dropped(tmp_path, resume_step):
    with MetricWriter(tmp_path) as writer:
        for step in range(5):
            writer.write_scalars(step, {"v": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a kill -9 in the middle of a write leaves
        f.write('{"step": 5, "time": 17')

    with MetricWriter(tmp_path, resume_step=resume_step) as writer:
        assert [r["step"] for r in read_jsonl(tmp_path)] == [0, 1, 2, 3, 4]
        writer.write_scalars(5, {"v": 5.0})
    assert [(r["step"], r["v"]) for r in read_jsonl(tmp_path)] == [(s, float(s)) for s in range(6)]


def test_write_config(tmp_path):
    config = {"model": {"depth": 4, "width": 128}, "lr": 3e-4, "name": "dit-s"}
    with MetricWriter(tmp_path) as writer:
        writer.write_config(config)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    (event,) = read_tb(tmp_path).Tensors("config/text_summary")
    assert json.loads(textwrap.dedent(event.tensor_proto.string_val[0].decode())) == config

    as_string = json.dumps({"seed": 1})
    with MetricWriter(tmp_path, resume_step=0) as writer:
        writer.write_config(as_string)
        with pytest.raises(ValueError):
            writer.write_config("{not json")
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}


def test_disabled_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with MetricWriter(workdir, enabled=False, resume_step=3) as writer:
        for step in range(5):
            writer.write_scalars(step, {"loss": 1.0})
        writer.write_config({"a": 1})
    assert list(workdir.iterdir()) == []
    MetricWriter(tmp_path / "absent", enabled=False).close()
    assert not (tmp_path / "absent").exists()


def test_reserved_names_rejected(tmp_path):
    with MetricWriter(tmp_path) as writer, pytest.raises(ValueError):
        writer.write_scalars(0, {"step": 1.0})
    assert read_jsonl(tmp_path) == []


class ScriptedClock:
    def __init__(self, readings):
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def test_progress_rates():
    # Resumed at step 10. The first update (step 11) comes 100 s in: compilation. Then 0.5 s per step.
    clock = ScriptedClock([100.0, 100.5, 101.0, 101.5, 103.5])
    out = io.StringIO()
    progress = Progress(
        1000, 10, flops_per_step=2e12, tokens_per_step=4096, peak=8e12, enabled=True, window=3, clock=clock, file=out
    )
    progress.update(11, 0.9)
    assert progress.rates() == {}  # one reading is only a starting point
    progress.update(12, 0.8)
    progress.update(13, 0.7)
    progress.update(14, 0.6, {"lr": 1e-4})
    # 3 steps in 1.5 s -> 2 steps/s (the compile step would have given 4 / 101.5 s).
    rates = progress.rates()
    assert rates == pytest.approx({"steps_per_sec": 2.0, "tokens_per_sec": 8192.0, "mfu": 50.0})
    # Window of 3 intervals: the 12..15 readings only; 3 steps in 3 s -> 1 step/s.
    progress.update(15, 0.5)
    assert progress.rates() == pytest.approx({"steps_per_sec": 1.0, "tokens_per_sec": 4096.0, "mfu": 25.0})
    progress.close()
    shown = out.getvalue()
    assert "15/1000" in shown and "loss=0.5" in shown and "1 step/s" in shown and "MFU 25.0%" in shown


def test_progress_reset_window_and_every_k_steps():
    clock = ScriptedClock([5.0, 6.0, 50.0, 52.0])
    progress = Progress(100, 0, flops_per_step=None, tokens_per_step=10, peak=None, enabled=False, clock=clock)
    progress.update(10, 1.0)
    progress.update(20, 1.0)  # logged every 10 steps: 10 steps in 1 s
    assert progress.rates() == pytest.approx({"steps_per_sec": 10.0, "tokens_per_sec": 100.0})  # no MFU
    progress.reset_window()  # e.g. an evaluation ran from t=6 to t=50
    progress.update(30, 1.0)
    assert progress.rates() == {}
    progress.update(40, 1.0)
    assert progress.rates() == pytest.approx({"steps_per_sec": 5.0, "tokens_per_sec": 50.0})
    progress.close()


def test_progress_rates_of_steps_of_different_sizes():
    """Per-example timelines: each step passes its bucket's own tokens and FLOPs; the rates divide the work done
    in the window by its time (a big step and a small one are not two average steps)."""
    clock = ScriptedClock([10.0, 11.0, 12.0, 14.0])
    progress = Progress(100, 0, flops_per_step=9e12, tokens_per_step=900, peak=1e13, enabled=False, window=2,
                        clock=clock)
    progress.update(1, 1.0, tokens=900, flops=9e12)  # the starting point: its own work is before the window
    progress.update(2, 1.0, tokens=500, flops=5e12)
    progress.update(3, 1.0, tokens=700, flops=7e12)
    assert progress.rates() == pytest.approx({"steps_per_sec": 1.0, "tokens_per_sec": 600.0, "mfu": 60.0})
    progress.update(4, 1.0)  # no figures given: the fixed per-step ones (900 tokens, 9e12 FLOPs) in 2 s
    assert progress.rates() == pytest.approx({"steps_per_sec": 2 / 3, "tokens_per_sec": 1600 / 3, "mfu": 16 / 0.3})
    progress.close()


def test_peak_flops():
    assert peak_flops(jax.devices("cpu")) is None
    v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops([v5e] * 4) == 4 * 197e12 == 4 * chip_spec("TPU v5e").peak_bf16_flops
    assert peak_flops([h100, h100]) == 2 * 989e12
    assert peak_flops(["TPU v4"]) == 275e12
    assert peak_flops([v5e, jax.devices("cpu")[0]]) is None
    assert peak_flops([]) is None
