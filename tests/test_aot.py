"""Compile-only (AOT) reports for a TPU topology, compiled from the CPU test machine with libtpu."""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compute_on import compute_on
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from director_jax.parallel.chips import chip_spec
from director_jax.train import aot

TOPOLOGY = "v5p:2x2x1"


@pytest.fixture(scope="module")
def mesh():
    return aot.topology_mesh(TOPOLOGY, {"fsdp": -1})


def _shard_bytes(arg: jax.ShapeDtypeStruct) -> int:
    return math.prod(arg.sharding.shard_shape(arg.shape)) * jnp.dtype(arg.dtype).itemsize


def test_topology_devices_and_mesh(mesh):
    devices = aot.topology_devices(TOPOLOGY)
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    assert chip_spec(devices[0]).name == "TPU v5p"
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
    assert len(aot.topology_devices("v4:2x2x1")) == 4  # megacore: one device per chip, as on a real v4


def test_sharded_matmul_report(mesh):
    m, k, n = 512, 1024, 2048
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
    w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    out = NamedSharding(mesh, P("fsdp", None))
    fn = jax.jit(lambda x, w: jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32), out_shardings=out)

    report = aot.compile_report(fn, x, w, topology=TOPOLOGY)

    assert report.num_devices == 4 and report.device_kind == "TPU v5"
    assert report.argument_bytes == _shard_bytes(x) + _shard_bytes(w) == (m * k * 2 + k * n * 4) // 4
    assert report.output_bytes == m * n * 4 // 4
    assert report.peak_bytes >= report.argument_bytes + report.output_bytes
    assert report.total_bytes == report.peak_bytes + report.generated_code_bytes
    # cost_analysis is of the partitioned program: one device's share of 2*M*N*K.
    assert report.flops == pytest.approx(2 * m * n * k / 4, rel=0.01)
    assert report.global_flops == pytest.approx(2 * m * n * k, rel=0.01)
    assert report.hbm_bytes == chip_spec("TPU v5p").hbm_bytes and report.fits
    aot.check_fits(report)
    text = aot.format_report(report)
    assert "v5p:2x2x1: 4 x TPU v5" in text and "TFLOP" in text and "MiB" in text


def test_host_memory_arguments_are_not_counted_as_hbm(mesh):
    """XLA's peak counts arguments and outputs in pinned host memory too (a program of host buffers alone
    reports their size): the report takes them out of the HBM peak and shows them as host bytes."""
    n = 2**20  # 4 MiB of float32 per device
    device = NamedSharding(mesh, P("fsdp"))
    host = device.with_memory_kind("pinned_host")
    x = jax.ShapeDtypeStruct((4 * n,), jnp.float32, sharding=device)
    h = jax.ShapeDtypeStruct((4 * n,), jnp.float32, sharding=host)

    def step(x, h):  # x on the chips, h updated on the host from a copy of x (the host-memory EMA's pattern)
        x = x + 1
        return x, _host_update(h, jax.device_put(x, jax.memory.Space.Host))

    fn = jax.jit(step, out_shardings=(device, host), donate_argnums=(0, 1))
    report = aot.compile_report(fn, x, h, topology=TOPOLOGY, mesh=mesh)
    shard = n * 4  # bytes of one device's quarter of x (and of h)
    assert report.host_bytes == shard  # h: in and out, donated, counted once
    assert report.argument_bytes == shard and shard <= report.peak_bytes < shard + 64 * 1024  # HBM: x (+ staging)


_host_update = compute_on("device_host")(jax.jit(lambda h, x: 0.9 * h + 0.1 * x))


