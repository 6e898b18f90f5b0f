"""The text-embedding cache written with the umT5 encoder in JAX: ``embed_text --backend jax``.

The same cache as the PyTorch writer (``curation.text_embeddings``: one safetensors entry per caption,
trimmed to its tokens) from ``pipeline.text_encoder.JaxTextEncoder``, so a cache for training at scale
needs no PyTorch and runs where the TPUs are (the encoder sharded over the local chips, batches of
captions per call). The encoder's identity adds ``"backend": "jax"``: its entries live in their own
folder of the cache, never mixed with the PyTorch encoder's (they agree to ~1e-5 in float32, and
bfloat16 rounds differently).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from director_jax.curation.text_embeddings import (
    CacheSummary,
    _dir_digests,
    embed_caption_files,
    file_digest,
    fingerprint_of,
)
from director_jax.data.prompts import cleaning_description, prompt_clean
from director_jax.data.text_embeddings import DEFAULT_MAX_LENGTH, FORMAT_VERSION
from director_jax.parallel.rules import param_shardings
from director_jax.pipeline.text_encoder import JaxTextEncoder


def _digests(path: Path) -> set[str]:
    return _dir_digests(path) if path.is_dir() else {f"{path.name}={file_digest(path)}"}


class JaxCacheEncoder:
    """``JaxTextEncoder`` as ``compute_text_embeddings`` writes with it: trimmed entries and a fingerprint."""

    def __init__(self, checkpoint: str | os.PathLike, *, dtype: str = "bfloat16", max_length: int = DEFAULT_MAX_LENGTH,
                 tokenizer: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None):
        shardings = None if mesh is None else (lambda abstract: param_shardings(abstract, mesh))
        self.encoder = JaxTextEncoder(checkpoint, dtype=dtype, max_length=max_length, tokenizer=tokenizer,
                                      shardings=shardings)
        files = self.encoder.files
        self.dtype, self.max_length, self.dim = dtype, int(max_length), self.encoder.dim
        self.identity = {"format": FORMAT_VERSION, "files": sorted(_digests(files.weights) |
                                                                   _dir_digests(files.tokenizer_dir)),
                         "dtype": dtype, "max_length": self.max_length, "cleaning": cleaning_description(),
                         "backend": "jax"}
        self.fingerprint = fingerprint_of(self.identity)
        self.forward_calls = 0

    def encode(self, captions: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """Trimmed ``(L_i, D)`` embeddings (float32 or bfloat16) and untruncated token counts."""
        counts = self.encoder.tokenizer.token_counts([prompt_clean(c) for c in captions])
        padded, mask = self.encoder.encode(captions)
        self.forward_calls += 1
        dtype = ml_dtypes.bfloat16 if self.dtype == "bfloat16" else np.float32
        return [np.ascontiguousarray(e[: int(m.sum())].astype(dtype)) for e, m in zip(padded, mask, strict=True)], \
            counts

    def encoder_info(self) -> dict:
        files = self.encoder.files
        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "dim": self.dim, "dtype": self.dtype,
                "max_length": self.max_length, "checkpoint": str(files.weights), "layout": files.layout,
                "tokenizer_dir": str(files.tokenizer_dir), "identity": self.identity,
                "written_with": {"jax": jax.__version__, "backend": "jax", "device": jax.devices()[0].device_kind}}


def embed_caption_files_jax(caption_files: Sequence[str | os.PathLike], cache_dir: str | os.PathLike,
                            checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                            dtype: str = "bfloat16", max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                            empty_caption: bool = True, progress: bool = True,
                            mesh: jax.sharding.Mesh | None = None) -> CacheSummary:
    """``embed_caption_files`` with this encoder: the same checks before any model loads, the same cache."""
    return embed_caption_files(
        caption_files, cache_dir, checkpoint, dtype=dtype, max_length=max_length, batch_size=batch_size,
        empty_caption=empty_caption, progress=progress,
        make_encoder=lambda: JaxCacheEncoder(checkpoint, dtype=dtype, max_length=max_length, tokenizer=tokenizer,
                                             mesh=mesh))
