#!/usr/bin/env python3
"""Run director_jax on Cloud TPU: create a TPU VM or queued resource, install, train / evaluate on every
worker, watch, stop, delete; or submit the same run to GKE with xpk. Standard library only.

    python launch/tpu.py accelerators                         # the accelerator types this knows
    python launch/tpu.py compile --accelerator v5p-8 --config configs/gen_1_3b.py
    python launch/tpu.py create NAME --zone ZONE --accelerator v5p-8 [--spot] [--queued] [--num-slices N]
    python launch/tpu.py setup NAME --zone ZONE [--git URL] [--rev REV]
    python launch/tpu.py train NAME --zone ZONE --accelerator v5p-8 --config configs/gen_1_3b.py \\
        --workdir gs://BUCKET/runs/RUN [--compile-first] [--env K=V] [--pass-env VAR] [-- --config.a.b=value ...]
    python launch/tpu.py eval NAME --zone ZONE --accelerator v5p-8 --config configs/eval_synthetic.py --ckpt gs://...
    python launch/tpu.py status|logs|stop NAME --zone ZONE --run RUN
    python launch/tpu.py delete NAME --zone ZONE [--queued]
    python launch/tpu.py exec NAME --zone ZONE -- COMMAND ...   # in the checkout, with its .venv, on every worker
    python launch/tpu.py bucket gs://BUCKET --location REGION
    python launch/tpu.py sync SRC DEST                          # gcloud storage rsync, either direction
    python launch/tpu.py image --image IMAGE                    # docker build -f launch/Dockerfile + push
    python launch/tpu.py xpk cluster|train|eval|list|delete|delete-cluster ...

Every subcommand takes ``--dry-run`` (before or after the subcommand): it prints the commands it would
run, shell-quoted, one per line, and runs nothing. Without it the commands run one after another with
their output streamed; the first that fails stops the launcher with its exit status. Input errors
(unknown accelerator type, a multi-host run without a gs:// workdir, a missing config file, a malformed
bucket name) exit with status 2 before anything runs. Local paths (configs) are relative to the
repository root; local commands (compile, git archive, docker build) run there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REMOTE_DIR = "director_jax"  # the checkout on each worker, relative to the home directory
CONTAINER_DIR = "/app"  # the checkout inside launch/Dockerfile's image


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
_XPK_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")


def check_tpu_name(name: str, *, what: str = "TPU name") -> str:
    if not _TPU_NAME.fullmatch(name):
        raise LaunchError(f"{what} {name!r}: use lower-case letters, digits and '-', starting with a letter and "
                          "not ending with '-' (at most 63 characters).")
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
                              f"python launch/tpu.py {what} --help).")
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
            raise LaunchError(f"--pass-env {key!r} is not a variable name.")
        if key not in os.environ:
            raise LaunchError(f"--pass-env {key}: it is not set here, so there is nothing to pass to the workers.")
        env.append((key, os.environ[key]))
    return env


def run_name(value: str | None, path: str) -> str:
    name = value or path.rstrip("/").rsplit("/", 1)[-1]
    if not _RUN_NAME.fullmatch(name):
        raise LaunchError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (give --run NAME).")
    return name


# ------------------------------------------------------------------------------------------------
# Command builders


def gcloud_common(args: argparse.Namespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if getattr(args, "project", None):
        out.append(f"--project={args.project}")
    return out


def node_names(args: argparse.Namespace) -> list[str]:
    """TPU VM node ids: NAME, or NAME-0 .. NAME-(N-1) for a multi-slice queued resource (--node-prefix NAME)."""
    if args.num_slices > 1:
        return [f"{args.name}-{i}" for i in range(args.num_slices)]
    return [args.name]


def ssh(args: argparse.Namespace, script: str, *, worker: str = "all", node: str = "all") -> list[str]:
    """Runs ``script`` (bash) on the workers; a multi-slice queued resource is reached through its nodes."""
    if args.num_slices > 1:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.name, *gcloud_common(args),
                f"--node={node}", f"--worker={worker}"]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *gcloud_common(args), f"--worker={worker}"]
    if getattr(args, "iap", False):
        argv.append("--tunnel-through-iap")
    return [*argv, f"--command={script}"]


def remote_dir(args: argparse.Namespace) -> str:
    """The checkout's path as a bash word (relative paths are under the home directory)."""
    d = args.remote_dir.rstrip("/")
    parts = [p for p in d.split("/") if p]
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", d) or not parts or ".." in parts or parts == ["."] or (
            d.startswith("/") and len(parts) < 2):
        raise LaunchError(f"--remote-dir {args.remote_dir!r}: give a directory of its own (setup replaces its files), "
                          "e.g. director_jax (under the home directory) or /opt/director_jax.")
    return d if d.startswith("/") else '"$HOME"/' + d


