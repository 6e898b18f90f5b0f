"""``python -m director_jax.generate`` on a tiny randomly initialised Director-Gen checkpoint of the trainer.

The CLI runs in process (its absl flags parsed as a user's command line): it writes OUT.mp4, OUT.png and
OUT.json; the mp4 decodes to the asked frame count and size; the keyframes of the output are the VAE
round trip of the given images on exactly the asked frames; the same seed gives the same frames; every
bad input is refused with a clear error before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from director_jax import generate as cli
from director_jax.build import load_frozen_vae
from director_jax.configs_common import load_config
from director_jax.errors import GenerateError
from director_jax.models.multichunk import decode_timeline, encode_timeline
from director_jax.models.timeline import Timeline, place_given_frames
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.generate import generate
from director_jax.pipeline.media import read_video, to_float
from director_jax.pipeline.request import Request, plan
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.trainer import build_run

ROOT = Path(__file__).resolve().parents[1]
GEN_CONFIG = ROOT / "configs" / "gen_tiny.py"
SIZE = 32  # gen_tiny's video size
KEYFRAMES = {0: (230, 40, 40), 8: (40, 200, 60), 16: (40, 60, 230)}  # frame -> colour at 8 fps, 17 frames


_SHARED: dict[str, Path] = {}


def save_gen_checkpoint(workdir: Path, transform=None, configure=None) -> Path:
    """gen_tiny's random train state (every array through ``transform`` if given) saved by the trainer at step 0.

    ``configure(cfg)``: edits gen_tiny's config first (e.g. text conditioning on).
    """
    cfg = load_config(GEN_CONFIG)
    if configure is not None:
        configure(cfg)
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    return save_train_state(cfg, workdir, "gen", transform)


def save_train_state(cfg, workdir: Path, task: str, transform=None) -> Path:
    """``cfg``'s random train state (every array through ``transform`` if given) saved by the trainer's own code
    (build_run's init, Checkpointer) at step 0, on one device."""
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    state = jax.jit(run.init, out_shardings=run.shardings)()
    if transform is not None:
        state = jax.tree.map(transform, state)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(0, state, {}, {"config": cfg.to_json_best_effort(), "task": task, "step": 0}, wait=True)
    ckpt.close()
    return workdir


def shared_gen_checkpoint(tmp_path_factory) -> Path:
    """One gen_tiny checkpoint for the whole session (tests/test_generate_bad_inputs.py shares it)."""
    if "gen" not in _SHARED:
        _SHARED["gen"] = save_gen_checkpoint(tmp_path_factory.mktemp("gen_tiny"))
    return _SHARED["gen"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """gen_tiny's random train state, saved by the trainer's own code at step 0 (as tests/test_evaluate.py)."""
    return shared_gen_checkpoint(tmp_path_factory)


def _image(colour, size=(SIZE, SIZE)) -> np.ndarray:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[...] = colour
    img[(x // 8 + y // 8) % 2 == 0] //= 2  # a checker pattern, so the VAE sees some structure
    return img


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("keyframes")
    paths = {}
    for frame, colour in KEYFRAMES.items():
        paths[frame] = d / f"key_{frame}.png"
        Image.fromarray(_image(colour)).save(paths[frame])
    return paths


def _run(*args: str) -> dict:
    """The CLI in process: argv parsed by absl exactly as ``python -m director_jax.generate ...`` does."""
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", "--noprogress", *args])
    return generate(cli.request_from_flags())


def _keyframe_args(images, times=("0", "1s", "#16")) -> list[str]:
    return [f"--keyframe={images[f]}@{t}" for f, t in zip(KEYFRAMES, times, strict=True)]


def _decode_mp4(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def two_runs(checkpoint, images, tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    out = tmp_path_factory.mktemp("out")
    args = [f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3"]
    a = _run(*args, f"--out={out / 'a.mp4'}")
    b = _run(*args, f"--out={out / 'b.mp4'}")
    return out / "a.mp4", a, out / "b.mp4", b


def test_writes_mp4_sheet_and_settings(two_runs, checkpoint):
    mp4, result, _, _ = two_runs
    frames = _decode_mp4(mp4)
    assert frames.shape == (17, SIZE, SIZE, 3)
    sheet = Image.open(mp4.with_suffix(".png"))
    assert sheet.size[0] > 17 * SIZE and sheet.mode == "RGB"
    settings = json.loads(mp4.with_suffix(".json").read_text())
    assert settings["seed"] == 3 and settings["steps"] == 2 and settings["num_frames"] == 17
    assert settings["fps"] == 8.0 and settings["duration"] == pytest.approx(17 / 8)
    assert [k["frame"] for k in settings["keyframes"]] == [0, 8, 16]
    assert [k["time"] for k in settings["keyframes"]] == ["0", "1s", "#16"]
    assert settings["checkpoint"]["step"] == 0 and settings["checkpoint"]["weights"] == "ema"
    assert settings["caption_used"] is False
    for frame, colour in KEYFRAMES.items():  # each keyframe's fidelity, as NumPy computes it from the frames
        image = _image(colour).astype(np.float32) / 127.5 - 1
        mse = np.mean(np.square(np.clip(result["frames"][frame], -1, 1) - image))
        assert settings["keyframe_psnr_db"][str(frame)] == pytest.approx(10 * np.log10(4 / mse), abs=0.01)
    # the mp4 holds the generated frames (H.264 at crf 16: close, not exact)
    err = np.abs(frames.astype(np.float32) - (result["frames"] + 1) * 127.5).mean()
    assert err < 16.0, err  # yuv420 on the random model's per-pixel noise costs ~8 levels; a wrong video ~60
    assert not list(mp4.parent.glob(".*.tmp*"))  # no temporary files left


def test_keyframes_are_the_vae_round_trip_on_the_asked_frames(two_runs):
    _, result, _, _ = two_runs
    cfg = load_config(GEN_CONFIG)
    vae = load_frozen_vae(cfg, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    layout = Timeline.from_keyframes(17, list(KEYFRAMES)).layout
    given = place_given_frames(17, {f: _image(c).astype(np.float32) / 127.5 - 1 for f, c in KEYFRAMES.items()})
    encode, decode = jitted_codec(vae)  # the CLI's jitted VAE calls (compiled already), not eager ones
    mean, _ = encode_timeline(vae, jnp.asarray(given[None]), layout, encode=encode)
    round_trip = np.asarray(decode_timeline(vae, mean, layout, decode=decode))[0]
    out = result["frames"]
    for frame in KEYFRAMES:
        err = np.abs(out[frame] - np.clip(round_trip[frame], -1, 1)).max()
        assert err < 2e-3, (frame, err)
        here = np.abs(out[frame] - round_trip[frame]).mean()
        for other in (frame - 1, frame + 1):  # and not on a neighbouring frame
            if 0 <= other < 17:
                assert np.abs(out[other] - round_trip[frame]).mean() > 10 * here, (frame, other)


def test_same_seed_same_video(two_runs, checkpoint, images, tmp_path):
    a_path, a, b_path, b = two_runs
    np.testing.assert_array_equal(a["frames"], b["frames"])
    np.testing.assert_array_equal(_decode_mp4(a_path), _decode_mp4(b_path))
    c = _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=4",
             f"--out={tmp_path / 'c.mp4'}")
    assert np.abs(c["frames"] - a["frames"]).max() > 1e-3  # another seed, another video


def test_without_config_the_runs_recorded_config_is_used(two_runs, checkpoint, images, tmp_path):
    """``--config`` left out: the config the trainer recorded in the step gives the same video."""
    _, a, _, _ = two_runs
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    out = tmp_path / "own.mp4"
    flags.FLAGS(["director_jax.generate", "--noprogress", f"--ckpt={checkpoint}", *_keyframe_args(images),
                 "--frames=17", "--steps=2", "--seed=3", f"--out={out}"])
    own = generate(cli.request_from_flags())
    np.testing.assert_array_equal(own["frames"], a["frames"])
    assert "recorded config" in json.loads(out.with_suffix(".json").read_text())["config"]


def test_keyframe_guidance_flag_changes_the_generated_frames_only(two_runs, checkpoint, images, tmp_path):
    _, a, _, _ = two_runs
    out = tmp_path / "guided.mp4"
    g = _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3",
             "--keyframe_guidance=4", f"--out={out}")
    assert json.loads(out.with_suffix(".json").read_text())["keyframe_guidance"] == 4.0
    generated = [f for f in range(17) if f not in KEYFRAMES]
    assert np.abs(g["frames"][generated] - a["frames"][generated]).max() > 1e-2
    np.testing.assert_allclose(g["frames"][list(KEYFRAMES)], a["frames"][list(KEYFRAMES)], atol=1e-5)
    bad = tmp_path / "bad.mp4"
    with pytest.raises(GenerateError, match="keyframe_guidance"):
        _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--keyframe_guidance=nan",
             f"--out={bad}")
    assert not list(tmp_path.glob("bad*"))


def test_bad_inputs_are_refused_and_write_nothing(checkpoint, images, tmp_path):
    good = f"--keyframe={images[0]}@0"
    ck = f"--ckpt={checkpoint}"
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    (bad_dir / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(_image((9, 9, 9), (48, 48))).save(bad_dir / "big.png")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        ("does not exist", ck, f"--keyframe={bad_dir / 'missing.png'}@0"),
        ("could not be read as an image", ck, f"--keyframe={bad_dir / 'broken.png'}@0"),
        ("before the previous keyframe", ck, f"--keyframe={images[8]}@1s", f"--keyframe={images[0]}@0"),
        ("the same frame as", ck, good, f"--keyframe={images[8]}@#0"),
        ("outside the video", ck, good, f"--keyframe={images[8]}@5s", "--frames=17"),
        ("negative", ck, f"--keyframe={images[0]}@-0.5"),
        (r"is 48x48 .* --resize", ck, f"--keyframe={bad_dir / 'big.png'}@0"),
        ("is not PATH@TIME", ck, f"--keyframe={images[0]}"),
        ("neither seconds", ck, f"--keyframe={images[0]}@soon"),
        ("does not exist", f"--ckpt={tmp_path / 'no_such_run'}", good),
        ("no complete checkpoint step", f"--ckpt={bad_dir}", good),
        ("at least one --keyframe", ck),
        ("must name an .mp4", ck, good, f"--out={out / 'x.gif'}"),
    ]
    for match, *args in cases:
        if any(a.startswith("--out=") for a in args):
            cli.define_flags()
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", *args])
            with pytest.raises(GenerateError, match=match):
                generate(cli.request_from_flags())
        else:
            with pytest.raises(GenerateError, match=match):
                _run(*args, f"--out={out / 'bad.mp4'}")
        assert list(out.iterdir()) == [], (match, list(out.iterdir()))
    # --resize accepts the wrong-size image (checked without generating: the plan only)
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", ck, f"--keyframe={bad_dir / 'big.png'}@0",
                 "--resize", f"--out={out / 'ok.mp4'}"])
    p = plan(cli.request_from_flags())
    assert p.given[0].shape == (SIZE, SIZE, 3) and p.num_frames == 17


def test_main_reports_errors_without_traceback(checkpoint, tmp_path, capsys):
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", f"--ckpt={checkpoint}",
                 f"--keyframe={tmp_path / 'missing.png'}@0", f"--out={tmp_path / 'x.mp4'}"])
    assert cli.main(["director_jax.generate"]) == 2
    assert "error: --keyframe image" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_durations_pacing_and_captions(images):
    """Pacing: the same keyframes at other times land on other frames; captions build the shot-structured one."""
    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", "--ckpt=unused", "--duration=4", "--fps=8",
                 f"--keyframe={images[0]}@0", f"--keyframe={images[8]}@3.5s", "--shot_caption=a cat sleeps.",
                 "--shot_caption=a dog barks.", "--out=x.mp4"])
    p = plan(cli.request_from_flags())
    assert p.num_frames == 32 and [k["frame"] for k in p.keyframes] == [0, 28]
    assert p.caption == "The video features 2 shots. Shot 1: a cat sleeps. Shot 2: a hard cut to a dog barks."


