"""The umT5 encoder in JAX against transformers' UMT5EncoderModel and diffusers' WanPipeline prompt encoding.

A tiny random umT5 with a real T5 tokenizer: a Unigram vocabulary trained here with ``tokenizers``
and built into transformers' ``T5Tokenizer`` (its ``tokenizer.json`` is what a umT5 release ships).
The official Wan layout is the same tensors under the names of ``wan/modules/t5.py``'s ``T5Encoder``,
saved with ``torch.save`` as the release's ``models_t5_umt5-xxl-enc-bf16.pth``.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from director_jax.convert.umt5 import find_text_encoder, load_umt5, official_key_map
from director_jax.curation import text_embeddings as tw
from director_jax.models.umt5 import UMT5Config, relative_position_buckets
from director_jax.parallel.mesh import create_mesh
from director_jax.parallel.rules import param_shardings
from director_jax.pipeline.text_encoder import JaxTextEncoder

MAX_LEN = 24
CAPTIONS = [
    "A red car drives down a wet road at night.",
    "  Two cats &amp; a dog\n   sleep  on a sofa.  ",
    "",
    "Shot 1: a man walks into the park. Shot 2: a dog runs after a ball across the grass, past the trees and the "
    "lake, under a grey sky, and the man follows it slowly.",  # more than MAX_LEN tokens: truncated
]
CORPUS = [c for c in CAPTIONS if c] + ["the quick brown fox jumps over the lazy dog", "a woman opens a door"] * 4


def _tokenizer(directory: Path, extra_pieces: int = 0) -> None:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    vocab += [(f"\u2581word{i}", -20.0) for i in range(extra_pieces)]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(directory)


def _encoder(seed: int, **overrides) -> transformers.UMT5EncoderModel:
    cfg = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128)
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(transformers.UMT5Config(**{**cfg, **overrides})).eval()


def make_pipeline_root(root: Path) -> Path:
    """A Wan diffusers pipeline root: text_encoder/ (the tiny random umT5, safetensors) and tokenizer/."""
    _encoder(0).save_pretrained(root / "text_encoder")
    _tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    return make_pipeline_root(tmp_path_factory.mktemp("wan_diffusers"))


@pytest.fixture(scope="module")
def official_root(pipeline_root, tmp_path_factory) -> Path:
    """An official release root: the same weights renamed and saved as a .pth, the tokenizer in google/umt5-xxl/."""
    root = tmp_path_factory.mktemp("wan_official")
    model = transformers.UMT5EncoderModel.from_pretrained(str(pipeline_root / "text_encoder")).eval()
    state = model.state_dict()
    names = official_key_map(find_text_encoder(pipeline_root).config)
    torch.save({names[k]: v.to(torch.bfloat16) for k, v in state.items() if k in names},
               root / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(pipeline_root / "tokenizer", root / "google" / "umt5-xxl")
    return root


def _reference(root: Path, captions: list[str], dtype=torch.float32) -> np.ndarray:
    """diffusers' WanPipeline._get_t5_prompt_embeds on the transformers encoder and tokenizer."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    tok = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    model = transformers.UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), dtype=dtype).eval()
    pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        emb = WanPipeline._get_t5_prompt_embeds(pipe, prompt=list(captions), max_sequence_length=MAX_LEN,
                                                device=torch.device("cpu"), dtype=torch.float32)
    return emb.numpy()


def test_relative_position_buckets_equal_transformers():
    attention = transformers.models.umt5.modeling_umt5.UMT5Attention(
        transformers.UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128),
        has_relative_attention_bias=True)
    length = 600  # past max_distance: the last bucket saturates
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = attention._relative_position_bucket(relative).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, 32, 128), want)


def test_tokenizer_and_encoder_equal_the_wan_pipeline(pipeline_root):
    encoder = JaxTextEncoder(pipeline_root, dtype="float32", max_length=MAX_LEN)
    tok = transformers.AutoTokenizer.from_pretrained(str(pipeline_root / "tokenizer"))
    texts = [tw.prompt_clean(c) for c in CAPTIONS]
    want = tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, add_special_tokens=True)
    ids, mask = encoder.tokenizer(texts)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    assert mask[3].all() and ids[3, -1] == encoder.tokenizer.eos_id  # the long caption: truncated, </s> kept

    with pytest.warns(tw.CaptionTruncatedWarning, match="truncated"):
        emb, emb_mask = encoder.encode(CAPTIONS)
    np.testing.assert_allclose(emb, _reference(pipeline_root, CAPTIONS), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(emb_mask, mask)


def test_equals_the_cache_embed_text_writes(pipeline_root):
    """The PyTorch encoder behind ``embed_text`` (float32) and this one agree on every caption."""
    torch_encoder = tw.TextEncoder(pipeline_root, dtype="float32", device="cpu", max_length=MAX_LEN)
    cached, lengths = torch_encoder.encode(CAPTIONS[:3])
    emb, mask = JaxTextEncoder(pipeline_root, dtype="float32", max_length=MAX_LEN).encode(CAPTIONS[:3])
    for row, (entry, n) in enumerate(zip(cached, (len(c) for c in cached), strict=True)):
        assert mask[row].sum() == n
        np.testing.assert_allclose(emb[row, :n], entry, atol=1e-5, rtol=1e-5)
        assert not emb[row, n:].any()
    assert lengths  # token counts came back for every caption


def test_official_layout_loads_the_same_encoder(pipeline_root, official_root):
    files = find_text_encoder(official_root)
    assert files.layout == "official" and files.config == find_text_encoder(pipeline_root).config
    official = JaxTextEncoder(official_root, dtype="float32", max_length=MAX_LEN).encode(CAPTIONS[:3])[0]
    # the official file is bfloat16: compare with the transformers encoder run on those bfloat16 weights
    model = transformers.UMT5EncoderModel.from_pretrained(str(pipeline_root / "text_encoder")).eval()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)
    ref_root = official_root / "reference"
    model.save_pretrained(ref_root / "text_encoder")
    shutil.copytree(pipeline_root / "tokenizer", ref_root / "tokenizer")
    np.testing.assert_allclose(official, _reference(ref_root, CAPTIONS[:3]), atol=1e-5, rtol=1e-5)


