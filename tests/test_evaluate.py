"""``python -m director_jax.evaluate`` end to end on a real (tiny, 2-step) Director-Gen checkpoint of the trainer.

The checkpoint comes from ``director_jax.train.trainer.train`` on configs/gen_tiny.py; the CLI runs
in subprocesses on 8 CPU devices, as a user runs it, sharing a JAX compilation cache so the second
run does not compile again (a cache hit runs the same executable, so it cannot hide a difference).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from director_jax.build import load_director_gen
from director_jax.configs_common import load_config
from director_jax.eval.run import run_evaluation
from director_jax.eval.scoring import PER_CASE
from director_jax.eval.suite import synthetic_cases
from director_jax.pipeline.settings import text_inputs
from tests.test_generate import save_gen_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIG = ROOT / "configs" / "eval_synthetic.py"
GEN_CONFIG = ROOT / "configs" / "gen_tiny.py"

# The suite cut to its size for a CPU test: one template (the layout gen_tiny trains on), two movies, two
# sampler steps, FVD's I3D at 64 px. Written as a config file because the CLI reads one.
TEST_CONFIG = f'''
from director_jax.configs_common import load_config


def get_config():
    c = load_config({str(EVAL_CONFIG)!r})
    c.model_config = {str(GEN_CONFIG)!r}
    c.cases = c.cases[:1]
    c.movies.count = 2
    c.sampler.steps = 2
    c.metrics.fvd_size = 64
    c.report.media_cases = 2
    return c
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """gen_tiny's random train state at step 0 (training steps would add only the train step's CPU compile; the slow
    test trains for real)."""
    return save_gen_checkpoint(tmp_path_factory.mktemp("gen_tiny"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "eval_test.py"
    path.write_text(TEST_CONFIG)
    return path


def _cli(config: Path, workdir: Path, cache: Path, *extra: str, devices: int = 8) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    cmd = [sys.executable, "-m", "director_jax.evaluate", f"--config={config}", f"--workdir={workdir}",
           "--noprogress", *extra]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def cli_runs(checkpoint, config_file, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("eval")
    cache = out / "jax_cache"
    for name in ("a", "b"):
        _cli(config_file, out / name, cache, f"--ckpt={checkpoint}")
    return out / "a", out / "b"


def test_cli_writes_metrics_and_report_and_two_runs_are_identical(cli_runs, checkpoint):
    a, b = cli_runs
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["run"]["evaluated"]["step"] == 0 and metrics["run"]["evaluated"]["weights"] == "ema"
    assert metrics["run"]["evaluated"]["checkpoint"] == str(checkpoint.absolute() / "checkpoints" / "0")
    assert [c["index"] for c in metrics["cases"]] == [0, 1]
    assert metrics["cases"][0]["keyframes"] == [0, 16] and metrics["cases"][0]["movie_seed"] == 7_000_000
    agg = metrics["aggregate"]
    for key in ("psnr", "ssim", "lpips", "keyframe_psnr", "keyframe_ssim", "keyframe_lpips", "temporal_error",
                "trajectory_error_px", "fvd"):
        assert isinstance(agg[key], float) and math.isfinite(agg[key]), key
    assert agg["fvd_clips"] == 2
    for key in PER_CASE:  # the aggregate is the mean of the cases
        assert agg[key] == pytest.approx(np.mean([c[key] for c in metrics["cases"]]), rel=1e-12), key
    report = (a / "report.html").read_text()
    assert "Director-Gen step 0 (ema)" in report and "first and last keyframe / movie 7000001" in report
    assert (a / "media" / "case_0000.png").stat().st_size > 0 and (a / "media" / "case_0001.png").exists()


def test_a_model_sharded_over_devices_gives_the_same_numbers(cli_runs, checkpoint, config_file, tmp_path):
    """--config.mesh=fsdp=2,tensor=2 on 8 devices: the model read into its shards (two groups of 4 devices, each
    generating its own cases) scores what the replicated model scores, up to float32 rounding."""
    _cli(config_file, tmp_path / "sharded", tmp_path / "cache", f"--ckpt={checkpoint}", "--config.mesh=fsdp=2,tensor=2")
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    replicated = json.loads((cli_runs[0] / "metrics.json").read_text())
    assert sharded["run"]["evaluated"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for got, want in [(sharded["aggregate"], replicated["aggregate"]),
                      *zip(sharded["cases"], replicated["cases"], strict=True)]:
        for key, value in want.items():
            if isinstance(value, float):
                # FVD of two clips (rank-deficient sets, a matrix square root) amplifies the float32 rounding
                # of a different sharding: 1.7e-5 relative measured on a 2-core AMD EPYC; see also below
                rel = 2e-4 if key.startswith("fvd") else 1e-5
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key


def test_weights_from_a_diffusers_export_score_like_the_run(cli_runs, checkpoint, config_file, tmp_path):
    """--ckpt a diffusers directory (the run's export) with --config.model_config: the run's numbers."""
    from director_jax.build import export_run

    export_run("export", "dit", str(checkpoint), str(tmp_path / "dit"))
    _cli(config_file, tmp_path / "weights", tmp_path / "cache", f"--ckpt={tmp_path / 'dit'}")
    from_weights = json.loads((tmp_path / "weights" / "metrics.json").read_text())
    from_run = json.loads((cli_runs[0] / "metrics.json").read_text())
    assert from_weights["run"]["evaluated"]["weights"] == "weights"
    for key, value in from_run["aggregate"].items():
        if isinstance(value, float):
            assert from_weights["aggregate"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@pytest.mark.slow  # a third CLI run against the storage emulator; CI runs the slow set too
def test_checkpoint_and_report_on_cloud_storage(cli_runs, checkpoint, config_file, gcs_emulator, tmp_path):
    """--ckpt and --workdir on gs://: the same numbers as from the local disk; an unfinished step is skipped."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    run = f"{gcs_emulator.bucket}/eval-{os.getpid()}"
    fs.put(str(checkpoint) + "/", f"{run}/ckpt", recursive=True)
    # a newer step without Orbax's commit_success.txt: what a run killed while writing it leaves on GCS
    for item in fs.find(f"{run}/ckpt/checkpoints/0"):
        if not item.endswith("commit_success.txt"):
            fs.copy(item, item.replace("/checkpoints/0/", "/checkpoints/5/"))
    fs.pipe(f"{run}/ckpt/checkpoints/0/commit_success.txt", b"ok")  # step 0, complete (as Orbax on GCS leaves it)
    env = dict(os.environ, **gcs_emulator.env)
    proc = subprocess.run([sys.executable, "-m", "director_jax.evaluate", f"--config={config_file}",
                           f"--workdir=gs://{run}/out", f"--ckpt=gs://{run}/ckpt", "--noprogress"],
                          env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "JAX_COMPILATION_CACHE_DIR": str(cli_runs[0].parent / "jax_cache")},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs.get(f"{run}/out/", str(tmp_path / "out"), recursive=True)
    ours = json.loads((tmp_path / "out" / "metrics.json").read_text())
    local = json.loads((cli_runs[0] / "metrics.json").read_text())
    assert ours["run"]["evaluated"].pop("checkpoint") == f"gs://{run}/ckpt/checkpoints/0"
    local["run"]["evaluated"].pop("checkpoint")
    skipped = ours["run"]["evaluated"].pop("skipped_steps")  # the uncommitted step 5, recorded as passed over
    assert local["run"]["evaluated"].pop("skipped_steps") == []
    assert all(s.startswith("step 5") for s in skipped), skipped
    assert ours == local
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "media" / "case_0001.png").is_file()


