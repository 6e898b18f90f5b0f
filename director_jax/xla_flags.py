"""The XLA flags this project sets for JAX's CPU backend, and why; applied before the backend starts.

XLA's CPU compiler hands matmuls to YNNPACK, by default fused with the elementwise work around them
(and reductions too). On the CPUs measured here that fusion is slower than YNNPACK running each
matmul alone beside XLA's own loop fusions: ``individual_dot`` made the DiT's forward + backward
14% faster (1.23 -> 1.06 s) and the VAE's encode / decode 15-18% faster, with float32 results equal
to rounding (``benchmarks/RESULTS.md``, "CPU speed (issue 23)"; ``python benchmarks/dit.py
--xla-default`` measures the difference on any machine).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so ``apply_cpu_flags`` must run
before the first JAX computation: every command's prologue (``cli.py``), the test suite's
``conftest.py`` and the benchmarks call it. A flag the user already put in ``XLA_FLAGS`` wins.
The flags only touch the CPU backend: GPU and TPU programs compile as before.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = {
    # YNNPACK for each matmul on its own, XLA's fusions for everything else (see the docstring).
    "xla_cpu_experimental_ynn_fusion_type": "individual_dot",
}


def apply_cpu_flags(environ: MutableMapping[str, str] | None = None) -> str:
    """Adds each of CPU_FLAGS to ``XLA_FLAGS`` that is not there yet; returns the new value."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    present = {item.lstrip("-").split("=", 1)[0] for item in current.split()}
    extra = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
    if extra:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *extra]).strip()
    return environ.get("XLA_FLAGS", "")
