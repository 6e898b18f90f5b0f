"""Compile-only (AOT) checks for a TPU topology, from any machine with ``libtpu`` installed.

Before renting a slice, compile the real train step for it here (a CPU box is enough) and read what
XLA's TPU compiler says it will need per chip::

    mesh = topology_mesh("v5p:2x2x1", {"fsdp": -1})
    report = compile_report(jax.jit(step, in_shardings=..., out_shardings=...), *abstract_args,
                            topology="v5p:2x2x1", mesh=mesh)
    print(format_report(report)); check_fits(report)

The devices are libtpu's compile-only devices (``jax.experimental.topologies``): they can be put in a
``Mesh`` and compiled for, never run on. Arguments are ``jax.ShapeDtypeStruct``s (with shardings, or
with ``in_shardings`` on the jit), so nothing is allocated. Figures are per device (per chip on
v5p / v5e / v6e / megacore v4), as the TPU compiler's buffer assignment has them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from director_jax.parallel.chips import chip_spec
from director_jax.parallel.mesh import MeshConfig, create_mesh
from director_jax.parallel.rules import Rules, axis_rules
from director_jax.train.state import with_shardings
from director_jax.train.trainer import abstract_batch, build_run, step_flops

MIB = 2**20
GIB = 2**30

TOPOLOGY_EXAMPLES: tuple[str, ...] = (
    "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x2", "v6e:4x4", "v5e:2x2", "v5e:4x4", "v4:2x2x1", "v4:2x2x2",
)
# libtpu 0.0.42.1 generation names (case-insensitive; "TPU v4" / "TPU v5 lite" also work, "v5litepod" does not).
_GENERATIONS = ("v4", "v5p", "v5e", "v6e", "tpu7x")
# A value per generation for TPU_ACCELERATOR_TYPE, only to stop libtpu's "could not determine TPU
# accelerator type" warning on machines without TPUs; compile-only devices do not depend on it.
_QUIET_ACCELERATOR = {"v4": "v4-8", "v5p": "v5p-8", "v5e": "v5litepod-4", "v6e": "v6e-4", "tpu7x": "tpu7x-8"}
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9_ ]+?)\s*[:=_](\d+(?:x\d+)*)(_twisted|_untwisted)?\s*$")
_INSTALL_HINT = ("pip install libtpu==0.0.42.1 (the libtpu for jax 0.10.2; or pip install -r requirements-tpu.txt "
                 "-c requirements.lock)")


class HbmOverflowError(ValueError):
    """The compiled program needs more memory per device than the chip's HBM."""


def _bad_name(topology: str, why: str) -> ValueError:
    return ValueError(f"Unknown TPU topology {topology!r}: {why}. Give '<generation>:<chips per axis>', e.g. "
                      f"{', '.join(TOPOLOGY_EXAMPLES)} (generations: {', '.join(_GENERATIONS)}; v4 / v5p are 3D, "
                      "v5e / v6e 2D; the smallest is one host, 2x2 chips).")


def _generation(topology: str) -> str:
    """The generation part of a topology name, lower-case, or a ValueError naming valid examples."""
    match = _NAME_RE.match(topology)
    if match is None:
        cloud = re.match(r"^\s*(v\d\w*|tpu7x)-(\d+)\s*$", topology, re.IGNORECASE)
        hint = ("that is a Cloud TPU accelerator type, not a chip topology (v5p-8 is v5p:2x2x1, v6e-8 is v6e:2x4, "
                "v5litepod-16 is v5e:4x4)") if cloud else "it is not '<generation>:<AxBxC>'"
        raise _bad_name(topology, hint)
    return match.group(1).lower()


def _libtpu_available() -> bool:
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    return xla_client.pjrt_plugin_loaded("tpu") or xla_bridge.get_tpu_library_path() is not None


