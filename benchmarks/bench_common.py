"""Helpers the benchmark scripts share: logging, core count, peak-RSS measurement, number formats, the
machine / software / code description that heads every table written to RESULTS.md, and the case runner of the
AOT-compile scripts (``aot_train.py``, ``aot_sampler.py``): each case in a fresh ``--one`` subprocess, its result
appended to a JSON-lines file and printed as a Markdown table row."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024.0**2
GIB = 2**30


def make_log(tag: str):
    """A ``log(msg)`` that prints ``[tag HH:MM:SS] msg`` to stderr (stdout stays for the tables)."""
    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def fmt_gib(n: float | None) -> str:
    """Bytes as GiB with two decimals (``-`` for None)."""
    return "-" if n is None else f"{n / GIB:.2f}"


class RSSMonitor:
    """Current RSS and a resettable peak RSS of this process, in bytes.

    Linux: the kernel's VmHWM, reset by writing 5 to /proc/self/clear_refs (exact, no sampling).
    Elsewhere: a psutil sampling thread (every 2 ms), or, without psutil, ru_maxrss (not resettable).
    """

    def __init__(self) -> None:
        self.method = "ru_maxrss (not resettable: peak since process start)"
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._max = 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
            self._kind = "hwm"
            return
        except (OSError, KeyError):
            pass
        try:
            import psutil

            self._proc = psutil.Process()
            self.method = "psutil RSS sampled every 2 ms"
            self._kind = "psutil"
        except ImportError:
            self._kind = "ru"

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def rss(self) -> int:
        if self._kind == "hwm":
            return self._status("VmRSS")
        if self._kind == "psutil":
            return self._proc.memory_info().rss
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def reset_peak(self) -> None:
        if self._kind == "hwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        elif self._kind == "psutil":
            self._stop_sampler()
            self._max = self.rss()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, self._proc.memory_info().rss)

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None

    def peak(self) -> int:
        if self._kind == "hwm":
            return self._status("VmHWM")
        if self._kind == "psutil":
            self._stop_sampler()
            return max(self._max, self.rss())
        return self.rss()


def release_free_memory() -> None:
    """Collects garbage and returns freed heap pages to the OS, so one phase's leftovers do not count."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine_description(script: str, watched: tuple[str, ...], jax_platforms: str | None = None) -> list[str]:
    """Date, machine, software versions, git revision (flagging uncommitted changes under ``watched``) and the
    command line of ``script``, as Markdown bullet lines."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    mem = ""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        mem = f", {total / 2**20:.0f} GiB RAM"

    def ver(p: str) -> str:
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return "n/a"

    code = "n/a"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(REPO)]
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *watched],
                               capture_output=True, text=True, check=True).stdout.strip()
        code = sha.stdout.strip() + (f" + uncommitted changes ({' or '.join(watched)})" if dirty else "")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    platforms = os.environ.get("JAX_PLATFORMS", "") if jax_platforms is None else jax_platforms
    return [
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {platform.platform()}; {cpu}; os.cpu_count() = {os.cpu_count()}, usable cores = "
        f"{usable_cores()}{mem}; load average at start: {load}",
        f"- Software: Python {platform.python_version()}, jax {ver('jax')} (JAX_PLATFORMS={platforms}), "
        f"flax {ver('flax')}, torch {ver('torch')}, diffusers {ver('diffusers')}",
        f"- Code: git {code}",
        f"- Command: `{shlex.join(['python', script, *sys.argv[1:]])}`",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '') or '(none)'}`",
    ]


# ------------------------------------------------------------------------------------------------
# AOT-compile cases: flags, one subprocess per case, the JSON-lines file and its Markdown table

# The TPU compiler refusing one buffer larger than HBM (``xla_tpu_no_crash_on_oom`` does not cover that). Groups:
# the buffer's bytes, the HBM limit in bytes, the buffer's shape (when the message gives it).
XLA_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED: Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)"
                        r"(?:.*?shape: ([a-z0-9]+\[[0-9,]+\]))?")
RESULT_PREFIX = "RESULT "  # a --one run's result, one JSON object on one stdout line
INFO_PREFIX = "INFO "  # what a --one run knows before its (slow, possibly failing) compile


def split_list(text: str) -> list[str]:
    """The items of a comma-separated flag: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def check_choices(parser: argparse.ArgumentParser, kind: str, names: Iterable[str], known: Iterable[str]) -> None:
    """``parser.error`` (exit 2) on the first of ``names`` not in ``known``: "unknown {kind} ...; choose from ..."."""
    known = list(known)
    for name in names:
        if name not in known:
            parser.error(f"unknown {kind} {name!r}; choose from {', '.join(known)}")


