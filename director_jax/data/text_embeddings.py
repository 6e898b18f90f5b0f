"""umT5 text embeddings: computed once with PyTorch into a cache on disk, read by the JAX side.

Fill the cache (PyTorch, CPU or GPU)::

    python -m director_jax.data.text_embeddings --checkpoint WAN_DIR --captions captions.txt --cache CACHE \\
        [--dtype bfloat16] [--batch_size 8] [--device cpu] [--max_length 512]

``--checkpoint`` is a Wan2.1 diffusers pipeline root (``text_encoder/`` and ``tokenizer/`` inside)
or one directory holding both a ``UMT5EncoderModel`` (``config.json`` + weights) and its tokenizer.
Nothing is downloaded. ``--captions`` files are ``.txt`` (one caption per line, blank lines skipped)
or ``.jsonl`` (one object with a ``"caption"`` string per line). The empty caption, used for
dropped captions and as the negative prompt, is always computed too (``--no_empty_caption`` not to).

Read it (NumPy only; no torch or transformers import)::

    emb, mask = load_text_embeddings(CACHE, captions)   # (B, 512, D) zero-padded, (B, 512) bool

Embeddings follow diffusers' ``WanPipeline._get_t5_prompt_embeds`` exactly: prompt cleaning, the
tokenizer padding to ``max_length`` with truncation, the encoder run with the attention mask, each
embedding trimmed to its true token count. The cache stores the trimmed ``(L, D)`` embedding; the
loader zero-pads it back to ``max_length`` as the pipeline does. Captions longer than ``max_length``
tokens are truncated (as the pipeline does silently) with a ``CaptionTruncatedWarning`` naming them.

Prompt cleaning: diffusers applies ``ftfy.fix_text`` when ftfy is installed, then
``html.unescape`` twice and whitespace collapsing. This does the same; without ftfy it is
diffusers' own no-ftfy path (html unescaping and whitespace only). Whether ftfy (and which
version) was used is part of the encoder fingerprint, so entries made with and without it never mix.

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

import argparse
import dataclasses
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from director_jax.io_utils import atomic_write, atomic_write_text

FORMAT_VERSION = 1
DEFAULT_MAX_LENGTH = 512
ENCODER_FILE = "encoder.json"
DTYPES = ("float32", "bfloat16")
CLI = "python -m director_jax.data.text_embeddings"

_FULL_HASH_BYTES = 64 * 1024**2
_SAMPLES, _SAMPLE_BYTES = 16, 1024**2


class CaptionTruncatedWarning(UserWarning):
    """A caption had more tokens than ``max_length`` and was truncated."""


class MissingTextEmbeddingsError(FileNotFoundError):
    """Some captions are not in the cache; ``missing`` lists them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# ----------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers' pipeline_wan.prompt_clean)


