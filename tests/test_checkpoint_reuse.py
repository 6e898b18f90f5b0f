"""Any training run is reusable: a VAE run as the frozen VAE of a Gen / SR run (``vae.init_from``), a Gen run as
the start of a Gen or SR run, an SR run continued (``init_from``), and any run exported for diffusers
(``python -m director_jax.convert export --src RUN``), with the latent statistics the VAE run measured.

Every run here is the real trainer (``director_jax.train.trainer.train``) on the tiny configs, shrunk to
a few steps on one device; every comparison is against the arrays the trainer saved, read back with
Orbax directly, or against diffusers.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from flax import nnx

from director_jax.build import (
    LATENT_STATS,
    build_director_gen,
    build_director_sr,
    export_run,
    flatten_state,
    frozen_vae,
    read_run_for_export,
    vae_config_with_checkpoint_stats,
)
from director_jax.configs_common import load_config
from director_jax.errors import UserError
from director_jax.models.sr import DirectorSR
from director_jax.train import state as state_lib
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.latent_stats import DECAY
from director_jax.train.tasks import make_task
from director_jax.train.trainer import build_run, make_data, train
from tests.torch_reference import reference_encode, reference_transformer_forward

ROOT = Path(__file__).resolve().parents[1]
VAE_STEPS, GEN_STEPS = 3, 2

# the tests read whole steps back with Orbax directly, onto the sharding they were saved with
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")


def _vae_cfg() -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "vae_tiny.py")
    cfg.train.update(dict(steps=VAE_STEPS, batch_size=2, log_every=1))
    cfg.optim.update(dict(warmup_steps=0, ema_decay=0.0))  # learn from step 1; raw weights (the EMA path: Gen's)
    cfg.mesh.update(dict(data=1, fsdp=1))
    cfg.checkpoint.update(dict(every=1, keep_last=10, async_save=False))
    return cfg


def _gen_cfg(vae_run: Path) -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")  # its VAE section is vae_tiny's architecture
    cfg.vae.init_from = str(vae_run)
    cfg.train.update(dict(steps=GEN_STEPS, batch_size=2, log_every=1))
    cfg.optim.update(dict(warmup_steps=0, ema_decay=0.9))
    cfg.mesh.update(dict(data=1, fsdp=1))
    cfg.checkpoint.update(dict(every=GEN_STEPS, keep_last=10, keep_every=0, async_save=False))
    return cfg


def _sr_cfg(gen_cfg: ml_collections.ConfigDict, init_from: str) -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "sr_tiny.py")
    cfg.model = ml_collections.ConfigDict(gen_cfg.model.to_dict())  # the Gen architecture it starts from
    cfg.vae.init_from = gen_cfg.vae.init_from
    cfg.init_from = init_from
    cfg.mesh.update(dict(data=1, fsdp=1))
    return cfg


def _saved(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a step's train state, read with Orbax directly (not through the code under test)."""
    restored = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    return {k: np.asarray(v) for k, v in restored.items()}


def _weights(module: nnx.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_state(nnx.state(module, nnx.Param)).items()}