def _video_file(path: Path, frames: np.ndarray) -> Path:
    from director_jax.video_io import write_mp4

    return write_mp4(path, frames.astype(np.float32) / 127.5 - 1.0, 8.0, crf=0)


@pytest.mark.parametrize("where", ["forward", "backward", "in between"])
def test_video_extension_keeps_the_given_video(checkpoint, tmp_path, where):
    """--video PATH@START: the given segment comes back as its VAE round trip (encoded as its own chunk)."""
    rng = np.random.default_rng(0)
    clip = np.stack([_image((40 + 30 * i, 200 - 20 * i, 90)) for i in range(5)])
    clip = np.clip(clip.astype(np.int32) + rng.integers(-8, 9, clip.shape), 0, 255).astype(np.uint8)
    path = _video_file(tmp_path / "context.mp4", clip)
    given = read_video(str(path), SIZE, SIZE, resize=False)  # the frames the CLI reads (lossless H.264)
    starts = {"forward": ["0"], "backward": ["end"], "in between": ["0", "end"]}[where]
    result = _run(f"--ckpt={checkpoint}", *[f"--video={path}@{s}" for s in starts], "--frames=17", "--steps=2",
                  f"--out={tmp_path / 'ext.mp4'}")
    spans = [(0 if s == "0" else 12, 5) for s in starts]
    assert [(v["frame"], v["length"]) for v in result["videos"]] == spans
    vae = load_frozen_vae(load_config(GEN_CONFIG), sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    encode, decode = jitted_codec(vae)
    alone = np.asarray(decode(encode(jnp.asarray(to_float(given)[None]))[0]))[0]  # the 5 frames on their own
    for start, length in spans:
        out = result["frames"][start:start + length]
        # causal decoding: a chunk's first frames depend only on its first latents, all of them given here
        np.testing.assert_allclose(out, np.clip(alone, -1, 1), rtol=0, atol=2e-3)
    generated = [f for f in range(17) if not any(s <= f < s + n for s, n in spans)]
    assert np.abs(result["frames"][generated] - np.clip(alone[-1], -1, 1)).mean() > 1e-2  # the rest is generated


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """sr_tiny's random train state at 64x64 (2x over gen_tiny's 32x32), saved by the trainer's code."""
    workdir = tmp_path_factory.mktemp("sr_tiny")
    cfg = load_config(ROOT / "configs" / "sr_tiny.py")
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    cfg.degradation.scales = (2,)
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    state = jax.jit(run.init, out_shardings=run.shardings)()
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(0, state, {}, {"config": cfg.to_json_best_effort(), "task": "sr", "step": 0}, wait=True)
    ckpt.close()
    return workdir, cfg


def test_sr_anchors_full_resolution_keyframes(checkpoint, sr_checkpoint, tmp_path):
    """--sr: the output is 2x the Gen size and its keyframes are the SR VAE's round trip of the full-res images."""
    sr_dir, sr_cfg = sr_checkpoint
    big = {0: _image((230, 40, 40), (2 * SIZE, 2 * SIZE)), 16: _image((40, 60, 230), (2 * SIZE, 2 * SIZE))}
    keyframes = []
    for frame, img in big.items():
        Image.fromarray(img).save(tmp_path / f"big_{frame}.png")
        keyframes.append(f"{tmp_path / f'big_{frame}.png'}@#{frame}")
    req = Request(config=load_config(GEN_CONFIG), ckpt=str(checkpoint), out=str(tmp_path / "sr.mp4"),
                      keyframes=keyframes, frames=17, steps=2, sr=True,
                      sr_ckpt=str(sr_dir), sr_config=sr_cfg, sr_steps=1, progress=False)
    result = generate(req)
    assert result["frames"].shape == (17, 2 * SIZE, 2 * SIZE, 3) and result["lowres"].shape == (17, SIZE, SIZE, 3)
    assert result["sr"]["scale"] == 2
    assert _decode_mp4(tmp_path / "sr.mp4").shape == (17, 2 * SIZE, 2 * SIZE, 3)
    vae = load_frozen_vae(sr_cfg, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    encode, decode = jitted_codec(vae)
    for frame, img in big.items():
        alone = np.asarray(decode(encode(jnp.asarray(to_float(img)[None, None]))[0]))[0, 0]
        np.testing.assert_allclose(result["frames"][frame], np.clip(alone, -1, 1), rtol=0, atol=2e-3)
    # a wrong-size full-res keyframe is refused before anything is written
    Image.fromarray(_image((1, 2, 3), (SIZE, SIZE))).save(tmp_path / "small.png")
    with pytest.raises(GenerateError, match="64x64|--resize"):
        generate(Request(**{**req.__dict__, "keyframes": [f"{tmp_path / 'small.png'}@0"],
                                    "out": str(tmp_path / "bad.mp4")}))
    assert not (tmp_path / "bad.mp4").exists()
