"""Mesh creation, logical axis rules (from the config) and sharded init on 8 virtual CPU devices."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.parallel import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    axis_rules,
    constrain,
    create_mesh,
    current_rules,
    logical_to_mesh_spec,
    param_shardings,
    resolve_sizes,
    rules_from_config,
    sharded_init,
)

TINY = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=8, out_channels=8, text_dim=32,
                    freq_dim=16, ffn_dim=40, num_layers=2)

RNG = np.random.RandomState(0)
LATENTS = RNG.randn(2, 3, 4, 6, 8).astype(np.float32)
TEXT = RNG.randn(2, 7, 32).astype(np.float32)
TIMESTEP = np.array([700.0, 35.5], np.float32)


def _build() -> WanDiT:
    return WanDiT(TINY, rngs=nnx.Rngs(3))


@jax.jit(static_argnums=0)
def _forward(graphdef, state, latents, timestep, text):
    return nnx.merge(graphdef, state)(latents, timestep, text)


def _run(model):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT)))


@pytest.fixture(scope="module")
def reference():
    """The same model built under a plain jit (no shardings), on one device."""
    graphdef, _ = nnx.split(nnx.eval_shape(_build))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(_build()))())
    return model, _run(model)


# -- mesh --------------------------------------------------------------------------------------


def test_mesh_sizes_resolve():
    assert jax.device_count() == 8
    mesh = create_mesh()
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    mesh = create_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    mesh = create_mesh(MeshConfig(fsdp=1, sequence=-1))
    assert dict(mesh.shape)["sequence"] == 8
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    mesh = create_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    assert mesh.devices.shape == (1, 2, 2, 1)
    assert resolve_sizes((1, -1, 2, 1), 8) == (1, 4, 2, 1)


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": 1}, r"multiply to 3 but there are 8 devices"),
    ({"data": 3, "fsdp": -1}, r"fixed sizes multiply to 3, which does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, r"At most one mesh size may be -1"),
    ({"data": 0}, r"positive or -1"),
    ({"model": 2}, r"Unknown mesh axes \['model'\]"),
])
def test_bad_mesh_sizes_raise(sizes, message):
    with pytest.raises(ValueError, match=message):
        create_mesh(sizes)


def test_dcn_sizes_must_match_the_slices():
    # CPU devices form one slice: two slices across DCN cannot be had
    with pytest.raises(ValueError, match=r"multiply to 2 but there are 1 slices"):
        create_mesh({"fsdp": -1, "dcn": {"data": 2}})
    assert MeshConfig.from_dict({"fsdp": 4, "dcn": {"data": 2}}).dcn_sizes == (2, 1, 1, 1)


# -- rules -------------------------------------------------------------------------------------


def test_every_model_axis_name_has_a_rule():
    names = set()
    for variable in jax.tree.leaves(nnx.state(nnx.eval_shape(_build), nnx.Param),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names.update(n for n in variable.get_metadata()["out_sharding"] if n is not None)
    assert names == {"embed", "embed_out", "heads", "mlp", "text_embed", "layers"}
    assert names <= dict(DEFAULT_RULES).keys()


def test_logical_to_mesh_spec_and_fallbacks():
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_mesh_spec(("layers", "embed", "mlp")) == P(None, ("fsdp", "sequence"), "tensor")
    assert logical_to_mesh_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), "sequence", None)
    # a mesh axis is used once: the second "embed" is replicated
    assert logical_to_mesh_spec(("embed", "embed")) == P(("fsdp", "sequence"), None)
    # parameters are sharded over the sequence-parallel chips as well (fsdp=2 x sequence=2: 4 shards)
    seq_mesh = create_mesh({"fsdp": 2, "sequence": 2, "data": 2})
    assert logical_to_mesh_spec(("embed", "mlp"), mesh=seq_mesh, shape=(8, 8)) == P(("fsdp", "sequence"), None)
    # size-1 mesh axis (sequence) dropped; shapes divisible
    assert logical_to_mesh_spec(("batch", "length"), mesh=mesh, shape=(8, 16)) == P(("data", "fsdp"), None)
    # batch 2 on data=2 x fsdp=2: only "data" divides it
    assert logical_to_mesh_spec(("batch", "length"), mesh=mesh, shape=(2, 16)) == P("data", None)
    # 42 not divisible by tensor=4: replicated; 24 divisible by fsdp=2
    mesh = create_mesh({"fsdp": 2, "tensor": 4})
    assert logical_to_mesh_spec(("embed", "mlp"), mesh=mesh, shape=(24, 42)) == P("fsdp", None)
    assert logical_to_mesh_spec(("embed", "mlp"), mesh=mesh, shape=(25, 40)) == P(None, "tensor")
    with pytest.raises(ValueError, match="'emb' has no sharding rule"):
        logical_to_mesh_spec(("emb",))
    with pytest.raises(ValueError, match="do not match the rank"):
        logical_to_mesh_spec(("embed",), mesh=mesh, shape=(4, 4))


def test_divisibility_fallback_in_param_shardings():
    config = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=8, out_channels=8, text_dim=32,
                          freq_dim=16, ffn_dim=42, num_layers=2)
    mesh = create_mesh({"fsdp": 2, "tensor": 4})
    shardings = param_shardings(nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0))), mesh)
    ffn = shardings["blocks"]["ffn"]
    assert ffn["proj_in"]["kernel"].spec == P(None, "fsdp", None)  # mlp 42 % 4 != 0
    assert ffn["proj_out"]["kernel"].spec == P(None, None, "fsdp")
    assert shardings["blocks"]["attn1"]["to_q"]["kernel"].spec == P(None, "fsdp", "tensor")  # heads 24 % 4 == 0


# -- sharded init ------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}])
def test_sharded_init_matches_unsharded(sizes, reference):
    ref_model, ref_out = reference
    mesh = create_mesh(sizes)
    model = sharded_init(_build, mesh)
    params = nnx.state(model, nnx.Param)
    ref_params = nnx.state(ref_model, nnx.Param)
    split = 0
    for (path, var), (ref_path, ref_var) in zip(nnx.to_flat_state(params), nnx.to_flat_state(ref_params),
                                                strict=True):
        assert path == ref_path
        value = var.get_value()
        expected = logical_to_mesh_spec(var.get_metadata()["out_sharding"], mesh=mesh, shape=value.shape)
        assert value.sharding.mesh == mesh
        assert value.sharding.spec == expected, path
        shard_shape = value.addressable_shards[0].data.shape
        for dim, axes in enumerate(expected):
            if axes is not None:
                assert shard_shape[dim] < value.shape[dim], path
                split += 1
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref_var.get_value()), err_msg=str(path))
    assert split >= 20
    if "tensor" in sizes:
        assert params["blocks"]["attn1"]["to_q"]["kernel"].get_value().sharding.spec == P(None, "fsdp", "tensor")
    else:  # tensor=1: heads / mlp fall back to replicated
        assert params["blocks"]["ffn"]["proj_in"]["kernel"].get_value().sharding.spec == P(None, "fsdp", None)
    out = _run(model)
    assert np.abs(ref_out).max() > 0.1
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)


def test_constrain():
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    assert constrain(x, ("batch", "act_embed")) is x  # no mesh: no-op
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "act_mlp"))

    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)

    # the active table (read when tracing: a fresh jit per table) and its restoration on exit
    with jax.set_mesh(mesh), axis_rules([("batch", "tensor"), ("act_mlp", ("data", "fsdp"))]):
        assert current_rules() == (("batch", "tensor"), ("act_mlp", ("data", "fsdp")))
        y = jax.jit(lambda x: constrain(x * 2, ("batch", "act_mlp")))(x)
    assert y.sharding.spec == P("tensor", "data")  # act_mlp: data divides the 6 columns, data x fsdp does not
    assert current_rules() == DEFAULT_RULES


def test_a_user_mesh_without_some_project_axes():
    """``jax.make_mesh`` meshes with only some of the project's axes: the missing ones count as size 1 when
    placing parameters and activations (Explicit axes, make_mesh's default, are resharded, Auto ones
    constrained), while a rule naming an axis that is not a project axis still has to be on the mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "sequence"))
    assert logical_to_mesh_spec(("batch", "length", "act_embed"), mesh=mesh, shape=(2, 8, 6)) == P(
        "data", "sequence", None)
    assert logical_to_mesh_spec(("embed", "mlp"), mesh=mesh, shape=(8, 6)) == P("sequence", None)  # fsdp, tensor gone
    assert logical_to_mesh_spec(("batch", "act_heads"), mesh=jax.make_mesh((8,), ("sequence",)),
                                shape=(2, 8)) == P(None, None)
    with pytest.raises(ValueError, match=r"Rule 'x' -> 'model': the mesh has no axis 'model'; its axes are "
                                         r"\('data', 'sequence'\)\."):
        logical_to_mesh_spec(("x",), [("x", "model")], mesh=mesh, shape=(4,))
    assert logical_to_mesh_spec(("x",), [("x", "model")], mesh=jax.make_mesh((8,), ("model",)), shape=(8,)) == P(
        "model")

    x = jnp.arange(2 * 8 * 6, dtype=jnp.float32).reshape(2, 8, 6)
    for axis_types in (None, (jax.sharding.AxisType.Auto,) * 2,
                       (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto)):
        kw = {} if axis_types is None else {"axis_types": axis_types}
        with jax.set_mesh(jax.make_mesh((2, 4), ("data", "sequence"), **kw)):
            y = jax.jit(lambda x: constrain(x * 2, ("batch", "length", "act_embed")))(x)
        assert tuple(y.sharding.spec) + (None,) * (3 - len(y.sharding.spec)) == ("data", "sequence", None), axis_types
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)

    shardings = param_shardings(nnx.eval_shape(_build), mesh)
    assert shardings["blocks"]["attn1"]["to_q"]["kernel"].spec == P(None, "sequence", None)


