#!/usr/bin/env python3
"""Run director_jax on Cloud TPU: create a TPU VM or queued resource, install, train / evaluate on every
worker, watch, stop, delete; or submit the same run to GKE with xpk.

    python launch/tpu.py accelerators                         # the accelerator types this knows
    python launch/tpu.py compile --accelerator v5p-8 --config configs/gen_1_3b.py
    python launch/tpu.py create NAME --zone ZONE --accelerator v5p-8 [--spot] [--queued] [--num_slices N]
    python launch/tpu.py setup NAME --zone ZONE [--git URL] [--rev REV]
    python launch/tpu.py train NAME --zone ZONE --accelerator v5p-8 --config configs/gen_1_3b.py \\
        --workdir gs://BUCKET/runs/RUN [--compile_first] [--env K=V] [--pass_env VAR] [-- --config.a.b=value ...]
    python launch/tpu.py eval NAME --zone ZONE --accelerator v5p-8 --config configs/eval_synthetic.py --ckpt gs://...
    python launch/tpu.py status|logs|stop NAME --zone ZONE --run RUN
    python launch/tpu.py delete NAME --zone ZONE [--queued]
    python launch/tpu.py exec NAME --zone ZONE -- COMMAND ...   # in the checkout, with its .venv, on every worker
    python launch/tpu.py bucket gs://BUCKET --location REGION
    python launch/tpu.py sync SRC DEST                          # gcloud storage rsync, either direction
    python launch/tpu.py image --image IMAGE                    # docker build -f launch/Dockerfile + push
    python launch/tpu.py xpk cluster|train|eval|list|delete|delete-cluster ...

Flags are absl flags with underscores, anywhere on the line (``--nospot`` turns a boolean off); each
flag's help names the subcommands that take it, and a flag another subcommand takes is refused.
Every subcommand takes ``--dry_run``: it prints the commands it would run, shell-quoted, one per
line, and runs nothing. Without it the commands run one after another with their output streamed;
the first that fails stops the launcher with its exit status. Input errors (unknown accelerator type,
a multi-host run without a gs:// workdir, a missing config file, a malformed bucket name, a missing
flag) are one line ``error: ...`` and exit status 2 before anything runs. Local paths (configs) are
relative to the repository root; local commands (compile, git archive, docker build) run there.
Needs only the standard library and absl-py (this repository's environment has both).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as `python launch/tpu.py`: the repository root on the path, for `launch.*`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from absl import app, flags  # noqa: E402

from launch import gke, runs, tpu_vm  # noqa: E402
from launch.checks import ROOT, LaunchError  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One subcommand: its builder (parsed arguments -> commands), positional arguments and flags."""

    build: Callable[[SimpleNamespace], list[list[str]]]
    help: str
    positionals: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # flags
    optional: tuple[str, ...] = ()
    extra: bool = False  # takes arguments after `--` (config overrides, or exec's command)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # this subcommand's flag defaults

    def usage(self, name: str) -> str:
        words = [name, *(p.upper() for p in self.positionals), *(f"--{f} {f.upper()}" for f in self.required)]
        if self.optional:
            words.append("[--" + "] [--".join(self.optional) + "]")
        if self.extra:
            words.append("[-- ...]")
        return "python launch/tpu.py " + " ".join(words)


_TPU = ("project", "num_slices", "remote_dir", "iap")  # every subcommand that reaches a TPU VM by name
_RUN = ("run", "env", "pass_env", "foreground", "preflight")  # train / eval on the workers
_XPK = ("project",)
_XPK_RUN = ("project", "num_slices", "env", "pass_env", "max_restarts")

