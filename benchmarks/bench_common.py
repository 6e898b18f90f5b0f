"""Helpers the benchmark scripts share: logging, core count, peak-RSS measurement, number formats, and the
machine / software / code description that heads every table written to RESULTS.md."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024.0**2


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
    ]