# -- rules from the config ---------------------------------------------------------------------


def _cfg(rules) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(mesh=dict(data=2, fsdp=2, tensor=2, sequence=1, rules=rules)))


def test_config_rules_replace_the_default_rules_they_name():
    assert rules_from_config(_cfg(None)) == DEFAULT_RULES
    assert rules_from_config(ml_collections.ConfigDict(dict(seed=0))) == DEFAULT_RULES  # no mesh section
    table = rules_from_config(_cfg([["embed", "tensor"], ("batch", ["data"]), ["act_mlp", []]]))
    assert [name for name, _ in table] == [name for name, _ in DEFAULT_RULES]
    changed = {name: axes for (name, axes), (_, default) in zip(table, DEFAULT_RULES, strict=True) if axes != default}
    assert changed == {"embed": "tensor", "batch": ("data",), "act_mlp": None}


@pytest.mark.parametrize("rules, message", [
    ([["embed", "model"]], r"entry \['embed', 'model'\]: unknown mesh axis 'model'.*mesh axes are \('data', 'fsdp', "
                           r"'tensor', 'sequence'\)"),
    ([["embed", ["fsdp", "tensr"]]], r"entry \['embed', \['fsdp', 'tensr'\]\]: unknown mesh axis 'tensr'"),
    ([["embed"]], r"entry \['embed'\]: not a \[logical_name, mesh_axes\] pair.*mesh axes are"),
    (["embed"], r"entry 'embed': not a \[logical_name, mesh_axes\] pair"),
    ([["embed", 4]], r"entry \['embed', 4\]: mesh_axes must be None, a mesh axis name or a list of them"),
    ([[None, "fsdp"]], r"the logical name must be a non-empty string"),
    ([["embed", ["fsdp", "fsdp"]]], r"a mesh axis appears twice"),
    ([["embed", "fsdp"], ["embed", "tensor"]], r"entry \['embed', 'tensor'\]: a second rule for 'embed'"),
    ([["embd", "fsdp"]], r"entry \['embd', 'fsdp'\]: no model uses the logical axis 'embd'; the logical axes are "
                         r"\('embed', "),
    ("embed=tensor", r"mesh.rules must be a list of \[logical_name, mesh_axes\] pairs"),
])
def test_bad_config_rules_name_the_entry_and_the_valid_axes(rules, message):
    with pytest.raises(ValueError, match=message):
        rules_from_config(_cfg(rules))