def remote_dir_display(args: argparse.Namespace) -> str:
    d = args.remote_dir.rstrip("/")
    return d if d.startswith("/") else "~/" + d


def script(*lines: str) -> str:
    """One bash command line: strict mode, then the statements."""
    return "; ".join(["set -euo pipefail", *lines])


def _num_slices(args) -> int:
    n = int(getattr(args, "num_slices", 1) or 1)
    if n < 1:
        raise LaunchError(f"--num-slices {n}: must be at least 1.")
    return n


def cmd_accelerators(args) -> list[list[str]]:
    header = ("accelerator", "chips", "hosts", "topology", "runtime version")
    rows = [(a.name, str(a.chips), str(a.hosts), a.topology, a.runtime) for a in ACCELERATORS.values()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return []


def compile_argv(config: str, topology: str, overrides: list[str]) -> list[str]:
    """The local AOT check; JAX_PLATFORMS=cpu: compile-only use of libtpu without TPUs (director_jax/train/aot.py)."""
    import importlib.util

    missing = [m for m in ("jax", "libtpu", "director_jax") if importlib.util.find_spec(m) is None]
    if missing:
        raise LaunchError(f"the compile check runs {sys.executable}, which lacks {', '.join(missing)}: run the tool "
                          "from this repository's environment (source scripts/env.sh).")
    return ["env", "JAX_PLATFORMS=cpu", sys.executable, "-m", "director_jax.train", "--config", config,
            "--compile_topology", topology, *overrides]


def cmd_compile(args) -> list[list[str]]:
    if bool(args.accelerator) == bool(args.topology):
        raise LaunchError("compile needs exactly one of --accelerator (e.g. v5p-8) or --topology (e.g. v5p:2x2x1).")
    topology = accelerator(args.accelerator).topology if args.accelerator else args.topology
    if not re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x):\d+(x\d+)*", topology):
        raise LaunchError(f"--topology {topology!r}: give <generation>:<chips per axis>, e.g. v5p:2x2x1 or v6e:2x4.")
    config = repo_file(args.config, what="config file")
    return [compile_argv(config, topology, check_overrides(args.extra, what="compile"))]


def cmd_create(args) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = _num_slices(args)
    version = args.version or acc.runtime
    queued = args.queued or n > 1
    if args.preemptible and queued:
        raise LaunchError("--preemptible is for `tpu-vm create`; queued resources take --spot (or --reserved).")
    if sum([args.spot, args.preemptible, args.reserved]) > 1:
        raise LaunchError("choose one of --spot, --preemptible and --reserved.")
    if args.valid_until and not queued:
        raise LaunchError("--valid-until is for queued resources (--queued).")
    if not queued:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *gcloud_common(args),
                f"--accelerator-type={acc.name}", f"--version={version}"]
        argv += ["--spot"] * args.spot + ["--preemptible"] * args.preemptible + ["--reserved"] * args.reserved
        return [argv]
    argv = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *gcloud_common(args),
            f"--accelerator-type={acc.name}", f"--runtime-version={version}"]
    if n > 1:
        for node in node_names(args):
            check_tpu_name(node, what="node name")
        argv += [f"--node-count={n}", f"--node-prefix={args.name}"]
    else:
        argv.append(f"--node-id={args.name}")
    argv += ["--spot"] * args.spot + ["--reserved"] * args.reserved
    if args.valid_until:
        argv.append(f"--valid-until-duration={args.valid_until}")
    return [argv]


