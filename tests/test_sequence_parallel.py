"""Sequence-parallel attention (Ulysses, ring) and the sequence-parallel DiT against unsharded runs.

On the 8 virtual CPU devices of conftest.py: forward and gradients equal the unsharded reference
in float32, with padded keys (kv_len), on meshes mixing "sequence" with data, fsdp and tensor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from director_jax.kernels import sequence_parallel as sp
from director_jax.kernels.attention import attention
from director_jax.kernels.dispatch import xla_attention
from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.parallel.mesh import create_mesh
from director_jax.parallel.rules import param_shardings

ATOL = 2e-5
B, H, D = 2, 4, 16


def _qkv(s: int, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.randn(B, s, H, D).astype(np.float32)) for _ in range(4))  # q, k, v, do


def _loss(fn):
    return lambda q, k, v, do: jnp.sum(fn(q, k, v) * do)


# -- the attention function --------------------------------------------------------------------


def test_sequence_axis_size():
    assert sp.sequence_axis_size() == 1  # no mesh
    with jax.set_mesh(create_mesh({"fsdp": 2, "sequence": 4})):
        assert sp.sequence_axis_size() == 4
    with jax.set_mesh(create_mesh({"fsdp": 8})):
        assert sp.sequence_axis_size() == 1


def test_ring_implementation():
    assert [sp.ring_implementation(i) for i in ("xla", "blockwise", "pallas")] == ["xla", "blockwise", "pallas"]
    assert sp.ring_implementation("cudnn") == sp.ring_implementation("splash") == "pallas"  # no (o, lse) pair
    with pytest.raises(ValueError, match="no local implementation"):
        sp.ring_implementation("auto")


def test_resolve_mode():
    assert sp.resolve_mode("auto", num_heads=8, head_shards=2, n=4) == "ulysses"
    assert sp.resolve_mode("auto", num_heads=4, head_shards=2, n=4) == "ring"  # 2 local heads, 4 shards
    assert sp.resolve_mode("ring", num_heads=8, head_shards=1, n=4) == "ring"
    with pytest.raises(ValueError, match=r"use sequence_parallel='ring'"):
        sp.resolve_mode("ulysses", num_heads=6, head_shards=1, n=4)
    with pytest.raises(ValueError, match="Unknown sequence_parallel mode"):
        sp.resolve_mode("stripes", num_heads=8, head_shards=1, n=4)


# (mesh sizes, sequence length, mode, local impl). H = 4: on sequence=8 only ring applies ("auto" picks it).
CASES = [
    ({"fsdp": 1, "sequence": 8}, 64, "ring", "xla"),
    ({"fsdp": 1, "sequence": 8}, 64, "auto", "blockwise"),
    ({"data": 2, "fsdp": 1, "sequence": 4}, 96, "ulysses", "xla"),
    ({"data": 2, "fsdp": 1, "sequence": 4}, 96, "ring", "blockwise"),
    ({"fsdp": 2, "tensor": 2, "sequence": 2}, 64, "ulysses", "blockwise"),
    ({"fsdp": 2, "tensor": 2, "sequence": 2}, 64, "ring", "xla"),
]


@pytest.mark.parametrize("sizes,s,mode,impl", CASES)
def test_matches_unsharded_attention(sizes, s, mode, impl):
    q, k, v, do = _qkv(s)
    # row 0: a partially valid key shard, then fully padded ones; row 1: valid keys within shard 1
    kv_len = jnp.array([s // 2 + 5, s // 8 + 1], jnp.int32)
    ref = lambda q, k, v: xla_attention(q, k, v, kv_len=kv_len)  # noqa: E731
    ours = lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl=impl, sequence_parallel=mode)  # noqa: E731
    expected = ref(q, k, v)
    expected_grads = jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v, do)

    mesh = create_mesh(sizes)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), "sequence", "tensor", None))
    q, k, v, do = jax.device_put((q, k, v, do), sharding)
    with jax.set_mesh(mesh):
        forward = jax.jit(ours, in_shardings=sharding, out_shardings=sharding)
        out = forward(q, k, v)
        grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)), in_shardings=sharding)(q, k, v, do)
        hlo = forward.lower(q, k, v).as_text()
    resolved = "ring" if mode == "auto" else mode
    assert ("collective_permute" if resolved == "ring" else "all_to_all") in hlo
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"d{name}")


def test_ulysses_runs_a_kernel_inside_its_shard_map():
    # the Pallas kernel (interpreted on the CPU) must not be re-sharded inside Ulysses' shard_map: local
    # batch 2 and 2 heads per device would divide by data=2 again if it were
    rng = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rng.randn(4, 32, 8, D).astype(np.float32)) for _ in range(3))
    kv_len = jnp.array([32, 9, 20, 1], jnp.int32)
    with jax.set_mesh(create_mesh({"data": 2, "fsdp": 1, "sequence": 4})):
        out = jax.jit(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl="pallas", sequence_parallel="ulysses"))(
            q, k, v)
    np.testing.assert_allclose(out, xla_attention(q, k, v, kv_len=kv_len), atol=ATOL, rtol=0)


def test_errors_name_the_fix():
    q, k, v, _ = _qkv(64)
    with jax.set_mesh(create_mesh({"fsdp": 1, "sequence": 8})):
        with pytest.raises(ValueError, match=r"use sequence_parallel='ring' \(or 'auto'\)"):
            attention(q, k, v, impl="xla", sequence_parallel="ulysses")  # 4 heads on 8 sequence shards
        with pytest.raises(ValueError, match="pad the tokens to a multiple of 8"):
            attention(q[:, :60], k[:, :60], v[:, :60], impl="xla", sequence_parallel="ring")


def test_no_mesh_is_local_attention():
    q, k, v, _ = _qkv(64)
    np.testing.assert_array_equal(attention(q, k, v, impl="xla", sequence_parallel="ring"), xla_attention(q, k, v))


@pytest.mark.parametrize("mesh, what", [
    (lambda: create_mesh({"fsdp": 8}), r"\{'data': 1, 'fsdp': 8, 'tensor': 1, 'sequence': 1\}: its 'sequence' axis "
                                       "has size 1"),
    (lambda: jax.make_mesh((8,), ("data",)), r"\{'data': 8\}: it has no 'sequence' axis"),
])
def test_a_mesh_without_a_sequence_axis_says_so(mesh, what):
    """Asked for on a mesh that cannot do it, ring and Ulysses raise one line naming the mesh; "auto" is local."""
    q, k, v, _ = _qkv(64)
    with jax.set_mesh(mesh()):
        for mode in ("ring", "ulysses"):
            with pytest.raises(ValueError, match=rf"^sequence_parallel='{mode}' needs a 'sequence' mesh axis of size "
                                                 rf"> 1, but the active mesh is {what}\. Use a mesh with one") as err:
                attention(q, k, v, impl="xla", sequence_parallel=mode)
            assert "\n" not in str(err.value)
        out = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla", sequence_parallel="auto"))(q, k, v)
    np.testing.assert_allclose(out, xla_attention(q, k, v), atol=ATOL, rtol=0)


# -- a user's own mesh: any axes, as long as one is "sequence" -------------------------------------------------

USER_MESHES = {
    "data=2 x sequence=4": lambda: jax.make_mesh((2, 4), ("data", "sequence")),  # Explicit axes (make_mesh's default)
    "sequence=8": lambda: jax.make_mesh((8,), ("sequence",)),
    "data=2 x sequence=4, Auto axes": lambda: jax.make_mesh((2, 4), ("data", "sequence"),
                                                            axis_types=(jax.sharding.AxisType.Auto,) * 2),
}


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sequence=8" else n
                                  for n in USER_MESHES])  # sequence=8 in the slow set: the 2 x 4 meshes cover it
def test_user_meshes_match_unsharded_attention(name, mode):
    """The README example: a mesh without the project's fsdp / tensor axes (its rules drop them), inputs not
    placed beforehand. 8 heads so that Ulysses splits them over sequence=8 too."""
    rng = np.random.RandomState(3)
    q, k, v, do = (jnp.asarray(rng.randn(B, 64, 8, D).astype(np.float32)) for _ in range(4))
    kv_len = jnp.array([37, 9], jnp.int32)  # padded keys: a partially valid shard, then empty ones
    ref = lambda q, k, v: xla_attention(q, k, v, kv_len=kv_len)  # noqa: E731
    ours = lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl="xla", sequence_parallel=mode)  # noqa: E731
    expected = ref(q, k, v)
    expected_grads = jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v, do)
    mesh = USER_MESHES[name]()
    with jax.set_mesh(mesh):
        forward = jax.jit(ours)
        out = forward(q, k, v)
        grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v, do)
        hlo = forward.lower(q, k, v).as_text()
        eager = ours(q, k, v)  # the README snippet runs outside jit
    assert ("collective_permute" if mode == "ring" else "all_to_all") in hlo
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(eager, expected, atol=ATOL, rtol=0)
    for name_, got, want in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"d{name_}")


def test_pallas_kernel_on_a_user_mesh():
    """Without sequence parallelism the Pallas kernel runs per (batch, heads) shard: "batch" goes on the user
    mesh's "data" axis, the project axes it lacks (fsdp, tensor) are dropped."""
    q, k, v, _ = _qkv(32)
    kv_len = jnp.array([32, 7], jnp.int32)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "sequence"))):
        out = jax.jit(lambda q, k, v: attention(q, k, v, kv_len=kv_len, impl="pallas"))(q, k, v)
    np.testing.assert_allclose(out, xla_attention(q, k, v, kv_len=kv_len), atol=ATOL, rtol=0)


