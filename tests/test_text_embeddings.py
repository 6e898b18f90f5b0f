"""umT5 text-embedding cache against diffusers' WanPipeline prompt encoding on a tiny random umT5.

The tokenizer is transformers' byte-level ByT5Tokenizer (needs no downloaded files): a caption's
token count is independently known as its UTF-8 byte count + 1 (the EOS token).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from director_jax.curation import text_embeddings as tw
from director_jax.data import text_embeddings as te
from director_jax.data.captions import format_multishot_caption

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 512
CAPTIONS = [
    "A red ball rolls across a wooden floor.",
    "  Two cats &amp; a dog\n   sleep  on a sofa.  ",  # html entity and whitespace: cleaned as diffusers does
    "Café lights — ünïcode at night",
    "",  # the empty caption (dropped caption / negative prompt)
    format_multishot_caption(["a woman opens a door.", "a dark corridor."]),
]


def _byte_tokens(caption: str) -> int:
    """Independent token count for ByT5: bytes of the cleaned caption + EOS."""
    cleaned = re.sub(r"\s+", " ", html.unescape(html.unescape(caption)).strip()).strip()
    return len(cleaned.encode()) + 1


def _make_checkpoint(path: Path, seed: int, layout: str = "pipeline") -> Path:
    tok = transformers.ByT5Tokenizer()
    config = transformers.UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=32)
    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(config).eval()
    enc_dir, tok_dir = (path / "text_encoder", path / "tokenizer") if layout == "pipeline" else (path, path)
    model.save_pretrained(enc_dir)
    tok.save_pretrained(tok_dir)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("wan_a"), seed=0)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("wan_b"), seed=1)


@pytest.fixture(scope="module")
def encoder(ckpt) -> tw.TextEncoder:
    return tw.TextEncoder(ckpt, dtype="float32", device="cpu")


def _torch_parts(ckpt: Path):
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"), local_files_only=True)
    model = transformers.UMT5EncoderModel.from_pretrained(str(ckpt / "text_encoder"), local_files_only=True).eval()
    return tok, model


def wan_reference(ckpt: Path, captions: list[str], max_length: int = MAX_LEN) -> np.ndarray:
    """diffusers' own WanPipeline._get_t5_prompt_embeds on the checkpoint's encoder and tokenizer."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    tok, model = _torch_parts(ckpt)
    pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        emb = WanPipeline._get_t5_prompt_embeds(pipe, prompt=list(captions), max_sequence_length=max_length,
                                                device=torch.device("cpu"), dtype=torch.float32)
    return emb.numpy()


def test_cache_matches_wan_pipeline(ckpt, encoder, tmp_path):
    summary = tw.compute_text_embeddings(CAPTIONS, tmp_path, encoder, batch_size=2, progress=False)
    assert (summary.computed, summary.cached, summary.forward_calls) == (5, 0, 3)
    emb, mask = te.load_text_embeddings(tmp_path, CAPTIONS)
    assert emb.shape == (5, MAX_LEN, 32) and emb.dtype == np.float32 and mask.dtype == bool

    ref = wan_reference(ckpt, CAPTIONS)
    np.testing.assert_allclose(emb, ref, atol=1e-6, rtol=0)
    assert mask.sum(1).tolist() == [_byte_tokens(c) for c in CAPTIONS]
    for b in range(len(CAPTIONS)):  # mask is a prefix; zeros past it
        assert mask[b, : mask[b].sum()].all() and not np.any(emb[b, mask[b].sum():])

    # Padding to 512 with the mask gives what the encoder gives on the bare tokens. The padded
    # softmax sums over 512 keys (masked ones as exact zeros) in another order than over the bare
    # tokens, so float32 rounding differs: CI saw 1.07e-6 on a value of 0.27, hence 1e-5 (rel 4e-6).
    tok, model = _torch_parts(ckpt)
    for b, caption in enumerate(CAPTIONS):
        ids = tok([tw.prompt_clean(caption)], return_tensors="pt").input_ids
        with torch.no_grad():
            bare = model(ids).last_hidden_state[0].numpy()
        np.testing.assert_allclose(emb[b, : len(bare)], bare, atol=1e-5, rtol=0)