def _git(*argv: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LaunchError("git is not on the PATH; it packs the working tree (or give --git URL).") from None
    if done.returncode:
        raise LaunchError(f"git {' '.join(argv)} failed in {ROOT}: {done.stderr.strip()} (not a git checkout? give "
                          "--git URL to clone on the workers instead).")
    return done.stdout


def cmd_setup(args) -> list[list[str]]:
    check_tpu_name(args.name)
    _num_slices(args)
    d = remote_dir(args)
    steps: list[list[str]] = []
    lines: list[str] = []
    python = args.python
    if python == "python3.11":
        lines.append("if ! command -v python3.11 > /dev/null; then sudo apt-get update -q && sudo "
                     "DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv; fi")
    if args.git:
        rev = args.rev or "origin/HEAD"
        url = shlex.quote(args.git)
        lines += [f"if [ -d {d}/.git ]; then git -C {d} fetch --quiet origin; else git clone --quiet {url} {d}; fi",
                  f"git -C {d} checkout --quiet --detach {shlex.quote(rev)}"]
    else:
        rev = args.rev or "HEAD"
        _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if rev == "HEAD" and _git("status", "--porcelain", "--untracked-files=no").strip():
            warn("the working tree has uncommitted changes; the workers get HEAD (git archive). Commit them, or "
                 "pass --rev $(git stash create) to ship them.")
        tarball = Path(tempfile.gettempdir()) / f"director_jax-{args.name}.tar.gz"
        steps.append(["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", rev])
        remote_tar = "director_jax-src.tar.gz"
        for node in node_names(args):
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), f"{node}:{remote_tar}",
                    *gcloud_common(args), "--worker=all"]
            if args.iap:
                argv.append("--tunnel-through-iap")
            steps.append(argv)
        # the archive's top-level entries are replaced whole (files deleted upstream go too); anything else in
        # the checkout (.venv, logs, data, weights, runs) stays
        lines += [f"mkdir -p {d}",
                  f'tar -tzf "$HOME"/{remote_tar} | cut -d/ -f1 | sort -u | while read -r top; do '
                  f'if [ -n "$top" ]; then rm -rf {d}/"$top"; fi; done',
                  f'tar -xzf "$HOME"/{remote_tar} -C {d}']
    pip = ".venv/bin/python -m pip install -q --disable-pip-version-check"
    lines += [f"cd {d}",
              f"[ -x .venv/bin/python ] || {shlex.quote(python)} -m venv .venv",
              f"{pip} --upgrade pip",
              f"{pip} -r requirements-tpu.txt -c requirements.lock",
              f"{pip} --no-deps -e ."]
    if args.pip_extra:
        lines.append(f"{pip} -c requirements.lock {shlex.join(args.pip_extra)}")
    lines.append('echo "$(hostname): ready, $(.venv/bin/python -c \'import jax; print("jax", jax.__version__)\')"')
    steps.append(ssh(args, script(*lines)))
    return steps


def _pid_check(run: str) -> str:
    """``if`` the run's process is alive (its pid file names a live director_jax process), ``then`` ..."""
    return (f'pid=$(cat logs/{run}.pid 2> /dev/null || true); '
            'if [ -n "$pid" ] && grep -qa director_jax /proc/"$pid"/cmdline 2> /dev/null; then ')


def launch_script(args, run: str, module_argv: list[str], env: list[tuple[str, str]], bucket: str | None) -> str:
    """The bash line each worker runs: checks, then the command detached (setsid nohup) with its log and pid."""
    d = remote_dir(args)
    command = shlex.join([".venv/bin/python", "-m", *module_argv])
    lines = [f"cd {d}", "mkdir -p logs"]
    if bucket and not args.no_preflight:
        lines.append(f"if command -v gcloud > /dev/null && ! gcloud storage ls gs://{bucket} > /dev/null; then echo "
                     f"\"$(hostname): cannot list gs://{bucket}: give the TPU VM's service account access to the "
                     "bucket\" >&2; exit 1; fi")
    lines.append(_pid_check(run) + f'echo "$(hostname): {run} is already running (pid $pid); stop it first" >&2; '
                 "exit 1; fi")
    lines.append("export PYTHONUNBUFFERED=1")  # the log keeps up with the run
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env]
    lines.append(f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname):" {shlex.quote(command)} >> logs/{run}.log')
    if args.foreground:
        lines.append(f"{command} 2>&1 | tee -a logs/{run}.log")
    else:
        lines += [f"setsid nohup {command} >> logs/{run}.log 2>&1 < /dev/null & echo $! > logs/{run}.pid",
                  f'echo "$(hostname): started {run} (pid $(cat logs/{run}.pid)), log {remote_dir_display(args)}/logs/'
                  f'{run}.log"']
    return script(*lines)