def _constraints(lowered_text: str, shape: str) -> set[str]:
    """The shardings of the sharding constraints on ``shape`` tensors ("2x18x24") in a lowered program."""
    found = re.findall(r"sdy\.sharding_constraint [^<]*<@\w+, (\[.*?\])> : tensor<(\S+?)x?f32>", lowered_text)
    return {spec for spec, ty in found if ty == shape}


# Model width (params "embed", activations "act_embed") moved from fsdp to tensor; then replicated, with the
# batch on fsdp only. ``to_q`` is a (layers, embed, heads) kernel: a mesh axis is used once per spec, so
# with "embed" on tensor the heads fall back to replicated.
@pytest.mark.parametrize("rules, to_q, activations", [
    (None, P(None, "fsdp", "tensor"), '[{"data"}, {}, {}]'),
    ([["embed", "tensor"], ["act_embed", "tensor"]], P(None, "tensor", None), '[{"data"}, {}, {"tensor"}]'),
    ([["embed", None], ["batch", "fsdp"]], P(None, None, "tensor"), '[{"fsdp"}, {}, {}]'),
])
def test_config_rules_place_parameters_and_activations(rules, to_q, activations, reference):
    _, ref_out = reference
    table = rules_from_config(_cfg(rules))
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = sharded_init(_build, mesh, table)
    params = nnx.state(model, nnx.Param)
    assert params["blocks"]["attn1"]["to_q"]["kernel"].get_value().sharding.spec == to_q
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        assert value.sharding.spec == logical_to_mesh_spec(var.get_metadata()["out_sharding"], table, mesh=mesh,
                                                           shape=value.shape), path

    graphdef, state = nnx.split(model)
    inputs = (jnp.asarray(LATENTS), jnp.asarray(TIMESTEP), jnp.asarray(TEXT))
    forward = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))  # traced under this table only
    with jax.set_mesh(mesh), axis_rules(table):
        lowered = forward.lower(state, *inputs)
        out = np.asarray(forward(state, *inputs))
    # the DiT's (B, S, D) activations between blocks: batch 2, 3 x (4 x 6) / (2 x 2) patches = 18 tokens, width 24
    assert _constraints(lowered.as_text(), "2x18x24") == {activations}
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)