# -- the DiT -------------------------------------------------------------------------------------

TINY = WanDiTConfig(num_attention_heads=4, attention_head_dim=12, in_channels=8, out_channels=8, text_dim=32,
                    freq_dim=16, ffn_dim=40, num_layers=1)
RNG = np.random.RandomState(1)
TEXT = RNG.randn(2, 5, 32).astype(np.float32)
# 18 tokens (F=3, 2x3 patches per frame): padded to 20 on sequence=4 and to 24 on sequence=8
# (a fully padded shard); 16 tokens (F=2, 2x4 patches) divide evenly.
GRIDS = {18: RNG.randn(2, 3, 4, 6, 8).astype(np.float32), 16: RNG.randn(2, 2, 4, 8, 8).astype(np.float32)}
TIMESTEPS = {
    "shared": np.array([10.0, 700.0], np.float32),
    "per_frame": np.array([[0.0, 500.0, 900.0], [100.0, 200.0, 300.0]], np.float32),
    "per_token": RNG.uniform(0, 1000, (2, 18)).astype(np.float32),
}


@jax.jit(static_argnums=0)
def _forward(graphdef, state, latents, timestep, text):
    return nnx.merge(graphdef, state)(latents, timestep, text)


@pytest.fixture(scope="module")
def reference():
    model = WanDiT(TINY, rngs=nnx.Rngs(0), attention_impl="xla")
    return nnx.graphdef(model), nnx.state(model)


