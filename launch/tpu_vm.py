"""TPU VM commands: gcloud command lines to create, set up, inspect and delete TPU VMs / queued resources.

Also the pieces every command that reaches the workers shares (``ssh`` through the TPU VM or its
queued resource, the checkout's path, a strict-mode bash line, the run's pid check) and the Cloud
Storage ones (``bucket``, ``sync``). Each ``cmd_*`` takes the parsed arguments and returns the
commands to run, as argument lists. Standard library only.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

from launch.checks import ACCELERATORS, ROOT, LaunchError, accelerator, check_tpu_name, parse_gs, run_name, warn

DEFAULT_REMOTE_DIR = "director_jax"  # the checkout on each worker, relative to the home directory


def gcloud_common(args: SimpleNamespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if getattr(args, "project", None):
        out.append(f"--project={args.project}")
    return out


def node_names(args: SimpleNamespace) -> list[str]:
    """TPU VM node ids: NAME, or NAME-0 .. NAME-(N-1) for a multi-slice queued resource (--node-prefix NAME)."""
    if args.num_slices > 1:
        return [f"{args.name}-{i}" for i in range(args.num_slices)]
    return [args.name]


def ssh(args: SimpleNamespace, script: str, *, worker: str = "all", node: str = "all") -> list[str]:
    """Runs ``script`` (bash) on the workers; a multi-slice queued resource is reached through its nodes."""
    if args.num_slices > 1:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.name, *gcloud_common(args),
                f"--node={node}", f"--worker={worker}"]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *gcloud_common(args), f"--worker={worker}"]
    if getattr(args, "iap", False):
        argv.append("--tunnel-through-iap")
    return [*argv, f"--command={script}"]


def remote_dir(args: SimpleNamespace) -> str:
    """The checkout's path as a bash word (relative paths are under the home directory)."""
    d = args.remote_dir.rstrip("/")
    parts = [p for p in d.split("/") if p]
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", d) or not parts or ".." in parts or parts == ["."] or (
            d.startswith("/") and len(parts) < 2):
        raise LaunchError(f"--remote_dir {args.remote_dir!r}: give a directory of its own (setup replaces its files), "
                          "e.g. director_jax (under the home directory) or /opt/director_jax.")
    return d if d.startswith("/") else '"$HOME"/' + d


def remote_dir_display(args: SimpleNamespace) -> str:
    d = args.remote_dir.rstrip("/")
    return d if d.startswith("/") else "~/" + d


def script(*lines: str) -> str:
    """One bash command line: strict mode, then the statements."""
    return "; ".join(["set -euo pipefail", *lines])


def pid_check(run: str) -> str:
    """``if`` the run's process is alive (its pid file names a live director_jax process), ``then`` ..."""
    return (f'pid=$(cat logs/{run}.pid 2> /dev/null || true); '
            'if [ -n "$pid" ] && grep -qa director_jax /proc/"$pid"/cmdline 2> /dev/null; then ')


def cmd_accelerators(args: SimpleNamespace) -> list[list[str]]:
    header = ("accelerator", "chips", "hosts", "topology", "runtime version")
    rows = [(a.name, str(a.chips), str(a.hosts), a.topology, a.runtime) for a in ACCELERATORS.values()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return []


def cmd_create(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = args.num_slices
    version = args.version or acc.runtime
    queued = args.queued or n > 1
    if args.preemptible and queued:
        raise LaunchError("--preemptible is for `tpu-vm create`; queued resources take --spot (or --reserved).")
    if sum([args.spot, args.preemptible, args.reserved]) > 1:
        raise LaunchError("choose one of --spot, --preemptible and --reserved.")
    if args.valid_until and not queued:
        raise LaunchError("--valid_until is for queued resources (--queued).")
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


def cmd_setup(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
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


def _describe(args: SimpleNamespace) -> list[str]:
    if args.queued or args.num_slices > 1:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *gcloud_common(args),
                "--format=yaml(name,state,tpu.nodeSpec[].node.acceleratorType)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *gcloud_common(args),
            "--format=yaml(name,state,health,acceleratorType,runtimeVersion)"]


def cmd_status(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
    steps = [_describe(args)]
    if args.run:
        run = run_name(args.run, "")
        d = remote_dir(args)
        steps.append(ssh(args, script(
            f'cd {d} 2> /dev/null || {{ echo "$(hostname): no checkout at {remote_dir_display(args)} (run setup)"; '
            'exit 0; }',
            pid_check(run) + f'echo "$(hostname): {run} running (pid $pid)"; else echo "$(hostname): {run} not '
            'running"; fi',
            f"tail -n {args.lines} logs/{run}.log 2> /dev/null || true")))
    return steps


def cmd_delete(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
    if args.queued or args.num_slices > 1:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *gcloud_common(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *gcloud_common(args), "--quiet"]]


def cmd_bucket(args: SimpleNamespace) -> list[list[str]]:
    bucket, path = parse_gs(args.bucket, what="bucket")
    if path:
        raise LaunchError(f"{args.bucket}: give the bucket alone (gs://{bucket}).")
    argv = ["gcloud", "storage", "buckets", "create", f"gs://{bucket}", f"--location={args.location}",
            "--uniform-bucket-level-access"]
    if args.project:
        argv.append(f"--project={args.project}")
    return [argv]


def cmd_sync(args: SimpleNamespace) -> list[list[str]]:
    remote = [p for p in (args.src, args.dest) if p.startswith("gs://")]
    if not remote:
        raise LaunchError("sync copies to or from Cloud Storage: SRC or DEST must be gs://BUCKET/...")
    for p in remote:
        parse_gs(p, what="path")
    return [["gcloud", "storage", "rsync", "--recursive", args.src, args.dest]]