def cmd_train(args) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = _num_slices(args)
    config = repo_file(args.config, what="config file")
    overrides = check_overrides(args.extra)
    workdir = check_storage_path(args.workdir, what="--workdir", acc=acc, num_slices=n)
    bucket = parse_gs(workdir, what="--workdir")[0] if workdir.startswith("gs://") else None
    env = parse_env(args.env, args.pass_env)
    run = run_name(args.run, workdir)
    steps = []
    if args.compile_first:
        steps.append(compile_argv(config, acc.topology, overrides))
    module = ["director_jax.train", "--config", config, "--workdir", workdir, *distributed_flag(acc, n)]
    module += with_slices(overrides, n)
    steps.append(ssh(args, launch_script(args, run, module, env, bucket)))
    return steps


def distributed_flag(acc, num_slices: int) -> list[str]:
    """``--distributed on`` for several hosts: said outright, not left to the commands' metadata-server detection."""
    return ["--distributed", "on"] if acc.multi_host or num_slices > 1 else []


def evaluate_module_present() -> bool:
    return (ROOT / "director_jax" / "evaluate.py").is_file() or (ROOT / "director_jax" / "evaluate").is_dir()


def eval_config(path: str) -> str:
    if evaluate_module_present():
        return repo_file(path, what="config file")
    warn("director_jax.evaluate is not in this checkout yet: the eval config is not checked here.")
    return repo_file(path, what="config file", must_exist=False)


def eval_extra(extra: Sequence[str]) -> list[str]:
    extra = list(extra)
    return extra[1:] if extra and extra[0] == "--" else extra


def cmd_eval(args) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = _num_slices(args)
    config = eval_config(args.config)
    ckpt = check_storage_path(args.ckpt, what="--ckpt", acc=acc, num_slices=n, warn_local=False)
    bucket = parse_gs(ckpt, what="--ckpt")[0] if ckpt.startswith("gs://") else None
    env = parse_env(args.env, args.pass_env)
    parts = [p for p in ckpt.split("/") if p and p != "gs:"]
    while len(parts) > 1 and (parts[-1] == "checkpoints" or parts[-1].isdigit()):
        parts.pop()  # .../runs/RUN/checkpoints[/STEP] -> RUN
    run = run_name(args.run, "eval-" + parts[-1])
    module = ["director_jax.evaluate", "--config", config, "--ckpt", ckpt, *eval_out(args),
              *distributed_flag(acc, n), *eval_extra(args.extra)]
    return [ssh(args, launch_script(args, run, module, env, bucket))]


def eval_out(args) -> list[str]:
    """``--out`` becomes the evaluation's ``--workdir`` (metrics.json, report.html; process 0 writes)."""
    return ["--workdir", args.out] if args.out else []


def _describe(args) -> list[str]:
    if args.queued or args.num_slices > 1:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *gcloud_common(args),
                "--format=yaml(name,state,tpu.nodeSpec[].node.acceleratorType)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *gcloud_common(args),
            "--format=yaml(name,state,health,acceleratorType,runtimeVersion)"]


def cmd_status(args) -> list[list[str]]:
    check_tpu_name(args.name)
    _num_slices(args)
    steps = [_describe(args)]
    if args.run:
        run = run_name(args.run, "")
        d = remote_dir(args)
        steps.append(ssh(args, script(
            f'cd {d} 2> /dev/null || {{ echo "$(hostname): no checkout at {remote_dir_display(args)} (run setup)"; '
            'exit 0; }',
            _pid_check(run) + f'echo "$(hostname): {run} running (pid $pid)"; else echo "$(hostname): {run} not '
            'running"; fi',
            f"tail -n {args.lines} logs/{run}.log 2> /dev/null || true")))
    return steps