def _compile_only_libtpu_env(generation: str) -> None:
    """Sets libtpu env vars for compile-only use, only where this process will not run on TPUs.

    ``ALLOW_MULTIPLE_LIBTPU_LOAD``: libtpu otherwise holds /tmp/libtpu_lockfile, so a second process
    compiling for a topology (parallel tests, two checks) fails with ABORTED. ``TPU_WORKER_HOSTNAMES``
    / ``TPU_ACCELERATOR_TYPE``: without them libtpu logs an INVALID_ARGUMENT error and a warning on
    machines without TPUs. Each is set only when unset, before libtpu is initialized, and when
    ``JAX_PLATFORMS`` excludes "tpu" (so no TPU runtime of this process can read them).
    """
    from jax._src.lib import xla_client

    platforms = jax.config.jax_platforms or ""
    if not platforms or "tpu" in platforms.lower().split(","):
        return
    if xla_client.pjrt_plugin_loaded("tpu") and xla_client.pjrt_plugin_initialized("tpu"):
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _QUIET_ACCELERATOR.get(generation, "v5p-8"))


def topology_devices(topology: str, *, num_slices: int = 1) -> list[jax.Device]:
    """Compile-only devices of a TPU slice, e.g. ``"v5p:2x2x1"`` (4 chips) or ``"v6e:4x4"`` (16 chips).

    One device per chip, as JAX sees a real slice: v4 is built in megacore mode (without it libtpu
    lists each of a v4 chip's two TensorCores as a device). ``num_slices > 1`` gives that many copies
    with ``slice_index`` set, for multi-slice (DCN) meshes.
    """
    if not isinstance(topology, str):
        raise TypeError(f"topology must be a string like 'v5p:2x2x1'; got {type(topology).__name__}.")
    generation = _generation(topology)
    if not _libtpu_available():
        raise RuntimeError(f"Compiling for TPU topology {topology!r} needs libtpu, which is not installed: "
                           f"{_INSTALL_HINT}. It works on CPU-only machines too (compile only).")
    _compile_only_libtpu_env(generation)
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if generation in ("v4", "tpu v4"):
        kwargs["chip_config_name"] = "megacore"
    if num_slices != 1:
        kwargs["num_slices"] = int(num_slices)
    try:
        return list(topologies.get_topology_desc(topology_name=topology.strip(), platform="tpu", **kwargs).devices)
    except jax.errors.JaxRuntimeError as e:
        message = str(e).splitlines()[0]
        if message.startswith("INVALID_ARGUMENT"):
            raise _bad_name(topology, f"libtpu says {message}") from e
        raise RuntimeError(f"libtpu could not build TPU topology {topology!r}: {message}. If another process holds "
                           "/tmp/libtpu_lockfile, set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (compile-only use) or run with "
                           "JAX_PLATFORMS=cpu so this module sets it.") from e


