"""Bad inputs of `train` and `evaluate`: each refused in one line before any work, nothing written.

The fast tables call the checks the commands run first (``train.checks.check_training``,
``eval.checks.check_evaluation``) on real configs; the slow table runs the real commands as
subprocesses and checks the exit code, the single ``error:`` line and that nothing was written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from director_jax.configs_common import load_config
from director_jax.errors import UserError
from director_jax.eval.checks import check_evaluation
from director_jax.train.checks import check_training

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "configs" / "gen_tiny.py"
EVAL = ROOT / "configs" / "eval_synthetic.py"

TRAIN_CASES = [  # (dotted field, value, message fragment)
    ("train.steps", -1, "train.steps=-1"),
    ("train.steps", 2.5, "whole number"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("train.micro_batches", 3, "not divisible"),
    ("train.log_every", 0, "train.log_every=0"),
    ("train.nonfinite", "ignore", "choose one of"),
    ("checkpoint.every", 0, "checkpoint.every=0"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last=0"),
    ("optim.learning_rate", float("nan"), "learning_rate=nan"),
    ("optim.learning_rate", float("inf"), "learning_rate=inf"),
    ("optim.grad_clip", -1.0, "grad_clip=-1.0"),
    ("optim.ema_decay", 1.5, "below 1"),
    ("optim.b2", 1.0, "below 1"),
    ("data.worker_count", -2, "worker_count=-2"),
    ("video.num_frames", 0, "num_frames=0"),
    ("video.height", 30, "multiple of"),
    ("train.keyframe_dropout", 2.0, "probability"),
    ("train.latents", "cached", "train.latents"),
    ("task", "upscale", "not a task"),
    ("mesh.rules", (("embed", "nope"),), "unknown mesh axis"),
    ("mesh.rules", (("no_such_axis", None),), "no model uses"),
    ("model_options.sequence_parallel", "ring", "needs a sequence axis"),
    ("vae.init_from", "", "vae.init_from is empty"),  # Gen on a random VAE: noise in every frame
]


def _set(cfg, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[last] = value


@pytest.mark.parametrize(("field", "value", "says"), TRAIN_CASES, ids=[f"{c[0]}={c[1]}" for c in TRAIN_CASES])
def test_training_config_mistakes_are_refused_before_anything_is_written(field, value, says, tmp_path):
    cfg = load_config(GEN)
    _set(cfg, field, value)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=None) as err:
        check_training(cfg, str(workdir))
    assert says in str(err.value)
    assert not workdir.exists()


def test_training_workdir_that_cannot_be_written(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cfg = load_config(GEN)
    cfg.vae.init_from = "random"  # a smoke test's frozen VAE, on purpose
    with pytest.raises(UserError, match="not a directory"):
        check_training(cfg, str(a_file))
    with pytest.raises(UserError, match="not writable"):
        check_training(cfg, str(a_file / "run"))
    check_training(cfg, str(tmp_path / "fine"))  # a good config and place pass
    assert (tmp_path / "fine").is_dir() and not list((tmp_path / "fine").iterdir())


EVAL_CASES = [  # (dotted field, value, extra kwargs, message fragment)
    ("suite", "imagenet", {}, "available suites"),
    ("weights", "best", {}, "weights='best'"),
    ("movies.count", 0, {}, "movies.count=0"),
    ("movies.count", 10_000_000, {}, "GiB budget"),
    ("movies.shot_lengths", (24, 0), {}, "shot_lengths entry=0"),
    ("cases_per_device", 0, {}, "cases_per_device=0"),
    ("report.media_cases", -1, {}, "media_cases=-1"),
    ("metrics.fvd_size", 8, {}, "fvd_size=8"),
    ("max_suite_gib", float("nan"), {}, "max_suite_gib=nan"),
    ("model_config", "configs/no_such.py", {}, "neither a config file nor a trainer run"),
    ("cases", (dict(name="x", keyframes=("#0",), fps=3),), {}, "unknown keys ['fps']"),
    ("cases", (), {}, "lists no cases"),
    ("cases", (dict(name="late", keyframes=("#0", "9s")),), {}, "outside the video"),
    ("cases", (dict(name="twice", keyframes=("#0", "#0")),), {}, "same frame twice"),
    ("cases", (dict(name="anchor", keyframes=("#0",), anchor="middle"),), {}, "anchor='middle'"),
    ("seed", -3, {}, "seed=-3"),
    (None, None, dict(ckpt=None, baseline=None), "give --ckpt"),
    (None, None, dict(ckpt="configs/demo.py", baseline=None), "is a file"),
    (None, None, dict(ckpt="/nonexistent/run", baseline=None), "does not exist"),
    (None, None, dict(step=-1), "--step=-1"),
]


@pytest.mark.parametrize(("field", "value", "kw", "says"), EVAL_CASES,
                         ids=[f"{c[0]}={c[1]}" if c[0] else c[3] for c in EVAL_CASES])
def test_evaluation_mistakes_are_refused_before_anything_is_written(field, value, kw, says, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name files relative to the repository
    cfg = load_config(EVAL)
    cfg.model_config = "configs/gen_tiny.py"  # a baseline takes its sizes from a model config
    if field:
        _set(cfg, field, value)
    workdir = tmp_path / "eval"
    args = dict(ckpt=None, baseline="crossfade", step=None) | kw
    with pytest.raises(UserError) as err:
        check_evaluation(cfg, str(workdir), **args)
    assert says in str(err.value)
    assert not workdir.exists()


BAD_COMMANDS = [  # (command, args, message fragment)
    ("train", ["--config", "configs/gen_tiny.py", "--workdir", "{out}", "--config.checkpoint.every=0"], "every=0"),
    ("train", ["--config", "configs/gen_tiny.py", "--workdir", "{out}", "--config.optim.learning_rate=nan"], "nan"),
    ("train", ["--config", "configs/gen_tiny.py", "--workdir", "{out}", "--config.video.height=30"], "multiple of"),
    ("train", ["--config", "configs/gen_tiny.py"], "--workdir is required"),
    ("train", ["--config", "configs/gen_tiny.py", "--workdir", "{out}", "--config.no_such=1"], "no_such"),
    ("evaluate", ["--baseline", "crossfade", "--workdir", "{out}", "--config.movies.count=0"], "count=0"),
    ("evaluate", ["--ckpt", "configs/demo.py", "--workdir", "{out}"], "is a file"),
    ("evaluate", ["--workdir", "{out}"], "give --ckpt"),
    ("evaluate", ["--baseline", "crossfade", "--workdir", "{out}", "--config.model_config=x.py"], "x.py"),
    ("evaluate", ["--baseline", "crossfade", "--workdir", "{out}", "--config.movies.count=9999999",
                  "--config.model_config=configs/gen_tiny.py"], "GiB"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "args", "says"), BAD_COMMANDS, ids=[f"{c[0]}:{c[2]}" for c in BAD_COMMANDS])
def test_the_commands_print_one_line_and_write_nothing(command, args, says, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", f"director_jax.{command}", *[a.format(out=out) for a in args]],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not out.exists()
