"""umT5 encoder weights from the files users hold -> ``models.umt5.UMT5Encoder``, straight onto their shards.

Sources, found from one path (``find_text_encoder``):

* a Wan diffusers pipeline root (``text_encoder/`` + ``tokenizer/``), or one directory holding a
  ``UMT5EncoderModel`` (``config.json`` with model_type ``umt5``, ``model.safetensors`` or a sharded
  index, or ``pytorch_model.bin``) and its tokenizer: the Hugging Face layout;
* an official Wan release root (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``, the
  tokenizer), or that ``.pth`` file itself: the official layout (``wan/modules/t5.py``'s
  ``T5Encoder`` names: ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,v,o}, pos_embedding.embedding,
  norm2, ffn.{gate.0, fc1, fc2}}``, ``norm``). The file holds no config: the shape is read off the
  tensors (relative-attention distance 128 and eps 1e-6, as the official code fixes them).

Tensors are read one at a time (safetensors slices lazily), transposed from PyTorch's (out, in),
stacked over layers, cast to the wanted dtype and placed on the target sharding, so the host never
holds the whole float32 encoder. A file whose tensors do not fit the encoder (another size, a plain
T5) is one ``ValueError`` listing what is missing or mis-shaped; no reading to a device starts before.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from director_jax.convert.lazy import open_safetensors
from director_jax.convert.pth import load_pth
from director_jax.models.umt5 import LAYER_PARAMS, UMT5Config, UMT5Encoder

OFFICIAL_GLOB = "models_t5_*.pth"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# our stacked layer parameter -> (Hugging Face name, official name) with {i} the layer; all but the
# norms and the bias table are PyTorch Linear weights (out, in), transposed on the way in
_LAYER_NAMES = {
    "norm1": ("encoder.block.{i}.layer.0.layer_norm.weight", "blocks.{i}.norm1.weight"),
    "q": ("encoder.block.{i}.layer.0.SelfAttention.q.weight", "blocks.{i}.attn.q.weight"),
    "k": ("encoder.block.{i}.layer.0.SelfAttention.k.weight", "blocks.{i}.attn.k.weight"),
    "v": ("encoder.block.{i}.layer.0.SelfAttention.v.weight", "blocks.{i}.attn.v.weight"),
    "o": ("encoder.block.{i}.layer.0.SelfAttention.o.weight", "blocks.{i}.attn.o.weight"),
    "position_bias": ("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
                      "blocks.{i}.pos_embedding.embedding.weight"),
    "norm2": ("encoder.block.{i}.layer.1.layer_norm.weight", "blocks.{i}.norm2.weight"),
    "wi_gate": ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "blocks.{i}.ffn.gate.0.weight"),
    "wi_linear": ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "blocks.{i}.ffn.fc1.weight"),
    "wo": ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "blocks.{i}.ffn.fc2.weight"),
}
_NOT_TRANSPOSED = {"norm1", "norm2", "position_bias", "embedding", "final_norm"}
_TOP_NAMES = {"embedding": (("shared.weight", "encoder.embed_tokens.weight"), ("token_embedding.weight",)),
              "final_norm": (("encoder.final_layer_norm.weight",), ("norm.weight",))}
LAYOUTS = ("hf", "official")


@dataclasses.dataclass(frozen=True)
class TextEncoderFiles:
    """Where an encoder's weights and tokenizer are, in which layout, and the encoder's shape."""

    weights: Path  # the Hugging Face model directory, or the official .pth
    layout: str  # "hf" or "official"
    tokenizer_dir: Path
    config: UMT5Config


def official_key_map(cfg: UMT5Config) -> dict[str, str]:
    """Hugging Face name -> official Wan name of every encoder tensor (for exports and tests)."""
    out = {hf.format(i=i): off.format(i=i) for hf, off in _LAYER_NAMES.values() for i in range(cfg.num_layers)}
    out.update({names[0][0]: names[1][0] for names in _TOP_NAMES.values()})
    return out


def _hf_weights_file(directory: Path) -> Path | None:
    return next((directory / n for n in HF_WEIGHTS if (directory / n).exists()), None)


def _tokenizer_dir(default: Path, tokenizer: str | Path | None) -> Path:
    directory = Path(tokenizer).expanduser().resolve() if tokenizer is not None else default
    if not (directory / "tokenizer.json").is_file():
        extra = ""
        if (directory / "spiece.model").exists():
            extra = (" It has spiece.model only: write tokenizer.json once with transformers, "
                     "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR).")
        raise FileNotFoundError(f"no tokenizer.json in {directory}: the umT5 tokenizer's files (tokenizer.json) are "
                                f"needed; pass their directory with --tokenizer.{extra}")
    return directory


def find_text_encoder(path: str | Path, tokenizer: str | Path | None = None) -> TextEncoderFiles:
    """Finds the encoder's weights, layout, config and tokenizer in what the user passed (see the module doc)."""
    root = Path(path).expanduser().resolve()
    if root.is_file() and root.suffix == ".pth":
        return _official(root, _tokenizer_dir(root.parent / "google" / "umt5-xxl", tokenizer))
    if not root.is_dir():
        raise FileNotFoundError(f"text encoder {root} is neither a directory nor an official models_t5_*.pth file.")
    if (root / "text_encoder" / "config.json").exists():
        return _hf(root / "text_encoder", _tokenizer_dir(root / "tokenizer", tokenizer))
    official = sorted(root.glob(OFFICIAL_GLOB))
    if official:
        return _official(official[0], _tokenizer_dir(root / "google" / "umt5-xxl", tokenizer))
    if (root / "config.json").exists():
        return _hf(root, _tokenizer_dir(root, tokenizer))
    raise FileNotFoundError(
        f"{root} holds no umT5 encoder: expected a Wan diffusers pipeline root (text_encoder/ and tokenizer/), a "
        f"directory with a UMT5EncoderModel (config.json + weights) and its tokenizer, or an official Wan release "
        f"root ({OFFICIAL_GLOB} and google/umt5-xxl/).")


