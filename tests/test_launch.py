"""launch/tpu.py: the commands every subcommand prints with --dry_run (argument lists, quoting, workers,
queued-resource vs TPU VM forms, xpk), its input errors, the bash scripts it sends to the workers (run
here with bash against a stand-in interpreter), the execution path with a stand-in `gcloud` first on the
PATH, and every `python launch/tpu.py` line of launch/README.md. No network, no Google Cloud."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "launch" / "tpu.py"
ZONE = "us-east5-a"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
QR_SSH = ["gcloud", "compute", "tpus", "queued-resources", "ssh"]


def run_tool(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def dry(*args: str, env: dict | None = None) -> list[list[str]]:
    """The commands printed by ``--dry_run``, each split back into its argument list."""
    done = run_tool("--dry_run", *args, env=env)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def fails(*args: str) -> str:
    """Input errors: status 2, nothing printed on stdout, the message on stderr."""
    done = run_tool("--dry_run", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    return done.stderr


def remote_script(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


# ------------------------------------------------------------------------------------------------
# Accelerator table


def test_accelerator_table_agrees_with_aot_topology_names():
    from director_jax.train import aot
    from launch.checks import ACCELERATORS

    table = ACCELERATORS
    for acc in table.values():
        match = aot._NAME_RE.match(acc.topology)
        assert match is not None and match.group(1) == acc.generation in aot._GENERATIONS, acc
        assert math.prod(int(n) for n in match.group(2).split("x")) == acc.chips, acc
        assert len(match.group(2).split("x")) == (3 if acc.generation in ("v4", "v5p") else 2), acc
        with pytest.raises(ValueError, match="Cloud TPU accelerator type"):
            aot._generation(acc.name)  # aot tells the two namings apart
    # the pairs aot's own hint names
    message = ""
    try:
        aot._generation("v5p-8")
    except ValueError as e:
        message = str(e)
    pairs = re.findall(r"(\w+-\d+) is (\w+:[\dx]+)", message)
    assert len(pairs) == 3
    for name, topology in pairs:
        assert table[name].topology == topology
    hosts = {n: table[n].hosts for n in ("v4-8", "v5p-8", "v5p-16", "v5p-128", "v5litepod-8", "v5litepod-16",
                                         "v6e-8", "v6e-16", "v6e-256")}
    assert hosts == {"v4-8": 1, "v5p-8": 1, "v5p-16": 2, "v5p-128": 16, "v5litepod-8": 1, "v5litepod-16": 4,
                     "v6e-8": 1, "v6e-16": 4, "v6e-256": 64}
    runtimes = {table[n].runtime for n in ("v5p-8", "v4-8", "v5litepod-4", "v6e-4")}
    assert runtimes == {"v2-alpha-tpuv5", "tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e"}

    out = run_tool("accelerators").stdout.splitlines()
    assert out[0].split() == ["accelerator", "chips", "hosts", "topology", "runtime", "version"]
    assert ["v5p-8", "4", "1", "v5p:2x2x1", "v2-alpha-tpuv5"] in [line.split() for line in out]
    assert len(out) == 1 + len(table)


# ------------------------------------------------------------------------------------------------
# create / delete / status


def test_create_tpu_vm_and_queued_resource_forms():
    assert dry("create", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--spot") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "dj", f"--zone={ZONE}", "--accelerator-type=v5p-8",
         "--version=v2-alpha-tpuv5", "--spot"]]
    assert dry("create", "dj", "--zone", "us-central2-b", "--accelerator", "v4-32", "--preemptible",
               "--project", "proj") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "dj", "--zone=us-central2-b", "--project=proj",
         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--preemptible"]]
    assert dry("create", "dj", "--zone", ZONE, "--accelerator", "v6e-8", "--queued", "--reserved",
               "--valid_until", "6h") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "dj", f"--zone={ZONE}",
         "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--node-id=dj", "--reserved",
         "--valid-until-duration=6h"]]
    # several slices: always a queued resource, nodes dj-0 and dj-1
    assert dry("create", "dj", "--zone", ZONE, "--accelerator", "v5p-16", "--num_slices", "2", "--spot",
               "--version", "custom-runtime") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "dj", f"--zone={ZONE}",
         "--accelerator-type=v5p-16", "--runtime-version=custom-runtime", "--node-count=2", "--node-prefix=dj",
         "--spot"]]


def test_create_errors():
    err = fails("create", "dj", "--zone", ZONE, "--accelerator", "v5p-7")
    assert "unknown accelerator type 'v5p-7'" in err
    for valid in ("v5p-{8,16,32", "v4-{8,", "v5litepod-{1,4,8,16", "v6e-{1,4,8,16"):
        assert valid in err
    assert "its accelerator type is v5p-8" in fails("create", "dj", "--zone", ZONE, "--accelerator", "v5p:2x2x1")
    assert "v5litepod-16" in fails("create", "dj", "--zone", ZONE, "--accelerator", "v5e-16")
    assert "--preemptible is for `tpu-vm create`" in fails("create", "dj", "--zone", ZONE, "--accelerator",
                                                             "v5p-8", "--queued", "--preemptible")
    assert "one of --spot" in fails("create", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--spot", "--reserved")
    assert "TPU name 'My_TPU'" in fails("create", "My_TPU", "--zone", ZONE, "--accelerator", "v5p-8")
    assert "create needs --zone" in fails("create", "dj", "--accelerator", "v5p-8")


def test_flags_are_absl_flags_with_underscores():
    """Flags anywhere on the line; the earlier hyphenated spellings, another subcommand's flag, a missing name or a
    bad value are input errors (status 2, one line), like the others."""
    assert "flags are spelled with underscores, --num_slices" in fails("create", "dj", "--zone", ZONE, "--accelerator",
                                                                        "v5p-8", "--num-slices", "2")
    assert "--nopreflight" in fails("train", "dj", "--zone", ZONE, "--no-preflight")
    done = run_tool("create", "dj", "--dry-run")
    assert done.returncode == 2 and done.stderr == "error: unknown option --dry-run: flags are spelled with " \
        "underscores, --dry_run.\n"
    assert "--spot is not an option of delete" in fails("delete", "dj", "--zone", ZONE, "--spot")
    assert "create needs NAME" in fails("create", "--zone", ZONE, "--accelerator", "v5p-8")
    assert "unexpected arguments for delete: x" in fails("delete", "dj", "x", "--zone", ZONE)
    assert "flag --num_slices=0" in fails("create", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--num_slices", "0")
    assert "xpk needs an action" in fails("xpk", "--zone", ZONE)
    assert "unknown subcommand 'launch'" in fails("launch")
    # booleans turn off with --no..., and a subcommand's own defaults apply to shared flags
    assert dry("create", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--spot", "--nospot")[0][-1] == \
        "--version=v2-alpha-tpuv5"
    assert "tail -n 3 logs/r.log" in remote_script(dry("status", "dj", "--zone", ZONE, "--run", "r")[1])


def test_delete_and_status_forms():
    assert dry("delete", "dj", "--zone", ZONE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dj", f"--zone={ZONE}", "--quiet"]]
    assert dry("delete", "dj", "--zone", ZONE, "--queued", "--project", "p") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "dj", f"--zone={ZONE}", "--project=p", "--force",
         "--quiet"]]
    assert dry("delete", "dj", "--zone", ZONE, "--num_slices", "2")[0][3] == "queued-resources"
    assert dry("status", "dj", "--zone", ZONE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dj", f"--zone={ZONE}",
         "--format=yaml(name,state,health,acceleratorType,runtimeVersion)"]]
    (describe,) = dry("status", "dj", "--zone", ZONE, "--queued")
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "dj"]
    describe, ssh = dry("status", "dj", "--zone", ZONE, "--run", "gen")
    assert ssh[:8] == [*SSH, "dj", f"--zone={ZONE}", "--worker=all"]
    assert "logs/gen.pid" in remote_script(ssh)


# ------------------------------------------------------------------------------------------------
# setup


def test_setup_ships_git_archive_to_every_worker(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    archive, scp, ssh = dry("setup", "dj", "--zone", ZONE, env=env)
    tarball = str(tmp_path / "director_jax-dj.tar.gz")
    assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "dj:director_jax-src.tar.gz",
                   f"--zone={ZONE}", "--worker=all"]
    assert ssh[:8] == [*SSH, "dj", f"--zone={ZONE}", "--worker=all"] and len(ssh) == 9
    lines = remote_script(ssh).split("; ")
    assert lines[0] == "set -euo pipefail"
    order = ['tar -xzf "$HOME"/director_jax-src.tar.gz -C "$HOME"/director_jax',
             'cd "$HOME"/director_jax',
             "[ -x .venv/bin/python ] || python3.11 -m venv .venv",
             ".venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-tpu.txt -c "
             "requirements.lock",
             ".venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e ."]
    assert [lines.index(line) for line in order] == sorted(lines.index(line) for line in order)
    assert any("apt-get install -y -q python3.11 python3.11-venv" in line for line in lines)
    assert subprocess.run(["bash", "-n", "-c", remote_script(ssh)]).returncode == 0

    # several slices: one scp per node, ssh through the queued resource
    steps = dry("setup", "dj", "--zone", ZONE, "--num_slices", "2", "--rev", "HEAD~0", "--iap", env=env)
    assert [s[5:7] for s in steps[1:3]] == [[tarball, "dj-0:director_jax-src.tar.gz"],
                                            [tarball, "dj-1:director_jax-src.tar.gz"]]
    assert steps[0][-1] == "HEAD~0" and steps[1][-1] == "--tunnel-through-iap"
    assert steps[3][:10] == [*QR_SSH, "dj", f"--zone={ZONE}", "--node=all", "--worker=all", "--tunnel-through-iap"]


FAKE_VENV_PYTHON = """#!/bin/bash
echo "$*" >> "$HOME/python_calls"
if [ "$1" = "-c" ]; then echo "jax 0.0-fake"; fi
"""


def test_setup_script_replaces_the_code_and_keeps_the_rest(tmp_path):
    """The setup script, run by bash in a fake home: the archive's top-level entries are replaced (a file deleted
    upstream goes), data / weights / the venv stay, and pip runs with the requirement files in order."""
    home = tmp_path / "home"
    checkout = home / "director_jax"
    _write_exe(checkout / ".venv" / "bin" / "python", FAKE_VENV_PYTHON)
    (checkout / "configs").mkdir()
    (checkout / "configs" / "stale.py").write_text("deleted upstream")
    (checkout / "data").mkdir()
    (checkout / "data" / "keep.txt").write_text("copied here by exec")
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp_path)}
    archive, _, ssh = dry("setup", "dj", "--zone", ZONE, "--python", "/nonexistent/python3.11", env=env)
    subprocess.run(archive, check=True)
    (tmp_path / "director_jax-dj.tar.gz").rename(home / "director_jax-src.tar.gz")
    done = subprocess.run(["bash", "-c", remote_script(ssh)], capture_output=True, text=True, env=env, cwd=home,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ready, jax 0.0-fake")
    assert not (checkout / "configs" / "stale.py").exists()
    assert (checkout / "configs" / "gen_1_3b.py").read_text() == (ROOT / "configs" / "gen_1_3b.py").read_text()
    assert (checkout / "data" / "keep.txt").exists() and (checkout / "pyproject.toml").exists()
    pip = "-m pip install -q --disable-pip-version-check"
    assert (home / "python_calls").read_text().splitlines() == [
        f"{pip} --upgrade pip", f"{pip} -r requirements-tpu.txt -c requirements.lock", f"{pip} --no-deps -e .",
        "-c import jax; print(\"jax\", jax.__version__)"]


def test_setup_from_git_url_and_options():
    (ssh,) = dry("setup", "dj", "--zone", ZONE, "--git", "https://example.com/me/director_jax.git", "--rev", "v1.0",
                 "--python", "/opt/py311/bin/python3", "--pip_extra", "gcsfs==2026.10.1", "--remote_dir", "/opt/dj")
    script = remote_script(ssh)
    assert ("if [ -d /opt/dj/.git ]; then git -C /opt/dj fetch --quiet origin; else git clone --quiet "
            "https://example.com/me/director_jax.git /opt/dj; fi; git -C /opt/dj checkout --quiet --detach "
            "v1.0") in script
    assert "apt-get" not in script and "/opt/py311/bin/python3 -m venv .venv" in script
    assert "-c requirements.lock gcsfs==2026.10.1" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    for bad in (".", "/", "../x", "a b"):
        assert "--remote_dir" in fails("setup", "dj", "--zone", ZONE, "--remote_dir", bad)


# ------------------------------------------------------------------------------------------------
# train / eval


EXPECTED_TRAIN_SCRIPT = (
    'set -euo pipefail; cd "$HOME"/director_jax; mkdir -p logs; '
    'if command -v gcloud > /dev/null && ! gcloud storage ls gs://my-bkt > /dev/null; then echo "$(hostname): cannot '
    "list gs://my-bkt: give the TPU VM's service account access to the bucket\" >&2; exit 1; fi; "
    'pid=$(cat logs/gen.pid 2> /dev/null || true); if [ -n "$pid" ] && grep -qa director_jax /proc/"$pid"/cmdline '
    '2> /dev/null; then echo "$(hostname): gen is already running (pid $pid); stop it first" >&2; exit 1; fi; '
    "export PYTHONUNBUFFERED=1; export TPU_STDERR_LOG_LEVEL=0; export LIBTPU_INIT_ARGS='--xla_tpu_flag=true --other'; "
    'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname):" \'.venv/bin/python -m director_jax.train --config '
    "configs/gen_1_3b.py --workdir gs://my-bkt/runs/gen --config.train.steps 100 "
    "--config.model_options.remat_policy=full' >> logs/gen.log; "
    "setsid nohup .venv/bin/python -m director_jax.train --config configs/gen_1_3b.py --workdir gs://my-bkt/runs/gen "
    "--config.train.steps 100 --config.model_options.remat_policy=full >> logs/gen.log 2>&1 < /dev/null & "
    'echo $! > logs/gen.pid; echo "$(hostname): started gen (pid $(cat logs/gen.pid)), log ~/director_jax/logs/gen.log"'
)


def test_train_command_on_every_worker_exactly():
    env = {**os.environ, "LIBTPU_INIT_ARGS": "--xla_tpu_flag=true --other"}
    args = ["train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/gen_1_3b.py",
            "--workdir", "gs://my-bkt/runs/gen", "--env", "TPU_STDERR_LOG_LEVEL=0", "--pass_env", "LIBTPU_INIT_ARGS",
            "--", "--config.train.steps", "100", "--config.model_options.remat_policy=full"]
    (ssh,) = dry(*args, env=env)
    assert ssh == [*SSH, "dj", f"--zone={ZONE}", "--worker=all", "--command=" + EXPECTED_TRAIN_SCRIPT]
    # --dry_run after the subcommand, and a config path given from another directory, print the same
    done = run_tool(args[0], "--dry_run", *args[1:7], str(ROOT / "configs" / "gen_1_3b.py"), *args[8:], env=env,
                    cwd=ROOT / "launch")
    assert done.returncode == 0 and [shlex.split(line) for line in done.stdout.splitlines()] == [ssh]
    # overrides without "--" are accepted too
    assert dry(*[a for a in args if a != "--"], env=env) == [ssh]


def test_train_compile_first_and_compile():
    compile_cmd, ssh = dry("train", "dj", "--zone", ZONE, "--accelerator", "v6e-8", "--config", "configs/gen_tiny.py",
                           "--workdir", "gs://my-bkt/runs/t", "--compile_first", "--", "--config.mesh.fsdp=8")
    assert compile_cmd == ["env", "JAX_PLATFORMS=cpu", sys.executable, "-m", "director_jax.train", "--config",
                           "configs/gen_tiny.py", "--compile_topology", "v6e:2x4", "--config.mesh.fsdp=8"]
    assert ssh[:5] == SSH
    assert dry("compile", "--accelerator", "v5p-8", "--config", "configs/gen_1_3b.py", "--",
               "--config.model_options.remat_policy", "full") == [
        ["env", "JAX_PLATFORMS=cpu", sys.executable, "-m", "director_jax.train", "--config", "configs/gen_1_3b.py",
         "--compile_topology", "v5p:2x2x1", "--config.model_options.remat_policy", "full"]]
    assert dry("compile", "--topology", "v5p:4x4x4", "--config", "configs/gen_14b.py")[0][-1] == "v5p:4x4x4"
    assert "exactly one of" in fails("compile", "--config", "configs/gen_1_3b.py")
    assert "--topology 'v5p-8'" in fails("compile", "--topology", "v5p-8", "--config", "configs/gen_1_3b.py")


def test_train_multi_host_and_multi_slice():
    base = ["--config", "configs/gen_1_3b.py", "--workdir", "gs://my-bkt/runs/big"]
    (ssh,) = dry("train", "dj", "--zone", ZONE, "--accelerator", "v5p-16", *base)
    assert ssh[:8] == [*SSH, "dj", f"--zone={ZONE}", "--worker=all"]
    assert ("setsid nohup .venv/bin/python -m director_jax.train --config configs/gen_1_3b.py --workdir "
            "gs://my-bkt/runs/big --distributed on >> logs/big.log") in remote_script(ssh)
    (ssh,) = dry("train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--num_slices", "2", *base)
    assert ssh[:9] == [*QR_SSH, "dj", f"--zone={ZONE}", "--node=all", "--worker=all"]
    assert "--distributed on --config.mesh.dcn_data=2 >>" in remote_script(ssh)
    (ssh,) = dry("train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--num_slices", "2", *base, "--",
                 "--config.mesh.dcn_fsdp=2")
    assert "--distributed on --config.mesh.dcn_fsdp=2 >>" in remote_script(ssh)
    (ssh,) = dry("train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", *base, "--foreground", "--run", "r1",
                 "--nopreflight")
    script = remote_script(ssh)
    assert script.endswith("--workdir gs://my-bkt/runs/big 2>&1 | tee -a logs/r1.log")
    assert "setsid" not in script and "gcloud storage ls" not in script


def test_train_input_errors():
    base = ["train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/gen_1_3b.py"]
    err = fails(*base[:5], "v5p-16", "--config", "configs/gen_1_3b.py", "--workdir", "runs/local")
    assert "every host must see the same checkpoint directory" in err
    assert "not on gs://" in fails(*base[:5], "v5p-8", "--num_slices", "2", "--config", "configs/gen_1_3b.py",
                                   "--workdir", "/tmp/x")
    err = fails(*base[:5], "v5p-8", "--config", "configs/missing.py", "--workdir", "gs://my-bkt/r")
    assert "config file configs/missing.py does not exist" in err and "gen_1_3b.py" in err
    assert "outside the repository" in fails(*base[:5], "v5p-8", "--config", "/etc/hostname", "--workdir",
                                             "gs://my-bkt/r")
    cases = [("My-Bucket", "only lower-case"), ("ab", "characters long"), ("-bkt", "start and end"),
             ("goog-runs", "goog"), ("my-google-runs", "goog"), ("192.168.5.4", "IP address"),
             ("a" * 64, "characters long"), ("", "only lower-case")]
    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(lambda case: fails(*base, "--workdir", f"gs://{case[0]}/runs/x"), cases))
    for (bucket, why), err in zip(cases, errors, strict=True):
        assert f"malformed bucket name {bucket!r}" in err and why in err, (bucket, err)
    assert "only gs:// URLs" in fails(*base, "--workdir", "s3://bkt/x")
    assert "unexpected argument '--steps'" in fails(*base, "--workdir", "gs://my-bkt/r", "--", "--steps", "3")
    assert "unknown option '--steps'" in fails(*base, "--workdir", "gs://my-bkt/r", "--", "--config.a=1", "--steps")
    assert "unexpected argument 'extra'" in fails(*base, "--workdir", "gs://my-bkt/r", "extra")
    assert "--env '1A=b'" in fails(*base, "--workdir", "gs://my-bkt/r", "--env", "1A=b")
    env = {k: v for k, v in os.environ.items() if k != "DJ_UNSET_VAR"}
    done = run_tool("--dry_run", *base, "--workdir", "gs://my-bkt/r", "--pass_env", "DJ_UNSET_VAR", env=env)
    assert done.returncode == 2 and "--pass_env DJ_UNSET_VAR: it is not set here" in done.stderr
    assert "run name 'bad name'" in fails(*base, "--workdir", "gs://my-bkt/r", "--run", "bad name")
    # one host, local workdir: allowed, with a warning
    done = run_tool("--dry_run", *base, "--workdir", "runs/local")
    assert done.returncode == 0 and "lost when the VM is deleted or preempted" in done.stderr
    assert "--workdir runs/local" in remote_script(shlex.split(done.stdout))


def test_eval_command():
    (ssh,) = dry("eval", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/eval_synthetic.py",
                 "--ckpt", "gs://my-bkt/runs/gen-1-3b/checkpoints/2000", "--out", "runs/ev", "--",
                 "--config.movies.count", "16")
    script = remote_script(ssh)
    assert ssh[:8] == [*SSH, "dj", f"--zone={ZONE}", "--worker=all"]
    assert ("setsid nohup .venv/bin/python -m director_jax.evaluate --config configs/eval_synthetic.py --ckpt "
            "gs://my-bkt/runs/gen-1-3b/checkpoints/2000 --workdir runs/ev --config.movies.count 16 "
            ">> logs/eval-gen-1-3b.log 2>&1 < /dev/null & echo $! > logs/eval-gen-1-3b.pid") in script
    (ssh,) = dry("eval", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/eval_synthetic.py",
                 "--ckpt", "runs/gen", "--run", "ev1")
    assert ".venv/bin/python -m director_jax.evaluate --config configs/eval_synthetic.py --ckpt runs/gen >> " \
        "logs/ev1.log" in remote_script(ssh)
    assert "every host must see" in fails("eval", "dj", "--zone", ZONE, "--accelerator", "v4-16", "--config",
                                          "configs/eval_synthetic.py", "--ckpt", "ckpts/x")
    (ssh,) = dry("eval", "dj", "--zone", ZONE, "--accelerator", "v4-16", "--config", "configs/eval_synthetic.py",
                 "--ckpt", "gs://my-bkt/runs/gen", "--", "--config.movies.count", "16")
    assert ("-m director_jax.evaluate --config configs/eval_synthetic.py --ckpt gs://my-bkt/runs/gen "
            "--distributed on --config.movies.count 16 >> logs/eval-gen.log") in remote_script(ssh)
    if (ROOT / "director_jax" / "evaluate.py").is_file():
        assert "configs/eval_missing.py does not exist" in fails(
            "eval", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/eval_missing.py", "--ckpt",
            "gs://my-bkt/r")


# ------------------------------------------------------------------------------------------------
# logs / stop / exec, and the worker-side scripts run with bash


def test_logs_stop_exec_forms():
    (ssh,) = dry("logs", "dj", "--zone", ZONE, "--run", "gen", "--follow")
    assert ssh == [*SSH, "dj", f"--zone={ZONE}", "--worker=0",
                   '--command=set -euo pipefail; cd "$HOME"/director_jax; tail -n 100 -F logs/gen.log']
    (ssh,) = dry("logs", "dj", "--zone", ZONE, "--run", "gen", "--worker", "all", "--lines", "5", "--num_slices", "2")
    assert ssh[:9] == [*QR_SSH, "dj", f"--zone={ZONE}", "--node=0", "--worker=all"]
    assert remote_script(ssh).endswith('tail -n 5 logs/gen.log | sed "s/^/$(hostname): /"')
    assert "--follow reads one worker's log" in fails("logs", "dj", "--zone", ZONE, "--run", "g", "-f", "--worker",
                                                      "all")
    (ssh,) = dry("stop", "dj", "--zone", ZONE, "--run", "gen")
    assert ssh[:8] == [*SSH, "dj", f"--zone={ZONE}", "--worker=all"] and "kill -TERM" in remote_script(ssh)
    assert "kill -KILL" in remote_script(dry("stop", "dj", "--zone", ZONE, "--run", "gen", "--force")[0])
    (ssh,) = dry("exec", "dj", "--zone", ZONE, "--", "gcloud", "storage", "rsync", "--recursive", "gs://my-bkt/d",
                 "data/d b")
    assert ssh == [*SSH, "dj", f"--zone={ZONE}", "--worker=all",
                   '--command=set -euo pipefail; cd "$HOME"/director_jax; export PATH="$PWD/.venv/bin:$PATH"; '
                   "gcloud storage rsync --recursive gs://my-bkt/d 'data/d b'"]
    assert "exec needs a command" in fails("exec", "dj", "--zone", ZONE)


FAKE_PYTHON = """#!/bin/bash
echo "fake python $*"
trap 'echo "SIGTERM: saving a checkpoint"; exit 0' TERM
while true; do sleep 0.05; done
"""
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL")
sys.exit(7 if fail and fail in sys.argv[1:] else 0)
"""