SUBCOMMANDS: dict[str, Subcommand] = {
    "accelerators": Subcommand(tpu_vm.cmd_accelerators, "list the accelerator types, topologies and runtimes"),
    "compile": Subcommand(runs.cmd_compile, "AOT-compile the train step for a TPU topology, here",
                          required=("config",), optional=("accelerator", "topology"), extra=True),
    "create": Subcommand(tpu_vm.cmd_create, "create a TPU VM or a queued resource", ("name",),
                         ("zone", "accelerator"),
                         (*_TPU, "version", "queued", "spot", "preemptible", "reserved", "valid_until")),
    "setup": Subcommand(tpu_vm.cmd_setup, "install the repository and its venv on every worker", ("name",),
                        ("zone",), (*_TPU, "git", "rev", "python", "pip_extra")),
    "train": Subcommand(runs.cmd_train, "python -m director_jax.train on every worker; overrides after --", ("name",),
                        ("zone", "accelerator", "config", "workdir"), (*_TPU, *_RUN, "compile_first"), extra=True),
    "eval": Subcommand(runs.cmd_eval, "python -m director_jax.evaluate on every worker", ("name",),
                       ("zone", "accelerator", "config", "ckpt"), (*_TPU, *_RUN, "out"), extra=True),
    "status": Subcommand(tpu_vm.cmd_status, "the TPU's state; with --run, the run on each worker", ("name",),
                         ("zone",), (*_TPU, "queued", "run", "lines"), defaults={"lines": 3}),
    "logs": Subcommand(runs.cmd_logs, "tail a run's log on a worker", ("name",), ("zone", "run"),
                       (*_TPU, "worker", "node", "lines", "follow"),
                       defaults={"worker": "0", "node": "0", "lines": 100}),
    "stop": Subcommand(runs.cmd_stop, "SIGTERM the run on every worker (checkpoint, exit)", ("name",), ("zone", "run"),
                       (*_TPU, "force")),
    "delete": Subcommand(tpu_vm.cmd_delete, "delete the TPU VM or queued resource", ("name",), ("zone",),
                         (*_TPU, "queued")),
    "exec": Subcommand(runs.cmd_exec, "run a command in the checkout (venv on PATH) on workers", ("name",), ("zone",),
                       (*_TPU, "worker", "node"), extra=True, defaults={"worker": "all", "node": "all"}),
    "bucket": Subcommand(tpu_vm.cmd_bucket, "create a Cloud Storage bucket", ("bucket",), ("location",), ("project",)),
    "sync": Subcommand(tpu_vm.cmd_sync, "gcloud storage rsync --recursive SRC DEST", ("src", "dest")),
    "image": Subcommand(gke.cmd_image, "docker build -f launch/Dockerfile, then push", (), ("image",), ("push",)),
    "xpk cluster": Subcommand(gke.xpk_cluster, "xpk cluster create", (), ("zone", "cluster", "accelerator"),
                              (*_XPK, "num_slices", "spot", "on_demand", "reservation")),
    "xpk train": Subcommand(gke.xpk_train, "xpk workload create running director_jax.train", (),
                            ("zone", "cluster", "accelerator", "workload", "image", "config", "workdir"), _XPK_RUN,
                            extra=True),
    "xpk eval": Subcommand(gke.xpk_eval, "xpk workload create running director_jax.evaluate", (),
                           ("zone", "cluster", "accelerator", "workload", "image", "config", "ckpt"),
                           (*_XPK_RUN, "out"), extra=True),
    "xpk list": Subcommand(gke.xpk_list, "xpk workload list", (), ("zone", "cluster"), _XPK),
    "xpk delete": Subcommand(gke.xpk_delete, "xpk workload delete", (), ("zone", "cluster", "workload"), _XPK),
    "xpk delete-cluster": Subcommand(gke.xpk_delete_cluster, "xpk cluster delete", (), ("zone", "cluster"), _XPK),
}

# ------------------------------------------------------------------------------------------------
# Flags: one absl flag per option; which subcommands take it is in the table above


def _takes(name: str) -> str:
    users = [cmd for cmd, sub in SUBCOMMANDS.items() if name in sub.required or name in sub.optional]
    return f" [{', '.join(users)}]"


def _flag(define: Callable, name: str, default: Any, help: str, **kw: Any) -> None:
    define(name, default, help + _takes(name), **kw)


flags.DEFINE_bool("dry_run", False, "Print the commands (shell-quoted, one per line), run nothing [every subcommand].")
_flag(flags.DEFINE_string, "zone", None, "Zone, e.g. us-east5-a (where v5p lives).")
_flag(flags.DEFINE_string, "project", None, "GCP project (default: gcloud's configured project).")
_flag(flags.DEFINE_integer, "num_slices", 1, "Slices: a multi-slice queued resource has nodes NAME-0 .. NAME-N-1.",
      lower_bound=1)