def _hf(directory: Path, tokenizer_dir: Path) -> TextEncoderFiles:
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({' '.join(str(e).split())}).") from None
    if _hf_weights_file(directory) is None:
        raise FileNotFoundError(f"{directory} has a config.json but no weights ({', '.join(HF_WEIGHTS)}).")
    return TextEncoderFiles(directory, "hf", tokenizer_dir, UMT5Config.from_hf(config, str(config_path)))


def _official(path: Path, tokenizer_dir: Path) -> TextEncoderFiles:
    shapes = {k: v.shape for k, v in _open(path, "official").items()}
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        inner = shapes["blocks.0.attn.q.weight"][0]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not an official Wan umT5 encoder file: it lacks token_embedding.weight or "
                         "blocks.0.{attn.q, pos_embedding.embedding, ffn.fc1}.weight.") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                     num_heads=heads, relative_attention_num_buckets=buckets)
    return TextEncoderFiles(path, "official", tokenizer_dir, cfg)


class _Tensors:
    """Name -> array on demand: safetensors (lazy), or a whole ``.pth`` / ``.bin`` read once."""

    def __init__(self, path: Path, layout: str):
        self.path, self.tensors = path, _open(path, layout)

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.tensors.get(name)
        return None if t is None else tuple(t.shape)

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return t.read() if hasattr(t, "read") else np.asarray(t)


def _open(path: Path, layout: str) -> dict[str, Any]:
    if path.is_dir():
        path = _hf_weights_file(path)
    if path.name.endswith((".safetensors", ".safetensors.index.json")):
        return open_safetensors(path)
    state = load_pth(path)  # in the file's dtypes (bfloat16 stays bfloat16: half the host memory of float32)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return state


def _source_names(cfg: UMT5Config, layout: str) -> dict[str, list[tuple[str, ...]]]:
    """Our parameter -> per layer (or once), the candidate source names."""
    col = LAYOUTS.index(layout)
    out = {p: [(names[col].format(i=i),) for i in range(cfg.num_layers)] for p, names in _LAYER_NAMES.items()}
    out.update({p: [names[col]] for p, names in _TOP_NAMES.items()})
    return out


def _check(files: TextEncoderFiles, tensors: _Tensors, expected: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """The source name of every tensor, after checking presence and shape of all of them (one error for all)."""
    chosen, missing, wrong = {}, [], []
    for p, per_layer in _source_names(files.config, files.layout).items():
        want = expected[p][1:] if p in _LAYER_NAMES else expected[p]
        chosen[p] = []
        for candidates in per_layer:
            name = next((c for c in candidates if tensors.shape(c) is not None), None)
            if name is None:
                missing.append(candidates[0])
                continue
            got = tensors.shape(name)
            need = want if p in _NOT_TRANSPOSED or len(want) < 2 else tuple(reversed(want))
            if got != need:
                wrong.append(f"{name}: file has {got}, the encoder needs {need}")
            chosen[p].append(name)
    if missing or wrong:
        lines = [f"the umT5 weights in {files.weights} do not fit a {describe(files.config)} encoder:"]
        if missing:
            more = " ..." if len(missing) > 8 else ""
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:8]) + more)
        lines += [f"  wrong shape: {w}" for w in wrong[:8]]
        lines.append("Is this the umT5 encoder the config's text_dim expects, and its own config.json?")
        raise ValueError("\n".join(lines))
    return chosen


def describe(cfg: UMT5Config) -> str:
    return (f"{cfg.num_layers}-layer d_model={cfg.d_model} heads={cfg.num_heads}x{cfg.d_kv} d_ff={cfg.d_ff} "
            f"vocab={cfg.vocab_size}")


def load_umt5(files: TextEncoderFiles, *, param_dtype: Any = np.float32,
              shardings: Callable[[nnx.State], nnx.State] | None = None) -> UMT5Encoder:
    """The encoder with the file's weights in ``param_dtype``, each placed by ``shardings(abstract_state)``.

    ``shardings``: abstract state -> state of ``jax.sharding.Sharding`` (``parallel.rules.param_shardings``
    bound to a mesh); default one device. Checks every tensor's presence and shape before reading any.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: UMT5Encoder(files.config, rngs=nnx.Rngs(0), param_dtype=param_dtype)))
    flat = dict(nnx.to_flat_state(abstract))
    expected = {path[0]: tuple(v.get_value().shape) for path, v in flat.items()}
    tensors = _Tensors(files.weights, files.layout)
    chosen = _check(files, tensors, expected)
    placement = None if shardings is None else dict(nnx.to_flat_state(shardings(abstract)))  # path -> Sharding
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    values = {}
    for path, variable in flat.items():
        name = path[0]
        parts = [tensors.read(n) for n in chosen[name]]
        for source, part in zip(chosen[name], parts, strict=True):
            if not np.isfinite(part).all():
                raise ValueError(f"the umT5 weights in {files.weights} have NaN or infinite values in {source}.")
        if name not in _NOT_TRANSPOSED:
            parts = [p.T for p in parts]
        host = (np.stack(parts) if name in _LAYER_NAMES else parts[0]).astype(variable.get_value().dtype)
        target = single if placement is None else placement[path]
        values[path] = variable.replace(jax.device_put(host, target))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


__all__ = ["LAYER_PARAMS", "TextEncoderFiles", "find_text_encoder", "load_umt5", "official_key_map"]
