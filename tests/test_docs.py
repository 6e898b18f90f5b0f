"""Every fenced code block of README.md and docs/*.md runs, so the documentation cannot go stale.

How each kind of block is run (``BLOCKS`` is checked to cover them all, by count):
- ``text`` blocks are printed output or file trees: nothing to run;
- README's first block (the demo and the tests) is what CI runs itself (``.ci/run``), not run here;
- ``python`` blocks run in a fresh process and directory; the lines that name the user's weights and sizes
  (``SETTINGS``) are replaced by small stand-ins this file builds (random weights, 17 frames at 32 px): those
  blocks are the ones that need real weights, counted in ``NEEDS_WEIGHTS``;
- ``bash`` blocks: docs/guide.md's walkthrough runs in order in one directory, on one device, each command with
  small step counts appended (``TINY``), then README's other command blocks in the same directory on 8 devices;
  every command of README's walkthrough block must be one of the guide's (so it ran there).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```$", re.M | re.S)

# The lines of python blocks that name real weights or real sizes -> what the tests run instead.
SETTINGS = {
    'VAE_FILE = "Wan2.1_VAE.pth"  # the official file, a diffusers directory, .safetensors, or a trainer run '
    '(runs/vae)': 'VAE_FILE = "{vae}"',
    'GEN_DIR, VAE_FILE = "Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"  # official repo, diffusers or '
    'pipeline dir': 'GEN_DIR, VAE_FILE = "{dit}", "{vae}"',
    "FRAMES, SIZE, STEPS = 81, 480, 50": "FRAMES, SIZE, STEPS = 17, 32, 2",
}
NEEDS_WEIGHTS = 2  # python blocks run against stand-ins: "Using the VAE", "Using Director-Gen"

# Appended to each command of the walkthrough: small budgets, same code paths.
TINY = {
    "movies": ["--count=6", "--noprogress"],
    "train": ["--config.train.steps=3", "--config.checkpoint.every=3", "--noprogress"],
    "generate": ["--steps=2", "--sr_steps=1", "--noprogress"],
    "evaluate": ["--config.movies.count=1", "--config.metrics.fvd=False", "--config.sampler.steps=2",
                 "--noprogress"],
    "evaluate --suite curated": ["--config.max_clips=3", "--config.metrics.fvd=False", "--config.sampler.steps=2",
                                 "--noprogress"],
    "evaluate compare": [],
    "pytorch": ["--steps=2"],
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of ``page``."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split as the shell would."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(re.sub(r"(^|\s)#.*$", "", line))  # a comment starts at a "#" after a blank (not "@#16")
        if words:
            out.append(words)
    return out


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_every_block_is_run_or_accounted_for():
    counts = {"text": 0, "python": 0, "bash": 0}
    for page in PAGES:
        for lang, _ in blocks(page):
            assert lang in counts, f"{page.name}: a block tagged {lang!r}; tag it python, bash or text"
            counts[lang] += 1
    readme_python = [code for lang, code in blocks(ROOT / "README.md") if lang == "python"]
    assert counts["python"] == len(readme_python) == 3, counts  # all three run below
    assert sum(any(line in code for line in SETTINGS) for code in readme_python) == NEEDS_WEIGHTS
    for line in SETTINGS:  # every stand-in names a line the docs still have
        assert any(line in code for code in readme_python), line


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """A random tiny VAE (diffusers directory) and a random tiny Wan transformer over its latents."""
    from flax import nnx

    from director_jax.build import dit_config, vae_config_from
    from director_jax.configs_common import load_config
    from director_jax.convert import export_transformer, export_vae
    from director_jax.models.dit import WanDiT
    from director_jax.models.vae import WanVAE

    d = tmp_path_factory.mktemp("weights")
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")
    export_vae(WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(0)), d / "vae")
    export_transformer(WanDiT(dit_config(cfg.model), rngs=nnx.Rngs(1)), d / "dit")
    return {"vae": str(d / "vae"), "dit": str(d / "dit")}


@pytest.mark.parametrize("index", range(3))
def test_readme_python_block_runs(index, stand_ins, tmp_path):
    code = [code for lang, code in blocks(ROOT / "README.md") if lang == "python"][index]
    for line, replacement in SETTINGS.items():
        code = code.replace(line, replacement.format(**stand_ins))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "export_vae(vae" in code:
        assert (tmp_path / "out" / "vae" / "config.json").is_file()


def _run(words: list[str], cwd: Path, devices: int) -> str:
    assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("director_jax."), words
    verb = words[2].split(".")[1]
    if verb == "evaluate" and "--suite" in words:
        verb += f" --suite {words[words.index('--suite') + 1]}"
    elif verb == "evaluate" and words[3:4] == ["compare"]:
        verb += " compare"
    extra = TINY.get(verb, [])
    proc = subprocess.run([sys.executable, *words[1:], *extra], cwd=cwd, env=_env(devices), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    """docs/guide.md, every block in order, in a fresh directory on one device; then README's command blocks."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    guide = [words for lang, code in blocks(ROOT / "docs" / "guide.md") if lang == "bash" for words in commands(code)]
    for words in guide:
        _run(words, tmp_path, devices=1)
    video = json.loads((tmp_path / "out" / "video.json").read_text())
    assert set(video["keyframe_psnr_db"]) == {"0", "8", "16"}
    assert all(np.isfinite(v) for v in video["keyframe_psnr_db"].values())
    assert json.loads((tmp_path / "out" / "video_sr.json").read_text())["width"] == 64
    assert (tmp_path / "runs" / "eval" / "report.html").is_file()
    assert (tmp_path / "export" / "dit" / "config.json").is_file() and (tmp_path / "out" / "torch.mp4").is_file()

    readme = [(lang, code) for lang, code in blocks(ROOT / "README.md") if lang == "bash"][1:]  # [0]: CI's own
    walkthrough, *others = readme
    for words in commands(walkthrough[1]):
        assert words in guide, f"README's walkthrough has a command the guide does not run: {shlex.join(words)}"
    for _, code in others:
        for words in commands(code):
            _run(words, tmp_path, devices=8)
