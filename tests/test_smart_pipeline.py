"""Trainer runs -> ``convert export --model pipeline`` -> ``SmartDirectorPipeline.from_pretrained`` -> the video
the JAX ``generate`` makes from the same keyframes, seed and runs (Director-Gen and Director-SR).

The runs are tests/test_generate.py's random gen_tiny and sr_tiny train states saved by the trainer; the
reference is ``pipeline.generate.generate`` (JAX) with the Gen run's recorded config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from director_jax.build.pipeline_export import export_pipeline
from director_jax.errors import UserError
from director_jax.pipeline.generate import generate
from director_jax.pipeline.request import Request, run_config
from director_jax.pytorch.pipeline import psnr
from director_jax.pytorch.smart_pipeline import SmartDirectorPipeline
from tests.test_generate import SIZE, _image, checkpoint, sr_checkpoint  # noqa: F401 -- fixtures

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {0: (230, 40, 40), 8: (40, 200, 60), 16: (40, 60, 230)}


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory) -> dict[int, Path]:
    """Keyframes at the SR size (2 x gen_tiny's 32 x 32)."""
    d = tmp_path_factory.mktemp("keys")
    for frame, colour in COLOURS.items():
        Image.fromarray(_image(colour, (2 * SIZE, 2 * SIZE))).save(d / f"k{frame}.png")
    return {frame: d / f"k{frame}.png" for frame in COLOURS}


@pytest.fixture(scope="module")
def exported(checkpoint, sr_checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "pipeline"
    summary = export_pipeline(str(checkpoint), str(out), sr_src=str(sr_checkpoint[0]))
    assert "Gen + SR" in summary and str(out) in summary
    return out


def test_pipeline_directory_is_diffusers_style(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "SmartDirectorPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["sr_vae"] == [None, None]  # SR shares it
    assert index["transformer"] == index["sr_transformer"] == ["director_jax.pytorch.modules",
                                                              "DirectorWanTransformer3DModel"]
    for part in ("vae", "transformer", "sr_transformer"):
        assert (exported / part / "config.json").is_file()
        assert (exported / part / "diffusion_pytorch_model.safetensors").is_file()
    for part in ("scheduler", "sr_scheduler"):
        assert json.loads((exported / part / "scheduler_config.json").read_text())["_class_name"]
    settings = index["director_config"]
    assert (settings["height"], settings["width"], settings["num_frames"], settings["sr_scale"]) == (SIZE, SIZE, 17, 2)


def test_same_video_as_jax_generate(exported, checkpoint, sr_checkpoint, keyframes, tmp_path):  # noqa: F811
    sr_dir, sr_cfg = sr_checkpoint
    req = Request(config=run_config(str(checkpoint), None), ckpt=str(checkpoint), out=str(tmp_path / "jax.mp4"),
                  keyframes=[f"{keyframes[f]}@#{f}" for f in COLOURS], frames=17, steps=2, seed=3, sr=True,
                  sr_ckpt=str(sr_dir), sr_config=sr_cfg, sr_steps=1, progress=False, mesh="single")
    reference = generate(req)
    pipe = SmartDirectorPipeline.from_pretrained(str(exported))
    out = pipe({f"#{f}": keyframes[f] for f in COLOURS}, num_frames=17, num_inference_steps=2, seed=3, sr=True,
               sr_steps=1)
    assert out.frames.shape == (17, 2 * SIZE, 2 * SIZE, 3) and out.lowres.shape == (17, SIZE, SIZE, 3)
    lowres_db = psnr(out.lowres * 2 - 1, reference["lowres"])
    sr_db = psnr(out.frames * 2 - 1, reference["frames"])
    print(f"SmartDirectorPipeline vs JAX generate: Gen {lowres_db:.1f} dB, SR {sr_db:.1f} dB")
    assert lowres_db >= 40 and sr_db >= 40, (lowres_db, sr_db)
    other = pipe({f"#{f}": keyframes[f] for f in COLOURS}, num_frames=17, num_inference_steps=2, seed=4, sr=True,
                 sr_steps=1)
    assert psnr(other.frames * 2 - 1, reference["frames"]) < 35  # another seed, another video


def test_bfloat16_export_halves_the_files_and_still_runs(checkpoint, exported, keyframes, tmp_path):  # noqa: F811
    out = tmp_path / "bf16"
    export_pipeline(str(checkpoint), str(out), dtype="bfloat16")
    f32 = (exported / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    bf16 = (out / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert bf16 < 0.6 * f32
    pipe = SmartDirectorPipeline.from_pretrained(str(out))
    small = {f"#{f}": np.asarray(Image.open(keyframes[f]).resize((SIZE, SIZE))) for f in (0, 16)}
    result = pipe(small, num_frames=17, num_inference_steps=2, seed=3)
    assert result.frames.shape == (17, SIZE, SIZE, 3) and np.isfinite(result.frames).all()
    with pytest.raises(ValueError, match="sr=True needs a pipeline exported with a Director-SR run"):
        pipe(small, num_frames=17, sr=True)


def test_bad_exports_write_nothing(checkpoint, sr_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "never"
    with pytest.raises(UserError, match="sr"):  # a Gen run given as the SR run
        export_pipeline(str(checkpoint), str(out), sr_src=str(checkpoint))
    with pytest.raises(UserError, match="--dtype"):
        export_pipeline(str(checkpoint), str(out), dtype="float16")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier pipeline export"):
        export_pipeline(str(checkpoint), str(tmp_path / "taken"))
    assert not out.exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging directory left behind


def test_cli_exports_a_pipeline(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "director_jax.convert", "export", "--model", "pipeline",
                             "--src", str(checkpoint), "--out", str(out)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported pipeline (Gen, float32)" in result.stdout and (out / "model_index.json").is_file()