def cmd_logs(args) -> list[list[str]]:
    check_tpu_name(args.name)
    _num_slices(args)
    run = run_name(args.run, "")
    if args.follow and args.worker == "all":
        raise LaunchError("--follow reads one worker's log: give --worker N (default 0).")
    d = remote_dir(args)
    tail = f"tail -n {args.lines}" + (" -F" if args.follow else "") + f" logs/{run}.log"
    if args.worker == "all" or (args.num_slices > 1 and args.node == "all"):
        tail += ' | sed "s/^/$(hostname): /"'  # several workers' lines interleave
    return [ssh(args, script(f"cd {d}", tail), worker=args.worker, node=args.node)]


def cmd_stop(args) -> list[list[str]]:
    check_tpu_name(args.name)
    _num_slices(args)
    run = run_name(args.run, "")
    d = remote_dir(args)
    signal = "KILL" if args.force else "TERM"
    what = (f"killed {run} (pid $pid)" if args.force
            else f"sent SIGTERM to {run} (pid $pid): it saves a checkpoint and exits")
    return [ssh(args, script(
        f"cd {d}",
        _pid_check(run) + f'kill -{signal} -- -"$pid" 2> /dev/null || kill -{signal} "$pid"; '
        f'echo "$(hostname): {what}"; else echo "$(hostname): {run} not running"; fi'))]


def cmd_delete(args) -> list[list[str]]:
    check_tpu_name(args.name)
    if args.queued or _num_slices(args) > 1:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *gcloud_common(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *gcloud_common(args), "--quiet"]]


def cmd_exec(args) -> list[list[str]]:
    check_tpu_name(args.name)
    _num_slices(args)
    command = eval_extra(args.extra)
    if not command:
        raise LaunchError("exec needs a command after --, e.g. exec NAME --zone ZONE -- python -m director_jax.curate")
    d = remote_dir(args)
    return [ssh(args, script(f"cd {d}", 'export PATH="$PWD/.venv/bin:$PATH"', shlex.join(command)),
                worker=args.worker, node=args.node)]


def cmd_bucket(args) -> list[list[str]]:
    bucket, path = parse_gs(args.bucket, what="bucket")
    if path:
        raise LaunchError(f"{args.bucket}: give the bucket alone (gs://{bucket}).")
    argv = ["gcloud", "storage", "buckets", "create", f"gs://{bucket}", f"--location={args.location}",
            "--uniform-bucket-level-access"]
    if args.project:
        argv.append(f"--project={args.project}")
    return [argv]


def cmd_sync(args) -> list[list[str]]:
    remote = [p for p in (args.src, args.dest) if p.startswith("gs://")]
    if not remote:
        raise LaunchError("sync copies to or from Cloud Storage: SRC or DEST must be gs://BUCKET/...")
    for p in remote:
        parse_gs(p, what="path")
    return [["gcloud", "storage", "rsync", "--recursive", args.src, args.dest]]


def cmd_image(args) -> list[list[str]]:
    steps = [["docker", "build", "-f", str(ROOT / "launch" / "Dockerfile"), "-t", args.image, str(ROOT)]]
    if not args.no_push:
        steps.append(["docker", "push", args.image])
    return steps


# ------------------------------------------------------------------------------------------------
# GKE with xpk


def _xpk_common(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _container_command(module_argv: list[str], env: list[tuple[str, str]]) -> str:
    assignments = [f"{k}={shlex.quote(v)}" for k, v in env]
    return " ".join([f"cd {CONTAINER_DIR}", "&&", *assignments, shlex.join(["python", "-m", *module_argv])])


def _xpk_workload(args, module_argv: list[str]) -> list[str]:
    if not _XPK_NAME.fullmatch(args.workload):
        raise LaunchError(f"workload name {args.workload!r}: lower-case letters, digits and '-', starting with a "
                          "letter, at most 40 characters.")
    env = parse_env(args.env, args.pass_env)
    argv = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
            f"--tpu-type={args.accelerator}", f"--num-slices={args.num_slices}", f"--docker-image={args.image}",
            f"--command={_container_command(module_argv, env)}", *_xpk_common(args)]
    if args.max_restarts:
        argv.append(f"--max-restarts={args.max_restarts}")
    return argv