def add_output_args(parser: argparse.ArgumentParser, *, out: str, timeout_min: float) -> None:
    """The case runner's ``--out`` (JSON-lines file) and ``--timeout_min`` (per case) flags, with these defaults."""
    parser.add_argument("--out", default=out, help="JSON lines are appended here as cases complete")
    parser.add_argument("--timeout_min", type=float, default=timeout_min,
                        help="kill a case's compile after this many minutes")


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    """The ``--one`` (internal: one case in this process) and ``--table`` (print saved results) flags."""
    parser.add_argument("--one", action="store_true", help="(internal) compile one case in this process")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of these result files")


def memory_cells(r: dict) -> list[str]:
    """A compiled case's per-chip memory cells: arguments, temporaries, peak + code and HBM in GiB, then whether it
    fits (``yes`` or ``**NO**``, with its share of HBM)."""
    fits = "yes" if r["fits"] else "**NO**"
    if r["hbm_bytes"]:
        fits += f" ({100 * r['total_bytes'] / r['hbm_bytes']:.0f}%)"
    return [fmt_gib(r["argument_bytes"]), fmt_gib(r["temp_bytes"]), fmt_gib(r["total_bytes"]), fmt_gib(r["hbm_bytes"]),
            fits]


def markdown_header(columns: Sequence[str]) -> str:
    """The header and rule lines of a Markdown table of ``columns``."""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def print_jsonl_table(paths: Iterable[str | Path], columns: Sequence[str], row: Callable[[dict], str]) -> None:
    """Prints the Markdown table (``row`` of each record) of the JSON-lines result files ``paths``."""
    print(markdown_header(columns))
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                print(row(json.loads(line)))


def emit_result(result: dict) -> None:
    """Prints a ``--one`` run's result as the ``RESULT {json}`` line that ``run_case_in_subprocess`` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _infos(stdout: str) -> list[dict]:
    return [json.loads(ln[len(INFO_PREFIX):]) for ln in stdout.splitlines() if ln.startswith(INFO_PREFIX)]


def run_case_in_subprocess(cmd: Sequence[str], base: dict, *, timeout_min: float,
                           parse_failure: Callable[[str], dict] | None = None,
                           error_pattern: re.Pattern[str] | None = None) -> dict:
    """Runs one case's ``cmd`` (a ``--one`` run) in REPO; returns its result with ``wall_seconds`` added.

    A run that exits 0 with a ``RESULT`` line gives that line's result. Otherwise the result is ``base`` and the
    last ``INFO`` line, with ``status`` "error" and a ``note`` quoting stderr (``error_pattern``'s match when it has
    one, else its last line) plus ``parse_failure(stderr)``'s fields, or ``status`` "timeout" after
    ``timeout_min`` minutes.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_min * 60)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        info = _infos(proc.stdout)
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len(RESULT_PREFIX):])
        else:
            tail = proc.stderr.strip().splitlines() or ["no output"]
            match = error_pattern.search(proc.stderr) if error_pattern is not None else None
            err = match.group(0) if match else tail[-1][:300]
            result = {**base, **(info[-1] if info else {}), "status": "error",
                      "note": f"failed (rc {proc.returncode}): {err}",
                      **(parse_failure(proc.stderr) if parse_failure is not None else {})}
    except subprocess.TimeoutExpired as e:
        info = _infos(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        result = {**base, **(info[-1] if info else {}), "status": "timeout",
                  "note": f"compile did not finish in {timeout_min:g} min on this {os.cpu_count()}-core machine"}
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def append_jsonl(path: str | Path, record: dict) -> None:
    """Appends ``record`` to the JSON-lines file ``path`` as one line."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_cases(cases: Iterable[tuple[Sequence[str], dict]], out: str | Path, columns: Sequence[str],
              row: Callable[[dict], str], *, timeout_min: float, parse_failure: Callable[[str], dict] | None = None,
              error_pattern: re.Pattern[str] | None = None,
              footnote: Callable[[dict], str | None] | None = None) -> int:
    """Runs each ``(cmd, base)`` case with ``run_case_in_subprocess``; returns 1 when any did not succeed, else 0.

    Prints the table header of ``columns`` first, then, as each case completes, appends its result to ``out``
    and prints its ``row`` (and ``footnote(base)`` under it, when that gives a line).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(markdown_header(columns), flush=True)
    failures = 0
    for cmd, base in cases:
        result = run_case_in_subprocess(cmd, base, timeout_min=timeout_min, parse_failure=parse_failure,
                                        error_pattern=error_pattern)
        failures += result["status"] != "ok"
        append_jsonl(out, result)
        print(row(result), flush=True)
        if footnote is not None and (note := footnote(base)):
            print(note, flush=True)
    return 1 if failures else 0