def test_second_call_computes_nothing(encoder, tmp_path):
    first = tw.compute_text_embeddings(CAPTIONS[:3], tmp_path, encoder, batch_size=8, progress=False)
    cache = te.TextEmbeddingCache(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for _, p in cache.entries()}
    assert first.computed == 3 and len(stamps) == 3

    again = tw.compute_text_embeddings(CAPTIONS[:3] + CAPTIONS[:1], tmp_path, encoder, progress=False)
    assert (again.total, again.computed, again.cached, again.forward_calls) == (3, 0, 3, 0)
    assert {p: p.stat().st_mtime_ns for _, p in cache.entries()} == stamps

    more = tw.compute_text_embeddings(CAPTIONS, tmp_path, encoder, progress=False)
    assert (more.computed, more.cached, more.forward_calls) == (2, 3, 1)
    assert sorted(c for c, _ in cache.entries()) == sorted(CAPTIONS)


def test_other_checkpoint_other_entries(ckpt, ckpt_b, encoder, tmp_path):
    tw.compute_text_embeddings(CAPTIONS, tmp_path, encoder, progress=False)
    enc_b = tw.TextEncoder(ckpt_b, dtype="float32", device="cpu")
    assert enc_b.fingerprint != encoder.fingerprint
    summary_b = tw.compute_text_embeddings(CAPTIONS, tmp_path, enc_b, progress=False)
    assert summary_b.computed == len(CAPTIONS) and summary_b.cached == 0

    with pytest.raises(ValueError, match="2 encoders"):
        te.load_text_embeddings(tmp_path, CAPTIONS)
    emb_a, _ = te.load_text_embeddings(tmp_path, CAPTIONS, encoder=encoder.fingerprint[:8])
    emb_b, _ = te.load_text_embeddings(tmp_path, CAPTIONS, encoder=enc_b.fingerprint[:8])
    np.testing.assert_allclose(emb_a, wan_reference(ckpt, CAPTIONS), atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb_b, wan_reference(ckpt_b, CAPTIONS), atol=1e-6, rtol=0)
    assert np.abs(emb_a - emb_b).max() > 1e-2

    # bfloat16 is another encoder identity too; its values are the float32 ones to bf16 precision.
    enc_bf16 = tw.TextEncoder(ckpt, dtype="bfloat16", device="cpu")
    assert enc_bf16.fingerprint not in (encoder.fingerprint, enc_b.fingerprint)
    assert tw.compute_text_embeddings(CAPTIONS, tmp_path, enc_bf16, progress=False).computed == len(CAPTIONS)
    cache_bf16 = te.TextEmbeddingCache(tmp_path, encoder=enc_bf16.fingerprint)
    assert cache_bf16.read(CAPTIONS[0]).dtype.name == "bfloat16"
    emb_16, _ = cache_bf16.load(CAPTIONS)
    scale = np.abs(emb_a).max()
    assert np.abs(emb_16 - emb_a).max() < 0.05 * scale and np.abs(emb_16 - emb_a).max() > 0


def test_long_caption_truncated_with_warning(ckpt, encoder, tmp_path):
    long_caption = "a dog runs along the beach at sunset. " * 20  # 760 bytes -> 760 tokens + EOS
    n_tokens = _byte_tokens(long_caption)
    assert n_tokens > MAX_LEN
    with pytest.warns(tw.CaptionTruncatedWarning, match=f"has {n_tokens} tokens") as record:
        summary = tw.compute_text_embeddings([long_caption, CAPTIONS[0]], tmp_path, encoder, progress=False)
    assert len(record) == 1 and "a dog runs along" in str(record[0].message)
    assert summary.truncated == [(long_caption, n_tokens)]
    cache = te.TextEmbeddingCache(tmp_path)
    assert cache.read(long_caption).shape == (MAX_LEN, 32)
    emb, mask = cache.load([long_caption])
    assert mask.sum() == MAX_LEN
    np.testing.assert_allclose(emb, wan_reference(ckpt, [long_caption]), atol=1e-6, rtol=0)


