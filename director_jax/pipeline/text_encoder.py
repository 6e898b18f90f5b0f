"""Captions -> umT5 embeddings in JAX: what ``generate`` and ``evaluate`` use instead of a text cache.

Does what diffusers' ``WanPipeline._get_t5_prompt_embeds`` (and ``embed_text``'s PyTorch encoder) do,
without PyTorch or transformers: Wan's prompt cleaning, the tokenizer's ``tokenizer.json`` run by
the ``tokenizers`` library with the fast tokenizer's truncation (the closing ``</s>`` kept) and
padding to ``max_length``, the encoder (``models.umt5``) with the attention mask, and every
embedding zeroed past its caption's tokens. The result is the (B, max_length, D) embedding and
mask the DiT reads, equal to what the cache holds for the same captions.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from director_jax.convert.umt5 import TextEncoderFiles, describe, find_text_encoder, load_umt5
from director_jax.data.prompts import CaptionTruncatedWarning, prompt_clean
from director_jax.data.text_embeddings import DEFAULT_MAX_LENGTH, short_caption

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _special(directory: Path, name: str, default: str) -> str:
    """A special token's text from tokenizer_config.json (a string, or transformers' {"content": ...} form)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    value = config.get(name, default)
    return value.get("content", default) if isinstance(value, dict) else str(value)


class UMT5Tokenizer:
    """``tokenizer.json`` with the fast tokenizer's call ``padding="max_length", truncation=True``."""

    def __init__(self, directory: str | Path, max_length: int = DEFAULT_MAX_LENGTH):
        from tokenizers import Tokenizer

        self.directory, self.max_length = Path(directory), int(max_length)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        except Exception as e:  # the Rust library raises its own exception type for a damaged file
            raise ValueError(f"{self.directory / 'tokenizer.json'} is not a readable tokenizer "
                             f"({' '.join(str(e).split())[:200]}).") from None
        pad = _special(self.directory, "pad_token", "<pad>")
        eos = _special(self.directory, "eos_token", "</s>")
        self.pad_id, self.eos_id = self.tokenizer.token_to_id(pad), self.tokenizer.token_to_id(eos)
        if self.pad_id is None or self.eos_id is None:
            raise ValueError(f"the tokenizer in {self.directory} has no {pad!r} / {eos!r} token: it is not a umT5 "
                             "(T5-family) tokenizer.")
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each (cleaned) text with the closing ``</s>``, before truncation."""
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, max_length) int32 ids and their bool mask, truncated and right-padded."""
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=self.pad_id,
                                      pad_token=self.tokenizer.id_to_token(self.pad_id))
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], bool)
        return ids, mask


class JaxTextEncoder:
    """A umT5 encoder and its tokenizer, from any layout ``convert.umt5.find_text_encoder`` knows.

    ``dtype``: the weights' and activations' dtype (bfloat16, as Wan runs the encoder, or float32);
    ``shardings``: abstract state -> shardings, to spread a large encoder over a mesh (default one device).
    """

    def __init__(self, path: str | Path, *, dtype: str = "bfloat16", max_length: int = DEFAULT_MAX_LENGTH,
                 tokenizer: str | Path | None = None, shardings: Any = None):
        if dtype not in DTYPES:
            raise ValueError(f"text encoder dtype {dtype!r}: use one of {sorted(DTYPES)} (umT5 overflows in float16).")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.files: TextEncoderFiles = find_text_encoder(path, tokenizer)
        self.tokenizer = UMT5Tokenizer(self.files.tokenizer_dir, max_length)
        cfg = self.files.config
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer in {self.files.tokenizer_dir} has {self.tokenizer.vocab_size} tokens but "
                             f"the encoder in {self.files.weights} has vocab_size {cfg.vocab_size}: they do not belong "
                             "together; pass the encoder's own tokenizer (--tokenizer).")
        if self.tokenizer.pad_id != cfg.pad_token_id:
            raise ValueError(f"the tokenizer in {self.files.tokenizer_dir} pads with id {self.tokenizer.pad_id}, the "
                             f"encoder with {cfg.pad_token_id}: they do not belong together; pass the encoder's own "
                             "tokenizer (--tokenizer).")
        self.dtype, self.max_length, self.dim = dtype, int(max_length), cfg.d_model
        self.model = load_umt5(self.files, param_dtype=DTYPES[dtype], shardings=shardings)
        self._forward = jax.jit(lambda model, ids, mask: model(ids, mask))
        log.info("umT5 encoder (%s, %s layout, %s) from %s", describe(cfg), self.files.layout, dtype,
                 self.files.weights)

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, max_length, D) float32 embeddings, zero past each caption's tokens, and the (B, max_length) mask.

        Warns (``CaptionTruncatedWarning``) for every caption longer than ``max_length`` tokens.
        """
        texts = [prompt_clean(c) for c in captions]
        for caption, n in zip(captions, self.tokenizer.token_counts(texts), strict=True):
            if n > self.max_length:
                warnings.warn(f"caption {short_caption(caption)} has {n} tokens, more than max_length "
                              f"{self.max_length}: truncated to {self.max_length} tokens.", CaptionTruncatedWarning,
                              stacklevel=2)
        ids, mask = self.tokenizer(texts)
        hidden = np.asarray(self._forward(self.model, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
        return np.where(mask[..., None], hidden, 0.0).astype(np.float32), mask
