"""``init_from`` read straight into the shards (build/shard_init.py): the trainer's new-run state from a
diffusers export or a training run, on an 8-device mesh (fsdp 4 x data 2), per-device slice reads only."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from director_jax.build import dit_config, flatten_state
from director_jax.configs_common import load_config
from director_jax.convert import lazy
from director_jax.convert.dit import export_transformer
from director_jax.models.dit import WanDiT
from director_jax.train import state as state_lib
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.trainer import build_run

ROOT = Path(__file__).resolve().parents[1]
MESH = dict(data=2, fsdp=4, tensor=1)
Z = 4


def _gen_cfg() -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")
    cfg.vae.init_from = "random"
    cfg.mesh.update(MESH)
    return cfg


def _sr_cfg() -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "sr_tiny.py")
    cfg.video.update(dict(height=32, width=32, num_frames=9))
    cfg.vae.update(dict(base_dim=8, z_dim=Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
                        temperal_downsample=(False, True, True), latents_mean=(0.0,) * Z, latents_std=(1.0,) * Z))
    cfg.model.update(dict(in_channels=Z, out_channels=Z))
    cfg.degradation.update(dict(scales=(2,)))
    cfg.train.update(dict(keyframes=(0, 8), timelines="fixed"))
    cfg.vae.init_from = "random"
    cfg.mesh.update(MESH)
    return cfg


def _host(tree) -> dict[str, np.ndarray]:
    return {n: np.asarray(v) for n, v in flatten_state(tree).items()}


def _expected_shardings(run) -> dict[str, jax.sharding.Sharding]:
    return {n: s.sharding for n, s in flatten_state(state_lib.with_shardings(run.abstract.params,
                                                                             run.shardings.params)).items()}


class _NoReads:
    """Fails any weight read or whole-file load (inside the traced init nothing may be read)."""

    def __init__(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("a weight file was read while tracing")

        monkeypatch.setattr(lazy.LazyTensor, "read", refuse)
        monkeypatch.setattr("director_jax.build.models.load_transformer", refuse)


@pytest.fixture(scope="module")
def gen_export(tmp_path_factory):
    cfg = _gen_cfg()
    dit = WanDiT(dit_config(cfg.model), rngs=nnx.Rngs(5))
    return export_transformer(dit, tmp_path_factory.mktemp("gen") / "transformer"), dit


def test_diffusers_export_loads_into_the_shards_exactly(gen_export, monkeypatch):
    out, dit = gen_export
    cfg = _gen_cfg()
    cfg.init_from = str(out)
    with monkeypatch.context() as m:  # the graphdef, the abstract state: nothing is read
        _NoReads(m)
        run = build_run(cfg, materialize_frozen=False)
        jax.eval_shape(run.init)
    assert run.init.request() is not None and run.mesh.shape["fsdp"] == 4 and run.mesh.shape["data"] == 2
    state = state_lib.create_state(run.init, run.shardings)

    params, ema = flatten_state(state.params), _host(state.ema)
    source = {f"dit.{n}": np.asarray(v) for n, v in flatten_state(nnx.state(dit, nnx.Param)).items()}
    assert params.keys() == source.keys()
    shardings = _expected_shardings(run)
    sharded = 0
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(value), source[name], err_msg=name)
        np.testing.assert_array_equal(ema[name], source[name], err_msg=name)
        assert value.sharding.is_equivalent_to(shardings[name], value.ndim), name
        sharded += not value.sharding.is_fully_replicated
    assert sharded > 10  # fsdp really splits most parameters

    # independently of the converter's table: the safetensors file itself
    raw = load_file(out / "diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["dit.blocks.attn1.to_q.kernel"])[1],
                                  raw["blocks.1.attn1.to_q.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["dit.patch_embedding.kernel"]),
                                  raw["patch_embedding.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(np.asarray(params["dit.proj_out.bias"]), raw["proj_out.bias"])

    # the fresh optimizer state, step, key: exactly today's init (the in-trace path, still there for tools)
    today = jax.jit(run.init, out_shardings=run.shardings)()
    ours, theirs = _host(state), _host(today)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert int(state.step) == 0


def test_each_device_reads_only_its_slices(gen_export, monkeypatch):
    out, _ = gen_export
    cfg = _gen_cfg()
    cfg.init_from = str(out)
    run = build_run(cfg, materialize_frozen=False)
    reads: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    original = lazy.LazyTensor.read

    def record(self, index=None):
        part = original(self, index)
        reads.append((self.key, self.shape, part.shape))
        return part

    monkeypatch.setattr(lazy.LazyTensor, "read", record)
    state = state_lib.create_state(run.init, run.shardings)
    shardings = _expected_shardings(run)
    assert reads and all(len(full) == len(got) for _, full, got in reads)
    q = [(full, got) for key, full, got in reads if key == "blocks.0.attn1.to_q.weight"]
    assert shardings["dit.blocks.attn1.to_q.kernel"].spec != jax.sharding.PartitionSpec()
    # (64, 64) split 4 ways by fsdp: four distinct quarter reads (the data axis' replicas share them)
    assert len(q) == 4 and all(np.prod(got) == np.prod(full) // 4 for full, got in q), q
    whole = {key for key, full, got in reads if full == got}
    replicated = {n for n, s in shardings.items() if s.is_fully_replicated}
    partial = [key for key, full, got in reads if full != got]
    assert len(partial) > len(whole) and replicated  # the sharded parameters were never read whole
    for name, value in flatten_state(state.params).items():
        if not value.sharding.is_fully_replicated:
            assert value.addressable_shards[0].data.size < value.size, name


def test_sr_starts_from_a_gen_export_in_its_shards(tmp_path):
    cfg = _sr_cfg()
    gen = WanDiT(dit_config(cfg.model), rngs=nnx.Rngs(3))
    cfg.init_from = str(export_transformer(gen, tmp_path / "gen"))
    run = build_run(cfg, materialize_frozen=False)
    state = state_lib.create_state(run.init, run.shardings)
    params = _host(state.params)
    kernel = params["dit.patch_embedding.kernel"]
    np.testing.assert_array_equal(kernel[..., :Z, :], np.asarray(gen.patch_embedding.kernel.get_value()))
    assert kernel.shape[3] == 2 * Z and not kernel[..., Z:, :].any()
    for name, value in flatten_state(nnx.state(gen, nnx.Param)).items():
        if name != "patch_embedding.kernel":
            np.testing.assert_array_equal(params[f"dit.{name}"], np.asarray(value), err_msg=name)
    today = _host(jax.jit(run.init, out_shardings=run.shardings)())
    for name, value in _host(state).items():
        np.testing.assert_array_equal(value, today[name], err_msg=name)


def test_a_gen_run_restores_into_the_shards_for_gen_and_sr(tmp_path):
    gen_cfg = _gen_cfg()
    gen_cfg.optim.ema_decay = 0.9
    run = build_run(gen_cfg, materialize_frozen=False)
    state = jax.jit(run.init, out_shardings=run.shardings)()
    state = state.replace(ema=jax.tree.map(lambda x: 0.5 * x, state.ema))  # EMA and raw weights differ
    ckpt = Checkpointer(tmp_path / "gen" / "checkpoints", gen_cfg.checkpoint)
    ckpt.save(3, state, {}, {"config": gen_cfg.to_json_best_effort(), "task": "gen", "step": 3}, wait=True)
    ckpt.close()
    saved_ema = _host(state.ema)

    gen_cfg.init_from = str(tmp_path / "gen")
    run = build_run(gen_cfg, materialize_frozen=False)
    loaded = state_lib.create_state(run.init, run.shardings)
    shardings = _expected_shardings(run)
    for name, value in flatten_state(loaded.params).items():
        np.testing.assert_array_equal(np.asarray(value), saved_ema[name], err_msg=name)
        assert value.sharding.is_equivalent_to(shardings[name], value.ndim), name
    for name, value in _host(loaded.ema).items():
        np.testing.assert_array_equal(value, saved_ema[name], err_msg=name)

    sr_cfg = _sr_cfg()  # SR over the Gen run's architecture: its patch kernel gains zero low-res channels
    sr_cfg.model.update(gen_cfg.model.to_dict())
    sr_cfg.vae.update(gen_cfg.vae.to_dict())
    z = int(gen_cfg.model.in_channels)
    sr_cfg.vae.update(dict(latents_mean=(0.0,) * z, latents_std=(1.0,) * z))
    sr_cfg.init_from = str(tmp_path / "gen")
    run = build_run(sr_cfg, materialize_frozen=False)
    sr = _host(state_lib.create_state(run.init, run.shardings).params)
    for name, value in sr.items():
        if name == "dit.patch_embedding.kernel":
            np.testing.assert_array_equal(value[..., :z, :], saved_ema[name])
            assert value.shape[3] == 2 * z and not value[..., z:, :].any()
        else:
            np.testing.assert_array_equal(value, saved_ema[name], err_msg=name)
