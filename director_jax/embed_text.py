"""``python -m director_jax.embed_text --checkpoint WAN_DIR --captions FILE [--captions FILE ...] --cache CACHE``

Computes the umT5 embedding of every caption in the caption files (``.txt``, one per line, or
``.jsonl``, a ``"caption"`` per line; ``--captions`` repeats) that the cache lacks, with PyTorch and
the user's Wan2.1 checkpoint (a diffusers pipeline root with ``text_encoder/`` and ``tokenizer/``, or
one umT5 encoder directory); the empty caption too, unless ``--noempty_caption``. Options:
``--dtype bfloat16|float32``, ``--batch_size 8``, ``--device cpu|cuda``, ``--max_length 512``,
``--tokenizer DIR``, ``--noprogress``. Given a curated ``manifest.jsonl`` (lines with ``"cuts"``), it
also embeds every multi-shot sample's shot-range captions (the captions of windows that show only some
of its shots), so ``--captions curated/manifest.jsonl`` fills all that ``python -m director_jax.shards
--text_cache`` needs. The cache (layout and reader: ``director_jax.data.text_embeddings``)
is read by training, ``generate`` and ``evaluate`` with no PyTorch. Needs the packages of
``requirements-test.txt`` (torch, transformers), or ``--backend jax``: the umT5 encoder in JAX (no PyTorch;
also reads an official Wan release's ``models_t5_umt5-xxl-enc-bf16.pth``).
"""

from __future__ import annotations

from absl import flags

from director_jax import cli
from director_jax.curation.text_cache_jax import embed_caption_files_jax
from director_jax.curation.text_embeddings import embed_caption_files
from director_jax.data.text_embeddings import DEFAULT_MAX_LENGTH, DTYPES

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Wan2.1 diffusers pipeline root (text_encoder/, tokenizer/) or a umT5 encoder directory.")
_CAPTIONS = flags.DEFINE_multi_string(
    "captions", [], "A .txt or .jsonl caption file (repeatable); a curated manifest.jsonl adds its shot-range "
    "captions.")
_CACHE = flags.DEFINE_string("cache", None, "The cache directory to fill (created).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory, when it is not beside the encoder.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", f"Encoder dtype: one of {', '.join(DTYPES)}.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Captions per encoder call.")
_DEVICE = flags.DEFINE_string("device", None, "Torch device (default: cuda when available, else cpu).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", DEFAULT_MAX_LENGTH, "Tokens per caption.")
_EMPTY_CAPTION = flags.DEFINE_bool("empty_caption", True,
                                   "Also embed the empty caption (the dropped caption and the negative prompt).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar over the captions.")
_BACKEND = flags.DEFINE_enum("backend", "torch", ["torch", "jax"],
                             "torch: transformers' UMT5EncoderModel; jax: the umT5 encoder in JAX (no PyTorch, "
                             "official Wan releases too; its entries in their own folder of the cache).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; give several caption files as --captions A "
                            "--captions B.")
    for flag, value in (("checkpoint", _CHECKPOINT.value), ("cache", _CACHE.value)):
        if not value:
            raise cli.UserError(f"--{flag} is required (see --helpshort).")
    if not _CAPTIONS.value:
        raise cli.UserError("--captions is required: a .txt or .jsonl caption file (repeatable).")
    common = dict(tokenizer=_TOKENIZER.value, dtype=_DTYPE.value, max_length=_MAX_LENGTH.value,
                  batch_size=_BATCH_SIZE.value, empty_caption=_EMPTY_CAPTION.value, progress=_PROGRESS.value)
    try:
        if _BACKEND.value == "jax":
            summary = embed_caption_files_jax(_CAPTIONS.value, _CACHE.value, _CHECKPOINT.value, **common)
        else:
            summary = embed_caption_files(_CAPTIONS.value, _CACHE.value, _CHECKPOINT.value, device=_DEVICE.value,
                                          **common)
    except (OSError, ValueError) as e:  # unreadable or malformed caption files, a wrong checkpoint, bad settings
        raise cli.UserError(str(e)) from e
    print(summary.describe())


if __name__ == "__main__":
    cli.run(main)