def _write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _fake_gcloud(tmp_path: Path) -> tuple[dict, Path]:
    log = tmp_path / "gcloud_calls.jsonl"
    _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log)}
    return env, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_worker_scripts_start_watch_and_stop_a_run(tmp_path):
    """The scripts train / status / logs / stop / exec send, run by bash in a fake home with a stand-in
    interpreter: detached start, pid file, refusal to start twice, SIGTERM to the run, log contents."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc (the scripts target Linux TPU VMs)")
    home = tmp_path / "home"
    _write_exe(home / "director_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
    env, gcloud_log = _fake_gcloud(tmp_path)
    env["HOME"] = str(home)
    common = ["dj", "--zone", ZONE]

    def on_worker(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", remote_script(argv)], capture_output=True, text=True, env=env,
                              cwd=home, timeout=30)

    (train,) = dry("train", *common, "--accelerator", "v5p-8", "--config", "configs/gen_tiny.py", "--workdir",
                   "gs://my-bkt/runs/t1", "--env", "RUN_FLAG=a b", "--", "--config.train.steps=3")
    started = on_worker(train)
    assert started.returncode == 0, started.stderr
    pid_file = home / "director_jax" / "logs" / "t1.pid"
    pid = int(pid_file.read_text())
    try:
        assert f"started t1 (pid {pid}), log ~/director_jax/logs/t1.log" in started.stdout
        assert _calls(gcloud_log) == [["storage", "ls", "gs://my-bkt"]]  # the preflight
        log = home / "director_jax" / "logs" / "t1.log"
        deadline = time.time() + 10
        while "fake python" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        lines = log.read_text().splitlines()
        assert lines[0].startswith("=== ") and lines[0].endswith(
            ": .venv/bin/python -m director_jax.train --config configs/gen_tiny.py --workdir gs://my-bkt/runs/t1 "
            "--config.train.steps=3")
        assert lines[1] == ("fake python -m director_jax.train --config configs/gen_tiny.py --workdir "
                            "gs://my-bkt/runs/t1 --config.train.steps=3")
        assert os.getsid(pid) == pid  # its own session: the ssh session ending does not take it down
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"RUN_FLAG=a b\0" in f.read()

        again = on_worker(train)
        assert again.returncode == 1 and f"t1 is already running (pid {pid}); stop it first" in again.stderr

        status = on_worker(dry("status", *common, "--run", "t1")[1])
        assert status.returncode == 0 and f"t1 running (pid {pid})" in status.stdout
        assert "fake python -m director_jax.train" in status.stdout  # the log's last lines
        logs = on_worker(dry("logs", *common, "--run", "t1", "--lines", "1")[0])
        assert logs.stdout.strip() == lines[1]
        ran = on_worker(dry("exec", *common, "--", "sh", "-c", 'echo "$PWD"; command -v python')[0])
        assert ran.stdout.split() == [str(home / "director_jax"), str(home / "director_jax/.venv/bin/python")]

        stopped = on_worker(dry("stop", *common, "--run", "t1")[0])
        assert stopped.returncode == 0 and f"sent SIGTERM to t1 (pid {pid})" in stopped.stdout
        deadline = time.time() + 10
        while Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert "SIGTERM: saving a checkpoint" in log.read_text()
        status = on_worker(dry("status", *common, "--run", "t1")[1])
        assert "t1 not running" in status.stdout
        assert "t1 not running" in on_worker(dry("stop", *common, "--run", "t1")[0]).stdout
        # the stale pid file does not block a new start
        restarted = on_worker(train)
        assert restarted.returncode == 0, restarted.stderr
        pid = int(pid_file.read_text())
        killed = on_worker(dry("stop", *common, "--run", "t1", "--force")[0])
        assert f"killed t1 (pid {pid})" in killed.stdout
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, 9)


def test_preflight_refuses_a_bucket_the_worker_cannot_list(tmp_path):
    home = tmp_path / "home"
    _write_exe(home / "director_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
    env, _ = _fake_gcloud(tmp_path)
    env.update(HOME=str(home), FAKE_GCLOUD_FAIL="gs://my-bkt")
    (train,) = dry("train", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--config", "configs/gen_tiny.py",
                   "--workdir", "gs://my-bkt/runs/t2")
    done = subprocess.run(["bash", "-c", remote_script(train)], capture_output=True, text=True, env=env, cwd=home,
                          timeout=30)
    assert done.returncode == 1 and "cannot list gs://my-bkt" in done.stderr
    assert not (home / "director_jax" / "logs" / "t2.pid").exists()


# ------------------------------------------------------------------------------------------------
# Execution path: the real subprocess calls, with a stand-in gcloud first on the PATH


def test_runs_the_printed_commands_with_a_stand_in_gcloud(tmp_path):
    env, log = _fake_gcloud(tmp_path)
    env["TMPDIR"] = str(tmp_path)
    create = ["create", "dj", "--zone", ZONE, "--accelerator", "v5p-8", "--spot", "--queued"]
    done = run_tool(*create, env=env)
    assert done.returncode == 0, done.stderr
    assert [["gcloud", *c] for c in _calls(log)] == dry(*create)
    assert "[1/1] gcloud compute tpus queued-resources create dj" in done.stderr

    log.unlink()
    setup = ["setup", "dj", "--zone", ZONE]
    done = run_tool(*setup, env=env)
    assert done.returncode == 0, done.stderr
    planned = dry(*setup, env=env)
    assert [["gcloud", *c] for c in _calls(log)] == planned[1:]  # the git archive step ran for real:
    with tarfile.open(tmp_path / "director_jax-dj.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "requirements-tpu.txt", "requirements.lock", "configs/gen_1_3b.py"} <= names

    # the first failure stops the run, with its status and the command
    log.unlink()
    done = run_tool(*setup, env={**env, "FAKE_GCLOUD_FAIL": "scp"})
    assert done.returncode == 7
    assert "error: step 2/3 failed with exit status 7; 1 later step(s) not run" in done.stderr
    assert [c[:3] for c in _calls(log)] == [["compute", "tpus", "tpu-vm"]] and _calls(log)[0][3] == "scp"

    log.unlink()
    train = ["train", "dj", "--zone", ZONE, "--accelerator", "v5p-16", "--config", "configs/gen_1_3b.py",
             "--workdir", "gs://my-bkt/runs/x"]
    assert run_tool(*train, env=env).returncode == 0
    assert [["gcloud", *c] for c in _calls(log)] == dry(*train)

    # input errors run nothing; a missing tool is named
    log.unlink()
    assert run_tool(*train[:-1], "runs/x", env=env).returncode == 2 and not log.exists()
    done = run_tool("xpk", "list", "--cluster", "c", "--zone", ZONE, env={**env, "PATH": str(tmp_path / "bin")})
    assert done.returncode == 127 and "xpk is not on the PATH (pip install xpk)" in done.stderr


# ------------------------------------------------------------------------------------------------
# bucket / sync / image / xpk


def test_bucket_sync_image():
    assert dry("bucket", "gs://my-director-runs", "--location", "us-east5") == [
        ["gcloud", "storage", "buckets", "create", "gs://my-director-runs", "--location=us-east5",
         "--uniform-bucket-level-access"]]
    assert "give the bucket alone" in fails("bucket", "gs://my-bkt/x", "--location", "us")
    assert "malformed bucket name 'Bad'" in fails("bucket", "gs://Bad", "--location", "us")
    assert dry("sync", "curated/tfds", "gs://my-bkt/data/tfds") == [
        ["gcloud", "storage", "rsync", "--recursive", "curated/tfds", "gs://my-bkt/data/tfds"]]
    assert "SRC or DEST must be gs://" in fails("sync", "a", "b")
    assert dry("image", "--image", "us-docker.pkg.dev/p/r/dj:v1") == [
        ["docker", "build", "-f", str(ROOT / "launch" / "Dockerfile"), "-t", "us-docker.pkg.dev/p/r/dj:v1", str(ROOT)],
        ["docker", "push", "us-docker.pkg.dev/p/r/dj:v1"]]
    assert len(dry("image", "--image", "x:1", "--nopush")) == 1


def test_dockerfile_copies_files_that_exist():
    text = (ROOT / "launch" / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    sources = [s for c in copies for s in c]
    assert {"requirements-tpu.txt", "requirements.lock", "director_jax", "configs", "pyproject.toml"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
    assert "pip install -r requirements-tpu.txt -c requirements.lock" in text
    assert "pip install --no-deps -e ." in text


def test_xpk_commands():
    common = ["--cluster", "director", "--zone", ZONE]
    assert dry("xpk", "cluster", *common, "--accelerator", "v5p-8", "--num_slices", "2", "--spot") == [
        ["xpk", "cluster", "create", "--cluster=director", "--tpu-type=v5p-8", "--num-slices=2", f"--zone={ZONE}",
         "--spot"]]
    assert dry("xpk", "cluster", *common, "--accelerator", "v6e-16", "--reservation", "res1", "--project", "p") == [
        ["xpk", "cluster", "create", "--cluster=director", "--tpu-type=v6e-16", "--num-slices=1", f"--zone={ZONE}",
         "--project=p", "--reservation=res1"]]
    run = ["--workload", "gen-1-3b", "--image", "img:v1", "--config", "configs/gen_1_3b.py"]
    assert dry("xpk", "train", *common, "--accelerator", "v5p-8", *run, "--workdir", "gs://my-bkt/runs/gen",
               "--env", "TPU_STDERR_LOG_LEVEL=0", "--max_restarts", "20", "--", "--config.train.steps=9") == [
        ["xpk", "workload", "create", "--cluster=director", "--workload=gen-1-3b", "--tpu-type=v5p-8",
         "--num-slices=1", "--docker-image=img:v1",
         "--command=cd /app && TPU_STDERR_LOG_LEVEL=0 python -m director_jax.train --config configs/gen_1_3b.py "
         "--workdir gs://my-bkt/runs/gen --config.train.steps=9", f"--zone={ZONE}", "--max-restarts=20"]]
    (create,) = dry("xpk", "train", *common, "--accelerator", "v5p-16", "--num_slices", "2", *run, "--workdir",
                    "gs://my-bkt/runs/gen")
    assert "--num-slices=2" in create
    assert create[8].endswith("--workdir gs://my-bkt/runs/gen --distributed on --config.mesh.dcn_data=2")
    (create,) = dry("xpk", "eval", *common, "--accelerator", "v5p-8", *run[:4], "--config",
                    "configs/eval_synthetic.py", "--ckpt", "gs://my-bkt/runs/gen/checkpoints", "--out", "/tmp/ev")
    assert create[8] == ("--command=cd /app && python -m director_jax.evaluate --config configs/eval_synthetic.py "
                         "--ckpt gs://my-bkt/runs/gen/checkpoints --workdir /tmp/ev")
    (create,) = dry("xpk", "eval", *common, "--accelerator", "v5p-32", *run[:4], "--config",
                    "configs/eval_synthetic.py", "--ckpt", "gs://my-bkt/runs/gen")
    assert create[8].endswith("--ckpt gs://my-bkt/runs/gen --distributed on")
    assert dry("xpk", "list", *common) == [["xpk", "workload", "list", "--cluster=director", f"--zone={ZONE}"]]
    assert dry("xpk", "delete", *common, "--workload", "w") == [
        ["xpk", "workload", "delete", "--cluster=director", "--workload=w", f"--zone={ZONE}"]]
    assert dry("xpk", "delete-cluster", *common) == [["xpk", "cluster", "delete", "--cluster=director",
                                                      f"--zone={ZONE}"]]
    assert "a GKE pod's disk goes with the pod" in fails("xpk", "train", *common, "--accelerator", "v5p-8", *run,
                                                     "--workdir", "runs/x")
    assert "workload name 'Gen_1'" in fails("xpk", "train", *common, "--accelerator", "v5p-8", "--workload", "Gen_1",
                                            *run[2:], "--workdir", "gs://my-bkt/r")
    assert "unknown accelerator type" in fails("xpk", "cluster", *common, "--accelerator", "v5p-3")


# ------------------------------------------------------------------------------------------------
# launch/README.md


def _readme_commands() -> list[str]:
    text = (ROOT / "launch" / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_every_readme_command_runs_in_dry_run_mode():
    commands = _readme_commands()
    launcher = [c for c in commands if c.startswith("python launch/tpu.py ")]
    others = [c for c in commands if not c.startswith("python launch/tpu.py ")]
    argvs = [shlex.split(command)[2:] for command in launcher]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda argv: run_tool("--dry_run", *argv), argvs))
    for command, done in zip(launcher, results, strict=True):
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip(), command
    used = {argv[0] if argv[0] != "xpk" else f"xpk {argv[1]}" for argv in argvs}
    assert used >= {"bucket", "compile", "create", "status", "setup", "sync", "exec", "train", "logs", "stop", "eval",
                    "delete", "image", "xpk cluster", "xpk train", "xpk list", "xpk delete", "xpk delete-cluster"}
    # the walkthrough's train command: the 1.3B config, the gs:// workdir, every worker
    (train,) = [c for c in launcher if " train director-v5p " in c and "v5p-8" in c and "--workdir gs://" in c]
    (ssh,) = dry(*shlex.split(train)[2:])
    assert "--worker=all" in ssh
    assert ("setsid nohup .venv/bin/python -m director_jax.train --config configs/gen_1_3b.py --workdir "
            "gs://my-director-runs/runs/gen-1-3b ") in remote_script(ssh)
    # the other fenced commands are this repository's modules
    for command in others:
        module = re.fullmatch(r"python -m (director_jax[\w.]*) .*", command)
        assert module is not None, command
        path = ROOT / Path(*module.group(1).split("."))
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), command
