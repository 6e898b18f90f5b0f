"""The PyTorch pipeline from exported weights reproduces the JAX ``generate_video`` (MC-RoPE, chunk padding, CFG);
its command, ``python -m director_jax.pytorch``, gives the library's video and refuses bad input in one line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from director_jax.convert import export_transformer, export_vae, load_transformer
from director_jax.data.synthetic import make_movie
from director_jax.diffusion import sampler_sigmas
from director_jax.models.dit import DirectorGen, WanDiTConfig
from director_jax.models.timeline import Timeline, place_given_frames
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.pipeline.gen import generate_video
from director_jax.pipeline.media import to_float
from director_jax.pytorch.pipeline import TorchDirectorPipeline, jax_noise, noise_shape, psnr
from director_jax.video_io import to_uint8
from tests.torch_reference import reference_transformer, state_dict_numpy

REPO = Path(__file__).resolve().parents[1]

Z = 4
H, W = 32, 48  # latents 4 x 6, tokens 2 x 3 per frame: a non-square grid catches h / w swaps
VAE_CFG = WanVAEConfig(base_dim=8, z_dim=Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                       latents_mean=(-0.76, -0.71, -0.91, 0.11), latents_std=(2.82, 1.45, 3.27, 2.07))  # Wan2.1-like
DIT_CFG = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z, text_dim=8,
                       freq_dim=32, ffn_dim=64, num_layers=2)
# keyframes at 0, 7 and 18: chunks of 7, 11 and 1 frames, padded to 9, 13 and 1 -> 3 + 4 + 1 latents at
# positions 0, 0.25, 1.25 | 1.75, 2, 3, 4 | 4.5 (fractional: diffusers' integer RoPE would use 0..7)
KEYFRAMES = [0, 7, 18]
LAYOUT = Timeline.from_keyframes(19, KEYFRAMES).layout
PSNR_MIN = 40.0
LATENT_ATOL = 1e-3  # sampled latents, float32 on both sides (measured ~1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random Gen DiT and VAE in JAX, exported to diffusers dirs and loaded back in PyTorch."""
    reference = reference_transformer(DIT_CFG, seed=3)
    with torch.no_grad():  # sharper self-attention (q, k RMS-norm gains x 5: logits x 25), as in a trained model,
        for name, p in reference.named_parameters():  # so the temporal positions visibly matter
            if "attn1.norm_q" in name or "attn1.norm_k" in name:
                p.mul_(5.0)
            if "attn1.to_out.0.weight" in name:  # and a larger self-attention share of the residual stream
                p.mul_(8.0)
    gen = DirectorGen(load_transformer(state_dict_numpy(reference), DIT_CFG))
    vae = WanVAE(VAE_CFG, rngs=nnx.Rngs(0))
    root = tmp_path_factory.mktemp("export")
    export_vae(vae, root / "vae")
    export_transformer(gen.dit, root / "transformer")
    pipe = TorchDirectorPipeline.from_pretrained(root / "vae", root / "transformer")
    return gen, vae, pipe, root


@pytest.fixture(scope="module")
def inputs():
    frames = make_movie(2, [19], H, W).frames
    video = place_given_frames(19, {k: frames[k] for k in KEYFRAMES})[None]
    rng = np.random.RandomState(0)
    text = rng.randn(1, 6, DIT_CFG.text_dim).astype(np.float32)
    negative = rng.randn(1, 6, DIT_CFG.text_dim).astype(np.float32)
    mask = np.array([[True] * 4 + [False] * 2])
    noise = jax_noise(7, noise_shape(LAYOUT, 1, H, W, Z))
    return video, text, negative, mask, noise


_RESULTS = {}


def _run_both(models, inputs, **sampling):
    key = tuple(sorted(sampling.items()))
    if key not in _RESULTS:
        _RESULTS[key] = _run_both_uncached(models, inputs, **sampling)
    return _RESULTS[key]


def _run_both_uncached(models, inputs, **sampling):
    gen, vae, pipe, _ = models
    video, text, negative, mask, noise = inputs
    extra = {}
    if sampling.get("guidance_scale", 1.0) != 1.0:
        extra = dict(negative_text=negative, negative_mask=np.ones_like(mask))
    t0 = time.perf_counter()
    # the JAX side draws its noise from the key: the same tensor jax_noise(7, ...) hands to PyTorch
    jax_video, jax_latents = generate_video(gen, vae, LAYOUT, jnp.asarray(video), jnp.asarray(text),
                                            key=jax.random.key(7), text_mask=jnp.asarray(mask), progress=False,
                                            **sampling, **extra)
    t1 = time.perf_counter()
    torch_video, torch_latents = pipe(LAYOUT, video, text, noise, text_mask=mask, **sampling, **extra)
    t2 = time.perf_counter()
    print(f"JAX {t1 - t0:.1f} s, PyTorch {t2 - t1:.1f} s")
    return np.asarray(jax_video), np.asarray(jax_latents), torch_video, torch_latents