def test_missing_captions_error(encoder, tmp_path):
    with pytest.raises(te.MissingTextEmbeddingsError) as empty:
        te.load_text_embeddings(tmp_path / "nothing_here", ["x", "y"])
    assert empty.value.missing == ["x", "y"]

    tw.compute_text_embeddings(CAPTIONS[:1], tmp_path, encoder, progress=False)
    asked = [CAPTIONS[0], "a cat that was never cached", "", "a cat that was never cached"]
    with pytest.raises(te.MissingTextEmbeddingsError) as err:
        te.load_text_embeddings(tmp_path, asked)
    message = str(err.value)
    assert err.value.missing == ["a cat that was never cached", ""]
    assert "2 caption(s)" in message and "'a cat that was never cached'" in message and "''" in message
    assert CAPTIONS[0] not in message
    assert f"python -m director_jax.embed_text --checkpoint {encoder.checkpoint.root}" in message
    assert f"--cache {tmp_path} --dtype float32 --max_length 512" in message
    with pytest.raises(FileNotFoundError, match="no text embeddings with max_length 256"):
        te.TextEmbeddingCache(tmp_path, max_length=256)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "director_jax.embed_text", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})


def _one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    """A user error: exit code 2 and one line ``error: ...`` on stderr that holds ``text``."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert text in result.stderr


def test_cli_txt_and_jsonl(ckpt, tmp_path):
    cache = tmp_path / "cache"
    txt = tmp_path / "caps.txt"
    txt.write_text(f"{CAPTIONS[0]}\n\n{CAPTIONS[2]}\n{CAPTIONS[4]}\n")
    jsonl = tmp_path / "caps.jsonl"
    jsonl_caps = [CAPTIONS[0], CAPTIONS[1], "line one\nline two"]  # a newline only a .jsonl can hold
    jsonl.write_text("".join(json.dumps({"caption": c, "video": f"{i}.mp4"}) + "\n" for i, c in enumerate(jsonl_caps)))
    common = ["--checkpoint", str(ckpt), "--cache", str(cache), "--dtype", "float32", "--device", "cpu",
              "--batch_size", "2", "--noprogress"]

    # End to end in a fresh process: 3 + 3 captions, one shared, and the empty caption added.
    first = _cli("--captions", str(txt), "--captions", str(jsonl), *common)
    assert first.returncode == 0, first.stderr
    assert "6 captions: 6 computed (3 batches, 0 truncated), 0 already cached" in first.stdout
    everything = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[4], CAPTIONS[1], jsonl_caps[2], ""]
    emb, mask = te.load_text_embeddings(cache, everything)
    np.testing.assert_allclose(emb, wan_reference(ckpt, everything), atol=1e-6, rtol=0)
    assert mask.sum(1).tolist() == [_byte_tokens(c) for c in everything]

    # Again (in this process, through the function the command calls, to save a second start-up): nothing to compute.
    again = tw.embed_caption_files([jsonl], cache, ckpt, dtype="float32", device="cpu", batch_size=2, progress=False)
    assert "4 captions: 0 computed (0 batches, 0 truncated), 4 already cached" in again.describe()
    # Bad caption files are user errors, found before any model loads.
    _one_line_error(_cli("--captions", str(tmp_path / "caps.csv"), *common), ".jsonl")
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n{"text": "no caption field"}\n')
    _one_line_error(_cli("--captions", str(tmp_path / "bad.jsonl"), *common),
                    "bad.jsonl:2: expected an object with a \"caption\" string")


def test_a_curated_manifest_gives_every_shot_range_caption(tmp_path):
    shots = ["a woman opens a door.", "a dark corridor.", "her face, lit by a torch."]
    three, two, one = (format_multishot_caption(shots), format_multishot_caption(shots[:2]),
                       format_multishot_caption(["a cat sleeps."]))
    lines = [{"id": "a", "caption": three, "cuts": [110, 120]}, {"id": "b", "caption": one, "cuts": []},
             {"id": "c", "caption": two, "cuts": [7]}, {"caption": "no cuts: a plain caption file's line"}]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # each caption, then its proper ranges by first shot, then last: (0,0) (0,1) (1,1) (1,2) (2,2); then (0,0) (1,1)
    assert tw.read_captions(path) == [
        three,
        "The video features 1 shot. Shot 1: a woman opens a door.",
        two,
        "The video features 1 shot. Shot 1: a dark corridor.",
        "The video features 2 shots. Shot 1: a dark corridor. Shot 2: a hard cut to her face, lit by a torch.",
        "The video features 1 shot. Shot 1: her face, lit by a torch.",
        one,
        two,
        "The video features 1 shot. Shot 1: a woman opens a door.",
        "The video features 1 shot. Shot 1: a dark corridor.",
        lines[3]["caption"],
    ]
    lines[2]["cuts"] = [7, 9]  # three shots, a caption of two: refused with its line, before any model loads
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: curated sample c \(a line with cuts\): the caption "
                                         r"describes 2 shot\(s\) but the video has 3"):
        tw.read_captions(path)


def test_embedding_a_manifest_fills_what_the_shards_need(encoder, tmp_path):
    from director_jax.curation.shards import build_curated_dataset, cached_captions
    from tests.test_shards import make_curated_dir

    samples = make_curated_dir(tmp_path / "curated", [(0, [6, 5, 7], 32, 32, 8.0, 0), (1, [9], 32, 32, 8.0, 50)])
    captions = tw.read_captions(tmp_path / "curated" / "manifest.jsonl")
    assert len(captions) == 1 + 5 + 1
    tw.compute_text_embeddings([*captions, ""], tmp_path / "cache", encoder, progress=False)
    builder = build_curated_dataset(tmp_path / "curated", text_cache=tmp_path / "cache", text_max_length=MAX_LEN,
                                    validation_fraction=0.0, progress=False)
    rec = builder.as_data_source("train")[0]
    assert rec["range_text_lengths"].tolist() == [_byte_tokens(c) for c in captions[1:6]]
    assert set(cached_captions([s for s, _ in samples])) == set(captions)


def test_cli_missing_required_flag(ckpt, tmp_path):
    _one_line_error(_cli("--captions", str(tmp_path / "caps.txt"), "--cache", str(tmp_path / "cache")),
                    "--checkpoint is required")
    _one_line_error(_cli("--checkpoint", str(ckpt), "--cache", str(tmp_path / "cache")), "--captions is required")
    assert not (tmp_path / "cache").exists()


def test_entries_are_safetensors_and_unfinished_writes_are_not_entries(encoder, tmp_path):
    from safetensors import safe_open

    tw.compute_text_embeddings(CAPTIONS[:2], tmp_path, encoder, progress=False)
    folder = tmp_path / encoder.fingerprint[:16]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert [p.name for p in files if p.suffix != ".safetensors"] == ["encoder.json"]
    entries = [p for p in files if p.suffix == ".safetensors"]
    assert len(entries) == 2 and not any(p.name.startswith(".") for p in files)
    for p in entries:
        with safe_open(str(p), framework="np") as f:
            caption = f.metadata()["caption"]
            assert list(f.keys()) == ["embedding"] and f.get_tensor("embedding").shape == (_byte_tokens(caption), 32)
        h = hashlib.sha256(f"{encoder.fingerprint}\n{caption}".encode()).hexdigest()
        assert p == folder / h[:2] / f"{h}.safetensors"
    assert json.loads((folder / "encoder.json").read_text())["fingerprint"] == encoder.fingerprint

    # What a writer killed mid-write leaves: a hidden temporary file beside the entry's name.
    cache = te.TextEmbeddingCache(tmp_path)
    target = cache.path(CAPTIONS[2])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = entries[0].read_bytes()[: entries[0].stat().st_size // 2]
    (target.parent / f".{target.name}.x1y2z3.tmp.safetensors").write_bytes(partial)
    assert CAPTIONS[2] not in cache and len(list(cache.entries())) == 2
    with pytest.raises(te.MissingTextEmbeddingsError):
        cache.load([CAPTIONS[2]])
    assert tw.compute_text_embeddings(CAPTIONS[:3], tmp_path, encoder, progress=False).computed == 1
    assert cache.load([CAPTIONS[2]])[1].sum() == _byte_tokens(CAPTIONS[2])

    # A damaged entry (not something this code writes) is reported by path, not read as data.
    entries[0].write_bytes(partial)
    with pytest.raises(ValueError, match=re.escape(str(entries[0]))):
        cache.load(CAPTIONS[:2])


def test_reader_imports_no_torch(encoder, tmp_path):
    tw.compute_text_embeddings(CAPTIONS[:2], tmp_path, encoder, progress=False)
    script = (
        "import sys, numpy as np, jax.numpy as jnp\n"
        "from director_jax.data.text_embeddings import load_text_embeddings\n"
        f"emb, mask = load_text_embeddings({str(tmp_path)!r}, {CAPTIONS[:2]!r}, dtype=jnp.bfloat16)\n"
        "assert emb.dtype == jnp.bfloat16 and emb.shape == (2, 512, 32), (emb.dtype, emb.shape)\n"
        "print(mask.sum(1).tolist(), sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{[_byte_tokens(c) for c in CAPTIONS[:2]]} []"


def test_reader_reads_bfloat16_in_a_fresh_process(tmp_path):
    """A bfloat16 cache read by a process that imported nothing but the reader (no jax, no ml_dtypes first)."""
    import ml_dtypes

    fingerprint = hashlib.sha256(b"a bfloat16 test encoder").hexdigest()
    folder = tmp_path / fingerprint[:16]
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps({"format": 1, "fingerprint": fingerprint, "dim": 4,
                                                     "dtype": "bfloat16", "max_length": 8}))
    rng = np.random.default_rng(0)
    truth = {c: rng.normal(size=(n, 4)).astype(ml_dtypes.bfloat16) for c, n in [("a red ball", 3), ("", 1)]}
    for caption, emb in truth.items():
        h = hashlib.sha256(f"{fingerprint}\n{caption}".encode()).hexdigest()
        tw.write_entry(folder / h[:2] / f"{h}.safetensors", caption, emb, len(emb), fingerprint)
    script = (
        "import sys, numpy as np\n"
        "assert not {'ml_dtypes', 'jax'} & set(sys.modules), 'not a fresh process'\n"
        "from director_jax.data.text_embeddings import load_text_embeddings\n"
        f"emb, mask = load_text_embeddings({str(tmp_path)!r}, {list(truth)!r}, max_length=8)\n"
        f"bf, _ = load_text_embeddings({str(tmp_path)!r}, {list(truth)!r}, max_length=8, dtype='bfloat16')\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, emb=emb, mask=mask, bf=bf.view(np.uint16))\n"
        "print(str(bf.dtype), sorted(m for m in ('jax', 'torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bfloat16 []"
    with np.load(tmp_path / "out.npz") as z:
        assert z["mask"].sum(1).tolist() == [3, 1]
        for b, emb in enumerate(truth.values()):
            np.testing.assert_array_equal(z["emb"][b, :len(emb)], emb.astype(np.float32))  # bf16 -> f32 is exact
            np.testing.assert_array_equal(z["bf"][b, :len(emb)], emb.view(np.uint16))  # bit-exact
            assert not z["emb"][b, len(emb):].any() and not z["bf"][b, len(emb):].any()


def test_checkpoint_layouts(ckpt, encoder, tmp_path):
    flat = _make_checkpoint(tmp_path / "flat", seed=0, layout="flat")  # same weights, one directory
    enc_flat = tw.TextEncoder(flat, dtype="float32", device="cpu")
    assert enc_flat.checkpoint.encoder_dir == enc_flat.checkpoint.tokenizer_dir == flat.resolve()
    assert enc_flat.fingerprint == encoder.fingerprint  # same files: the cache is shared, wherever they lie
    assert tw.TextEncoder(ckpt, dtype="float32", device="cpu", max_length=64).fingerprint != encoder.fingerprint

    with pytest.raises(FileNotFoundError, match="holds no umT5 encoder"):
        tw.resolve_checkpoint(tmp_path)
    config = json.loads((flat / "config.json").read_text())
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type 't5'"):
        tw.resolve_checkpoint(tmp_path / "t5")
    with pytest.raises(ValueError, match="float16"):
        tw.TextEncoder(ckpt, dtype="float16")


def test_file_digest_samples_large_files(tmp_path):
    path = tmp_path / "big.safetensors"
    size = 65 * 1024**2 + 123
    with open(path, "wb") as f:
        f.truncate(size)
    mib = 1024**2
    expected = hashlib.sha256(b"\0" * (16 * mib)).hexdigest()
    assert tw.file_digest(path) == f"{size}:{expected}"
    with open(path, "r+b") as f:  # a byte inside the 8th sample
        f.seek((size - mib) * 7 // 15 + 10)
        f.write(b"\1")
    assert tw.file_digest(path) != f"{size}:{expected}"
    small = tmp_path / "config.json"
    small.write_bytes(b"{}")
    assert tw.file_digest(small) == f"2:{hashlib.sha256(b'{}').hexdigest()}"
