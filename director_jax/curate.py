"""``python -m director_jax.curate [--config configs/curate.py] --input FILES_OR_DIRS --out DIR [--config.a.b=v]``

Cuts movies into shots, filters them, assembles single- and multi-shot samples and writes their
clips, captions and manifest to DIR (the layout in ``director_jax.curation.pipeline``). ``--input`` may
repeat and may hold comma-separated paths. Rerunning with the same ``--out`` resumes. Without
``--config`` the repository's ``configs/curate.py`` is used.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "curate.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG) if _DEFAULT_CONFIG.is_file() else None,
    "A curation config file (get_config()); default configs/curate.py.")
_INPUT = flags.DEFINE_multi_string("input", [], "Video files or directories (repeatable, comma separated).")
_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed when it holds a previous run).")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; give inputs with --input.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required (configs/curate.py was not found beside the package).")
    if not _INPUT.value:
        raise app.UsageError("--input is required: video files or directories, e.g. --input /movies")
    if not _OUT.value:
        raise app.UsageError("--out is required: the curated output directory.")
    from director_jax.curation.pipeline import curate, format_summary

    summary = curate(_INPUT.value, _OUT.value, cfg)
    print(format_summary(summary, _OUT.value))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