_flag(flags.DEFINE_string, "remote_dir", tpu_vm.DEFAULT_REMOTE_DIR, "The checkout on each worker, relative to home.")
_flag(flags.DEFINE_bool, "iap", False, "ssh / scp through IAP (workers without external IPs).")
_flag(flags.DEFINE_string, "accelerator", None, "Accelerator type, e.g. v5p-8 (see the accelerators subcommand).")
_flag(flags.DEFINE_string, "topology", None, "Chip topology to compile for, e.g. v5p:2x2x1 (instead of --accelerator).")
_flag(flags.DEFINE_string, "version", None, "TPU software version (default: the accelerator's, see accelerators).")
_flag(flags.DEFINE_bool, "queued", False, "A queued resource (waits for capacity; multi-slice).")
_flag(flags.DEFINE_bool, "spot", False, "Spot capacity (cheaper, preemptible).")
_flag(flags.DEFINE_bool, "preemptible", False, "Preemptible TPU VM (tpu-vm create only).")
_flag(flags.DEFINE_bool, "reserved", False, "Use a reservation.")
_flag(flags.DEFINE_string, "valid_until", None, "Queued resources: give up after this long, e.g. 6h.")
_flag(flags.DEFINE_string, "git", None, "Clone this repository URL on the workers (default: ship `git archive` of "
      "--rev from here).")
_flag(flags.DEFINE_string, "rev", None, "Git revision (default HEAD here; origin/HEAD with --git).")
_flag(flags.DEFINE_string, "python", "python3.11", "Interpreter for the venv (python3.11 is apt-installed when "
      "missing).")
_flag(flags.DEFINE_multi_string, "pip_extra", [], "Extra requirement to install (repeat), constrained by "
      "requirements.lock.")
_flag(flags.DEFINE_string, "config", None, "Config file of this repository, e.g. configs/gen_1_3b.py.")
_flag(flags.DEFINE_string, "workdir", None, "gs://BUCKET/runs/RUN: checkpoints, metrics, TensorBoard.")
_flag(flags.DEFINE_bool, "compile_first", False, "Compile for the accelerator's topology here first; stop if it "
      "does not fit.")
_flag(flags.DEFINE_string, "ckpt", None, "The training workdir, its checkpoints/ or a step directory in it.")
_flag(flags.DEFINE_string, "out", None, "The evaluation's --workdir (default: its own).")
_flag(flags.DEFINE_string, "run", None, "Run name: logs/RUN.log and logs/RUN.pid on each worker (default: the "
      "workdir's last component).")
_flag(flags.DEFINE_multi_string, "env", [], "NAME=VALUE environment variable for the run (repeat).")
_flag(flags.DEFINE_multi_string, "pass_env", [], "Pass this variable's local value to the run (repeat), e.g. "
      "LIBTPU_INIT_ARGS.")
_flag(flags.DEFINE_bool, "foreground", False, "Stay attached and stream the output (default: detached, setsid "
      "nohup).")
_flag(flags.DEFINE_bool, "preflight", True, "Check that each worker can list the gs:// bucket (--nopreflight: skip).")
_flag(flags.DEFINE_integer, "lines", None, "Log lines to show (status: 3, logs: 100).", lower_bound=0)
_flag(flags.DEFINE_string, "worker", None, "Worker index, or all (logs: 0, exec: all).")
_flag(flags.DEFINE_string, "node", None, "Multi-slice: node index, or all (logs: 0, exec: all).")
_flag(flags.DEFINE_bool, "follow", False, "Keep following the log.", short_name="f")
_flag(flags.DEFINE_bool, "force", False, "SIGKILL (no checkpoint) instead of SIGTERM.")
_flag(flags.DEFINE_string, "location", None, "Bucket region, e.g. us-east5 (the TPU zone's region).")
_flag(flags.DEFINE_string, "image", None, "Container image, e.g. us-docker.pkg.dev/PROJECT/REPO/director-jax:TAG.")
_flag(flags.DEFINE_bool, "push", True, "Push the image after building it (--nopush: build only).")
_flag(flags.DEFINE_string, "cluster", None, "GKE cluster name.")
_flag(flags.DEFINE_string, "workload", None, "xpk workload name.")
_flag(flags.DEFINE_integer, "max_restarts", 0, "Restart the workload (it resumes) this often.", lower_bound=0)
_flag(flags.DEFINE_bool, "on_demand", False, "On-demand capacity.")
_flag(flags.DEFINE_string, "reservation", None, "Reservation to use.")

