"""Test setup: 8 virtual CPU devices (so sharding is exercised) before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from director_jax.xla_flags import apply_cpu_flags  # noqa: E402  (no jax import: only sets XLA_FLAGS)

apply_cpu_flags()  # the commands' CPU compiler flags, so the tests run what users run
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A persistent compilation cache shared by every test and every subprocess a test starts (they inherit the
# environment): many tests compile the same small models, and the CLI, demo and multi-process cases compile
# what an earlier test already did. Executables are keyed by their HLO, compile options and jax/jaxlib
# versions, so a stale entry is never reused for other code (`rm -rf .cache` empties it). Only compiles of
# 0.2 s or more are kept: a full run compiles ~13,000 small programs (eager ops), whose entries cost more to
# look up than to compile. No size cap: JAX's capped cache locks and rescans the whole directory on every
# write, which stalled two parallel workers. Measured: test_generate + test_train 221 s without it, 158 s
# with it cold, 82 s warm.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Read when google-auth / gcsfs are imported: no metadata-server probing (no GCE here), and gcsfs's experimental
# bucket-type lookup (an API the storage emulator lacks, failing slowly on every call) off.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


import socket  # noqa: E402

import pytest  # noqa: E402

GCS_BUCKET = "director-test"


def _send_generation_headers() -> None:
    """Makes the emulator's media downloads carry ``x-goog-generation``, as Cloud Storage's do.

    TensorStore (Orbax's OCDBT manifests) reads an object's generation from that header and fails on
    "Malformed StorageGeneration" without it; gcp-storage-emulator 2026.7.19 does not send it.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "sends_generation", False):
        return

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the 404 stands as it is
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    with_generation.sends_generation = True
    objects.download = with_generation  # objects.get's alt=media calls the module's download
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is download:
                handlers[method] = with_generation


@pytest.fixture(scope="session")
def gcs_emulator():
    """A Cloud Storage emulator (a real HTTP server on 127.0.0.1) holding the bucket ``GCS_BUCKET``.

    gcsfs (epath's ``gs://``) and TensorStore (Orbax's arrays) are pointed at it through their emulator
    variables, in this process and in the returned environment for subprocesses; credentials are not
    looked for (no metadata server). gcsfs caches its filesystem, so one server serves the session.
    Yields ``.bucket``, ``.url`` and ``.env`` (the variables, for subprocesses).
    """
    import types

    from gcp_storage_emulator.server import create_server

    _send_generation_headers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "true",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": "127.0.0.1:9",
           "GCE_METADATA_IP": "127.0.0.1:9"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield types.SimpleNamespace(bucket=GCS_BUCKET, url=url, env=env)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