def cmd_xpk(args) -> list[list[str]]:
    action = args.xpk_action
    if action in ("cluster", "train", "eval"):
        acc = accelerator(args.accelerator)
        n = _num_slices(args)
    if action == "cluster":
        if sum([args.spot, args.on_demand, bool(args.reservation)]) > 1:
            raise LaunchError("choose one of --spot, --on-demand and --reservation.")
        argv = ["xpk", "cluster", "create", f"--cluster={args.cluster}", f"--tpu-type={acc.name}",
                f"--num-slices={n}", *_xpk_common(args)]
        argv += ["--spot"] * args.spot + ["--on-demand"] * args.on_demand
        if args.reservation:
            argv.append(f"--reservation={args.reservation}")
        return [argv]
    if action == "train":
        config = repo_file(args.config, what="config file")
        overrides = check_overrides(args.extra)
        workdir = args.workdir
        if not workdir.startswith("gs://"):
            raise LaunchError(f"--workdir {workdir!r}: a GKE pod's disk goes with the pod; checkpoints must go to "
                              "gs://BUCKET/...")
        parse_gs(workdir, what="--workdir")
        module = ["director_jax.train", "--config", config, "--workdir", workdir, *distributed_flag(acc, n)]
        return [_xpk_workload(args, module + with_slices(overrides, n))]
    if action == "eval":
        config = eval_config(args.config)
        if not args.ckpt.startswith("gs://"):
            raise LaunchError(f"--ckpt {args.ckpt!r}: the pods read checkpoints from gs://BUCKET/...")
        parse_gs(args.ckpt, what="--ckpt")
        return [_xpk_workload(args, ["director_jax.evaluate", "--config", config, "--ckpt", args.ckpt,
                                     *eval_out(args), *distributed_flag(acc, n), *eval_extra(args.extra)])]
    if action == "list":
        return [["xpk", "workload", "list", f"--cluster={args.cluster}", *_xpk_common(args)]]
    if action == "delete":
        return [["xpk", "workload", "delete", f"--cluster={args.cluster}", f"--workload={args.workload}",
                 *_xpk_common(args)]]
    if action == "delete-cluster":
        return [["xpk", "cluster", "delete", f"--cluster={args.cluster}", *_xpk_common(args)]]
    raise LaunchError(f"unknown xpk action {action!r}")


