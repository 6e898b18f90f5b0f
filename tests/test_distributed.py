"""``--distributed auto``: which machines count as one host of several, checked against a real HTTP metadata server.

The Cloud TPU check is driven the way it runs on a TPU VM: PCI device directories with vendor files (a
temporary tree standing in for /sys/bus/pci/devices) and the GCE metadata server's worker list, served
over HTTP on 127.0.0.1 and found through ``GCE_METADATA_IP`` as on the VM.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from director_jax.parallel import distributed

_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
        "GCE_METADATA_IP")


class _Metadata(http.server.BaseHTTPRequestHandler):
    workers = "w-0:uid0:10.0.0.2,w-1:uid1:10.0.0.3,w-2:uid2:10.0.0.4,w-3:uid3:10.0.0.5"
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403, "Missing Metadata-Flavor: Google")
        elif self.path == "/computeMetadata/v1/instance/attributes/worker-network-endpoints":
            body = self.workers.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    _Metadata.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    yield _Metadata
    server.shutdown()
    server.server_close()


def _pci(root: Path, vendors: list[str]) -> Path:
    for i, vendor in enumerate(vendors):
        (root / f"0000:00:{i:02x}.0").mkdir(parents=True)
        (root / f"0000:00:{i:02x}.0" / "vendor").write_text(vendor + "\n")
    return root


def test_tpu_chips_are_google_pci_devices(tmp_path):
    assert distributed.tpu_chip_count(_pci(tmp_path / "tpu", ["0x1ae0"] * 4 + ["0x8086"])) == 4
    assert distributed.tpu_chip_count(_pci(tmp_path / "cpu", ["0x8086", "0x1af4"])) == 0
    assert distributed.tpu_chip_count(tmp_path / "missing") == 0


def test_cloud_tpu_slice_hosts_come_from_the_metadata_server(metadata, tmp_path):
    tpu = _pci(tmp_path / "tpu", ["0x1ae0"] * 4)
    assert distributed.cloud_tpu_worker_count(pci_devices=tpu) == 4
    assert distributed.multihost_reason(pci_devices=tpu) == "the Cloud TPU metadata lists 4 workers"

    metadata.workers = "t1v-n-0-w-0"  # one host (v5p-8): nothing to initialise
    assert distributed.cloud_tpu_worker_count(pci_devices=tpu) == 1
    assert distributed.multihost_reason(pci_devices=tpu) is None


def test_no_tpu_chips_means_no_metadata_request(metadata, tmp_path):
    cpu = _pci(tmp_path / "cpu", ["0x8086"])
    assert distributed.cloud_tpu_worker_count(pci_devices=cpu) is None
    assert distributed.multihost_reason(pci_devices=cpu) is None
    assert metadata.requests == []


def test_silent_metadata_server_counts_as_one_host(monkeypatch, tmp_path):
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata) as server:
        port = server.server_address[1]  # bound, then closed: connections are refused
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{port}")
    assert distributed.cloud_tpu_worker_count(pci_devices=_pci(tmp_path, ["0x1ae0"])) is None


@pytest.mark.parametrize("env,reason", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS is set"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "MEGASCALE_COORDINATOR_ADDRESS is set"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_HOSTNAMES names 2 hosts"),
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),
    ({"SLURM_NTASKS": "8"}, "SLURM_NTASKS=8"),
    ({"SLURM_NTASKS": "1"}, None),
])
def test_environment_variables(metadata, tmp_path, monkeypatch, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.multihost_reason(pci_devices=tmp_path) == reason


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="choose one of"):
        distributed.initialize("maybe")
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("auto", coordinator_address="127.0.0.1:1234")
    assert distributed.initialize("off") is False
