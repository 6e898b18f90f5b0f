"""The prologue every ``python -m director_jax.<verb>`` shares: quiet logs, JAX platforms, one-line errors.

Each command is an absl program with underscore flags. ``run(main)`` replaces ``app.run(main)``:
before ``main`` it sets up logging (this package's one line per stage at INFO; Orbax, absl, JAX and
TensorStore chatter only with ``--verbose``), keeps JAX off libtpu on a machine without TPU chips
(libtpu otherwise warns at start-up that no TPU was found) and adds the CPU compiler flags of
``xla_flags.py``. A ``UserError`` (or absl's
``UsageError``) raised anywhere in ``main`` becomes one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from director_jax.errors import UserError
from director_jax.parallel.distributed import tpu_chip_count
from director_jax.xla_flags import apply_cpu_flags

VERBOSE = flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax, absl, JAX), not only one line per stage.")

# Loggers of libraries that speak at INFO on every checkpoint, compile or file open.
_CHATTY = ("absl", "orbax", "jax", "jax._src", "tensorstore", "etils", "grain", "tensorflow_datasets", "fsspec",
           "gcsfs", "urllib3", "google", "PIL", "matplotlib", "numexpr", "filelock", "httpx", "diffusers",
           "apache_beam")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


__all__ = ["VERBOSE", "UserError", "configure_logging", "default_jax_platforms", "parse_flags", "prologue", "run",
           "user_error_message"]


def default_jax_platforms() -> str | None:
    """The ``JAX_PLATFORMS`` to use when the user set none: ``None`` keeps JAX's own choice.

    Where no Google TPU chip is on the PCI bus, TPU is left out so libtpu (installed with ``jax[tpu]``
    for compile-only runs) does not probe for chips; a GPU plugin, when installed, stays in front of
    the CPU. Compile-only runs for a TPU topology work with ``cpu`` (libtpu's topology API needs no chip).
    """
    if tpu_chip_count() > 0:
        return None
    gpu = any(importlib.util.find_spec(name) is not None for name in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                                       "jax_rocm60_plugin"))
    return "cuda,cpu" if gpu else "cpu"


def configure_logging(verbose: bool, level: int = logging.INFO) -> None:
    """This package at ``level`` (INFO: one line per stage); libraries at WARNING unless ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=_FORMAT, force=True)
    library_level = logging.INFO if verbose else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(library_level)
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def prologue(verbose: bool | None = None, level: int = logging.INFO) -> None:
    """Logging, JAX platform and CPU compiler set-up; call before the first JAX computation (``run`` does)."""
    apply_cpu_flags()  # read by XLA when its first backend starts (see xla_flags.py)
    if "JAX_PLATFORMS" not in os.environ:
        platforms = default_jax_platforms()
        if platforms is not None:
            os.environ["JAX_PLATFORMS"] = platforms
            if "jax" in sys.modules:  # imported already (by a flag module): set the config it reads too
                sys.modules["jax"].config.update("jax_platforms", platforms)
    configure_logging(VERBOSE.value if verbose is None else verbose, level)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag (unknown, malformed value) as one line ``error: ...`` and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = f"{e} (see --help)"
    except (KeyError, AttributeError) as e:  # ml_collections: a --config.a.b override that names no field
        message = f"a --config override names a field the config does not have: {e}"
    except (ValueError, TypeError) as e:  # ml_collections: a value of the wrong type, a config file that fails
        message = f"a --config file or override could not be read: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def user_error_message(e: BaseException) -> str | None:
    """The one line for an exception that a user's input caused (a missing or unreadable file, a damaged weight
    file, an image too large to decode), or ``None`` for anything else, which is a bug and keeps its traceback.

    The one place that maps the known exception types of the libraries the commands use to ``error:`` lines.
    """
    if isinstance(e, UserError | app.UsageError):
        return str(e)
    if isinstance(e, OSError) and "config file" in str(e):  # ml_collections defers a config file's load error
        return _one_line(e)
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return f"{_one_line(e)} (check the path and its permissions)"
    kind = type(e).__name__
    module = type(e).__module__ or ""
    if kind in ("DecompressionBombError", "UnidentifiedImageError") and module.startswith("PIL"):
        return f"an image could not be read safely: {_one_line(e)}"
    if kind == "SafetensorError" or (kind in ("HeaderTooLarge", "InvalidHeader") and "safetensors" in module):
        return f"a .safetensors file is damaged or not a safetensors file: {_one_line(e)}"
    if kind == "UnpicklingError":
        return f"a .pth file is damaged or holds objects that are not weights (only tensors are read): {_one_line(e)}"
    return None


def run(main: Callable[[list[str]], int | None], *, level: int = logging.INFO) -> None:
    """``app.run(main)`` with the shared prologue, and user errors as ``error: ...`` with exit code 2.

    ``level``: this package's log level (commands whose progress bars say enough use WARNING).
    """

    def wrapped(argv: list[str]) -> int:
        prologue(level=level)
        try:
            return main(argv) or 0
        except Exception as e:
            message = user_error_message(e)
            if message is None or (VERBOSE.value and not isinstance(e, UserError | app.UsageError)):
                raise  # a bug, or --verbose: the traceback
            print(f"error: {message}", file=sys.stderr)
            return 2

    sys.exit(app.run(wrapped, flags_parser=parse_flags))