# ------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                     help="print the commands (shell-quoted, one per line), run nothing")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--zone", required=True, help="e.g. us-east5-a (where v5p lives)")
    where.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    tpu = argparse.ArgumentParser(add_help=False, parents=[where])
    tpu.add_argument("name", help="TPU VM / queued resource name")
    tpu.add_argument("--num-slices", type=int, default=1,
                     help="slices of a multi-slice queued resource (nodes NAME-0 .. NAME-N-1)")
    tpu.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                     help=f"the checkout on each worker, relative to home (default {DEFAULT_REMOTE_DIR})")
    tpu.add_argument("--iap", action="store_true", help="ssh / scp through IAP (workers without external IPs)")
    launch = argparse.ArgumentParser(add_help=False)
    launch.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-8")
    launch.add_argument("--run", help="run name: logs/RUN.log and logs/RUN.pid on each worker "
                                      "(default: the workdir's last component)")
    launch.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the run (repeatable), e.g. TPU_STDERR_LOG_LEVEL=0")
    launch.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                        help="pass this variable's local value to the run (repeatable), e.g. LIBTPU_INIT_ARGS")
    launch.add_argument("--foreground", action="store_true",
                        help="stay attached and stream the output (default: detached with setsid nohup)")
    launch.add_argument("--no-preflight", action="store_true",
                        help="skip the check that each worker can list the gs:// bucket")

    s = sub.add_parser("accelerators", parents=[dry], help="list the accelerator types, topologies and runtimes")
    s.set_defaults(func=cmd_accelerators)

    s = sub.add_parser("compile", parents=[dry], help="AOT-compile the train step for a TPU topology, here")
    s.add_argument("--config", required=True)
    s.add_argument("--accelerator", help="e.g. v5p-8 (its topology is used)")
    s.add_argument("--topology", help="e.g. v5p:2x2x1")
    s.set_defaults(func=cmd_compile, extra_ok=True)

    s = sub.add_parser("create", parents=[dry, tpu], help="create a TPU VM or a queued resource")
    s.add_argument("--accelerator", required=True)
    s.add_argument("--version", help="TPU software version (default: the accelerator's, see `accelerators`)")
    s.add_argument("--queued", action="store_true", help="a queued resource (waits for capacity; multi-slice)")
    s.add_argument("--spot", action="store_true")
    s.add_argument("--preemptible", action="store_true", help="tpu-vm create only")
    s.add_argument("--reserved", action="store_true")
    s.add_argument("--valid-until", help="queued resources: give up after this long, e.g. 6h")
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("setup", parents=[dry, tpu], help="install the repository and its venv on every worker")
    s.add_argument("--git", metavar="URL", help="clone this repository URL on the workers (default: ship "
                                                "`git archive` of --rev from here)")
    s.add_argument("--rev", help="git revision (default HEAD here; origin/HEAD with --git)")
    s.add_argument("--python", default="python3.11", help="interpreter for the venv (python3.11 is apt-installed "
                                                          "when missing)")
    s.add_argument("--pip-extra", action="append", default=[], metavar="REQ",
                   help="extra requirement to install (repeatable), constrained by requirements.lock")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("train", parents=[dry, tpu, launch],
                       help="python -m director_jax.train on every worker; overrides after --")
    s.add_argument("--config", required=True)
    s.add_argument("--workdir", required=True, help="gs://BUCKET/runs/RUN: checkpoints, metrics, TensorBoard")
    s.add_argument("--compile-first", action="store_true",
                   help="compile for the accelerator's topology here first; stop if it does not fit")
    s.set_defaults(func=cmd_train, extra_ok=True)

    s = sub.add_parser("eval", parents=[dry, tpu, launch], help="python -m director_jax.evaluate on every worker")
    s.add_argument("--config", required=True)
    s.add_argument("--ckpt", required=True, help="the training workdir, its checkpoints/ or a step dir in it")
    s.add_argument("--out", help="the evaluation's --workdir (default: its own, runs/eval in the checkout)")
    s.set_defaults(func=cmd_eval, extra_ok=True)

    s = sub.add_parser("status", parents=[dry, tpu], help="the TPU's state; with --run, the run on each worker")
    s.add_argument("--queued", action="store_true")
    s.add_argument("--run")
    s.add_argument("--lines", type=int, default=3)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("logs", parents=[dry, tpu], help="tail a run's log on a worker")
    s.add_argument("--run", required=True)
    s.add_argument("--worker", default="0", help="worker index, or all (default 0)")
    s.add_argument("--node", default="0", help="multi-slice: node index, or all (default 0)")
    s.add_argument("--lines", type=int, default=100)
    s.add_argument("--follow", "-f", action="store_true")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("stop", parents=[dry, tpu], help="SIGTERM the run on every worker (checkpoint, exit)")
    s.add_argument("--run", required=True)
    s.add_argument("--force", action="store_true", help="SIGKILL (no checkpoint)")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("delete", parents=[dry, tpu], help="delete the TPU VM or queued resource")
    s.add_argument("--queued", action="store_true")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("exec", parents=[dry, tpu], help="run a command in the checkout (venv on PATH) on workers")
    s.add_argument("--worker", default="all")
    s.add_argument("--node", default="all")
    s.set_defaults(func=cmd_exec, extra_ok=True)

    s = sub.add_parser("bucket", parents=[dry], help="create a Cloud Storage bucket")
    s.add_argument("bucket", help="gs://BUCKET")
    s.add_argument("--location", required=True, help="region, e.g. us-east5 (the TPU zone's region)")
    s.add_argument("--project")
    s.set_defaults(func=cmd_bucket)

    s = sub.add_parser("sync", parents=[dry], help="gcloud storage rsync --recursive SRC DEST")
    s.add_argument("src")
    s.add_argument("dest")
    s.set_defaults(func=cmd_sync)

    s = sub.add_parser("image", parents=[dry], help="docker build -f launch/Dockerfile, then push")
    s.add_argument("--image", required=True, help="e.g. us-docker.pkg.dev/PROJECT/REPO/director-jax:TAG")
    s.add_argument("--no-push", action="store_true")
    s.set_defaults(func=cmd_image)

    s = sub.add_parser("xpk", parents=[dry], help="GKE with xpk: cluster, train, eval, list, delete")
    xsub = s.add_subparsers(dest="xpk_action", required=True, metavar="ACTION")
    xwhere = argparse.ArgumentParser(add_help=False, parents=[dry, where])
    xwhere.add_argument("--cluster", required=True)
    xslices = argparse.ArgumentParser(add_help=False)
    xslices.add_argument("--accelerator", required=True, help="e.g. v5p-8")
    xslices.add_argument("--num-slices", type=int, default=1)
    xrun = argparse.ArgumentParser(add_help=False, parents=[xwhere, xslices])
    xrun.add_argument("--workload", required=True)
    xrun.add_argument("--image", required=True, help="the image `python launch/tpu.py image` pushed")
    xrun.add_argument("--config", required=True)
    xrun.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    xrun.add_argument("--pass-env", action="append", default=[], metavar="NAME")
    xrun.add_argument("--max-restarts", type=int, default=0, help="restart the workload (it resumes) this often")
    x = xsub.add_parser("cluster", parents=[xwhere, xslices], help="xpk cluster create")
    x.add_argument("--spot", action="store_true")
    x.add_argument("--on-demand", action="store_true")
    x.add_argument("--reservation")
    x = xsub.add_parser("train", parents=[xrun], help="xpk workload create running director_jax.train")
    x.add_argument("--workdir", required=True)
    x.set_defaults(extra_ok=True)
    x = xsub.add_parser("eval", parents=[xrun], help="xpk workload create running director_jax.evaluate")
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", help="the evaluation's --workdir")
    x.set_defaults(extra_ok=True)
    xsub.add_parser("list", parents=[xwhere], help="xpk workload list")
    x = xsub.add_parser("delete", parents=[xwhere], help="xpk workload delete")
    x.add_argument("--workload", required=True)
    xsub.add_parser("delete-cluster", parents=[xwhere], help="xpk cluster delete")
    s.set_defaults(func=cmd_xpk)
    return p