def test_bfloat16_encoder_is_close(pipeline_root):
    """bfloat16 weights and activations (Wan's default): within 5% of the float32 embedding's scale."""
    emb32 = JaxTextEncoder(pipeline_root, dtype="float32", max_length=MAX_LEN).encode(CAPTIONS[:3])[0]
    emb16 = JaxTextEncoder(pipeline_root, dtype="bfloat16", max_length=MAX_LEN).encode(CAPTIONS[:3])[0]
    assert np.max(np.abs(emb16 - emb32)) < 0.05 * np.max(np.abs(emb32))


def test_sharded_encoder_equals_one_device(pipeline_root):
    mesh = create_mesh({"fsdp": 2, "tensor": 4})
    sharded = JaxTextEncoder(pipeline_root, dtype="float32", max_length=MAX_LEN,
                             shardings=lambda abstract: param_shardings(abstract, mesh))
    q = sharded.model.q[...]
    assert q.sharding.spec != jax.sharding.PartitionSpec() and len(q.sharding.device_set) == 8
    single = JaxTextEncoder(pipeline_root, dtype="float32", max_length=MAX_LEN)
    np.testing.assert_allclose(sharded.encode(CAPTIONS)[0], single.encode(CAPTIONS)[0], atol=1e-5, rtol=1e-5)


def test_an_encoder_of_another_size_is_refused(pipeline_root, tmp_path):
    root = tmp_path / "mixed"
    _encoder(1, d_ff=64).save_pretrained(root / "text_encoder")
    config = json.loads((pipeline_root / "text_encoder" / "config.json").read_text())  # says d_ff 48
    (root / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit .*d_ff=48.*\n.*wrong shape: encoder.block.0.layer.1"):
        load_umt5(find_text_encoder(root, pipeline_root / "tokenizer"))


def test_a_tokenizer_of_another_encoder_is_refused(pipeline_root, tmp_path):
    _tokenizer(tmp_path / "big", extra_pieces=100)  # more tokens than the encoder's 128
    with pytest.raises(ValueError, match=r"has \d+ tokens but the encoder .* vocab_size 128: they do not belong"):
        JaxTextEncoder(pipeline_root, tokenizer=tmp_path / "big", max_length=MAX_LEN)


def test_missing_tokenizer_json_names_the_fix(tmp_path, pipeline_root):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json .*save_pretrained"):
        find_text_encoder(pipeline_root, tmp_path / "tok")


def test_abstract_config_matches_transformers_parameter_count(pipeline_root):
    files = find_text_encoder(pipeline_root)
    assert isinstance(files.config, UMT5Config)
    model = load_umt5(files)
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model)))
    theirs = sum(p.numel() for p in _encoder(0).parameters())
    assert ours == theirs


def test_embed_text_with_the_jax_backend_writes_the_same_cache(pipeline_root, official_root, tmp_path):
    """``embed_text --backend jax``: entries equal the PyTorch writer's (float32, 1e-5), in a folder of their own;
    from the official layout too (no PyTorch on that path)."""
    from director_jax.curation.text_cache_jax import embed_caption_files_jax
    from director_jax.curation.text_embeddings import embed_caption_files
    from director_jax.data.text_embeddings import load_text_embeddings

    captions = tmp_path / "captions.jsonl"  # one JSON object a line: the second caption holds a newline
    captions.write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS[:2]))
    kw = dict(dtype="float32", max_length=MAX_LEN, progress=False)
    torch_summary = embed_caption_files([captions], tmp_path / "torch", pipeline_root, device="cpu", **kw)
    jax_summary = embed_caption_files_jax([captions], tmp_path / "jax", pipeline_root, **kw)
    assert jax_summary.fingerprint != torch_summary.fingerprint and jax_summary.computed == 3  # 2 + the empty one
    wanted = [*CAPTIONS[:2], ""]
    want, want_mask = load_text_embeddings(tmp_path / "torch", wanted, max_length=MAX_LEN)
    got, got_mask = load_text_embeddings(tmp_path / "jax", wanted, max_length=MAX_LEN)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    again = embed_caption_files_jax([captions], tmp_path / "jax", pipeline_root, **kw)
    assert again.computed == 0 and again.cached == 3
    official = embed_caption_files_jax([captions], tmp_path / "official", official_root, **kw)
    assert official.computed == 3 and official.fingerprint != jax_summary.fingerprint
