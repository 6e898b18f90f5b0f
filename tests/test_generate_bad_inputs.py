"""``generate``'s validation layer and its outputs as one unit (issue 18), on real checkpoints, files and processes.

- A table of bad inputs (numbers that are not finite or out of range, an unknown sampler, the memory budget, the
  output location, the SR checkpoint and config, damaged or oversized files, a held lock) through
  ``pipeline.generate.generate(Request(...))``: each is one line naming the problem, and nothing is written. The
  same table through ``python -m director_jax.generate`` subprocesses (``error: ...``, exit code 2, no traceback)
  is in the slow set.
- 16-bit and float images keep their range; 8-bit modes convert as Pillow does.
- OUT.mp4 / OUT.png / OUT.json are published together: a failed write keeps the previous set, a killed run's
  staging directory is removed (or, when it had committed, finished) by the next run, a kill -9 of the real
  command while it writes leaves the previous set readable and the rerun leaves a complete set and no temporary
  files; two runs to one output cannot interleave; NaN never reaches a video or the JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from director_jax.build import check_config_matches, step_directory
from director_jax.configs_common import load_config
from director_jax.errors import GenerateError, UserError
from director_jax.io_utils import exclusive_lock
from director_jax.pipeline.generate import generate, output_lock, write_outputs
from director_jax.pipeline.media import read_image
from director_jax.pipeline.request import Request, plan
from tests.test_generate import GEN_CONFIG, ROOT, SIZE, save_gen_checkpoint, shared_gen_checkpoint

SR_CONFIG = ROOT / "configs" / "sr_tiny.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return shared_gen_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def cfg():
    return load_config(GEN_CONFIG)


def _checker(colour, size=SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.uint8)
    img[...] = colour
    img[(x // 8 + y // 8) % 2 == 0] //= 2
    return img


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like to Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real input files, good and bad."""
    d = tmp_path_factory.mktemp("inputs")
    out = {}
    for name, colour in (("first", (230, 40, 40)), ("last", (40, 60, 230))):
        out[name] = d / f"{name}.png"
        Image.fromarray(_checker(colour)).save(out[name])
    out["big"] = d / "big.png"  # 64x64: the SR keyframe size
    Image.fromarray(_checker((9, 200, 9), 2 * SIZE)).save(out["big"])
    out["broken"] = d / "broken.png"
    out["broken"].write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out["bomb"] = _png_header(d / "bomb.png", 100_000, 100_000)  # 1e10 pixels: Pillow's DecompressionBombError
    out["bomb_warn"] = _png_header(d / "bomb_warn.png", 10_000, 10_000)  # 1e8: Pillow only warns
    out["nan_tiff"] = d / "nan.tif"
    Image.fromarray(np.full((SIZE, SIZE), np.nan, np.float32)).save(out["nan_tiff"])
    out["not_video"] = d / "clip.mp4"
    out["not_video"].write_bytes(b"\0" * 1000)
    out["long_video"] = d / "long.mp4"
    from director_jax.video_io import write_mp4

    write_mp4(out["long_video"], np.zeros((20, SIZE, SIZE, 3), np.float32), 8.0)
    out["a_file"] = d / "plain_file"
    out["a_file"].write_text("not a directory")
    return out


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def complete_set(out: Path) -> dict:
    """The settings of the complete set at ``out``: OUT.json there, naming OUT.mp4 and OUT.png by their SHA-256."""
    settings = json.loads(out.with_suffix(".json").read_text())  # strict JSON: NaN would not parse back as a number
    for suffix in ("mp4", "png"):
        entry = settings["files"][suffix]
        assert entry["name"] == out.with_suffix("." + suffix).name
        assert entry["sha256"] == _sha(out.with_suffix("." + suffix)), f"OUT.{suffix} is not the one OUT.json names"
    return settings


def _leftovers(d: Path) -> list[str]:
    """Anything in ``d`` besides complete output sets: staging directories, temporary files, lock files."""
    return [n for n in _listing(d) if n.startswith(".") or n.endswith(".lock") or ".tmp" in n]


