"""``python -m director_jax.curate [--config configs/curate.py] --input FILES_OR_DIRS --out DIR [--config.a.b=v]``

Cuts movies into shots, filters them, assembles single- and multi-shot samples and writes their
clips, captions and manifest to DIR (the layout in ``director_jax.curation.pipeline``). ``--runner direct
--workers N`` runs the same work as an Apache Beam pipeline on N worker processes
(``director_jax.curation.beam_pipeline``). ``--input`` may
repeat and may hold comma-separated paths. Rerunning with the same ``--out`` resumes. Without
``--config`` the repository's ``configs/curate.py`` is used.

Refused in one line ``error: ...`` (exit code 2) before anything is written: a config value out of
range or not finite, inputs none of which is a video to try (all missing, or no file with a video
extension), an ``--out`` that is a file or cannot be created, and an ``--out`` another run is writing
(its ``OUT/.lock``).
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.curation.pipeline import build_captioner, curate, format_summary
from director_jax.curation.source import CurationSettings

_DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "curate.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG) if _DEFAULT_CONFIG.is_file() else None,
    "A curation config file (get_config()); default configs/curate.py.")
_INPUT = flags.DEFINE_multi_string("input", [], "Video files or directories (repeatable, comma separated).")
_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed when it holds a previous run).")
_RUNNER = flags.DEFINE_string("runner", "", "Empty: the sources one after another in this process; 'direct': an "
                              "Apache Beam pipeline on Beam's DirectRunner with --workers processes.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes of a --runner run.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; give inputs with --input.")
    cfg = _CONFIG.value
    if cfg is None:
        raise cli.UserError("--config is required (configs/curate.py was not found beside the package).")
    if not _INPUT.value:
        raise cli.UserError("--input is required: video files or directories, e.g. --input /movies")
    if not _OUT.value:
        raise cli.UserError("--out is required: the curated output directory.")
    try:  # the config and the output location are checked before any video is read
        CurationSettings.from_config(cfg)
        captioner = build_captioner(cfg.caption)
        runner = None
        if _RUNNER.value:
            from director_jax.curation.beam_pipeline import BeamRun  # apache-beam only for a --runner run

            runner = BeamRun(_RUNNER.value, _WORKERS.value)
    except (TypeError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    _check_out(Path(_OUT.value))
    summary = curate(_INPUT.value, _OUT.value, cfg, captioner=captioner, runner=runner)  # inputs, lock, work
    print(format_summary(summary, _OUT.value))


def _check_out(out: Path) -> None:
    """``--out`` is a directory, or can be created in its nearest existing parent (created later, by ``curate``)."""
    if out.exists() and not out.is_dir():
        raise cli.UserError(f"--out {out} is a file; give a directory.")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise cli.UserError(f"--out {out}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UserError(f"--out {out}: {parent} is not writable.")


if __name__ == "__main__":
    cli.run(main)
