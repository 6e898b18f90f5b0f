"""Training metrics: a JSONL + TensorBoard writer that survives restarts, peak FLOP/s, and a tqdm progress bar.

``metrics.jsonl`` is the record of a run meant for scripts (one JSON object a line, full float precision);
the TensorBoard event files are for looking at curves (TensorBoard stores scalars as float32). Both are
flushed after every write, so a run killed with SIGKILL loses at most the write in progress, and both are
cut back to the restored step on resume, so they tell the history of the run as it actually went.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np
from etils import epath
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from director_jax.io_utils import atomic_write, dir_path, is_remote
from director_jax.parallel.chips import chip_spec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TB_DIR = "tensorboard"

_RESERVED = ("step", "time")


def _json_number(value: Any) -> int | float | str:
    """Ints stay ints; floats become JSON numbers, and NaN/inf the strings "nan"/"inf"/"-inf" (strict JSON)."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    f = float(value)  # numpy / jax 0-d arrays too
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def _parse_line(line: bytes) -> dict | None:
    """A JSONL record with an integer step, or None for a line that is not one (torn or corrupt)."""
    try:
        record = json.loads(line)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _repair_jsonl(path: Path, max_step: int | None) -> None:
    """Drops a torn last line, corrupt lines and (when ``max_step`` is given) lines past it; atomic rewrite.

    The file is only rewritten when something is dropped, so a clean resume costs one read.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")  # tail: b"" when the file ends in a newline, else a torn line
    keep: list[bytes] = []
    corrupt = past = 0
    for line in complete:
        if not line.strip():
            continue
        record = _parse_line(line)
        if record is None:
            corrupt += 1
        elif max_step is not None and record["step"] > max_step:
            past += 1
        else:
            keep.append(line)
    if not (tail or corrupt or past):
        return
    log.info(
        "%s: dropping %d line(s) past step %s, %d corrupt line(s)%s",
        path,
        past,
        max_step,
        corrupt,
        " and a partly written last line" if tail else "",
    )
    kept = b"".join(line + b"\n" for line in keep)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(kept))


class MetricWriter:
    """Writes per-step scalars to ``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tensorboard``.

    Only one process of a multi-host job should write: pass ``enabled=jax.process_index() == 0``; a disabled
    writer touches nothing on disk. ``resume_step`` is the step the run was restored at (the last step whose
    metrics are valid): JSONL lines with a larger step are removed, and TensorBoard is told to hide the old
    events past it (a ``SessionLog.START`` at ``resume_step + 1``, the same mechanism as SummaryWriter's
    ``purge_step``). Without ``resume_step`` existing lines are kept and new ones appended.

    The event files are written synchronously with tensorboardX's ``EventsWriter`` (the writer underneath
    ``SummaryWriter``): SummaryWriter hands events to a background thread through a queue that its ``flush()``
    does not drain, so a killed run could lose events that "were flushed".

    A cloud ``workdir`` (``gs://...``) cannot be appended to: both files are written in a local staging
    directory and uploaded whole by ``sync()``, which the trainer calls after every checkpoint (so what a
    resume keeps is in the bucket), and which ``write_scalars`` calls every ``sync_every_s`` seconds and
    ``close()`` once more. A kill loses at most the lines since the last sync, all past the last checkpoint.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 sync_every_s: float = 60.0):
        self.remote = is_remote(workdir)
        self.workdir = dir_path(workdir)
        self.enabled = enabled
        self.sync_every_s = float(sync_every_s)
        self._jsonl: IO[str] | None = None
        self._events: EventsWriter | None = None
        self._staging: Path | None = None
        self._last_sync = time.monotonic()
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._staging = Path(tempfile.mkdtemp(prefix="director_jax_metrics_"))
            if self.metrics_path.exists():
                (self._staging / METRICS_FILE).write_bytes(self.metrics_path.read_bytes())
        local = self._local_dir
        _repair_jsonl(local / METRICS_FILE, resume_step)
        self._jsonl = open(local / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        tb_dir = local / TB_DIR
        tb_dir.mkdir(exist_ok=True)
        # Event file names start with the time in whole seconds; the ns suffix keeps a restart within the same
        # second from overwriting the previous file and sorts it after that file (TensorBoard reads in name order).
        self._events = EventsWriter(str(tb_dir / "events"), filename_suffix=f".{time.time_ns()}")
        if resume_step is not None:
            self._events.write_event(
                event_pb2.Event(
                    wall_time=time.time(),
                    step=resume_step + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )
        self._events.flush()
        self.sync()

    @property
    def _local_dir(self) -> Path:
        return self._staging if self._staging is not None else Path(self.workdir)

    @property
    def metrics_path(self) -> Path | epath.Path:
        return self.workdir / METRICS_FILE

    @property
    def config_path(self) -> Path | epath.Path:
        return self.workdir / CONFIG_FILE

    def sync(self) -> None:
        """Uploads the staged files to a cloud workdir (each object replaced whole); nothing to do locally."""
        self._last_sync = time.monotonic()
        if self._staging is None:
            return
        self.metrics_path.write_bytes((self._staging / METRICS_FILE).read_bytes())
        for event_file in sorted((self._staging / TB_DIR).iterdir()):  # only this run's: older ones stay as they are
            (self.workdir / TB_DIR / event_file.name).write_bytes(event_file.read_bytes())

    def write_scalars(self, step: int, mapping: Mapping[str, Any]) -> None:
        """Appends one JSONL line and one TensorBoard event for ``step``; values are Python/numpy/jax scalars."""
        if not self.enabled:
            return
        if self._jsonl is None or self._events is None:
            raise ValueError("MetricWriter is closed")
        clash = [k for k in mapping if k in _RESERVED]
        if clash:
            raise ValueError(f"scalar names {clash} clash with the JSONL record's own fields {_RESERVED}")
        step = int(step)
        now = time.time()
        record = {"step": step, "time": now, **{k: _json_number(v) for k, v in mapping.items()}}
        summary = Summary(value=[v for k, x in mapping.items() for v in tb_summary.scalar(k, float(x)).value])
        # One write() of the whole line, then flush: a kill leaves at most this line torn (dropped on resume).
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._events.write_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
        self._events.flush()
        if self._staging is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def write_config(self, config: str | Mapping[str, Any], step: int = 0) -> None:
        """Stores the run's config as ``config.json`` (atomically) and as TensorBoard text, to know what ran.

        ``config`` is a JSON string (e.g. ``ConfigDict.to_json_best_effort()``) or a JSON-serialisable mapping.
        """
        if not self.enabled:
            return
        if self._events is None:
            raise ValueError("MetricWriter is closed")
        if isinstance(config, str):
            json.loads(config)  # fail here, not when someone reads config.json
            text = config
        else:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
        text = text.rstrip("\n") + "\n"
        atomic_write(self.config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # cloud: one upload
        markdown = "\n".join("    " + line for line in text.splitlines())  # indented: a markdown code block
        self._events.write_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=tb_summary.text("config", markdown))
        )
        self._events.flush()

    def close(self) -> None:
        opened = self._jsonl is not None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._staging is not None:
            try:
                if opened:
                    self.sync()
            except Exception:  # gcsfs raises many kinds; the staged files are kept, not lost
                log.exception("could not upload the metrics to %s; they are kept in %s", self.workdir, self._staging)
            else:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peak_flops(devices: Iterable[jax.Device | str]) -> float | None:
    """Sum of the devices' peak dense bf16 FLOP/s (the MFU denominator); None if any chip is unknown (e.g. CPU)."""
    total = 0.0
    count = 0
    for device in devices:
        spec = chip_spec(device)
        if spec is None:
            return None
        total += spec.peak_bf16_flops
        count += 1
    return total if count else None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float | np.floating) else str(value)


