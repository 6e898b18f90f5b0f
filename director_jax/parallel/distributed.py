"""Starting JAX's multi-process runtime, the same way for every command that runs on all hosts of a pod.

``--distributed auto`` (the default) calls ``jax.distributed.initialize()`` when the machine is one host
of several: a coordinator in the environment (``JAX_COORDINATOR_ADDRESS``, multislice's
``MEGASCALE_COORDINATOR_ADDRESS``), GKE's ``TPU_WORKER_HOSTNAMES`` or SLURM's ``SLURM_NTASKS`` naming more
than one, or a Cloud TPU VM whose metadata server lists more than one worker. Cloud TPU VMs export none
of those variables, so the last check asks the metadata server, as ``jax.distributed.initialize()``
itself does, but only where Google TPU chips are on the PCI bus (elsewhere nothing is contacted).
``on`` always initialises (the environment must describe the cluster); ``off`` never does.
``--coordinator_address`` with ``--num_processes`` and ``--process_id`` names the cluster explicitly.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from absl import flags

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
GOOGLE_PCI_VENDOR = "0x1ae0"
_PCI_DEVICES = "/sys/bus/pci/devices"
_WORKERS_KEY = "worker-network-endpoints"


def tpu_chip_count(pci_devices: str | os.PathLike = _PCI_DEVICES) -> int:
    """Google TPU chips on this machine's PCI bus (0 off TPU VMs, and where /sys is not readable)."""
    root = Path(pci_devices)
    try:
        vendors = [d / "vendor" for d in root.iterdir()]
    except OSError:
        return 0
    count = 0
    for vendor in vendors:
        try:
            count += vendor.read_text().strip().lower() == GOOGLE_PCI_VENDOR
        except OSError:
            continue
    return count


def cloud_tpu_worker_count(*, timeout_s: float = 2.0, pci_devices: str | os.PathLike = _PCI_DEVICES) -> int | None:
    """Hosts of this Cloud TPU slice per the GCE metadata server; None off Cloud TPU VMs or when it does not answer.

    The server is ``GCE_METADATA_IP`` (the variable JAX reads too), by default ``metadata.google.internal``.
    """
    if tpu_chip_count(pci_devices) == 0:
        return None
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    url = f"http://{host}/computeMetadata/v1/instance/attributes/{_WORKERS_KEY}"
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.info("TPU chips found but the metadata server (%s) gave no worker list: %s", host, e)
        return None
    return len([w for w in text.split(",") if w.strip()])


def multihost_reason(*, pci_devices: str | os.PathLike = _PCI_DEVICES) -> str | None:
    """Why this process looks like one host of several (for the log), or None when it does not."""
    env = os.environ
    for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
        if env.get(name):
            return f"{name} is set"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES names {len(hosts)} hosts"
    if env.get("SLURM_NTASKS", "").isdigit() and int(env["SLURM_NTASKS"]) > 1:
        return f"SLURM_NTASKS={env['SLURM_NTASKS']}"
    workers = cloud_tpu_worker_count(pci_devices=pci_devices)
    if workers is not None and workers > 1:
        return f"the Cloud TPU metadata lists {workers} workers"
    return None


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when ``mode`` (or an explicit coordinator) says so; True if it did.

    Must run before anything touches a JAX device.
    """
    import jax

    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}; choose one of {MODES}.")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id.")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    reason = "--distributed on" if mode == "on" else (multihost_reason() if mode == "auto" else None)
    if reason is None:
        return False
    log.info("jax.distributed.initialize(): %s", reason)
    jax.distributed.initialize()  # TPU pods, GKE, SLURM: the environment says who is who
    return True


class DistributedFlags:
    """The four command-line flags, defined once per process (train and evaluate share them)."""

    def __init__(self) -> None:
        defined = flags.FLAGS
        if "distributed" not in defined:
            flags.DEFINE_enum("distributed", "auto", list(MODES),
                              "jax.distributed.initialize(): auto = when this host is one of several (environment "
                              "variables, or a Cloud TPU VM's metadata); on = always; off = never.")
            flags.DEFINE_string("coordinator_address", None,
                                "host:port of process 0 for a multi-process run outside a detected cluster "
                                "(with --num_processes and --process_id); implies --distributed on.")
            flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
            flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

    def initialize(self) -> bool:
        f = flags.FLAGS
        return initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
