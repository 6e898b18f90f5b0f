"""Runs on the workers: train and eval started detached on every worker, their logs, stop, exec; the compile check.

``launch_script`` is the bash line each worker runs to start a run: the bucket preflight, a refusal
to start a run twice, the environment, then the command under ``setsid nohup`` with its log and pid
in the checkout's ``logs/``. Standard library only.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from launch.checks import (
    ROOT,
    Accelerator,
    LaunchError,
    accelerator,
    check_overrides,
    check_storage_path,
    check_tpu_name,
    parse_env,
    parse_gs,
    repo_file,
    run_name,
    warn,
    with_slices,
)
from launch.tpu_vm import pid_check, remote_dir, remote_dir_display, script, ssh


def compile_argv(config: str, topology: str, overrides: list[str]) -> list[str]:
    """The local AOT check; JAX_PLATFORMS=cpu: compile-only use of libtpu without TPUs (director_jax/train/aot.py)."""
    missing = [m for m in ("jax", "libtpu", "director_jax") if importlib.util.find_spec(m) is None]
    if missing:
        raise LaunchError(f"the compile check runs {sys.executable}, which lacks {', '.join(missing)}: run the tool "
                          "from this repository's environment (source scripts/env.sh).")
    return ["env", "JAX_PLATFORMS=cpu", sys.executable, "-m", "director_jax.train", "--config", config,
            "--compile_topology", topology, *overrides]


def cmd_compile(args: SimpleNamespace) -> list[list[str]]:
    if bool(args.accelerator) == bool(args.topology):
        raise LaunchError("compile needs exactly one of --accelerator (e.g. v5p-8) or --topology (e.g. v5p:2x2x1).")
    topology = accelerator(args.accelerator).topology if args.accelerator else args.topology
    if not re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x):\d+(x\d+)*", topology):
        raise LaunchError(f"--topology {topology!r}: give <generation>:<chips per axis>, e.g. v5p:2x2x1 or v6e:2x4.")
    config = repo_file(args.config, what="config file")
    return [compile_argv(config, topology, check_overrides(args.extra, what="compile"))]


def launch_script(args: SimpleNamespace, run: str, module_argv: list[str], env: list[tuple[str, str]],
                  bucket: str | None) -> str:
    """The bash line each worker runs: checks, then the command detached (setsid nohup) with its log and pid."""
    d = remote_dir(args)
    command = shlex.join([".venv/bin/python", "-m", *module_argv])
    lines = [f"cd {d}", "mkdir -p logs"]
    if bucket and args.preflight:
        lines.append(f"if command -v gcloud > /dev/null && ! gcloud storage ls gs://{bucket} > /dev/null; then echo "
                     f"\"$(hostname): cannot list gs://{bucket}: give the TPU VM's service account access to the "
                     "bucket\" >&2; exit 1; fi")
    lines.append(pid_check(run) + f'echo "$(hostname): {run} is already running (pid $pid); stop it first" >&2; '
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


def distributed_flag(acc: Accelerator, num_slices: int) -> list[str]:
    """``--distributed on`` for several hosts: said outright, not left to the commands' metadata-server detection."""
    return ["--distributed", "on"] if acc.multi_host or num_slices > 1 else []


def cmd_train(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = args.num_slices
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


def eval_out(args: SimpleNamespace) -> list[str]:
    """``--out`` becomes the evaluation's ``--workdir`` (metrics.json, report.html; process 0 writes)."""
    return ["--workdir", args.out] if args.out else []


def cmd_eval(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    check_tpu_name(args.name)
    n = args.num_slices
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


def cmd_logs(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
    run = run_name(args.run, "")
    if args.follow and args.worker == "all":
        raise LaunchError("--follow reads one worker's log: give --worker N (default 0).")
    d = remote_dir(args)
    tail = f"tail -n {args.lines}" + (" -F" if args.follow else "") + f" logs/{run}.log"
    if args.worker == "all" or (args.num_slices > 1 and args.node == "all"):
        tail += ' | sed "s/^/$(hostname): /"'  # several workers' lines interleave
    return [ssh(args, script(f"cd {d}", tail), worker=args.worker, node=args.node)]


def cmd_stop(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
    run = run_name(args.run, "")
    d = remote_dir(args)
    signal = "KILL" if args.force else "TERM"
    what = (f"killed {run} (pid $pid)" if args.force
            else f"sent SIGTERM to {run} (pid $pid): it saves a checkpoint and exits")
    return [ssh(args, script(
        f"cd {d}",
        pid_check(run) + f'kill -{signal} -- -"$pid" 2> /dev/null || kill -{signal} "$pid"; '
        f'echo "$(hostname): {what}"; else echo "$(hostname): {run} not running"; fi'))]


def cmd_exec(args: SimpleNamespace) -> list[list[str]]:
    check_tpu_name(args.name)
    command = eval_extra(args.extra)
    if not command:
        raise LaunchError("exec needs a command after --, e.g. exec NAME --zone ZONE -- python -m director_jax.curate")
    d = remote_dir(args)
    return [ssh(args, script(f"cd {d}", 'export PATH="$PWD/.venv/bin:$PATH"', shlex.join(command)),
                worker=args.worker, node=args.node)]
