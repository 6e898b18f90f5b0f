"""benchmarks/aot_sampler.py: one Director-Gen sampler step AOT-compiled for a TPU topology (libtpu, compile only)."""

import importlib.util
from pathlib import Path

import pytest

from director_jax.parallel.chips import chip_spec

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5p:2x2x1"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("aot_sampler", ROOT / "benchmarks" / "aot_sampler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aot_sampler = _load_benchmark()


def _cpu_flops(cfg, dtype: str) -> float:
    """XLA's cost analysis of the same sampler-step function, unsharded, compiled for this CPU."""
    step = aot_sampler.sampler_step(cfg, None, dtype=dtype, batch=2)
    cost = step["fn"].lower(*step["args"]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


@pytest.fixture(scope="module")
def reports():
    """The tiny config's sampler step (bf16, CFG batch 2) compiled for v5p:2x2x1 on two meshes."""
    cfg = aot_sampler.load_case_config("tiny", None)
    return {mesh: aot_sampler.compile_sampler_step(cfg, TOPOLOGY, mesh, dtype="bfloat16", batch=2,
                                                   echo=lambda _: None)
            for mesh in ("fsdp=4", "fsdp=2,sequence=2")}


def test_tiny_sampler_step_on_v5p_meshes(reports):
    cfg = aot_sampler.load_case_config("tiny", None)
    cpu = _cpu_flops(cfg, "bfloat16")

    for mesh, r in reports.items():
        assert r["status"] == "ok" and r["num_devices"] == 4 and r["device_kind"] == "TPU v5", mesh
        assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0 and r["output_bytes"] > 0
        assert r["peak_bytes"] >= r["argument_bytes"] and r["total_bytes"] > r["peak_bytes"]
        assert r["hbm_bytes"] == chip_spec("TPU v5p").hbm_bytes and r["fits"]
        assert r["flops"] > 0 and r["xla_flops_per_chip"] > 0
        assert r["cfg_batch"] == 2 and r["dtype"] == "bfloat16" and r["attention"].startswith("pallas")
        # 17 frames, keyframes 0, 8, 16: 3 chunks of 5 + 1 + 1 latent frames, 4x4 tokens each (32x32, VAE /4, patch 2)
        assert (r["latents"], r["tokens"]) == (7, 112)
        # No chip does more than the whole call; together they do at least all of it (the rest is replication).
        assert r["xla_flops_per_chip"] <= 1.1 * cpu
        assert r["xla_flops_per_chip"] * r["num_devices"] >= 0.9 * cpu

    seq = reports["fsdp=2,sequence=2"]
    assert seq["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 2} and "ulysses" in seq["attention"]
    # Batch 2 over fsdp=2, tokens over sequence=2: no chip repeats another's work, so the four chips' XLA
    # counts add up to the unsharded CPU program's (same convention: the scanned layer body counted once).
    assert seq["xla_flops_per_chip"] * 4 == pytest.approx(cpu, rel=0.10)

    # The analytic count (GFLOP/step in the table) against XLA's count of the same function on the CPU: one layer
    # (XLA counts the scan body once); float32, as XLA also counts bf16 <-> f32 converts as FLOPs.
    analytic_one_layer = aot_sampler.step_flops(cfg, seq["latents"], seq["tokens"], seq["text_len"], 2, layers=1)
    assert analytic_one_layer == pytest.approx(_cpu_flops(cfg, "float32"), rel=0.10)
    assert seq["flops"] == aot_sampler.step_flops(cfg, 7, 112, seq["text_len"], 2)
    assert seq["flops"] > analytic_one_layer  # two layers


@pytest.mark.parametrize("mesh", ["fsdp=8", "fsdp=2", "fsdp=3,sequence=-1"])
def test_mesh_that_does_not_match_the_topology_is_refused(mesh):
    cfg = aot_sampler.load_case_config("tiny", None)
    with pytest.raises(ValueError, match=r"topology v5p:2x2x1 (has 4 chips|\(4 chips\))"):
        aot_sampler.compile_sampler_step(cfg, TOPOLOGY, mesh, echo=lambda _: None)


def test_table_row_of_a_result(reports):
    row = aot_sampler.table_row({"model": "tiny", "size": None, **reports["fsdp=2,sequence=2"]})
    assert row.count("|") == len(aot_sampler.COLUMNS) + 1
    assert "| 112 | v5p:2x2x1 | fsdp=2,sequence=2 | bfloat16 | 2 |" in row and "yes (0%)" in row