def plan(argv: Sequence[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    parser = _parser()
    argv = list(argv)
    if "--" in argv:  # everything after -- goes to the command as it is
        cut = argv.index("--")
        args, extra = parser.parse_known_args(argv[:cut])
        extra += argv[cut:]
    else:
        args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args, args.func(args)


def execute(steps: list[list[str]]) -> int:
    for i, argv in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {shlex.join(argv)}", file=sys.stderr, flush=True)
        try:
            rc = subprocess.call(argv, cwd=ROOT)
        except FileNotFoundError:
            hint = {"gcloud": "install the Google Cloud CLI", "xpk": "pip install xpk",
                    "docker": "install Docker"}.get(argv[0], "install it")
            print(f"error: {argv[0]} is not on the PATH ({hint}).", file=sys.stderr)
            return 127
        except KeyboardInterrupt:
            print("interrupted.", file=sys.stderr)
            return 130
        if rc != 0:
            later = f"; {len(steps) - i} later step(s) not run" if i < len(steps) else ""
            print(f"error: step {i}/{len(steps)} failed with exit status {rc}{later}:\n  {shlex.join(argv)}",
                  file=sys.stderr)
            return rc
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, steps = plan(sys.argv[1:] if argv is None else argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for step in steps:
            print(shlex.join(step))
        return 0
    return execute(steps)


if __name__ == "__main__":
    sys.exit(main())
