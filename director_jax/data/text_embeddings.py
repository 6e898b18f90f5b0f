"""The umT5 text-embedding cache: its layout on disk and its reader (NumPy only; no torch or transformers).

The cache is filled once, with PyTorch and the user's umT5 checkpoint, by
``python -m director_jax.embed_text`` (``director_jax.curation.text_embeddings``). Training,
generation and evaluation read it::

    emb, mask = load_text_embeddings(CACHE, captions)   # (B, 512, D) zero-padded, (B, 512) bool

An entry is the trimmed ``(L, D)`` embedding of one caption as diffusers' ``WanPipeline`` computes
it; the reader zero-pads it back to ``max_length`` as the pipeline does.

Cache layout (no index to keep consistent; every file is written atomically)::

    CACHE/<fingerprint[:16]>/encoder.json           what encoder made the entries (see below)
    CACHE/<fingerprint[:16]>/<h[:2]>/<h>.safetensors  h = sha256(fingerprint + "\\n" + caption)

An entry holds one tensor ``embedding`` of shape ``(L, D)`` in the encoder's dtype (float32 or
bfloat16) and metadata: the caption, ``L`` and the caption's untruncated token count. Captions are
keys verbatim (before cleaning). The fingerprint hashes everything the embeddings depend on: the
encoder's and tokenizer's files (config and tokenizer files in full; files over 64 MiB, i.e. the
weights, by size plus sixteen evenly spaced 1 MiB samples: other weights or a fine-tune change them,
but an edit confined to unsampled bytes would not, so give such a checkpoint its own cache), the
dtype, ``max_length`` and the cleaning. A different encoder therefore writes to a different folder and
never reuses stale entries; the checkpoint's path is not part of it (a moved checkpoint keeps its
cache). The torch/transformers versions and the device are recorded in encoder.json but are not
part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes  # registers bfloat16 with NumPy, which safetensors needs to read a bfloat16 entry
import numpy as np

FORMAT_VERSION = 1
DEFAULT_MAX_LENGTH = 512
ENCODER_FILE = "encoder.json"
DTYPES = ("float32", "bfloat16")
CLI = "python -m director_jax.embed_text"


class MissingTextEmbeddingsError(FileNotFoundError):
    """Some captions are not in the cache; ``missing`` lists them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def short_caption(text: str, n: int = 80) -> str:
    """A caption for a message: quoted, cut to ``n`` characters."""
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def entry_hash(fingerprint: str, caption: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{caption}".encode("utf-8", "surrogatepass")).hexdigest()


def np_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a name, a NumPy dtype or a ``jnp`` dtype; "bfloat16" is ml_dtypes' bfloat16."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _encoder_dirs(cache_dir: Path) -> list[tuple[Path, dict]]:
    if (cache_dir / ENCODER_FILE).is_file():
        dirs = [cache_dir]
    elif cache_dir.is_dir():
        dirs = sorted(p.parent for p in cache_dir.glob(f"*/{ENCODER_FILE}"))
    else:
        dirs = []
    return [(d, json.loads((d / ENCODER_FILE).read_text())) for d in dirs]


def _describe_encoder(info: dict) -> str:
    return (f"{info['fingerprint'][:16]} (checkpoint {info.get('checkpoint', '?')}, {info['dtype']}, "
            f"max_length {info['max_length']})")


class TextEmbeddingCache:
    """One encoder's entries in a cache directory.

    ``cache_dir`` is the cache root (holding one folder per encoder) or one encoder's folder. In a
    root with entries from several encoders of the same ``max_length``, ``encoder`` (a fingerprint
    or a prefix of it) says which to read.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, max_length: int = DEFAULT_MAX_LENGTH,
                 encoder: str | None = None):
        cache_dir = Path(cache_dir)
        found = _encoder_dirs(cache_dir)
        if not found:
            raise FileNotFoundError(f"{cache_dir} holds no text-embedding cache (no */{ENCODER_FILE}); fill it with "
                                    f"`{CLI} --checkpoint UMT5_CHECKPOINT --captions FILE --cache {cache_dir}`.")
        chosen = [(d, i) for d, i in found if i["max_length"] == max_length
                  and (encoder is None or i["fingerprint"].startswith(encoder))]
        if len(chosen) != 1:
            listing = "\n".join(f"  {d}: {_describe_encoder(i)}" for d, i in found)
            what = f"max_length {max_length}" + (f" and fingerprint {encoder!r}" if encoder else "")
            if not chosen:
                raise FileNotFoundError(f"{cache_dir} has no text embeddings with {what}; it has:\n{listing}")
            raise ValueError(f"{cache_dir} has text embeddings from {len(chosen)} encoders with {what}; choose one "
                             f"with encoder=FINGERPRINT (a prefix is enough):\n{listing}")
        self.dir, self.info = chosen[0]
        self.root = self.dir.parent  # what the command line's --cache names
        self.fingerprint: str = self.info["fingerprint"]
        self.max_length: int = self.info["max_length"]
        self.dim: int = self.info["dim"]

    def path(self, caption: str) -> Path:
        h = entry_hash(self.fingerprint, caption)
        return self.dir / h[:2] / f"{h}.safetensors"

    def __contains__(self, caption: str) -> bool:
        return self.path(caption).is_file()

    def missing(self, captions: Sequence[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if c not in self]

    def read(self, caption: str) -> np.ndarray:
        """The trimmed ``(L, D)`` embedding of one caption, in the stored dtype."""
        from safetensors import safe_open

        path = self.path(caption)
        if not path.is_file():
            raise self._missing_error([caption])
        try:
            with safe_open(str(path), framework="np") as f:
                meta, emb = f.metadata() or {}, f.get_tensor("embedding")
        except Exception as e:  # corrupt or foreign file
            raise ValueError(f"text-embedding cache entry {path} (caption {short_caption(caption)}) is unreadable: "
                             f"{e}. Delete it and run the cache command again.") from e
        if meta.get("caption") != caption:
            raise ValueError(f"cache entry {path} holds caption {short_caption(meta.get('caption', ''))}, not "
                             f"{short_caption(caption)}: the file was misplaced; delete it.")
        if emb.ndim != 2 or emb.shape[1] != self.dim or not 1 <= emb.shape[0] <= self.max_length:
            raise ValueError(f"cache entry {path} has shape {emb.shape}, expected (1..{self.max_length}, {self.dim}).")
        return emb

    def load(self, captions: Sequence[str], dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(B, max_length, D)`` embeddings zero-padded past each caption's tokens, ``(B, max_length)`` mask."""
        captions = list(captions)
        missing = self.missing(captions)
        if missing:
            raise self._missing_error(missing)
        unique = {c: self.read(c) for c in dict.fromkeys(captions)}
        emb = np.zeros((len(captions), self.max_length, self.dim), np_dtype(dtype))
        mask = np.zeros((len(captions), self.max_length), bool)
        for b, c in enumerate(captions):
            e = unique[c]
            emb[b, : len(e)] = e.astype(emb.dtype)
            mask[b, : len(e)] = True
        return emb, mask

    def entries(self) -> Iterator[tuple[str, Path]]:
        """(caption, path) of every stored entry; temporary files of unfinished writes are not entries."""
        from safetensors import safe_open

        for path in sorted(self.dir.glob("??/*.safetensors")):
            if path.name.startswith("."):
                continue
            with safe_open(str(path), framework="np") as f:
                yield (f.metadata() or {})["caption"], path

    def _missing_error(self, missing: list[str], manifest=None) -> MissingTextEmbeddingsError:
        return missing_error(missing, self.root, self.info.get("checkpoint"), self.info["dtype"], self.max_length,
                             f"for encoder {_describe_encoder(self.info)}", manifest=manifest)


def missing_error(missing: list[str], cache_root, checkpoint, dtype, max_length, where: str, *,
                  manifest=None) -> MissingTextEmbeddingsError:
    """The error naming the missing captions and the command that computes them (from ``manifest``, a curated
    ``manifest.jsonl``, when the captions are a curated directory's)."""
    shown = "\n".join(f"  {short_caption(c)}" for c in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    checkpoint = shlex.quote(str(checkpoint)) if checkpoint else "UMT5_CHECKPOINT"
    captions = "CAPTIONS.jsonl" if manifest is None else shlex.quote(str(manifest))
    command = (f"{CLI} --checkpoint {checkpoint} --captions {captions} --cache {shlex.quote(str(cache_root))} "
               f"--dtype {dtype} --max_length {max_length}")
    if manifest is None:
        what = ("where CAPTIONS.jsonl holds one {\"caption\": ...} per line (or a .txt file with one caption per "
                "line).")
    else:
        what = "(from the manifest it computes every sample's caption and the captions of its shot ranges)."
    return MissingTextEmbeddingsError(
        f"{len(missing)} caption(s) have no text embedding in {cache_root} {where}:\n{shown}{more}\n"
        f"Compute them with\n  {command}\n{what}", missing)


def load_text_embeddings(cache_dir: str | os.PathLike, captions: Sequence[str], *,
                         max_length: int = DEFAULT_MAX_LENGTH, dtype=np.float32,
                         encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cached embeddings of ``captions``: ``(B, max_length, D)`` zero-padded and a ``(B, max_length)`` bool mask.

    NumPy arrays (``dtype`` may be a NumPy or ``jnp`` dtype, or "bfloat16"); the empty caption is a
    caption like any other. Raises ``MissingTextEmbeddingsError`` listing the captions not cached
    and the command that computes them.
    """
    try:
        cache = TextEmbeddingCache(cache_dir, max_length=max_length, encoder=encoder)
    except FileNotFoundError as e:
        captions = list(dict.fromkeys(captions))
        raise missing_error(captions, cache_dir, None, "bfloat16", max_length, f"({e})") from e
    return cache.load(captions, dtype)
