"""GKE with xpk: the training image (``image``) and the ``xpk`` actions (cluster, train, eval, list, delete).

A workload runs ``cd /app && python -m director_jax.train ...`` (or ``director_jax.evaluate``) in
launch/Dockerfile's image on every host of its slices; its checkpoints go to gs://. Each ``xpk_*``
takes the parsed arguments and returns the commands to run. Standard library only.
"""

from __future__ import annotations

import shlex
from types import SimpleNamespace

from launch.checks import (
    ROOT,
    LaunchError,
    accelerator,
    check_overrides,
    check_workload_name,
    parse_env,
    parse_gs,
    repo_file,
    with_slices,
)
from launch.runs import distributed_flag, eval_config, eval_extra, eval_out

CONTAINER_DIR = "/app"  # the checkout inside launch/Dockerfile's image


def cmd_image(args: SimpleNamespace) -> list[list[str]]:
    steps = [["docker", "build", "-f", str(ROOT / "launch" / "Dockerfile"), "-t", args.image, str(ROOT)]]
    if args.push:
        steps.append(["docker", "push", args.image])
    return steps


def _xpk_common(args: SimpleNamespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _container_command(module_argv: list[str], env: list[tuple[str, str]]) -> str:
    assignments = [f"{k}={shlex.quote(v)}" for k, v in env]
    return " ".join([f"cd {CONTAINER_DIR}", "&&", *assignments, shlex.join(["python", "-m", *module_argv])])


def _xpk_workload(args: SimpleNamespace, module_argv: list[str]) -> list[str]:
    check_workload_name(args.workload)
    env = parse_env(args.env, args.pass_env)
    argv = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
            f"--tpu-type={args.accelerator}", f"--num-slices={args.num_slices}", f"--docker-image={args.image}",
            f"--command={_container_command(module_argv, env)}", *_xpk_common(args)]
    if args.max_restarts:
        argv.append(f"--max-restarts={args.max_restarts}")
    return argv


def xpk_cluster(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    if sum([args.spot, args.on_demand, bool(args.reservation)]) > 1:
        raise LaunchError("choose one of --spot, --on_demand and --reservation.")
    argv = ["xpk", "cluster", "create", f"--cluster={args.cluster}", f"--tpu-type={acc.name}",
            f"--num-slices={args.num_slices}", *_xpk_common(args)]
    argv += ["--spot"] * args.spot + ["--on-demand"] * args.on_demand
    if args.reservation:
        argv.append(f"--reservation={args.reservation}")
    return [argv]


def xpk_train(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    config = repo_file(args.config, what="config file")
    overrides = check_overrides(args.extra)
    workdir = args.workdir
    if not workdir.startswith("gs://"):
        raise LaunchError(f"--workdir {workdir!r}: a GKE pod's disk goes with the pod; checkpoints must go to "
                          "gs://BUCKET/...")
    parse_gs(workdir, what="--workdir")
    module = ["director_jax.train", "--config", config, "--workdir", workdir, *distributed_flag(acc, args.num_slices)]
    return [_xpk_workload(args, module + with_slices(overrides, args.num_slices))]


def xpk_eval(args: SimpleNamespace) -> list[list[str]]:
    acc = accelerator(args.accelerator)
    config = eval_config(args.config)
    if not args.ckpt.startswith("gs://"):
        raise LaunchError(f"--ckpt {args.ckpt!r}: the pods read checkpoints from gs://BUCKET/...")
    parse_gs(args.ckpt, what="--ckpt")
    return [_xpk_workload(args, ["director_jax.evaluate", "--config", config, "--ckpt", args.ckpt, *eval_out(args),
                                 *distributed_flag(acc, args.num_slices), *eval_extra(args.extra)])]


def xpk_list(args: SimpleNamespace) -> list[list[str]]:
    return [["xpk", "workload", "list", f"--cluster={args.cluster}", *_xpk_common(args)]]


def xpk_delete(args: SimpleNamespace) -> list[list[str]]:
    return [["xpk", "workload", "delete", f"--cluster={args.cluster}", f"--workload={args.workload}",
             *_xpk_common(args)]]


def xpk_delete_cluster(args: SimpleNamespace) -> list[list[str]]:
    return [["xpk", "cluster", "delete", f"--cluster={args.cluster}", *_xpk_common(args)]]