def test_baselines_score_as_expected(config_file, tmp_path):
    """The true clips get every metric's best value; the cross-fade keeps keyframes exact but misplaces objects."""
    cfg = load_config(config_file)
    cfg.cases = load_config(EVAL_CONFIG).cases  # all templates, on one movie
    cfg.movies.count = 1
    ref = run_evaluation(cfg, tmp_path / "ref", baseline="reference", progress=False)["aggregate"]
    assert ref["psnr"] == 100.0 and ref["ssim"] == pytest.approx(1.0) and ref["lpips"] < 1e-6
    assert ref["temporal_error"] == 0.0 and ref["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert ref["trajectory_error_px"] < 0.75 and ref["object_missing_fraction"] == 0.0
    xfade = run_evaluation(cfg, tmp_path / "xfade", baseline="crossfade", progress=False)
    agg = xfade["aggregate"]
    assert agg["keyframe_psnr"] == 100.0 and agg["psnr"] < 40.0
    assert agg["trajectory_error_px"] > ref["trajectory_error_px"] + 1.0
    assert agg["temporal_error"] > 0.0 and agg["fvd"] > 1.0
    assert set(xfade["by_template"]) == {t["name"] for t in cfg.cases}
    assert (tmp_path / "xfade" / "report.html").exists()


def test_suite_cases_follow_the_config():
    cfg = load_config(EVAL_CONFIG)
    cases = synthetic_cases(cfg, height=32, width=32, fps=8.0, num_frames=17)
    assert len(cases) == cfg.movies.count * len(cfg.cases)
    first, seconds, per_shot = cases[:3]
    assert first.keyframes == (0, 16) and seconds.keyframes == (0, 8, 16)  # "1s" at 8 fps is frame 8
    assert per_shot.cuts == (8,) and per_shot.keyframes == (0, 8) and per_shot.start == 16
    assert first.cuts == () and "Shot 2: a hard cut to" in per_shot.caption
    assert [c.index for c in cases] == list(range(len(cases)))
    again = synthetic_cases(cfg, height=32, width=32, fps=8.0, num_frames=17)
    np.testing.assert_array_equal(again[5].reference, cases[5].reference)


def test_bad_invocations_are_named(checkpoint, config_file, tmp_path):
    cfg = load_config(config_file)
    with pytest.raises(ValueError, match="not both"):
        run_evaluation(cfg, tmp_path, ckpt=checkpoint, baseline="crossfade")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_evaluation(cfg, tmp_path, ckpt=tmp_path / "nowhere")
    other = load_config(GEN_CONFIG)
    other.model.num_layers = 3  # not the model the checkpoint holds
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match="do not fit the model") as err:
        load_director_gen(other, checkpoint, sharding=replicated)
    assert "model_config" in str(err.value)
    gen, loaded = load_director_gen(load_config(GEN_CONFIG), checkpoint / "checkpoints", sharding=replicated,
                                    weights="params")
    assert (loaded.step, loaded.weights) == (0, "params")
    conditional = load_config(GEN_CONFIG)
    conditional.text.conditioning = True
    with pytest.raises(ValueError, match="text_cache"):
        cases = synthetic_cases(cfg, height=32, width=32, fps=8.0, num_frames=17)
        text_inputs(conditional, [c.caption for c in cases], text_cache=cfg.text_cache, guidance_scale=1.0)
    cfg.cases = (dict(name="too late", keyframes=("#0", "5s")),)
    with pytest.raises(ValueError, match="outside the video"):
        run_evaluation(cfg, tmp_path, baseline="crossfade")