def _assert_weights(module: nnx.Module, saved: dict[str, np.ndarray], prefix: str) -> None:
    ours = _weights(module)
    theirs = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def _stats(saved: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) from a step's stored EMA sums, in float64."""
    w = float(saved[f"{LATENT_STATS}.weight"])
    mean = saved[f"{LATENT_STATS}.mean"].astype(np.float64) / w
    sq = saved[f"{LATENT_STATS}.mean_sq"].astype(np.float64) / w
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VAE run (3 steps, a checkpoint each) and a Gen run (2 steps) encoding with it as its frozen VAE."""
    root = tmp_path_factory.mktemp("runs")
    devices = jax.devices()[:1]
    vae_result = train(_vae_cfg(), root / "vae", devices=devices, progress=False)
    gen_cfg = _gen_cfg(root / "vae")
    gen_result = train(gen_cfg, root / "gen", devices=devices, progress=False)
    return dict(vae=root / "vae", gen=root / "gen", gen_cfg=gen_cfg, vae_result=vae_result, gen_result=gen_result)


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / str(step)


# ------------------------------------------------------------------------------------------------
# A VAE run as the frozen VAE of a Gen / SR run


def test_vae_run_is_the_frozen_vae_with_its_own_latent_statistics(runs):
    cfg = ml_collections.ConfigDict(runs["gen_cfg"].to_dict())
    newest = _saved(_step(runs["vae"], VAE_STEPS))
    assert f"{LATENT_STATS}.mean" in newest and not any(k.startswith("ema.") for k in newest)  # ema_decay = 0
    mean, std = _stats(newest)
    # the workdir, its checkpoints/ folder: the newest step; a step directory: that step
    for path, step in ((runs["vae"], VAE_STEPS), (runs["vae"] / "checkpoints", VAE_STEPS), (_step(runs["vae"], 2), 2)):
        cfg.vae.init_from = str(path)
        vae = frozen_vae(cfg)
        saved = newest if step == VAE_STEPS else _saved(_step(runs["vae"], step))
        _assert_weights(vae, saved, "params")
        step_mean, step_std = _stats(saved)
        np.testing.assert_allclose(vae.config.latents_mean, step_mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(vae.config.latents_std, step_std, rtol=1e-12, atol=0)
    config = vae_config_with_checkpoint_stats(runs["gen_cfg"].vae)  # what the Gen task normalises with
    np.testing.assert_allclose(config.latents_mean, mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(config.latents_std, std, rtol=1e-12, atol=0)
    assert make_task(runs["gen_cfg"]).vae_config == config
    assert np.all(std > 0.01) and not np.allclose(config.latents_mean, 0)  # real, per-channel statistics


@jax.jit(static_argnums=0)
def _posterior_mean(graphdef, state, video):
    return nnx.merge(graphdef, state).encode(video)[0]


def test_latent_statistics_are_the_ema_of_the_posterior_means_of_the_training_batches(runs):
    """Step k's statistics = DECAY * step k-1's + (1 - DECAY) * the moments of batch k's posterior means under the
    weights of step k-1, recomputed here in float64 NumPy from the same batches (the data order is the run's).

    Tolerance 1e-5 relative: the step computes the moments in float32 inside the jitted train step, this
    test in float64 from a separately compiled encoder; they differ by float32 rounding (the stored
    sums are ~1e-2, off by ~1e-9 here), while one step's own contribution is ~5e-3: a wrong batch, wrong
    weights or a wrong decay would be off by ~1e-4 relative or more.
    """
    cfg = _vae_cfg()
    data = make_data(build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False))
    batches = [next(data) for _ in range(VAE_STEPS)]
    for step, batch in enumerate(batches, 1):  # the same examples as the run's steps
        assert [int(i) for i in batch["index"]] == runs["vae_result"].data_indices[step]
    saved = {s: _saved(_step(runs["vae"], s)) for s in range(1, VAE_STEPS + 1)}
    names = [f"{LATENT_STATS}.{k}" for k in ("mean", "mean_sq", "weight")]
    np.testing.assert_allclose(saved[1][names[2]], 1 - DECAY, rtol=1e-6)  # one step seen
    expected = {}
    for step in range(2, VAE_STEPS + 1):
        source = ml_collections.ConfigDict(runs["gen_cfg"].to_dict())
        source.vae.init_from = str(_step(runs["vae"], step - 1))
        graphdef, state = nnx.split(frozen_vae(source))
        mu = np.asarray(_posterior_mean(graphdef, state, jnp.asarray(batches[step - 1]["video"])), np.float64)
        axes = tuple(range(mu.ndim - 1))
        moments = (mu.mean(axis=axes), (mu * mu).mean(axis=axes), 1.0)
        for name, x in zip(names, moments, strict=True):
            expected[name] = DECAY * saved[step - 1][name].astype(np.float64) + (1 - DECAY) * x
            np.testing.assert_allclose(saved[step][name], expected[name], rtol=1e-5, atol=1e-9,
                                       err_msg=f"step {step} {name}")
    # the latents_mean / latents_std a Gen run normalises with: the mean and std those moments give
    mean = expected[names[0]] / expected[names[2]]
    std = np.sqrt(expected[names[1]] / expected[names[2]] - mean ** 2)
    config = vae_config_with_checkpoint_stats(runs["gen_cfg"].vae)
    np.testing.assert_allclose(config.latents_mean, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(config.latents_std, std, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~20 s: two more VAE runs; CI runs the slow set
def test_latent_statistics_resume_exactly(runs, tmp_path, caplog):
    """Stopped after step 2 and resumed, the run writes step 3's statistics (and weights) bit for bit; a VAE step
    saved before the task kept statistics resumes with them empty (weight 0), with one warning."""
    workdir = tmp_path / "vae"
    shutil.copytree(runs["vae"], workdir)
    shutil.rmtree(_step(workdir, VAE_STEPS))
    result = train(_vae_cfg(), workdir, devices=jax.devices()[:1], progress=False)
    assert sorted(result.losses) == [VAE_STEPS]  # resumed from step 2
    ours, theirs = _saved(_step(workdir, VAE_STEPS)), _saved(_step(runs["vae"], VAE_STEPS))
    for name in theirs:
        if name.startswith(("params.", LATENT_STATS)):
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

    cfg = _vae_cfg()
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    target = state_lib.with_shardings(run.abstract, run.shardings)
    old = Checkpointer(tmp_path / "old" / "checkpoints", cfg.checkpoint)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    try:
        state, data_state, meta = ckpt.restore(2, target)
        old.save(2, state.replace(latent_stats=None), data_state, meta, wait=True)
        with caplog.at_level(logging.WARNING):
            restored, _, _ = old.restore(2, target)
    finally:
        ckpt.close()
        old.close()
    assert [r for r in caplog.records if "predates latent_stats.mean" in r.getMessage()]
    assert float(restored.latent_stats["weight"]) == 0.0 and not np.asarray(restored.latent_stats["mean"]).any()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # another VAE run (~1 min on 2 cores); CI runs the slow set too
def test_latent_statistics_do_not_depend_on_mesh_or_micro_batches(runs, tmp_path):
    cfg = _vae_cfg()
    cfg.train.update(dict(steps=1, micro_batches=2))
    cfg.mesh.update(dict(data=2, fsdp=1))
    train(cfg, tmp_path / "split", devices=jax.devices()[:2], progress=False)
    ours, theirs = _saved(_step(tmp_path / "split", 1)), _saved(_step(runs["vae"], 1))
    for name in (f"{LATENT_STATS}.{k}" for k in ("mean", "mean_sq", "weight")):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------
# A Gen run as the start of a Gen or SR run; an SR run continued


def test_gen_run_trains_on_the_vae_run_and_starts_gen_and_sr_runs(runs):
    result = runs["gen_result"]
    assert result.final_step == GEN_STEPS and all(np.isfinite(v) for v in result.losses.values())
    saved = _saved(_step(runs["gen"], GEN_STEPS))
    assert not any(k.startswith(LATENT_STATS) for k in saved)  # Gen checkpoints hold what they always held

    cfg = ml_collections.ConfigDict(runs["gen_cfg"].to_dict())
    cfg.init_from = str(runs["gen"])
    gen = build_director_gen(cfg)
    _assert_weights(gen, saved, "ema")  # the EMA, which the run kept
    # the trainer's own init (under jax.jit, sharded) starts from the same weights
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    state = jax.jit(run.init, out_shardings=run.shardings)()
    for name, value in flatten_state(state.params).items():
        np.testing.assert_array_equal(np.asarray(value), saved[f"ema.{name}"], err_msg=name)

    sr = build_director_sr(_sr_cfg(cfg, str(runs["gen"])))
    expected = _weights(DirectorSR.from_gen(gen))
    ours = _weights(sr)
    assert ours.keys() == expected.keys()
    for name, value in ours.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.fixture(scope="module")
def sr_run(runs, tmp_path_factory):
    """An SR checkpoint as the trainer writes one (its Checkpointer, its init, its meta), without training it."""
    workdir = tmp_path_factory.mktemp("sr")
    cfg = _sr_cfg(runs["gen_cfg"], "")
    cfg.optim.ema_decay = 0.9
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    state = jax.jit(run.init, out_shardings=run.shardings)()
    state = state.replace(ema=jax.tree.map(lambda x: 0.5 * x, state.ema))  # EMA and raw weights differ
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(7, state, {}, {"config": cfg.to_json_best_effort(), "task": "sr", "step": 7}, wait=True)
    ckpt.close()
    return workdir, cfg


def test_sr_run_continues_and_exports(sr_run, tmp_path):
    workdir, cfg = sr_run
    saved = _saved(_step(workdir, 7))
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.init_from = str(workdir)
    sr = build_director_sr(cfg)
    _assert_weights(sr, saved, "ema")

    line = export_run("export", "sr", workdir, tmp_path / "sr", weights="params")
    assert "the params weights of step 7 of the sr run" in line
    loaded, info = WanTransformer3DModel.from_pretrained(tmp_path / "sr", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    exported, _, _ = read_run_for_export("sr", workdir, weights="params")
    _assert_weights(exported, saved, "params")
    _assert_same_transformer(exported.dit, loaded.eval())


# ------------------------------------------------------------------------------------------------
# convert export: diffusers loads what a run wrote, and computes what this project computes


RNG = np.random.RandomState(0)
VIDEO = RNG.uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)


def _assert_same_transformer(dit, reference) -> None:
    c = dit.config
    latents = RNG.randn(1, 2, 4, 4, c.in_channels).astype(np.float32)
    text = RNG.randn(1, 5, c.text_dim).astype(np.float32)
    timestep = np.array([640.0], np.float32)
    graphdef, state = nnx.split(dit)
    ours = nnx.merge(graphdef, state)(jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(text))
    expected = reference_transformer_forward(reference, latents, timestep, text)
    assert np.abs(expected).max() > 0.05  # a real signal
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_export_vae_run_for_diffusers_with_its_latent_statistics(runs, tmp_path):
    line = export_run("export", "vae", runs["vae"], tmp_path / "vae")
    assert line.startswith("exported vae: ") and f"params weights of step {VAE_STEPS} of the vae run" in line
    model, info = AutoencoderKLWan.from_pretrained(tmp_path / "vae", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    mean, std = _stats(_saved(_step(runs["vae"], VAE_STEPS)))
    np.testing.assert_allclose(model.config["latents_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(model.config["latents_std"], std, rtol=1e-12)
    vae, _, _ = read_run_for_export("vae", runs["vae"])
    graphdef, state = nnx.split(vae)
    ours = np.asarray(_posterior_mean(graphdef, state, jnp.asarray(VIDEO)))
    theirs, _ = reference_encode(model.eval(), VIDEO)
    assert np.abs(theirs).max() > 0.05
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_export_gen_run_for_diffusers(runs, tmp_path):
    line = export_run("export", "dit", runs["gen"], tmp_path / "dit")
    assert f"the ema weights of step {GEN_STEPS} of the gen run" in line
    loaded, info = WanTransformer3DModel.from_pretrained(tmp_path / "dit", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    dit, _, _ = read_run_for_export("dit", runs["gen"])
    _assert_weights(dit, {k.replace("ema.dit.", "ema.", 1): v for k, v in
                          _saved(_step(runs["gen"], GEN_STEPS)).items()}, "ema")
    _assert_same_transformer(dit, loaded.eval())


# ------------------------------------------------------------------------------------------------
# Errors: one line naming the problem and the fix


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_errors_name_the_problem_and_the_fix(runs, tmp_path):
    cfg = ml_collections.ConfigDict(runs["gen_cfg"].to_dict())
    # an empty workdir (the trainer made its checkpoints/ but never finished a step)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    cfg.vae.init_from = str(tmp_path / "empty")
    with pytest.raises(UserError) as e:
        frozen_vae(cfg)
    assert "config.vae.init_from=" in _one_line(e) and "no complete checkpoint step" in str(e.value)
    assert "train first" in str(e.value)
    # a step whose save never finished
    partial = tmp_path / "partial" / "checkpoints"
    shutil.copytree(_step(runs["vae"], VAE_STEPS), partial / str(VAE_STEPS))
    (partial / str(VAE_STEPS) / "commit_success.txt").unlink()
    cfg.vae.init_from = str(partial.parent)
    with pytest.raises(UserError) as e:
        vae_config_with_checkpoint_stats(cfg.vae)
    assert "save never finished" in _one_line(e)
    # a run of another task as the VAE, and as the start of a Gen run
    cfg.vae.init_from = str(runs["gen"])
    with pytest.raises(UserError) as e:
        frozen_vae(cfg)
    assert "is a Director-Gen training run (task 'gen'), not a VAE run" in _one_line(e)
    assert "AutoencoderKLWan directory" in str(e.value)
    gen = ml_collections.ConfigDict(runs["gen_cfg"].to_dict())
    gen.init_from = str(runs["vae"])
    with pytest.raises(UserError) as e:
        build_director_gen(gen)
    assert "config.init_from=" in _one_line(e) and "is a VAE training run (task 'vae')" in str(e.value)
    # a Gen run of another architecture than config.model: the fields named
    gen.init_from, gen.model.num_layers = str(runs["gen"]), 3
    with pytest.raises(UserError) as e:
        build_director_gen(gen)
    assert "another architecture than config.model: num_layers=2 (config: 3)" in _one_line(e)
    # a VAE of another architecture than config.vae: the fields named
    cfg.vae.init_from = str(runs["vae"])
    cfg.vae.base_dim, cfg.vae.num_res_blocks = 8, 2
    with pytest.raises(UserError) as e:
        frozen_vae(cfg)
    assert "base_dim=16 (config: 8), num_res_blocks=1 (config: 2)" in _one_line(e)
    assert "--config.vae.<field>" in str(e.value)
    # EMA asked of a run that kept none; a VAE run exported as a DiT
    with pytest.raises(UserError) as e:
        export_run("export", "vae", runs["vae"], tmp_path / "out", weights="ema")
    assert "holds no EMA weights" in _one_line(e) and "--weights params" in str(e.value)
    with pytest.raises(UserError) as e:
        export_run("export", "dit", runs["vae"], tmp_path / "out")
    assert "is a VAE training run (task 'vae'), not a Director-Gen run: export it with --model vae" in _one_line(e)
    assert not (tmp_path / "out").exists()  # nothing written


def _error_line(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_commands_report_a_run_of_another_task_in_one_line(runs, tmp_path):
    """The command lines: ``error: ...`` on one line, exit code 2, nothing written."""
    out = tmp_path / "out"
    line = _error_line(["director_jax.convert", "export", "--model", "sr", "--src", str(runs["gen"]), "--out",
                        str(out)])
    assert "is a Director-Gen training run (task 'gen'), not a Director-SR run: export it with --model dit" in line
    line = _error_line(["director_jax.train", f"--config={ROOT / 'configs' / 'gen_tiny.py'}", f"--workdir={out}",
                        f"--config.vae.init_from={runs['gen']}"])
    assert "is a Director-Gen training run (task 'gen'), not a VAE run" in line
    assert not out.exists()