def _probes(files: dict[str, Path], checkpoint: Path, tmp: Path) -> list[tuple[str, dict]]:
    """(expected message fragment, Request fields) for each bad input; ``OUT`` stands for the probe's --out."""
    first, last = f"{files['first']}@0", f"{files['last']}@#16"
    sr_cfg = load_config(SR_CONFIG)
    sr_cfg.degradation.scales = (2,)
    ro = tmp / "read_only"
    ro.mkdir()
    os.chmod(ro, 0o500)
    probes = [
        # numbers: finite and in range
        ("--fps=nan", dict(fps=float("nan"))),
        ("--fps=inf", dict(fps=float("inf"))),
        ("frame rate from 0.01 to 1000", dict(fps=0.0)),
        ("frame rate from 0.01 to 1000", dict(fps=1e6)),
        ("--duration=inf: give a finite number", dict(duration=float("inf"), frames=None)),
        ("not a finite number of frames", dict(duration=1e308, fps=1000.0, frames=None)),
        ("at least one frame", dict(frames=0)),
        ("--frames=1.5: give a whole number", dict(frames=1.5)),
        ("must be a positive multiple", dict(height=33)),
        ("must be a positive multiple", dict(width=-16)),
        ("'#inf' is not a finite number", dict(keyframes=(f"{files['first']}@#inf",))),
        ("'#' takes a whole frame index", dict(keyframes=(f"{files['first']}@#1.5",))),
        ("'nan' is not a finite number", dict(keyframes=(f"{files['first']}@nan",))),
        ("'1e309s' is not a finite number", dict(keyframes=(f"{files['first']}@1e309s",))),
        ("'-inf' is not a finite number", dict(keyframes=(f"{files['first']}@-inf",))),
        ("--steps=0: sample with 1 to 10000 steps", dict(steps=0)),
        ("--steps=1000000000: sample with 1 to 10000", dict(steps=10**9)),
        ("--shift=nan: give a finite number", dict(shift=float("nan"))),
        ("--shift=-1: the timestep shift is a positive", dict(shift=-1.0)),
        ("--guidance=nan: give a finite number", dict(guidance=float("nan"))),
        ("--guidance=inf: give a finite number", dict(guidance=float("inf"))),
        ("--guidance=1e+30: give a scale from 0 to 100", dict(guidance=1e30)),
        ("--keyframe_guidance=-2: give a scale from 0", dict(keyframe_guidance=-2.0)),
        ("--seed=-1: give a seed from 0", dict(seed=-1)),
        ("--seed=18446744073709551616: give a seed", dict(seed=2**64)),
        ("--sampler='ddim' is not a sampler: choose one of unipc, euler", dict(sampler="ddim")),
        ("--sr_steps=0", dict(sr=True, sr_ckpt=str(checkpoint), sr_config=sr_cfg, sr_steps=0,
                              keyframes=(f"{files['big']}@0",))),
        ("--weights='best'", dict(weights="best")),
        # the memory budget
        ("over the memory budget of 268,435,456 pixels", dict(frames=10**9)),
        ("--max_pixels=", dict(height=2**16, width=2**16)),
        ("over the memory budget of 10,000 pixels", dict(max_pixels=10_000)),
        ("--max_pixels=0: the memory budget is a positive", dict(max_pixels=0)),
        ("the SR output is 17 frames x 64 x 64", dict(sr=True, sr_ckpt=str(checkpoint), sr_config=sr_cfg,
                                                      max_pixels=17 * 32 * 32 * 2, keyframes=(f"{files['big']}@0",))),
        # the output location
        ("must name an .mp4 file", dict(out="OUT.gif")),
        ("is a directory; name a file", dict(out="DIR.mp4")),
        ("is a file, so the directory", dict(out=str(files["a_file"] / "sub" / "x.mp4"))),
        ("is cloud storage", dict(out="gs://bucket/x.mp4")),
        ("needs a file name before .mp4", dict(out="OUTDIR/.mp4")),
        # checkpoints and configs, before any model loads
        ("--ckpt: checkpoint path", dict(ckpt=str(tmp / "no_such_run"))),
        ("--sr needs --sr_ckpt", dict(sr=True)),
        ("--sr_ckpt: checkpoint path", dict(sr=True, sr_ckpt=str(tmp / "no_sr_run"), sr_config=sr_cfg,
                                            keyframes=(f"{files['big']}@0",))),
        ("--sr_ckpt: no complete checkpoint step", dict(sr=True, sr_ckpt=str(files["a_file"].parent),
                                                        sr_config=sr_cfg, keyframes=(f"{files['big']}@0",))),
        ("--sr_config is a 'gen' config", dict(sr=True, sr_ckpt=str(checkpoint), sr_config=load_config(GEN_CONFIG))),
        # files
        ("could not be read as an image", dict(keyframes=(f"{files['broken']}@0",))),
        ("too large to decode safely", dict(keyframes=(f"{files['bomb']}@0",))),
        ("too large to decode safely", dict(keyframes=(f"{files['bomb_warn']}@0",))),
        ("NaN or infinite", dict(keyframes=(f"{files['nan_tiff']}@0",))),
        ("could not be decoded as a video", dict(keyframes=(), videos=(f"{files['not_video']}@0",))),
        ("has more than 17 frames", dict(keyframes=(), videos=(f"{files['long_video']}@0",))),
        ("is not PATH@TIME", dict(keyframes=(str(files["first"]),))),
        ("before the previous keyframe", dict(keyframes=(last, first))),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        probes.append(("is not writable", dict(out=str(ro / "x.mp4"))))
    return probes


def _request(cfg, checkpoint: Path, files: dict[str, Path], out: Path, **fields) -> Request:
    base = dict(config=cfg, ckpt=str(checkpoint), out=str(out), keyframes=(f"{files['first']}@0",), frames=17,
                steps=1, progress=False)
    return Request(**{**base, **fields})


def test_probe_table_in_process(cfg, checkpoint, files, tmp_path):
    """Every bad input: a GenerateError of one line with the expected words, before anything loads; nothing written."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "DIR.mp4").mkdir()
    before = _listing(out_dir)
    probes = _probes(files, checkpoint, tmp_path)
    assert len(probes) >= 20
    tokens = {"OUT.gif": out_dir / "probe.gif", "DIR.mp4": out_dir / "DIR.mp4", "OUTDIR/.mp4": out_dir / ".mp4"}
    for fragment, fields in probes:
        out = fields.pop("out", str(out_dir / "probe.mp4"))
        req = _request(cfg, checkpoint, files, tokens.get(out, out), **fields)
        with pytest.raises(GenerateError) as info:
            generate(req)
        message = str(info.value)
        assert fragment in message, (fragment, message)
        assert "\n" not in message, message
        assert _listing(out_dir) == before, (fragment, _listing(out_dir))
    assert not (files["a_file"].parent / "plain_file" / "sub").exists()


def test_max_pixels_flag_sets_the_budget(files, tmp_path):
    """--max_pixels reaches the plan: the budget refuses 17 x 32 x 32 under it and accepts it at it."""
    from absl import flags

    from director_jax import generate as cli

    def parsed(*args):
        cli.define_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["director_jax.generate", f"--config={GEN_CONFIG}", "--ckpt=unused", "--frames=17",
                     f"--keyframe={files['first']}@0", f"--out={tmp_path / 'v.mp4'}", *args])
        return cli.request_from_flags()

    assert parsed().max_pixels == 2**28
    with pytest.raises(GenerateError, match=r"17 frames x 32 x 32 = 17,408 pixels, over the memory budget of 17,407 "
                                            r"pixels .* --max_pixels=17408"):
        plan(parsed("--max_pixels=17407"))
    assert plan(parsed("--max_pixels=17408")).num_frames == 17
    assert _listing(tmp_path) == []


def test_a_held_lock_refuses_a_second_run_and_writes_nothing(cfg, checkpoint, files, tmp_path):
    out = tmp_path / "busy.mp4"
    with exclusive_lock(str(out) + ".lock"):
        with pytest.raises(GenerateError, match=rf"another generate \(pid {os.getpid()}\) is writing .*busy\.mp4"):
            generate(_request(cfg, checkpoint, files, out))
        assert _listing(tmp_path) == ["busy.mp4.lock"]
    assert _listing(tmp_path) == []  # the holder removes its lock file


def test_high_depth_images_keep_their_range(tmp_path):
    """16-bit PNG (I;16, I) and float TIFF (F) at their real brightness; 8-bit modes as Pillow's RGB conversion."""
    ramp16 = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    got = read_image(str(tmp_path / "g16.png"), SIZE, SIZE, resize=False)
    np.testing.assert_array_equal(got[..., 0], np.round(ramp16 / 65535 * 255).astype(np.uint8))
    assert (got[..., 0] == got[..., 2]).all() and 120 < got.mean() < 135  # old code: 255 almost everywhere

    ramp32 = ramp16.astype(np.int32) * 32768  # a 32-bit integer TIFF (mode I): its type's maximum is 2**31 - 1
    Image.fromarray(ramp32).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    got32 = read_image(str(tmp_path / "i32.tif"), SIZE, SIZE, resize=False)
    np.testing.assert_array_equal(got32[..., 0], np.round(ramp32 / (2**31 - 1) * 255).astype(np.uint8))

    ramp = np.linspace(-0.5, 1.5, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)  # out of [0, 1]: clipped
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    got = read_image(str(tmp_path / "f.tif"), SIZE, SIZE, resize=False)
    np.testing.assert_array_equal(got[..., 1], np.round(np.clip(ramp.astype(np.float64), 0, 1) * 255).astype(np.uint8))
    assert 100 < got.mean() < 160  # old code: 0 or 1 everywhere (black)

    rgb = _checker((200, 100, 50))
    for mode in ("RGBA", "P", "L", "LA", "1"):
        path = tmp_path / f"m_{mode}.png"
        Image.fromarray(rgb).convert(mode).save(path)
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(read_image(str(path), SIZE, SIZE, resize=False), expected, err_msg=mode)


# --- outputs as one unit -----------------------------------------------------------------------------------------


def _plan_and_frames(cfg, files, out: Path, fps: float = 8.0, seed: int = 0):
    p = plan(Request(config=cfg, ckpt="unused", out=str(out), keyframes=(f"{files['first']}@0",), frames=17,
                     fps=fps))
    frames = np.random.default_rng(seed).uniform(-1, 1, (17, SIZE, SIZE, 3)).astype(np.float32)
    return p, frames


def _write(cfg, files, out: Path, seed: int, fps: float = 8.0, **settings) -> dict:
    p, frames = _plan_and_frames(cfg, files, out, fps, seed)
    settings = dict(dict(seed=seed, fps=fps), **settings)
    with output_lock(str(out)):
        write_outputs(str(out), frames, p, settings)
    return settings


def test_failed_write_keeps_the_previous_set(cfg, files, tmp_path):
    out = tmp_path / "v.mp4"
    _write(cfg, files, out, seed=1)
    old = complete_set(out)
    assert old["seed"] == 1
    snapshot = {n: _sha(tmp_path / n) for n in _listing(tmp_path)}
    p, frames = _plan_and_frames(cfg, files, out)
    frames[3, 4, 5, 1] = np.nan  # a NaN video is an error, never a file
    with output_lock(str(out)), pytest.raises(GenerateError, match="NaN or infinite values"):
        write_outputs(str(out), frames, p, dict(seed=2))
    with output_lock(str(out)), pytest.raises(ValueError, match="not JSON compliant"):  # NaN never reaches JSON
        write_outputs(str(out), np.zeros_like(frames), p, dict(seed=2, guidance=float("nan")))
    with output_lock(str(out)), pytest.raises(ValueError, match="fps"):  # the mp4 writer fails inside the staging
        write_outputs(str(out), np.zeros_like(frames), dataclasses.replace(p, fps=-1.0), dict(seed=2))
    assert {n: _sha(tmp_path / n) for n in _listing(tmp_path)} == snapshot
    assert complete_set(out)["seed"] == 1 and _leftovers(tmp_path) == []


def test_fractional_fps_writes(cfg, files, tmp_path):
    """23.976 fps: the old writer raised after all the work (PyAV takes no float rate)."""
    import av

    out = tmp_path / "ntsc.mp4"
    _write(cfg, files, out, seed=0, fps=23.976)
    complete_set(out)
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(23.976)


def _staging_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and ".staging-" in p.name)


