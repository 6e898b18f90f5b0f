"""Computing the umT5 text-embedding cache with PyTorch: what ``python -m director_jax.embed_text`` runs.

``--checkpoint`` is a Wan2.1 diffusers pipeline root (``text_encoder/`` and ``tokenizer/`` inside)
or one directory holding both a ``UMT5EncoderModel`` (``config.json`` + weights) and its tokenizer.
Nothing is downloaded. Caption files are ``.txt`` (one caption per line, blank lines skipped) or
``.jsonl`` (one object with a ``"caption"`` string per line). The empty caption, used for dropped
captions and as the negative prompt, is always computed too (unless ``--noempty_caption``).

A ``.jsonl`` line that also carries ``"cuts"`` (a list) is a curated sample (a line of
``curate``'s ``manifest.jsonl``): its proper shot ranges' captions are read too
(``captions.shot_range_captions``, after the caption), since a loader window that shows only some of
the sample's shots is captioned with them and the shards store their embeddings. So
``--captions curated/manifest.jsonl`` computes everything ``python -m director_jax.shards
--text_cache`` needs. Such a line's caption must have ``len(cuts) + 1`` shots.

Embeddings follow diffusers' ``WanPipeline._get_t5_prompt_embeds`` exactly: prompt cleaning, the
tokenizer padding to ``max_length`` with truncation, the encoder run with the attention mask, each
embedding trimmed to its true token count. The cache stores the trimmed ``(L, D)`` embedding (the
layout and the reader: ``director_jax.data.text_embeddings``). Captions longer than ``max_length``
tokens are truncated (as the pipeline does silently) with a ``CaptionTruncatedWarning`` naming them.

Prompt cleaning: diffusers applies ``ftfy.fix_text`` when ftfy is installed, then
``html.unescape`` twice and whitespace collapsing. This does the same; without ftfy it is
diffusers' own no-ftfy path (html unescaping and whitespace only). Whether ftfy (and which
version) was used is part of the encoder fingerprint, so entries made with and without it never mix.

PyTorch and transformers are imported only when an encoder is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from director_jax.data.captions import shot_range_captions
from director_jax.data.prompts import CaptionTruncatedWarning, cleaning_description, prompt_clean
from director_jax.data.text_embeddings import (
    DEFAULT_MAX_LENGTH,
    DTYPES,
    ENCODER_FILE,
    FORMAT_VERSION,
    TextEmbeddingCache,
    short_caption,
)
from director_jax.io_utils import atomic_write, atomic_write_text

_FULL_HASH_BYTES = 64 * 1024**2
_SAMPLES, _SAMPLE_BYTES = 16, 1024**2


# ----------------------------------------------------------------------------------------------
# Checkpoint and fingerprint


@dataclasses.dataclass(frozen=True)
class EncoderCheckpoint:
    root: Path
    encoder_dir: Path
    tokenizer_dir: Path


def resolve_checkpoint(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> EncoderCheckpoint:
    """Finds the umT5 encoder and its tokenizer in a user's directory (see the module doc)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"text encoder checkpoint {root} is not a directory.")
    if (root / "text_encoder" / "config.json").exists():
        encoder_dir, default_tok = root / "text_encoder", root / "tokenizer"
    elif (root / "config.json").exists():
        encoder_dir, default_tok = root, root
    elif any(root.glob("models_t5_*.pth")):
        raise ValueError(
            f"{root} looks like an official Wan2.1 checkpoint, whose umT5 encoder is in Wan's own module format. "
            "Use the diffusers layout (e.g. the Wan2.1-T2V-*-Diffusers repository: text_encoder/ and tokenizer/).")
    else:
        raise FileNotFoundError(
            f"{root} holds no umT5 encoder: expected a Wan2.1 diffusers pipeline root (text_encoder/config.json and "
            "tokenizer/) or a directory with a UMT5EncoderModel config.json, its weights and its tokenizer files.")
    config = json.loads((encoder_dir / "config.json").read_text())
    if config.get("model_type") != "umt5":
        raise ValueError(f"{encoder_dir}/config.json has model_type {config.get('model_type')!r}; the Wan text "
                         "encoder is a umT5 encoder (model_type 'umt5', UMT5EncoderModel).")
    tokenizer_dir = Path(tokenizer).expanduser().resolve() if tokenizer is not None else default_tok
    if not tokenizer_dir.is_dir() or not any(
            (tokenizer_dir / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "spiece.model")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer_config.json, tokenizer.json or spiece.model) in "
                                f"{tokenizer_dir}; pass the tokenizer directory explicitly (--tokenizer).")
    return EncoderCheckpoint(root, encoder_dir, tokenizer_dir)