@pytest.mark.parametrize("sampling", [
    dict(sampler="euler", steps=8, shift=3.0),
    dict(sampler="unipc", steps=5, shift=5.0, guidance_scale=4.0),
    dict(sampler="euler", steps=6, shift=1.0, keyframe_guidance=3.0),
], ids=["euler", "unipc-cfg", "euler-keyframe-guidance"])
def test_torch_pipeline_reproduces_jax_video(models, inputs, sampling):
    gen, vae, pipe, _ = models
    scheduler = pipe.scheduler(sampling["sampler"], sampling["shift"])
    scheduler.set_timesteps(sampling["steps"])
    np.testing.assert_array_equal(scheduler.sigmas.numpy().astype(np.float32),
                                  sampler_sigmas(sampling["sampler"], sampling["steps"], sampling["shift"]))

    jax_video, jax_latents, torch_video, torch_latents = _run_both(models, inputs, **sampling)
    assert torch_video.shape == jax_video.shape == (1, 19, H, W, 3)
    # the given latents: the same multi-chunk encode on both sides
    given = LAYOUT.given
    assert given.tolist() == [True, False, False, True, False, False, False, True]
    latent_err = np.abs(torch_latents - jax_latents).max()
    given_err = np.abs(torch_latents[:, given] - jax_latents[:, given]).max()
    value = psnr(torch_video, jax_video)
    print(f"{sampling}: latents max |diff| {latent_err:.2e} (given {given_err:.2e}), video PSNR {value:.1f} dB, "
          f"latent std {jax_latents[:, ~given].std():.2f}, video std {jax_video.std():.2f}")
    assert given_err < 1e-4
    assert latent_err < LATENT_ATOL
    assert value >= PSNR_MIN
    assert jax_video.std() > 0.05  # a real video, not a constant one that any pipeline would match
    if sampling.get("keyframe_guidance", 1.0) != 1.0:  # guidance reached both samplers: it changes the latents
        unguided = {k: v for k, v in sampling.items() if k != "keyframe_guidance"}
        assert np.abs(_run_both(models, inputs, **unguided)[1] - jax_latents)[:, ~given].max() > 1e-2


def test_integer_rope_does_not_reproduce(models, inputs):
    """diffusers' integer positions 0..L-1 instead of MC-RoPE: the same pipeline no longer matches JAX."""
    gen, vae, pipe, _ = models
    sampling = dict(sampler="euler", steps=8, shift=3.0)
    jax_video, jax_latents, _, _ = _run_both(models, inputs, **sampling)
    video, text, _, mask, noise = inputs
    plain = TorchDirectorPipeline(pipe.vae, pipe.transformer, pipe.device, mc_rope=False)
    int_video, int_latents = plain(LAYOUT, video, text, noise, text_mask=mask, **sampling)
    latent_err = np.abs(int_latents - jax_latents).max()
    value = psnr(int_video, jax_video)
    print(f"integer RoPE: latents max |diff| {latent_err:.2e}, video PSNR {value:.1f} dB")
    # both checks of the parity test fail: latents off by ~1 (1000x the tolerance), the video at 38.6 dB
    # (measured) instead of ~130 dB. This tiny random VAE's decoder damps latent differences, so the video
    # margin under 40 dB is the smaller signal; the latent check is the sharp one.
    assert latent_err > 100 * LATENT_ATOL
    assert value < PSNR_MIN


def _pytorch_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "director_jax.pytorch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_makes_the_librarys_video(models, inputs, tmp_path):
    """Keyframe PNGs at #frames and at seconds, embedding .npy files, --seed: the library's frames for the same
    inputs (the PNG-quantized keyframes, jax_noise(seed)); a keyframe past the end is refused before loading."""
    _, _, pipe, root = models
    video, text, negative, _, _ = inputs
    paths = {}
    for k in KEYFRAMES:
        paths[k] = tmp_path / f"key{k}.png"
        Image.fromarray(to_uint8(video[0, k])).save(paths[k])
    np.save(tmp_path / "text.npy", text[0])
    np.save(tmp_path / "negative.npy", negative)
    fps = 16.0
    common = ["--vae", str(root / "vae"), "--transformer", str(root / "transformer"), "--frames", "19",
              "--text_embeddings", str(tmp_path / "text.npy"), "--fps", str(fps)]
    proc = _pytorch_cli(*common, "--keyframe", f"{paths[0]}@#0", "--keyframe", f"{paths[7]}@#7",
                        "--keyframe", f"{paths[18]}@{18 / fps}s", "--guidance_scale", "2",
                        "--negative_embeddings", str(tmp_path / "negative.npy"), "--sampler", "euler", "--steps", "2",
                        "--shift", "3",
                        "--seed", "7", "--out", str(tmp_path / "out" / "video.npy"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'out' / 'video.npy'}: 19 frames, keyframes at [0, 7, 18]")
    got = np.load(tmp_path / "out" / "video.npy")
    given = place_given_frames(19, {k: to_float(np.asarray(Image.open(paths[k]))) for k in KEYFRAMES})[None]
    expected, _ = pipe(LAYOUT, given, text, jax_noise(7, noise_shape(LAYOUT, 1, H, W, Z)), negative_text=negative,
                       guidance_scale=2.0, sampler="euler", steps=2, shift=3.0)
    assert got.shape == (19, H, W, 3) and expected[0].std() > 0.05
    np.testing.assert_allclose(got, expected[0], atol=1e-5, rtol=0)

    late = _pytorch_cli(*common, "--keyframe", f"{paths[0]}@#19", "--out", str(tmp_path / "late.npy"))
    assert late.returncode == 2 and late.stdout == "", late.stderr
    assert late.stderr.startswith("error: --keyframe: keyframe time frame 19 is outside the video: 19 frames")
    assert late.stderr.count("\n") == 1 and not (tmp_path / "late.npy").exists()


def test_command_missing_flag_is_one_line_error(tmp_path):
    proc = _pytorch_cli("--vae", str(tmp_path), "--frames", "5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --transformer, --keyframe, --text_embeddings, --out are required (see --help).\n"
