"""Mesh creation, logical axis rules and sharded init on 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.parallel import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    constrain,
    create_mesh,
    logical_to_mesh_spec,
    param_shardings,
    resolve_sizes,
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