FLAGS = flags.FLAGS
OPTIONS = ("dry_run", *sorted({f for sub in SUBCOMMANDS.values() for f in (*sub.required, *sub.optional)}))

# ------------------------------------------------------------------------------------------------
# Command line


def _check_spelling(words: Sequence[str]) -> None:
    """The argparse spellings of earlier versions (--dry-run, --num-slices, --no-preflight) named outright."""
    for word in words:
        name = word.lstrip("-").split("=", 1)[0]
        if word.startswith("-") and "-" in name:
            fixed = name.replace("-", "_")
            if fixed.startswith("no_") and fixed[3:] in OPTIONS:
                fixed = "no" + fixed[3:]  # --no-preflight: --nopreflight
            if fixed in OPTIONS or (fixed.startswith("no") and fixed[2:] in OPTIONS):
                raise LaunchError(f"unknown option {word.split('=', 1)[0]}: flags are spelled with underscores, "
                                  f"--{fixed}.")


def plan(argv: Sequence[str]) -> tuple[SimpleNamespace, list[list[str]]]:
    """The subcommand's commands, from what absl left of the command line (``argv[0]`` is the program)."""
    words = list(argv[1:])
    cut = words.index("--") if "--" in words else len(words)
    before, after = words[:cut], words[cut:]  # everything after -- goes to the command as it is
    _check_spelling(before)
    name = before.pop(0) if before else ""
    if name == "xpk":
        name = f"xpk {before.pop(0)}" if before else "xpk"
    sub = SUBCOMMANDS.get(name)
    if sub is None:
        known = sorted({c.split()[0] for c in SUBCOMMANDS})
        actions = ", ".join(c.split()[1] for c in SUBCOMMANDS if c.startswith("xpk "))
        if name.startswith("xpk"):
            raise LaunchError(f"xpk {'action ' + repr(name[4:]) + ' is unknown' if name[4:] else 'needs an action'}: "
                              f"one of {actions}.")
        raise LaunchError(f"{'unknown subcommand ' + repr(name) if name else 'give a subcommand'}: one of "
                          f"{', '.join(known)} (xpk takes an action: {actions}). See python launch/tpu.py --help.")
    n = len(sub.positionals)
    positionals = before[:n]
    if len(positionals) < n or any(p.startswith("-") for p in positionals):
        raise LaunchError(f"{name} needs {' '.join(p.upper() for p in sub.positionals)}: {sub.usage(name)}")
    extra = before[n:] + after
    if extra and not sub.extra:
        raise LaunchError(f"unexpected arguments for {name}: {shlex.join(extra)} ({sub.usage(name)})")
    foreign = [f for f in OPTIONS if FLAGS[f].present and f != "dry_run" and f not in (*sub.required, *sub.optional)]
    if foreign:
        raise LaunchError(f"--{foreign[0]} is not an option of {name}: {sub.usage(name)}")
    missing = [f"--{f}" for f in sub.required if not FLAGS[f].present]
    if missing:
        raise LaunchError(f"{name} needs {', '.join(missing)}: {sub.usage(name)}")
    values = {f: FLAGS[f].value if FLAGS[f].present or f not in sub.defaults else sub.defaults[f] for f in OPTIONS}
    args = SimpleNamespace(command=name, extra=extra, **values, **dict(zip(sub.positionals, positionals, strict=True)))
    return args, sub.build(args)


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


def main(argv: Sequence[str]) -> int:
    try:
        args, steps = plan(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for step in steps:
            print(shlex.join(step))
        return 0
    return execute(steps)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, leaving what is not a launcher flag (subcommand, names, overrides, ``--`` and after) to ``main``;
    a malformed flag value is an input error like the others (``error: ...``, exit status 2)."""
    try:
        return FLAGS(argv, known_only=True)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