def test_next_run_removes_an_unfinished_staging_dir_and_finishes_a_committed_one(cfg, files, tmp_path):
    out = tmp_path / "v.mp4"
    _write(cfg, files, out, seed=1)
    # a run killed while writing: a staging directory without COMMIT, half a video in it
    killed = tmp_path / ".v.mp4.staging-killed1"
    killed.mkdir()
    (killed / "v.mp4").write_bytes(b"half a video")
    (tmp_path / ".v.png.abc123.tmp.png").write_bytes(b"old-style temp")
    with output_lock(str(out)):
        assert not killed.exists() and not (tmp_path / ".v.png.abc123.tmp.png").exists()
        assert complete_set(out)["seed"] == 1  # the previous set as it was
    # a run killed while moving: committed, OUT.json removed and OUT.mp4 moved, the rest still staged
    _write(cfg, files, out, seed=2)
    staged = tmp_path / "staged"
    staged.mkdir()
    settings = _write(cfg, files, staged / "v.mp4", seed=3)
    moving = tmp_path / ".v.mp4.staging-killed2"
    moving.mkdir()
    for name in ("v.png", "v.json"):
        os.replace(staged / name, moving / name)
    (moving / "COMMIT").write_text("v.mp4\nv.png\nv.json\n")
    out.with_suffix(".json").unlink()
    os.replace(staged / "v.mp4", out)
    with output_lock(str(out)):  # the next run finishes the move before anything else
        assert complete_set(out)["seed"] == settings["seed"] == 3
    assert _staging_dirs(tmp_path) == [] and _leftovers(tmp_path) == []