def test_trainer_uses_the_config_rules_for_state_batch_and_activations():
    """build_run places parameters, optimizer state and batch by ``mesh.rules`` and traces its step under them."""
    from director_jax.configs_common import load_config
    from director_jax.train.state import with_shardings
    from director_jax.train.trainer import abstract_batch, build_run

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gen_tiny.py")
    assert cfg.mesh.rules is None
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    cfg.mesh.rules = [["embed", "tensor"], ["act_embed", "tensor"], ["batch", "data"]]
    cfg.train.timelines = "fixed"  # a batch of one field (per-example timelines add per-row arrays)
    run = build_run(cfg, materialize_frozen=False)
    assert run.rules == rules_from_config(cfg)
    kernel = run.shardings.params["dit"]["blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.spec == P(None, "tensor", None)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(run.shardings.opt_state)
          if "to_q" in str(path) and "kernel" in str(path) and "attn1" in str(path)]
    assert mu and all(s.spec == kernel.spec for s in mu)  # Adam's moments mirror the kernel
    assert {k: s.spec for k, s in run.batch_sharding.items()} == {"video": P("data", None, None, None, None)}
    lowered = run.step_fn.lower(with_shardings(run.abstract, run.shardings), run.frozen_state, abstract_batch(run))
    # gen_tiny's DiT activations inside the step (B, S, D): batch 8 on data only, width 64 on tensor (S follows the
    # config's video and VAE: 96 tokens for 17 frames of 32x32 through its 4x VAE)
    tokens = {ty.split("x")[1] for ty in re.findall(r"tensor<(8x\d+x64)xf32>", lowered.as_text())}
    assert tokens and {spec for n in tokens for spec in _constraints(lowered.as_text(), f"8x{n}x64")} == {
        '[{"data"}, {}, {"tensor"}]'}