def _ftfy_version() -> str | None:
    if importlib.util.find_spec("ftfy") is None:
        return None
    return importlib.metadata.version("ftfy")


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (when installed), html-unescape twice, collapse whitespace."""
    if _ftfy_version() is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def cleaning_description() -> str:
    version = _ftfy_version()
    ftfy = f"ftfy {version}" if version else "no ftfy"
    return f"wan prompt_clean ({ftfy}; html.unescape x2; whitespace collapsed)"


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


def entry_hash(fingerprint: str, caption: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{caption}".encode("utf-8", "surrogatepass")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading the cache (NumPy only)


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

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
            raise ValueError(f"text-embedding cache entry {path} (caption {_short(caption)}) is unreadable: {e}. "
                             "Delete it and run the cache command again.") from e
        if meta.get("caption") != caption:
            raise ValueError(f"cache entry {path} holds caption {_short(meta.get('caption', ''))}, not "
                             f"{_short(caption)}: the file was misplaced; delete it.")
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
        emb = np.zeros((len(captions), self.max_length, self.dim), _np_dtype(dtype))
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

    def _missing_error(self, missing: list[str]) -> MissingTextEmbeddingsError:
        return missing_error(missing, self.root, self.info.get("checkpoint"), self.info["dtype"], self.max_length,
                             f"for encoder {_describe_encoder(self.info)}")


def missing_error(missing: list[str], cache_root, checkpoint, dtype, max_length,
                  where: str) -> MissingTextEmbeddingsError:
    shown = "\n".join(f"  {_short(c)}" for c in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    checkpoint = shlex.quote(str(checkpoint)) if checkpoint else "UMT5_CHECKPOINT"
    command = (f"{CLI} --checkpoint {checkpoint} --captions CAPTIONS.jsonl --cache {shlex.quote(str(cache_root))} "
               f"--dtype {dtype} --max_length {max_length}")
    return MissingTextEmbeddingsError(
        f"{len(missing)} caption(s) have no text embedding in {cache_root} {where}:\n{shown}{more}\n"
        f"Compute them with\n  {command}\nwhere CAPTIONS.jsonl holds one {{\"caption\": ...}} per line "
        "(or a .txt file with one caption per line).", missing)


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


# ----------------------------------------------------------------------------------------------
# Computing (PyTorch + transformers, imported here only)


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
                warnings.warn(f"caption {_short(caption)} has {n} tokens, more than max_length {self.max_length}: "
                              f"truncated to {self.max_length} tokens.", CaptionTruncatedWarning, stacklevel=2)
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
                import ml_dtypes

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
        lines += [f"  truncated: {_short(c)} ({n} tokens)" for c, n in self.truncated[:20]]
        if len(self.truncated) > 20:
            lines.append(f"  ... and {len(self.truncated) - 20} more truncated")
        return "\n".join(lines)


def _write_entry(path: Path, caption: str, emb: np.ndarray, token_count: int, fingerprint: str) -> None:
    from safetensors.numpy import save_file

    meta = {"caption": caption, "num_tokens": str(emb.shape[0]), "token_count": str(token_count),
            "fingerprint": fingerprint}
    atomic_write(path, lambda tmp: save_file({"embedding": emb}, tmp, metadata=meta))


def _encoder_folder(cache_dir: Path, encoder: TextEncoder) -> Path:
    if (cache_dir / ENCODER_FILE).exists():
        raise ValueError(f"{cache_dir} is one encoder's folder inside a cache; pass the cache root "
                         f"({cache_dir.parent}) instead.")
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
                _write_entry(cache.path(caption), caption, emb, n, encoder.fingerprint)
                if n > encoder.max_length:
                    truncated.append((caption, n))
            bar.update(len(batch))
    return CacheSummary(folder, encoder.fingerprint, len(unique), len(todo), len(unique) - len(todo),
                        encoder.forward_calls - calls_before, truncated)


# ----------------------------------------------------------------------------------------------
# Command line


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions of a ``.txt`` (one per line, blank lines skipped) or ``.jsonl`` (``{"caption": ...}``) file."""
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
    return captions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=CLI, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="Wan2.1 diffusers pipeline root (text_encoder/, tokenizer/) or a umT5 encoder directory")
    parser.add_argument("--captions", required=True, nargs="+", help=".txt or .jsonl caption files")
    parser.add_argument("--cache", required=True, help="the cache directory to fill")
    parser.add_argument("--tokenizer", help="tokenizer directory, when it is not beside the encoder")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="encoder dtype (default: bfloat16)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per caption (512)")
    parser.add_argument("--no_empty_caption", action="store_true",
                        help="do not add the empty caption (the dropped caption and negative prompt)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this process's own bar is the one that counts captions
        captions = [c for f in args.captions for c in read_captions(f)]
        if not args.no_empty_caption:
            captions.append("")
        encoder = TextEncoder(args.checkpoint, dtype=args.dtype, device=args.device, max_length=args.max_length,
                              tokenizer=args.tokenizer)
        summary = compute_text_embeddings(captions, args.cache, encoder, batch_size=args.batch_size,
                                          progress=not args.no_progress)
    except (OSError, ValueError) as e:  # user errors: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