def _command(checkpoint: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "director_jax.generate", f"--config={GEN_CONFIG}", f"--ckpt={checkpoint}",
            f"--keyframe={files['first']}@0", f"--keyframe={files['last']}@#16", "--frames=17", "--steps=1",
            "--noprogress", f"--out={out}", *extra]


def _kill_while_writing(checkpoint, files, out: Path, delay: float) -> bool:
    """Starts the real command, SIGKILLs it ``delay`` s after its staging directory appears; whether it was hit."""
    proc = subprocess.Popen(_command(checkpoint, files, out, "--seed=9"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not _staging_dirs(out.parent):  # the write takes tens of ms: poll often, but leave the CPU to it
            if proc.poll() is not None:
                raise AssertionError(f"finished before it was killed: {proc.communicate()}")
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        if delay:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return bool(_staging_dirs(out.parent))


def _check_after_kill(out: Path, old: dict) -> None:
    staged = _staging_dirs(out.parent)
    if staged and not (staged[0] / "COMMIT").exists():  # killed while writing: the previous set is untouched
        assert complete_set(out) == old
    # else killed while moving (committed): the next run finishes the move


def test_kill_9_while_writing_then_rerun(cfg, checkpoint, files, tmp_path):
    out = tmp_path / "v.mp4"
    _write(cfg, files, out, seed=1)
    old = complete_set(out)
    assert _kill_while_writing(checkpoint, files, out, delay=0.0), "the kill missed the write"
    _check_after_kill(out, old)
    assert (tmp_path / "v.mp4.lock").exists()  # the killed holder could not remove it; the kernel dropped its lock
    result = generate(_request(cfg, checkpoint, files, out, keyframes=(f"{files['first']}@0", f"{files['last']}@#16"),
                               seed=9))
    settings = complete_set(out)
    assert settings["seed"] == 9 and settings["files"] == result["files"]
    assert _leftovers(tmp_path) == [] and _listing(tmp_path) == ["v.json", "v.mp4", "v.png"]


def test_nan_weights_give_an_error_not_a_video(cfg, files, tmp_path):
    """A checkpoint of NaN weights: refused in one line (at load or after sampling), nothing written."""
    workdir = save_gen_checkpoint(tmp_path / "nan_run",
                                  lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x)
    out = tmp_path / "out" / "v.mp4"
    with pytest.raises(UserError, match="NaN") as info:
        generate(_request(cfg, workdir, files, out))
    assert "\n" not in str(info.value)
    assert _listing(out.parent) == []


# --- the real command ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_table_as_subprocesses(checkpoint, files, tmp_path):
    """The in-process table through ``python -m director_jax.generate``: ``error: ...`` on one line, exit code 2."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "DIR.mp4").mkdir()
    flag_cases = [
        ("--fps=nan", ["--fps=nan"]), ("--fps=inf", ["--fps=inf"]), ("--duration=inf", ["--duration=inf"]),
        ("memory budget", ["--frames=1000000000"]), ("memory budget", ["--height=65536", "--width=65536"]),
        ("is not a finite number", [f"--keyframe={files['last']}@1e309s"]),
        ("is not a finite number", [f"--keyframe={files['last']}@nan"]),
        ("'#inf' is not a finite number", [f"--keyframe={files['last']}@#inf"]),
        ("--steps=0", ["--steps=0"]), ("--shift=nan", ["--shift=nan"]), ("--guidance=nan", ["--guidance=nan"]),
        ("--keyframe_guidance=inf", ["--keyframe_guidance=inf"]), ("--seed=-1", ["--seed=-1"]),
        ("choose one of unipc, euler", ["--sampler=ddim"]), ("--max_pixels=0", ["--max_pixels=0"]),
        ("is a directory", [f"--out={out_dir / 'DIR.mp4'}"]),
        ("is a file, so the directory", [f"--out={files['a_file'] / 'x.mp4'}"]),
        ("too large to decode safely", [f"--keyframe={files['bomb']}@#8"]),
        ("could not be read as an image", [f"--keyframe={files['broken']}@#8"]),
        ("--sr_ckpt: checkpoint path", ["--sr", f"--sr_ckpt={tmp_path / 'none'}", f"--sr_config={SR_CONFIG}",
                                        "--resize"]),
        ("--sr_config is a 'gen' config", ["--sr", f"--sr_ckpt={checkpoint}", f"--sr_config={GEN_CONFIG}"]),
    ]
    for fragment, extra in flag_cases:
        out = out_dir / "probe.mp4"
        cmd = _command(checkpoint, files, out)
        if any(e.startswith("--keyframe=") for e in extra):  # the probe's keyframe replaces the last one
            cmd.remove(f"--keyframe={files['last']}@#16")
        if any(e.startswith("--duration=") for e in extra):
            cmd.remove("--frames=17")
        cmd += extra
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2, (extra, done.returncode, done.stderr[-2000:])
        assert len(lines) == 1 and fragment in lines[0], (fragment, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        assert _listing(out_dir) == ["DIR.mp4"], (extra, _listing(out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.002, 0.01, 0.03])
def test_kill_9_at_other_points_then_rerun(cfg, checkpoint, files, tmp_path, delay):
    out = tmp_path / "v.mp4"
    _write(cfg, files, out, seed=1)
    old = complete_set(out)
    _kill_while_writing(checkpoint, files, out, delay=delay)
    _check_after_kill(out, old)
    done = subprocess.run(_command(checkpoint, files, out, "--seed=9"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert complete_set(out)["seed"] == 9
    assert _leftovers(tmp_path) == [] and _listing(tmp_path) == ["v.json", "v.mp4", "v.png"]


def test_a_config_for_another_vae_is_refused_unless_asked_for(cfg, checkpoint, files, tmp_path):
    """Another VAE behind a DiT of the same shape loads without a shape error: the recorded config catches it."""
    other = load_config(GEN_CONFIG)
    other.vae.base_dim = 8  # another VAE architecture; the DiT's weights still fit
    out = tmp_path / "out" / "v.mp4"
    with pytest.raises(GenerateError, match=r"differs from the config .* vae\.base_dim: checkpoint 16, config 8"):
        generate(_request(other, checkpoint, files, out))
    assert not out.parent.exists() or not list(out.parent.iterdir())
    step_dir = step_directory(checkpoint)[0]
    check_config_matches(cfg, step_dir, what="--config", override="x")  # the run's own config passes
    with pytest.raises(UserError, match="--allow_config_mismatch"):
        check_config_matches(other, step_dir, what="--config", override="--allow_config_mismatch")
    plan(_request(other, checkpoint, files, out, allow_config_mismatch=True))  # asked for: the request stands
