"""``generate`` with a caption embedded by the umT5 encoder in JAX (``--text_encoder``), and without PyTorch.

A text-conditioned gen_tiny checkpoint (random weights, text_dim 32) and the tiny umT5 of
tests/test_umt5.py (d_model 32, a real T5 tokenizer). The reference is the other way the project
embeds captions: ``embed_text``'s PyTorch encoder writing a float32 cache, read with ``--text_cache``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from director_jax import generate as cli
from director_jax.curation.text_embeddings import embed_caption_files
from director_jax.errors import GenerateError
from director_jax.pipeline.generate import generate
from tests.test_generate import KEYFRAMES, _decode_mp4, _image, _keyframe_args, save_gen_checkpoint
from tests.test_umt5 import _encoder, _tokenizer, make_pipeline_root

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "A red car drives down a wet road at night."
OTHER = "Two cats sleep on a sofa."
MAX_LENGTH = 64  # gen_tiny's text.max_length


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    """Text conditioning on; the zero-initialised weights (output projections) made non-zero so captions matter."""

    def unzero(a):
        return a + 0.05 if jnp.issubdtype(a.dtype, jnp.floating) and a.size and not a.any() else a

    return save_gen_checkpoint(tmp_path_factory.mktemp("gen_text"), transform=unzero,
                               configure=lambda cfg: cfg.text.update(conditioning=True))


@pytest.fixture(scope="module")
def encoder_root(tmp_path_factory) -> Path:
    return make_pipeline_root(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("keyframes")
    for frame, colour in KEYFRAMES.items():
        Image.fromarray(_image(colour)).save(d / f"key_{frame}.png")
    return {frame: d / f"key_{frame}.png" for frame in KEYFRAMES}


def _run(*args: str) -> dict:
    """The CLI in process, with the run's recorded (text-conditioned) config."""
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", "--noprogress", *args])
    return generate(cli.request_from_flags())


def _args(ckpt: Path, images, out: Path, *extra: str) -> list[str]:
    return [f"--ckpt={ckpt}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=5", f"--out={out}",
            *extra]


def test_jax_encoder_gives_the_video_the_cache_gives(text_checkpoint, encoder_root, images, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{CAPTION}\n")
    embed_caption_files([captions], tmp_path / "cache", encoder_root, dtype="float32", device="cpu",
                        max_length=MAX_LENGTH, progress=False)
    cached = _run(*_args(text_checkpoint, images, tmp_path / "cached.mp4", f"--caption={CAPTION}",
                         f"--text_cache={tmp_path / 'cache'}"))
    jax_text = _run(*_args(text_checkpoint, images, tmp_path / "jax.mp4", f"--caption={CAPTION}",
                           f"--text_encoder={encoder_root}", "--text_dtype=float32"))
    np.testing.assert_allclose(jax_text["frames"], cached["frames"], atol=1e-4)
    other = _run(*_args(text_checkpoint, images, tmp_path / "other.mp4", f"--caption={OTHER}",
                        f"--text_encoder={encoder_root}", "--text_dtype=float32"))
    sharded = _run(*_args(text_checkpoint, images, tmp_path / "sharded.mp4", f"--caption={CAPTION}",
                          f"--text_encoder={encoder_root}", "--text_dtype=float32", "--mesh=fsdp=4,tensor=2"))
    np.testing.assert_allclose(sharded["frames"], jax_text["frames"], atol=1e-5)  # encoder and DiT on the mesh
    assert np.abs(other["frames"] - jax_text["frames"]).max() > 1e-3  # the caption reaches the model
    text = json.loads((tmp_path / "jax.json").read_text())["text"]
    assert text == {"encoder": str(encoder_root), "tokenizer": None, "dtype": "float32"}
    assert json.loads((tmp_path / "cached.json").read_text())["text"] == {"cache": str(tmp_path / "cache")}


_WITHOUT_TORCH = textwrap.dedent('''
    import importlib.abc, runpy, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "diffusers"):
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, NoTorch())
    sys.argv = ["generate", *sys.argv[1:]]
    try:
        runpy.run_module("director_jax.generate", run_name="__main__")
    finally:
        print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "diffusers"}))
''')


def test_generate_needs_no_torch(text_checkpoint, encoder_root, images, tmp_path):
    """The whole command, caption included, in a process where importing torch / transformers fails."""
    out = tmp_path / "no_torch.mp4"
    args = _args(text_checkpoint, images, out, f"--caption={CAPTION}", f"--text_encoder={encoder_root}",
                 "--text_dtype=float32", "--noprogress")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args], capture_output=True, text=True,
                            env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout
    in_process = _run(*_args(text_checkpoint, images, tmp_path / "here.mp4", f"--caption={CAPTION}",
                             f"--text_encoder={encoder_root}", "--text_dtype=float32"))
    decoded = _decode_mp4(out).astype(np.float32)
    assert np.abs(decoded - (in_process["frames"] + 1) * 127.5).mean() < 16.0  # H.264 of the same frames


def test_text_inputs_that_do_not_fit_are_refused(text_checkpoint, encoder_root, images, tmp_path):
    narrow = tmp_path / "narrow"
    _encoder(0, d_model=16).save_pretrained(narrow / "text_encoder")
    _tokenizer(narrow / "tokenizer")
    cases = {
        "narrow": ([f"--text_encoder={narrow}"],
                   r"--text_encoder: the encoder gives 16-wide embeddings, the model reads model.text_dim=32"),
        "both": ([f"--text_encoder={encoder_root}", f"--text_cache={tmp_path}"], "not both"),
        "neither": ([], "give --text_encoder"),
        "missing": ([f"--text_encoder={tmp_path / 'nowhere'}"], "--text_encoder: .*neither a directory"),
    }
    for name, (extra, message) in cases.items():
        out = tmp_path / f"{name}.mp4"
        with pytest.raises(GenerateError, match=message):
            _run(*_args(text_checkpoint, images, out, f"--caption={CAPTION}", *extra))
        assert not list(tmp_path.glob(f"{name}.*")), name  # nothing written