@pytest.mark.slow
def test_trained_checkpoint_numbers_do_not_depend_on_the_device_count(config_file, tmp_path):
    """2 real training steps (the train CLI), then the eval CLI on 1 and on 8 devices: same cases on the same noise,
    equal up to float32 rounding (measured <= 1.1e-6 relative)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    train_cmd = [sys.executable, "-m", "director_jax.train", f"--config={GEN_CONFIG}", f"--workdir={tmp_path / 'run'}",
                 "--config.vae.init_from=random", "--config.train.steps=2", "--config.train.batch_size=2",
                 "--config.checkpoint.every=2", "--noprogress"]
    proc = subprocess.run(train_cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {}
    for devices in (1, 8):
        _cli(config_file, tmp_path / str(devices), tmp_path / "cache", f"--ckpt={tmp_path / 'run'}",
             "--config.model_config=", devices=devices)  # empty: the run's own recorded config
        runs[devices] = json.loads((tmp_path / str(devices) / "metrics.json").read_text())
    assert runs[1]["run"]["evaluated"]["step"] == 2
    one, eight = runs[1], runs[8]
    for got, want in [(one["aggregate"], eight["aggregate"]), *zip(one["cases"], eight["cases"], strict=True)]:
        for key, value in want.items():
            if isinstance(value, float):
                # the FVD interval is a percentile of 200 resampled distances of rank-deficient sets: it carries
                # the clips' float32 rounding ~20x amplified (measured 1.9e-5 relative)
                rel = 2e-4 if key.startswith("fvd_ci") else 1e-5
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key
            else:
                assert got[key] == value, key