class Progress:
    """tqdm bar for the training loop showing loss, steps/s, tokens/s and MFU measured over recent steps.

    Rates come from the clock readings at the last ``window + 1`` calls of :meth:`update`, so they follow the
    current speed, and the time before the first call (compilation, restoring a checkpoint, the first step
    itself) never enters them: the first call only sets the starting point. Call :meth:`reset_window` after a
    pause that is not training (evaluation, a blocking checkpoint save) for the same reason.

    ``flops_per_step`` is the global figure: the FLOPs of one whole training step summed over all devices
    (``jit(step).lower(...).cost_analysis()["flops"]``, taken before partitioning; ``Compiled.cost_analysis()``
    of an SPMD program counts one device's share, so multiply that by the device count). ``peak`` is the sum of
    the peak FLOP/s of the same devices (:func:`peak_flops`). ``tokens_per_step`` is global too (whole batch).
    MFU = flops_per_step * steps/s / peak, reported in percent, and only when both figures are known.
    Steps of different sizes (per-example timelines: each batch in its own latent bucket) pass their own
    ``tokens`` and ``flops`` to :meth:`update`; the rates then divide the work done by the time it took.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        flops_per_step: float | None,
        tokens_per_step: int,
        peak: float | None,
        enabled: bool,
        window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
        file: IO[str] | None = None,
        desc: str = "train",
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step
        self.tokens_per_step = tokens_per_step
        self.peak = peak
        self._clock = clock
        # (step, clock, tokens so far, FLOPs so far) at recent update() calls
        self._marks: deque[tuple[int, float, float, float]] = deque(maxlen=window + 1)
        self._step = initial_step
        self._tokens = self._flops = 0.0  # work done since the start (or since this process resumed)
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            file=file,
            # tqdm's own rate and ETA would include compilation; ours go in the postfix instead.
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def update(self, step: int, loss: float, extra: Mapping[str, Any] | None = None, *, tokens: float | None = None,
               flops: float | None = None) -> None:
        """Moves the bar to ``step`` (steps completed so far) and shows ``loss``, the rates and ``extra``.

        Pass ``loss`` as a host float: fetching it waits for the step to finish, so the clock reading here is
        when the step really ended, not when it was dispatched. Calling this every k steps is fine.
        ``tokens`` / ``flops``: the work of the steps since the last call (default: the fixed per-step figures).
        """
        now = self._clock()
        done = step - self._step
        if done > 0:
            self._tokens += self.tokens_per_step * done if tokens is None else float(tokens)
            if self.flops_per_step is not None or flops is not None:
                self._flops += (self.flops_per_step or 0.0) * done if flops is None else float(flops)
        if not self._marks or step > self._marks[-1][0]:
            self._marks.append((step, now, self._tokens, self._flops))
        parts = [f"loss={_fmt(float(loss))}"]
        r = self.rates()
        if r:
            parts.append(f"{r['steps_per_sec']:.3g} step/s")
            parts.append(f"{tqdm.format_sizeof(r['tokens_per_sec'], divisor=1000)} tok/s")
            if "mfu" in r:
                parts.append(f"MFU {r['mfu']:.1f}%")
            if r["steps_per_sec"] > 0 and step < self.total_steps:
                parts.append(f"eta {tqdm.format_interval((self.total_steps - step) / r['steps_per_sec'])}")
        parts.extend(f"{k}={_fmt(v)}" for k, v in (extra or {}).items())
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        if step > self._step:
            self._bar.update(step - self._step)
            self._step = step
        else:
            self._bar.refresh()

    def reset_window(self) -> None:
        """Forgets the recorded times: the next :meth:`update` becomes the new starting point."""
        self._marks.clear()

    def rates(self) -> dict[str, float]:
        """``steps_per_sec``, ``tokens_per_sec`` and ``mfu`` (percent, only if computable) for the metrics file.

        Empty until two updates have been seen, since the first one only marks the start.
        """
        if len(self._marks) < 2:
            return {}
        (s0, t0, k0, f0), (s1, t1, k1, f1) = self._marks[0], self._marks[-1]
        if t1 <= t0:
            return {}
        sps = (s1 - s0) / (t1 - t0)
        out = {"steps_per_sec": sps, "tokens_per_sec": (k1 - k0) / (t1 - t0)}
        if self.flops_per_step is not None and self.peak:
            out["mfu"] = 100.0 * (f1 - f0) / (t1 - t0) / self.peak
        return out

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
