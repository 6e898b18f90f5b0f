"""``python -m director_jax.shards --curated OUT [--text_cache CACHE] [--validation_fraction 0.01]``

Builds the TFDS ArrayRecord shards the training loader reads from a curated directory (after
``python -m director_jax.curate --out OUT``): ``OUT/tfds/`` unless ``--data_dir``, with every
caption's umT5 embedding, and those of every multi-shot sample's shot ranges (window captions), from
``--text_cache`` (filled by ``python -m director_jax.embed_text --captions OUT/manifest.jsonl``;
``--text_max_length`` says which of its encoders). Rebuilt only when the manifest, the clips, the
validation fraction or the text encoder changed (``--force`` rebuilds anyway); a failed build keeps
the last good one. Every clip is decoded first: one that does not decode to its recorded frames
refuses the build, naming it (``error: ...``, exit code 2).
Format: ``director_jax.data.shards``; building: ``director_jax.curation.shards``.
"""

from __future__ import annotations

from absl import flags

from director_jax import cli
from director_jax.curation.shards import build_curated_dataset

_CURATED = flags.DEFINE_string("curated", None, "The curated directory (manifest.jsonl, clips/).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to build (default: CURATED/tfds).")
_TEXT_CACHE = flags.DEFINE_string(
    "text_cache", None, "A text-embedding cache holding every caption and shot-range caption (embed_text --captions "
    "CURATED/manifest.jsonl fills it).")
_TEXT_MAX_LENGTH = flags.DEFINE_integer("text_max_length", 512, "The max_length of the cache's encoder to read.")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.01,
                                          "Share of samples (hashed by id) in the validation split, in [0, 1).")
_FORCE = flags.DEFINE_bool("force", False, "Rebuild even if the inputs are unchanged.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show TFDS's progress bars.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}.")
    if not _CURATED.value:
        raise cli.UserError("--curated is required: the curated directory (what `python -m director_jax.curate "
                            "--out DIR` wrote).")
    try:
        builder = build_curated_dataset(_CURATED.value, data_dir=_DATA_DIR.value, text_cache=_TEXT_CACHE.value,
                                        text_max_length=_TEXT_MAX_LENGTH.value,
                                        validation_fraction=_VALIDATION_FRACTION.value, force=_FORCE.value,
                                        progress=_PROGRESS.value)
    except (OSError, ValueError, RuntimeError) as e:  # no manifest, missing clips or captions, a build running
        raise cli.UserError(str(e)) from e
    print(f"{builder.data_dir}: " + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
    cli.run(main)