def topology_mesh(topology: str, mesh_config: MeshConfig | Mapping[str, int] | None = None, *,
                  num_slices: int = 1) -> Mesh:
    """``create_mesh(mesh_config)`` over a topology's compile-only devices (ICI-aware device order)."""
    return create_mesh(mesh_config, devices=topology_devices(topology, num_slices=num_slices))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What XLA's compiler says one device needs for a program, and whether that fits the chip.

    Byte figures are per device, from ``compiled.memory_analysis()``: ``peak_bytes`` is the
    compiler's peak of live buffers in HBM (arguments, outputs, temporaries; donated arguments counted
    once), ``total_bytes`` adds the program binary. XLA's own peak also counts the arguments and
    outputs that live in host memory (a pinned-host EMA, say; a program with only host buffers reports
    their size as its peak); they are taken out of ``peak_bytes`` and reported as ``host_bytes``.
    ``flops`` and ``bytes_accessed`` are ``compiled.cost_analysis()`` of the SPMD-partitioned program,
    i.e. per device: a matmul sharded 4 ways reports 2*M*N*K/4, a replicated one 2*M*N*K.
    ``global_flops`` multiplies by the device count (work done by all chips, replicated work included).
    XLA counts a while loop's body once, whatever its trip count, so for a model that scans over its
    layers (``WanDiT``) these are far below the real step's FLOPs: use them to compare programs, an
    analytic count for MFU.
    """

    topology: str
    num_devices: int
    device_kind: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    peak_bytes: int
    host_bytes: int
    flops: float
    bytes_accessed: float
    lower_seconds: float
    compile_seconds: float
    hbm_bytes: float | None
    fits: bool

    @property
    def total_bytes(self) -> int:
        """Peak live buffers plus the program binary: what must fit in HBM."""
        return self.peak_bytes + self.generated_code_bytes

    @property
    def global_flops(self) -> float:
        return self.flops * self.num_devices


def _devices_of(tree: Any) -> list[jax.Device]:
    """The devices of the first ``Sharding`` found in ``tree`` (abstract args or a compiled's shardings)."""
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        sharding = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            return sorted(sharding.device_set, key=lambda d: d.id)
    return []


def _cost(compiled: jax.stages.Compiled) -> Mapping[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return cost or {}


def compile_report(jitted_fn: Callable[..., Any], *abstract_args: Any, topology: str, mesh: Mesh | None = None,
                   hbm_bytes: float | None = None, compiler_options: Mapping[str, Any] | None = None,
                   rules: Rules | None = None, **abstract_kwargs: Any) -> CompileReport:
    """Lowers and compiles ``jitted_fn(*abstract_args, **abstract_kwargs)``; reads XLA's memory and cost analyses.

    Arguments are ``jax.ShapeDtypeStruct``s carrying ``NamedSharding``s on ``topology_mesh`` devices
    (or plain ones with ``in_shardings`` on the jit), so the program is compiled for the TPU while
    nothing is allocated. ``mesh`` is made current (``jax.set_mesh``) and ``rules`` the active
    logical-axis table (default: the one active now; the trainer's step carries its own) while
    tracing, for code that constrains activations by logical names. ``hbm_bytes`` overrides the
    chip's HBM from ``director_jax.parallel.chips`` (e.g. to keep headroom for the runtime).

    The TPU compiler refuses programs whose temporaries exceed HBM (RESOURCE_EXHAUSTED); it is told
    not to (``xla_tpu_no_crash_on_oom``) so an oversized program still gets its report, with
    ``fits=False``; ``check_fits`` turns that into an error.
    """
    fn = jitted_fn if hasattr(jitted_fn, "lower") else jax.jit(jitted_fn)
    t0 = time.perf_counter()
    with axis_rules(rules):
        if mesh is not None:
            with jax.set_mesh(mesh):
                lowered = fn.lower(*abstract_args, **abstract_kwargs)
        else:
            lowered = fn.lower(*abstract_args, **abstract_kwargs)
    t1 = time.perf_counter()
    devices = (list(mesh.devices.flat) if mesh is not None else _devices_of((abstract_args, abstract_kwargs))
               or topology_devices(topology))
    options = dict(compiler_options or {})
    if devices[0].platform == "tpu":
        options.setdefault("xla_tpu_no_crash_on_oom", True)
    compile_only = devices[0].platform == "tpu" and jax.default_backend() != "tpu"
    cache_was = jax.config.jax_enable_compilation_cache
    if compile_only:  # an executable for libtpu's compile-only devices cannot be read back from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = lowered.compile(options or None)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    t2 = time.perf_counter()

    devices = _devices_of((compiled.input_shardings, compiled.output_shardings)) or devices
    kind = devices[0].device_kind
    if hbm_bytes is None:
        spec = chip_spec(kind)
        hbm_bytes = spec.hbm_bytes if spec is not None else None
    mem = compiled.memory_analysis()
    args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temps, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    host = sum(int(getattr(mem, f"host_{name}_size_in_bytes", 0) or 0) for name in ("argument", "output")) - int(
        getattr(mem, "host_alias_size_in_bytes", 0) or 0)  # host-memory arguments and outputs, donated ones once
    xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    peak = xla_peak - host if xla_peak else args + outs + temps - alias
    code = int(mem.generated_code_size_in_bytes)
    cost = _cost(compiled)
    return CompileReport(
        topology=topology, num_devices=len(devices), device_kind=kind, argument_bytes=args, output_bytes=outs,
        temp_bytes=temps, alias_bytes=alias, generated_code_bytes=code, peak_bytes=peak, host_bytes=host,
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1, hbm_bytes=hbm_bytes,
        fits=hbm_bytes is None or peak + code <= hbm_bytes)


def _bytes(n: float) -> str:
    return f"{n / GIB:10.2f} GiB" if n >= GIB else f"{n / MIB:10.1f} MiB"


def format_report(report: CompileReport) -> str:
    """A small table of the report (per-device memory, FLOPs, compile time, fit) for logs and the CLI."""
    hbm = "unknown chip (not checked)" if report.hbm_bytes is None else _bytes(report.hbm_bytes).strip()
    fit = "yes" if report.fits else "NO"
    if report.hbm_bytes is not None:
        fit += f" ({100 * report.total_bytes / report.hbm_bytes:.0f}% of HBM)"
    rows = [
        ("topology", f"{report.topology}: {report.num_devices} x {report.device_kind}"),
        ("arguments", _bytes(report.argument_bytes)),
        ("outputs", _bytes(report.output_bytes)),
        ("temporaries", _bytes(report.temp_bytes)),
        ("aliased (donated)", _bytes(report.alias_bytes)),
        ("generated code", _bytes(report.generated_code_bytes)),
        ("peak live buffers", _bytes(report.peak_bytes)),
        ("host memory", _bytes(report.host_bytes) + " (arguments and outputs kept in host memory)"),
        ("total (peak + code)", _bytes(report.total_bytes)),
        ("chip HBM", hbm),
        ("fits", fit),
        ("flops per device", f"{report.flops / 1e12:10.3f} TFLOP (loop bodies counted once)"),
        ("flops all devices", f"{report.global_flops / 1e12:10.3f} TFLOP"),
        ("compile time", f"{report.compile_seconds:10.1f} s (+ {report.lower_seconds:.1f} s tracing/lowering)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["AOT compile report, per device (XLA memory_analysis / cost_analysis):"] +
                     [f"  {name:<{width}}  {value.strip() if name in ('topology', 'chip HBM', 'fits') else value}"
                      for name, value in rows])


def check_fits(report: CompileReport) -> None:
    """Raises ``HbmOverflowError`` when the program needs more than the chip's HBM (no-op for unknown chips)."""
    if report.fits or report.hbm_bytes is None:
        return
    temps_dominate = report.temp_bytes > report.argument_bytes + report.output_bytes
    what = ("Most of it is temporaries (activations)" if temps_dominate
            else "Most of it is arguments and outputs (parameters, optimizer state, batch)")
    raise HbmOverflowError(
        f"The compiled program needs {report.total_bytes / GIB:.2f} GiB per device on {report.topology} "
        f"({report.device_kind}; peak live buffers {report.peak_bytes / GIB:.2f} GiB + code "
        f"{report.generated_code_bytes / GIB:.2f} GiB) but the chip has {report.hbm_bytes / GIB:.2f} GiB of HBM. "
        f"{what}. Try: more FSDP (a larger 'fsdp' mesh axis or more chips), remat_policy 'full', a smaller per-device "
        "batch, or sequence parallelism (a 'sequence' mesh axis) to split the activations.")


def compile_train_step(cfg: Any, topology: str, *, num_slices: int = 1, echo: Callable[[str], None] = print
                       ) -> CompileReport:
    """Compiles the real train step of ``cfg`` for ``topology``; prints the report; raises if it does not fit.

    The state (parameters, optimizer state, EMA) and the batch are abstract, sharded by the config's
    mesh and rules table (``mesh.rules``) over the topology's devices, exactly as
    ``python -m director_jax.train`` would run them.
    """
    run = build_run(cfg, devices=topology_devices(topology, num_slices=num_slices), materialize_frozen=False)
    state = with_shardings(run.abstract, run.shardings)
    report = compile_report(run.step_fn, state, run.frozen_state, abstract_batch(run), topology=topology,
                            mesh=run.mesh)
    echo(f"train step of {cfg.task} ({run.task.describe()}), global batch {cfg.train.batch_size} "
         f"in {cfg.train.micro_batches} micro-batch(es), mesh {dict(run.mesh.shape)}")
    echo(format_report(report))
    analytic = run.task.train_flops_per_example()
    if analytic is not None:
        total = analytic * int(cfg.train.batch_size)
        echo(f"  model flops per step (analytic, 3x forward, all devices): {total / 1e12:.1f} TFLOP "
             f"= {total / report.num_devices / 1e12:.1f} TFLOP per device")
    else:
        echo(f"  flops per step (XLA, all devices): {step_flops(run, state) / 1e12:.3f} TFLOP")
    check_fits(report)
    return report