def test_check_fits_raises_when_arguments_exceed_hbm(mesh):
    per_device = 60 * aot.GIB  # two of them: 120 GiB per chip, over v5p's 95 GB
    arg = jax.ShapeDtypeStruct((4 * per_device // 4,), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    report = aot.compile_report(jax.jit(lambda a, b: a[:8] + b[:8]), arg, arg, topology=TOPOLOGY)
    assert report.argument_bytes == 2 * per_device
    assert not report.fits
    with pytest.raises(aot.HbmOverflowError, match=r"(?s)GiB per device.*HBM.*fsdp.*full.*batch.*sequence"):
        aot.check_fits(report)
    assert "NO" in aot.format_report(report)


@pytest.mark.parametrize("name", ["v5p-8", "bogus", "v9z:2x2"])
def test_bad_topology_names(name):
    with pytest.raises(ValueError, match=r"Unknown TPU topology.*v5p:2x2x1.*v6e:2x2"):
        aot.topology_devices(name)


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(aot, "_libtpu_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install libtpu==0\.0\.42\.1"):
        aot.topology_devices(TOPOLOGY)


def test_scan_body_flops_counted_once(mesh):
    """Pins XLA's convention the report documents: a while loop's body is counted once, not per trip."""
    m = 256
    x = jax.ShapeDtypeStruct((m, m), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

    def flops(layers: int) -> float:
        ws = jax.ShapeDtypeStruct((layers, m, m), jnp.float32, sharding=NamedSharding(mesh, P()))
        fn = jax.jit(lambda x, ws: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0])
        return aot.compile_report(fn, x, ws, topology=TOPOLOGY).flops

    assert flops(8) == pytest.approx(flops(2), rel=0.05) == pytest.approx(2 * m**3 / 4, rel=0.05)


@pytest.mark.slow  # ~40 s AOT compile of the real 1.3B step; CI runs the slow set
def test_compile_only_train_step_of_gen_1_3b_at_480p_on_v5p():
    """The real 1.3B Director-Gen train step (AdamW, EMA, 480x832 x 81 frames, batch 1) for v5p:2x2x1.

    Remat "full" (the default dots_saveable needs 112.9 GiB per chip at 32,760 tokens with the XLA
    attention and does not fit: benchmarks/RESULTS.md); the argument bytes must be this run's shards of the parameters,
    optimizer state, EMA and batch (plus the TPU's tile padding).
    """
    from pathlib import Path

    from director_jax.configs_common import load_config
    from director_jax.train.state import with_shardings
    from director_jax.train.trainer import abstract_batch, build_run

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gen_1_3b.py")
    cfg.model_options.remat_policy = "full"
    lines = []
    report = aot.compile_train_step(cfg, TOPOLOGY, echo=lines.append)
    run = build_run(cfg, devices=aot.topology_devices(TOPOLOGY), materialize_frozen=False)
    expected = sum(_shard_bytes(a) for a in jax.tree.leaves(
        (with_shardings(run.abstract, run.shardings), abstract_batch(run))))
    # TPU layouts pad small arrays to (8, 128) tiles (biases, norms: 2.8 MB of 5.7 GB here), so >= and close
    assert expected <= report.argument_bytes <= expected * 1.001
    assert report.num_devices == 4 and report.fits and report.total_bytes <= chip_spec("TPU v5p").hbm_bytes
    text = "\n".join(lines)
    assert "32760 tokens" in text and "model flops per step" in text


@pytest.mark.slow  # 2-3 min each on 2 cores; the kernel-level AOT test (test_flash_tpu.py) runs by default
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_sequence_parallel_dit_train_step_with_the_tpu_kernel_compiles_for_v5p(mode):
    """The sharded Director-Gen train step (2 layers of 1.3B width, 1,950 tokens) with the Pallas TPU kernel
    inside sequence-parallel attention over sequence=2 x fsdp=2 chips: Mosaic lowers it, the program holds the
    kernel's custom calls and the mode's collective, and it fits. Full-size figures: benchmarks/RESULTS.md."""
    from pathlib import Path

    from director_jax.configs_common import load_config
    from director_jax.train.state import with_shardings
    from director_jax.train.trainer import abstract_batch, build_run

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gen_1_3b.py")
    cfg.model.num_layers = 2
    cfg.video.update(height=240, width=416, num_frames=17)  # 5 x 15 x 26 = 1,950 tokens (not a multiple of 128)
    cfg.mesh.update(fsdp=2, sequence=2)
    cfg.model_options.update(attention_impl="pallas", sequence_parallel=mode, remat_policy="full")
    run = build_run(cfg, devices=aot.topology_devices(TOPOLOGY), materialize_frozen=False)
    args = (with_shardings(run.abstract, run.shardings), run.frozen_state, abstract_batch(run))
    with jax.set_mesh(run.mesh):
        hlo = run.step_fn.lower(*args).as_text()
    assert "tpu_custom_call" in hlo  # the Mosaic kernels
    assert ("collective_permute" if mode == "ring" else "all_to_all") in hlo
    report = aot.compile_report(run.step_fn, *args, topology=TOPOLOGY, mesh=run.mesh)
    assert report.fits and dict(run.mesh.shape)["sequence"] == 2
    assert report.flops > run.task.train_flops_per_example() / report.num_devices / 2


@pytest.mark.slow  # two TPU compiles of a small DiT's gradient, 1-3 min on 2 cores
def test_offload_hidden_keeps_the_block_inputs_in_host_memory(mesh):
    """remat 'offload_hidden' (maxdiffusion's HIDDEN_STATE_WITH_OFFLOAD): every block's saved input leaves HBM, so
    the step's device temporaries shrink by about layers x one block input against remat 'full'."""
    from flax import nnx

    from director_jax.models.dit import WanDiT, WanDiTConfig

    layers, tokens, dim = 8, 4096, 256  # big enough that the saved inputs outweigh the copies' staging buffers
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=dim // 2, ffn_dim=512, num_layers=layers,
                       text_dim=32, freq_dim=32)
    replicated = NamedSharding(mesh, P())
    latents = jax.ShapeDtypeStruct((1, 4, 64, 64, 16), jnp.float32, sharding=replicated)  # 4 x 32 x 32 tokens
    text = jax.ShapeDtypeStruct((1, 8, 32), jnp.float32, sharding=replicated)

    def temps(policy: str) -> tuple[int, str]:
        model = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0), attention_impl="xla", remat_policy=policy))
        graphdef, params = nnx.split(model)
        params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params)

        def loss(params, latents, text):
            return jnp.mean(nnx.merge(graphdef, params)(latents, jnp.full((1,), 500.0), text) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params, latents, text).compile()
        return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

    full, _ = temps("full")
    offloaded, text_hlo = temps("offload_hidden")
    block_input = tokens * dim * 4
    assert full - offloaded >= (layers - 1) * block_input, (full, offloaded)
    assert "S(5)" in text_hlo  # the pinned-host memory space holds the saved block inputs