def _sharded_run(state, sizes, mode, tokens, timestep, *, grad=False):
    build = lambda: WanDiT(TINY, rngs=nnx.Rngs(0), attention_impl="xla", sequence_parallel=mode)  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    mesh = create_mesh(sizes)
    state = jax.device_put(state, param_shardings(state, mesh))
    args = (GRIDS[tokens], TIMESTEPS[timestep], TEXT)
    with jax.set_mesh(mesh):
        if grad:
            return jax.jit(jax.grad(_param_loss, argnums=1), static_argnums=0)(graphdef, state, *args)
        return _forward(graphdef, state, *args)


def _param_loss(graphdef, state, latents, timestep, text):
    out = nnx.merge(graphdef, state)(latents, timestep, text)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))


@pytest.mark.parametrize("sizes,mode,tokens,timestep", [
    ({"fsdp": 2, "sequence": 4}, "ulysses", 18, "per_frame"),
    ({"fsdp": 2, "tensor": 2, "sequence": 2}, "auto", 16, "shared"),
    ({"fsdp": 1, "sequence": 8}, "ring", 18, "per_token"),
])  # ring on fsdp=2 x sequence=4, per-frame timesteps: the gradient test
def test_dit_matches_unsharded(reference, sizes, mode, tokens, timestep):
    graphdef, state = reference
    expected = _forward(graphdef, state, GRIDS[tokens], TIMESTEPS[timestep], TEXT)
    out = _sharded_run(state, sizes, mode, tokens, timestep)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


def test_dit_parameter_gradients_match_unsharded(reference):
    graphdef, state = reference
    args = (GRIDS[18], TIMESTEPS["per_frame"], TEXT)
    expected = jax.jit(jax.grad(_param_loss, argnums=1), static_argnums=0)(graphdef, state, *args)
    grads = _sharded_run(state, {"fsdp": 2, "sequence": 4}, "ring", 18, "per_frame", grad=True)
    flat, flat_expected = nnx.to_flat_state(grads), dict(nnx.to_flat_state(expected))
    for path, value in flat:
        want = flat_expected[path]
        np.testing.assert_allclose(value[...], want[...], atol=ATOL * max(1.0, float(np.abs(want[...]).max())),
                                   rtol=0, err_msg=str(path))


def test_dit_without_sequence_axis_does_not_pad():
    model = WanDiT(TINY, rngs=nnx.Rngs(0), sequence_parallel="ring")
    assert model._sequence_padding(18) == 0
    with jax.set_mesh(create_mesh({"fsdp": 2, "sequence": 4})):
        assert model._sequence_padding(18) == 2 and model._sequence_padding(16) == 0
    with pytest.raises(ValueError, match="Unknown sequence_parallel"):
        WanDiT(TINY, rngs=nnx.Rngs(0), sequence_parallel="stripes")
