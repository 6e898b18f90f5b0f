"""The launcher's input checks: accelerator types, names, gs:// paths, repository files, overrides.

Every check raises ``LaunchError`` (printed as one line ``error: ...``, exit status 2) before any
command runs. Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: local commands run here


class LaunchError(Exception):
    """Bad input: reported as ``error: ...`` with exit status 2, before anything runs."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Accelerator types: Cloud TPU name -> chips, hosts, the AOT topology name (director_jax.train.aot), runtime


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # Cloud TPU accelerator type, e.g. "v5p-8" (v4 / v5p count TensorCores, v5e / v6e chips)
    generation: str  # "v4", "v5p", "v5e", "v6e": the generation part of the topology name
    chips: int
    hosts: int  # TPU VM workers (one process each)
    topology: str  # what `python -m director_jax.train --compile_topology` takes, e.g. "v5p:2x2x1"
    runtime: str  # the TPU VM software version for `gcloud compute tpus tpu-vm create --version`

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite",
                    "v6e": "v2-alpha-tpuv6e"}
# chips -> default slice shape. v4 / v5p: 3D torus, 2 TensorCores and 4 chips per host; v5e / v6e: 2D, one
# host up to 8 chips, 4 chips per host above that.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def _accelerator_table() -> dict[str, Accelerator]:
    table = {}
    for generation in ("v4", "v5p"):
        for chips, shape in _SHAPES_3D.items():
            name = f"{generation}-{2 * chips}"
            table[name] = Accelerator(name, generation, chips, max(1, chips // 4), f"{generation}:{shape}",
                                      RUNTIME_VERSIONS[generation])
    for prefix, generation in (("v5litepod", "v5e"), ("v6e", "v6e")):
        for chips, shape in _SHAPES_2D.items():
            name = f"{prefix}-{chips}"
            table[name] = Accelerator(name, generation, chips, 1 if chips <= 8 else chips // 4,
                                      f"{generation}:{shape}", RUNTIME_VERSIONS[generation])
    return table


ACCELERATORS: dict[str, Accelerator] = _accelerator_table()


def _valid_accelerators() -> str:
    by_prefix: dict[str, list[str]] = {}
    for name in ACCELERATORS:
        prefix, size = name.rsplit("-", 1)
        by_prefix.setdefault(prefix, []).append(size)
    return "; ".join(f"{prefix}-{{{','.join(sizes)}}}" for prefix, sizes in by_prefix.items())


def accelerator(name: str) -> Accelerator:
    """The table entry for a Cloud TPU accelerator type, or a LaunchError listing the valid ones."""
    found = ACCELERATORS.get(name.strip().lower())
    if found is not None:
        return found
    hint = ""
    by_topology = {a.topology: a.name for a in ACCELERATORS.values()}
    if name in by_topology:
        hint = f" ({name} is a chip topology; its accelerator type is {by_topology[name]})"
    elif re.fullmatch(r"v5e-\d+", name.strip().lower()):
        hint = f" (TPU v5e types are named v5litepod-N: {name.strip().lower().replace('v5e', 'v5litepod')}?)"
    raise LaunchError(f"unknown accelerator type {name!r}{hint}. Valid types: {_valid_accelerators()} "
                      "(`python launch/tpu.py accelerators` prints chips, hosts, topology and runtime of each).")


# ------------------------------------------------------------------------------------------------
# Input checks

_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORKLOAD_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")


def check_tpu_name(name: str, *, what: str = "TPU name") -> str:
    if not _TPU_NAME.fullmatch(name):
        raise LaunchError(f"{what} {name!r}: use lower-case letters, digits and '-', starting with a letter and "
                          "not ending with '-' (at most 63 characters).")
    return name


def check_workload_name(name: str) -> str:
    """An xpk workload name (a GKE JobSet name)."""
    if not _WORKLOAD_NAME.fullmatch(name):
        raise LaunchError(f"workload name {name!r}: lower-case letters, digits and '-', starting with a letter, at "
                          "most 40 characters.")
    return name


def check_bucket(bucket: str) -> str:
    """Cloud Storage bucket naming rules (https://cloud.google.com/storage/docs/buckets#naming)."""
    def bad(why: str) -> LaunchError:
        return LaunchError(f"malformed bucket name {bucket!r}: {why}. Bucket names are 3-63 characters of "
                           "lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or digit.")

    if not re.fullmatch(r"[a-z0-9._-]+", bucket):
        raise bad("only lower-case letters, digits, '-', '_' and '.' are allowed")
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        raise bad("it must start and end with a letter or digit")
    parts = bucket.split(".")
    if len(bucket) < 3 or (len(bucket) > 63 and "." not in bucket) or len(bucket) > 222:
        raise bad(f"it is {len(bucket)} characters long")
    if any(not 1 <= len(p) <= 63 for p in parts):
        raise bad("each dot-separated part must be 1-63 characters")
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        raise bad("it must not look like an IP address")
    if bucket.startswith("goog") or "google" in bucket or "g00gle" in bucket:
        raise bad("it must not start with 'goog' or contain 'google'")
    return bucket


def parse_gs(url: str, *, what: str) -> tuple[str, str]:
    """``gs://bucket/path`` -> (bucket, path); a LaunchError for anything else."""
    match = re.fullmatch(r"gs://([^/]*)(/.*)?", url)
    if match is None:
        raise LaunchError(f"{what} {url!r} is not a gs:// URL.")
    return check_bucket(match.group(1)), (match.group(2) or "").strip("/")


def check_storage_path(path: str, *, what: str, acc: Accelerator | None, num_slices: int,
                       warn_local: bool = True) -> str:
    """A workdir / checkpoint path every host can read: gs:// on multi-host runs, a warning otherwise."""
    if path.startswith("gs://"):
        parse_gs(path, what=what)
        return path
    if "://" in path:
        raise LaunchError(f"{what} {path!r}: only gs:// URLs or paths on the workers are supported.")
    hosts = (acc.hosts if acc else 1) * num_slices
    if hosts > 1:
        raise LaunchError(f"{what} {path!r} is not on gs://, but this run has {hosts} hosts: every host must see the "
                          "same checkpoint directory. Use gs://BUCKET/...")
    if warn_local:
        warn(f"{what} {path!r} is on the TPU VM's own disk: it is lost when the VM is deleted or preempted, and "
             "resuming needs it. Prefer gs://BUCKET/...")
    return path


def repo_file(path: str, *, what: str, must_exist: bool = True) -> str:
    """A file of this repository given relative to the current directory or to the root -> path relative to the
    root (the form the workers, which run in their checkout's root, need)."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, ROOT / path]
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved.is_file():
            try:
                return resolved.relative_to(ROOT).as_posix()
            except ValueError:
                raise LaunchError(f"{what} {path} is outside the repository ({ROOT}); the workers only have the "
                                  "repository's files: put it under configs/.") from None
    if must_exist:
        raise LaunchError(f"{what} {path} does not exist (looked in {Path.cwd()} and {ROOT}); the configs are "
                          f"{', '.join(sorted(p.name for p in (ROOT / 'configs').glob('*.py')))} in configs/.")
    return Path(path).as_posix()


def check_overrides(extra: Sequence[str], *, what: str = "train") -> list[str]:
    """Arguments after the launcher's own: ``--config.a.b=value`` / ``--config.a.b value`` pairs only."""
    extra = list(extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and not extra[0].startswith("--config."):
        raise LaunchError(f"unexpected argument {extra[0]!r} for {what}: after the launcher's options only config "
                          "overrides (--config.a.b=value) may follow.")
    for token in extra:
        if token.startswith("-") and not token.startswith("--config.") and token != "--":
            raise LaunchError(f"unknown option {token!r} for {what} (config overrides are --config.a.b=value; see "
                              "python launch/tpu.py --help).")
    return [t for t in extra if t != "--"]


def with_slices(overrides: list[str], num_slices: int) -> list[str]:
    """Multi-slice runs need the slice (DCN) mesh axes: data-parallel across slices unless the user chose."""
    if num_slices > 1 and not any(t.startswith("--config.mesh.dcn_") for t in overrides):
        return [*overrides, f"--config.mesh.dcn_data={num_slices}"]
    return overrides


def parse_env(assignments: Sequence[str], passed: Sequence[str]) -> list[tuple[str, str]]:
    env = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise LaunchError(f"--env {item!r}: give NAME=VALUE with a shell variable name.")
        env.append((key, value))
    for key in passed:
        if not _ENV_NAME.fullmatch(key):
            raise LaunchError(f"--pass_env {key!r} is not a variable name.")
        if key not in os.environ:
            raise LaunchError(f"--pass_env {key}: it is not set here, so there is nothing to pass to the workers.")
        env.append((key, os.environ[key]))
    return env


def run_name(value: str | None, path: str) -> str:
    name = value or path.rstrip("/").rsplit("/", 1)[-1]
    if not _RUN_NAME.fullmatch(name):
        raise LaunchError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (give --run NAME).")
    return name