def file_digest(path: Path) -> str:
    """``size:sha256``; files over 64 MiB are hashed from 16 evenly spaced 1 MiB samples."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()}"


def _dir_digests(directory: Path) -> set[str]:
    return {f"{p.name}={file_digest(p)}" for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}


def encoder_identity(ckpt: EncoderCheckpoint, dtype: str, max_length: int) -> dict:
    """Everything the embeddings depend on; its hash is the fingerprint.

    The files are one set of ``name=size:sha256`` over the encoder's and the tokenizer's folders,
    so the same files give the same fingerprint in either layout (one folder or two).
    """
    return {
        "format": FORMAT_VERSION,
        "files": sorted(_dir_digests(ckpt.encoder_dir) | _dir_digests(ckpt.tokenizer_dir)),
        "dtype": dtype,
        "max_length": int(max_length),
        "cleaning": cleaning_description(),
    }


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Computing (PyTorch + transformers, imported only here)


def _load_tokenizer(directory: Path):
    """AutoTokenizer on the tokenizer's own files.

    transformers 5 lets a model ``config.json`` in the same directory override the tokenizer class
    that ``tokenizer_config.json`` declares (umt5 -> T5Tokenizer, even for another tokenizer); a
    neutral config makes the declared class win, as it does in a separate ``tokenizer/`` folder.
    """
    from transformers import AutoTokenizer, PreTrainedConfig

    config_path = directory / "tokenizer_config.json"
    declared = config_path.exists() and json.loads(config_path.read_text()).get("tokenizer_class")
    kwargs = {"config": PreTrainedConfig()} if declared else {}
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)


class TextEncoder:
    """A ``UMT5EncoderModel`` and its tokenizer, run as diffusers' ``WanPipeline`` runs them."""

    def __init__(self, checkpoint: str | os.PathLike, *, dtype: str = "bfloat16", device: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, tokenizer: str | os.PathLike | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {DTYPES} (umT5 overflows in float16).")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.checkpoint = resolve_checkpoint(checkpoint, tokenizer)
        self.dtype, self.max_length = dtype, int(max_length)
        self.identity = encoder_identity(self.checkpoint, dtype, max_length)
        self.fingerprint = fingerprint_of(self.identity)

        import torch
        from transformers import UMT5EncoderModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = _load_tokenizer(self.checkpoint.tokenizer_dir)
        model, info = UMT5EncoderModel.from_pretrained(
            str(self.checkpoint.encoder_dir), dtype=getattr(torch, dtype), local_files_only=True,
            output_loading_info=True, weights_only=True)
        problems = [f"{k}: {sorted(info[k])}" for k in ("missing_keys", "mismatched_keys") if info.get(k)]
        if problems:  # unexpected keys (e.g. a full encoder-decoder umT5's decoder) are fine
            raise ValueError(f"the weights in {self.checkpoint.encoder_dir} do not fit its UMT5EncoderModel config: "
                             + "; ".join(problems))
        self.model = model.to(self.device).eval()
        self.dim = int(model.config.d_model)
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer in {self.checkpoint.tokenizer_dir} has {len(self.tokenizer)} tokens but "
                             f"the encoder's vocab_size is {model.config.vocab_size}: they do not belong together.")
        self.forward_calls = 0

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each cleaned text, special tokens included, before truncation."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def encode_padded(self, captions: Sequence[str]):
        """The pipeline's output: ``(B, max_length, D)`` torch tensor, zero past each caption's tokens,
        the token counts after truncation, and before it. Warns for every truncated caption."""
        import torch

        texts = [prompt_clean(c) for c in captions]
        counts = self.token_counts(texts)
        for caption, n in zip(captions, counts, strict=True):
            if n > self.max_length:
                warnings.warn(f"caption {short_caption(caption)} has {n} tokens, more than max_length "
                              f"{self.max_length}: truncated to {self.max_length} tokens.", CaptionTruncatedWarning,
                              stacklevel=2)
        inputs = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = inputs.input_ids, inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        with torch.inference_mode():
            hidden = self.model(ids.to(self.device), mask.to(self.device)).last_hidden_state
        self.forward_calls += 1
        trimmed = [u[:v] for u, v in zip(hidden, seq_lens, strict=True)]
        padded = torch.stack([torch.cat([u, u.new_zeros(self.max_length - u.size(0), u.size(1))]) for u in trimmed])
        return padded, seq_lens.tolist(), counts

    def encode(self, captions: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """Trimmed ``(L_i, D)`` NumPy embeddings (float32 or bfloat16) and untruncated token counts."""
        padded, lens, counts = self.encode_padded(captions)
        out = []
        for u, n in zip(padded, lens, strict=True):
            u = u[:n].detach().cpu()
            if self.dtype == "bfloat16":
                out.append(np.ascontiguousarray(u.float().numpy().astype(ml_dtypes.bfloat16)))
            else:
                out.append(np.ascontiguousarray(u.numpy()))
        return out, counts

    def encoder_info(self) -> dict:
        import torch
        import transformers

        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "dim": self.dim,
                "dtype": self.dtype, "max_length": self.max_length, "checkpoint": str(self.checkpoint.root),
                "encoder_dir": str(self.checkpoint.encoder_dir), "tokenizer_dir": str(self.checkpoint.tokenizer_dir),
                "identity": self.identity,
                "written_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "device": str(self.device)}}


@dataclasses.dataclass
class CacheSummary:
    cache_dir: Path  # the encoder's folder
    fingerprint: str
    total: int  # distinct captions asked for
    computed: int
    cached: int  # already there before
    forward_calls: int  # encoder batches run
    truncated: list[tuple[str, int]]  # of the computed captions: (caption, untruncated token count)

    def describe(self) -> str:
        lines = [f"text embeddings: {self.total} captions: {self.computed} computed ({self.forward_calls} batches, "
                 f"{len(self.truncated)} truncated), {self.cached} already cached; encoder "
                 f"{self.fingerprint[:16]} -> {self.cache_dir}"]
        lines += [f"  truncated: {short_caption(c)} ({n} tokens)" for c, n in self.truncated[:20]]
        if len(self.truncated) > 20:
            lines.append(f"  ... and {len(self.truncated) - 20} more truncated")
        return "\n".join(lines)


def write_entry(path: Path, caption: str, emb: np.ndarray, token_count: int, fingerprint: str) -> None:
    from safetensors.numpy import save_file

    meta = {"caption": caption, "num_tokens": str(emb.shape[0]), "token_count": str(token_count),
            "fingerprint": fingerprint}
    atomic_write(path, lambda tmp: save_file({"embedding": emb}, tmp, metadata=meta))


def _check_cache_root(cache_dir: Path) -> None:
    if (cache_dir / ENCODER_FILE).exists():
        raise ValueError(f"{cache_dir} is one encoder's folder inside a cache; pass the cache root "
                         f"({cache_dir.parent}) instead.")


def _encoder_folder(cache_dir: Path, encoder: TextEncoder) -> Path:
    _check_cache_root(cache_dir)
    folder = cache_dir / encoder.fingerprint[:16]
    info_path = folder / ENCODER_FILE
    if info_path.exists():
        existing = json.loads(info_path.read_text()).get("fingerprint")
        if existing != encoder.fingerprint:
            raise ValueError(f"{folder} belongs to encoder {existing}, not {encoder.fingerprint} (a 64-bit prefix "
                             "collision); use another --cache directory.")
    else:
        atomic_write_text(info_path, json.dumps(encoder.encoder_info(), indent=2, sort_keys=True) + "\n")
    return folder


def compute_text_embeddings(captions: Sequence[str], cache_dir: str | os.PathLike, encoder: TextEncoder, *,
                            batch_size: int = 8, progress: bool = True) -> CacheSummary:
    """Computes and stores the embeddings of the captions not yet in the cache; returns what it did."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    folder = _encoder_folder(Path(cache_dir), encoder)
    cache = TextEmbeddingCache(folder, max_length=encoder.max_length)
    unique = list(dict.fromkeys(captions))
    todo = [c for c in unique if c not in cache]
    calls_before = encoder.forward_calls
    truncated: list[tuple[str, int]] = []
    with tqdm(total=len(todo), unit="caption", desc="umT5 embeddings",
              disable=not progress or len(todo) <= batch_size) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            embs, counts = encoder.encode(batch)
            for caption, emb, n in zip(batch, embs, counts, strict=True):
                write_entry(cache.path(caption), caption, emb, n, encoder.fingerprint)
                if n > encoder.max_length:
                    truncated.append((caption, n))
            bar.update(len(batch))
    return CacheSummary(folder, encoder.fingerprint, len(unique), len(todo), len(unique) - len(todo),
                        encoder.forward_calls - calls_before, truncated)


# ----------------------------------------------------------------------------------------------
# Caption files


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions of a ``.txt`` (one per line, blank lines skipped) or ``.jsonl`` (``{"caption": ...}``) file;
    a ``.jsonl`` line with ``"cuts"`` (a curated sample) adds its proper shot ranges' captions (module doc)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"caption file {path} must be .txt (one caption per line) or .jsonl (a \"caption\" per line).")
    # split("\n"), not splitlines(): a caption may hold U+2028 and other characters splitlines breaks at
    lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    if path.suffix == ".txt":
        return [line for line in lines if line.strip()]
    captions = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}).") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str):
            raise ValueError(f"{path}:{n}: expected an object with a \"caption\" string, got {line[:100]!r}.")
        captions.append(obj["caption"])
        if isinstance(obj.get("cuts"), list):
            try:
                captions += shot_range_captions(obj["caption"], num_shots=len(obj["cuts"]) + 1, proper=True)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: curated sample {obj.get('id', '?')} (a line with cuts): {e}; fix its "
                                 "caption or rerun curation.") from None
    return captions


def embed_caption_files(caption_files: Sequence[str | os.PathLike], cache_dir: str | os.PathLike,
                        checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        dtype: str = "bfloat16", device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                        batch_size: int = 8, empty_caption: bool = True, progress: bool = True,
                        make_encoder: Callable[[], Any] | None = None) -> CacheSummary:
    """The command's work: read the caption files (plus the empty caption), check the settings, then
    load the encoder and compute what the cache lacks. Bad files or settings raise before any model loads.

    ``make_encoder``: builds another encoder with ``TextEncoder``'s cache interface (``curation.text_cache_jax``:
    the umT5 encoder in JAX); default the PyTorch ``TextEncoder`` of ``checkpoint``."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {DTYPES} (umT5 overflows in float16).")
    if not caption_files:
        raise ValueError("no caption files given.")
    captions = [c for f in caption_files for c in read_captions(f)]
    if empty_caption:
        captions.append("")
    _check_cache_root(Path(cache_dir))
    if make_encoder is not None:
        return compute_text_embeddings(captions, cache_dir, make_encoder(), batch_size=batch_size, progress=progress)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process's own bar is the one that counts captions
    encoder = TextEncoder(checkpoint, dtype=dtype, device=device, max_length=max_length, tokenizer=tokenizer)
    return compute_text_embeddings(captions, cache_dir, encoder, batch_size=batch_size, progress=progress)
