"""Bad inputs of ``curate`` and ``shards`` (issue 18): refused in one line before any work, or recorded and skipped.

Real mp4 files (synthetic movies written with PyAV), real file names that are not UTF-8, real lock
holders in other processes. The fast tests call the library; the probe table at the end runs every
case through the real commands (subprocesses, ``-m slow``) and checks the one-line message, the exit
code and the files left afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from director_jax.configs_common import load_config
from director_jax.curation.pipeline import curate
from director_jax.curation.shards import build_curated_dataset
from director_jax.curation.source import CurationSettings
from director_jax.data.synthetic import write_synthetic_movie
from director_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "curate.py"
BAD_NAME = b"caf\xe9 \xff.mp4"  # Latin-1 bytes: not valid UTF-8


def _config():
    cfg = load_config(str(CONFIG))
    cfg.progress = False
    return cfg


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _strict_json_text(path: Path) -> None:
    """The file is UTF-8 and every string in it is encodable (no lone surrogates): JSON any parser reads."""
    text = path.read_bytes().decode("utf-8")

    def walk(x):
        if isinstance(x, str):
            x.encode("utf-8")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k), walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for line in text.splitlines():
        if line.strip():
            walk(json.loads(line))


def _tree(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("movie") / "movie.mp4"
    write_synthetic_movie(path, 0, [20, 24], 48, 64)
    return path


# -- 1. a file name that is not UTF-8 --------------------------------------------------------------------------


def test_non_utf8_names_are_curated_recorded_as_json_and_resumed(movie, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(movie, inputs / "good.mp4")
    bad_video = os.path.join(os.fsencode(inputs), BAD_NAME)
    with open(bad_video, "wb") as f:
        f.write(movie.read_bytes())
    with open(os.path.join(os.fsencode(inputs), b"notes \xff.txt"), "wb") as f:
        f.write(b"not a video")
    out = tmp_path / "out"
    summary = curate([str(inputs)], out, _config())
    assert summary["sources"]["done"] == 2 and summary["sources"]["skipped"] == {"not_video_extension": 1}, summary
    for name in ("shots.jsonl", "manifest.jsonl", "skipped.jsonl"):
        _strict_json_text(out / name)
    shots = {os.path.basename(x["source"]): x for x in _lines(out / "shots.jsonl")}
    escaped = "caf\\xe9 \\xff.mp4"
    assert set(shots) == {"good.mp4", escaped}
    assert bytes.fromhex(shots[escaped]["source_bytes"]) == os.path.realpath(bad_video)
    assert "source_bytes" not in shots["good.mp4"]
    manifest = _lines(out / "manifest.jsonl")
    assert {os.path.basename(m["source"]) for m in manifest} == {"good.mp4", escaped}
    (skip,) = _lines(out / "skipped.jsonl")
    assert skip["reason"] == "not_video_extension" and skip["source"].endswith("notes \\xff.txt")
    assert bytes.fromhex(skip["source_bytes"]).endswith(b"notes \xff.txt")

    before = _tree(out)
    again = curate([str(inputs)], out, _config())  # resumes past both
    assert again["sources"]["already_done"] == 2 and again["sources"]["already_skipped"] == 1, again
    assert again["sources"]["done"] == 0
    after = _tree(out)
    assert {k: v for k, v in after.items() if k != "summary.json"} == {k: v for k, v in before.items()
                                                                         if k != "summary.json"}


# -- 2. inputs with nothing to curate ---------------------------------------------------------------------------


def test_inputs_without_any_video_are_refused_before_anything_is_written(tmp_path):
    empty, texts = tmp_path / "empty", tmp_path / "texts"
    empty.mkdir()
    texts.mkdir()
    (texts / "notes.txt").write_text("x")
    os.symlink(tmp_path / "gone.mp4", texts / "link.mp4")
    cases = [([str(tmp_path / "missing.mp4")], "no such file or directory: "),
             ([str(tmp_path / "a.mp4"), str(tmp_path / "b")], "no such file or directory: "),
             ([str(empty)], "no video to curate in "),
             ([str(texts)], "broken_symlink 1, not_video_extension 1"),
             ([""], "--input names no file or directory")]
    for inputs, fragment in cases:
        out = tmp_path / "out"
        with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
            curate(inputs, out, _config())
        assert not out.exists(), inputs


# -- 3. one run per output directory ---------------------------------------------------------------------------

_HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_output_is_refused_and_a_killed_holder_releases_it(movie, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another curate run is writing {out}"):
            curate([str(movie)], out, _config())
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written, nothing recovered
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = curate([str(movie)], out, _config())  # the kernel dropped the dead holder's lock
    assert summary["sources"]["done"] == 1


# -- 4. the shard builder decodes every clip first -------------------------------------------------------------


@pytest.fixture(scope="module")
def curated(movie, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curated") / "out"
    curate([str(movie)], out, _config())
    assert len(_lines(out / "manifest.jsonl")) >= 2
    return out


def _copy_curated(curated: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    dst = tmp_path / "curated"
    shutil.copytree(curated, dst)
    return dst, _lines(dst / "manifest.jsonl")


def test_shards_refuse_a_clip_that_no_longer_decodes_and_keep_the_last_build(curated, tmp_path):
    root, manifest = _copy_curated(curated, tmp_path)
    build_curated_dataset(root, progress=False, validation_fraction=0.0)
    good = _tree(root / "tfds")
    clip = root / manifest[1]["clip"]
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) * 2 // 3])  # cut short: the index (moov) survives only in some muxes
    with pytest.raises(ValueError, match=rf"{manifest[1]['clip']} \(sample {manifest[1]['id']}\) "
                                         r"(does not decode|decodes to \d+ frames)"):
        build_curated_dataset(root, progress=False, validation_fraction=0.0)
    assert _tree(root / "tfds") == good  # the last good build, untouched
    assert not [p for p in os.listdir(root) if p.startswith(".tfds.") and p != ".tfds.lock"]


def test_shards_refuse_a_clip_whose_frame_count_differs_from_its_line(curated, tmp_path):
    root, manifest = _copy_curated(curated, tmp_path)
    manifest[0]["end_frame"] += 3
    manifest[0]["num_frames"] += 3
    (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    n = manifest[0]["num_frames"]
    with pytest.raises(ValueError, match=rf"{manifest[0]['clip']} .* decodes to {n - 3} frames, the manifest "
                                         rf"records {n}"):
        build_curated_dataset(root, progress=False)
    assert not (root / "tfds").exists()


def test_shards_refuse_clip_paths_outside_the_directory_and_non_finite_numbers(curated, tmp_path):
    root, manifest = _copy_curated(curated, tmp_path)
    for field, value, fragment in [("clip", "../outside.mp4", "is not a path inside"),
                                   ("clip", "/etc/passwd", "is not a path inside"),
                                   ("fps", float("nan"), "must be finite and positive")]:
        lines = [dict(m) for m in manifest]
        lines[0][field] = value
        (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        with pytest.raises(ValueError, match=fragment):
            build_curated_dataset(root, progress=False)
        assert not (root / "tfds").exists()
    for kw, fragment in [({"validation_fraction": float("nan")}, "validation_fraction must be in"),
                         ({"text_max_length": 0}, "text_max_length must be an integer >= 1")]:
        with pytest.raises(ValueError, match=fragment):
            build_curated_dataset(curated, progress=False, **kw)


# -- 5. numeric config values ----------------------------------------------------------------------------------

CONFIG_CASES = [
    ("shots.content_threshold", float("nan"), "config.shots.content_threshold must be finite, got nan"),
    ("shots.content_threshold", -1.0, "config.shots.content_threshold must be in [0, 255], got -1.0"),
    ("shots.adaptive_threshold", float("inf"), "config.shots.adaptive_threshold must be finite"),
    ("shots.histogram_threshold", 2.0, "config.shots.histogram_threshold must be in [0, 1]"),
    ("filters.black_luma", float("nan"), "config.filters.black_luma must be finite"),
    ("filters.static_changed_fraction", 1.5, "config.filters.static_changed_fraction must be in [0, 1]"),
    ("filters.fade_min_change", float("-inf"), "config.filters.fade_min_change must be finite"),
    ("filters.min_shot_frames", 0, "config.filters.min_shot_frames must be >= 1"),
    ("single_shot.min_frames", 0, "config.single_shot.min_frames must be >= 1"),
    ("multi_shot.max_edge_frames", -5, "config.multi_shot.max_edge_frames must be >= 0"),
    ("keyframes.num_even", -1, "config.keyframes.num_even must be in [0, 1024]"),
    ("clip.crf", 99, "config.clip.crf must be in [0, 51]"),
    ("clip.max_short_side", 1, "config.clip.max_short_side must be in [2, 16384]"),
    ("caption.frames_per_shot", 0, "config.caption.frames_per_shot must be in [1, 64]"),
]


@pytest.mark.parametrize(("key", "value", "message"), CONFIG_CASES, ids=[f"{k}={v}" for k, v, _ in CONFIG_CASES])
def test_config_numbers_are_finite_and_in_range(key, value, message, movie, tmp_path):
    cfg = load_config(str(CONFIG))
    section, name = key.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CurationSettings.from_config(cfg)
    with pytest.raises(UserError):
        curate([str(movie)], tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_openai_caption_numbers_are_checked():
    from director_jax.curation.pipeline import build_captioner

    cfg = load_config(str(CONFIG))
    cfg.caption.kind, cfg.caption.openai.model = "openai", "m"
    for name, value, message in [("timeout_s", float("nan"), "timeout_s must be finite"),
                                 ("retries", -1, "retries must be in"), ("temperature", 9.0, "temperature must be in"),
                                 ("backoff_s", float("inf"), "backoff_s must be finite")]:
        c = load_config(str(CONFIG))
        c.caption.kind, c.caption.openai.model = "openai", "m"
        c.caption.openai[name] = value
        with pytest.raises(ValueError, match=f"config.caption.openai.{message}"):
            build_captioner(c.caption)
    build_captioner(cfg.caption)  # the defaults pass


# -- 6. the probe table: the real commands ---------------------------------------------------------------------


def _run(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", f"director_jax.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _probe_inputs(root: Path, movie: Path, curated: Path) -> dict[str, str]:
    """The files the probe cases name (made once), as placeholders."""
    (root / "empty").mkdir(parents=True)
    (root / "texts").mkdir()
    (root / "texts" / "notes.txt").write_text("x")
    (root / "links").mkdir()
    os.symlink(root / "nowhere.mp4", root / "links" / "dead.mp4")
    (root / "afile").write_text("keep me")
    variants = {}
    manifest = _lines(curated / "manifest.jsonl")
    for name, edit in [("truncated", "truncate"), ("frames", "frames"), ("escape", "escape"), ("nanfps", "nanfps")]:
        d = root / name
        shutil.copytree(curated, d)
        lines = [dict(m) for m in manifest]
        if edit == "truncate":
            clip = d / lines[0]["clip"]
            clip.write_bytes(clip.read_bytes()[:200])
        elif edit == "frames":
            lines[0]["num_frames"] += 2
            lines[0]["end_frame"] += 2
        elif edit == "escape":
            lines[0]["clip"] = "../afile"
        else:
            lines[0]["fps"] = float("nan")
        (d / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        variants[name] = str(d)
    return {"movie": str(movie), "root": str(root), "curated": str(curated), "clip0": manifest[0]["clip"],
            **variants}


# (name, command, args, expected stderr fragment). Curate cases write to {out} (must not exist after);
# shards cases must leave no tfds/ beside the manifest.
PROBES = [
    ("curate: missing input", "curate", ["--input", "{root}/missing.mp4"], "error: no such file or directory: "),
    ("curate: two missing inputs", "curate", ["--input", "{root}/a.mp4,{root}/b"], "error: no such file or directory"),
    ("curate: empty directory", "curate", ["--input", "{root}/empty"], "error: no video to curate in "),
    ("curate: only a text file", "curate", ["--input", "{root}/texts"], "not_video_extension 1"),
    ("curate: only a dead link", "curate", ["--input", "{root}/links"], "broken_symlink 1"),
    ("curate: empty --input", "curate", ["--input="], "error: --input names no file or directory"),
    ("curate: NaN threshold", "curate", ["--input", "{movie}", "--config.filters.black_luma=nan"],
     "error: config.filters.black_luma must be finite, got nan"),
    ("curate: inf threshold", "curate", ["--input", "{movie}", "--config.shots.content_threshold=inf"],
     "error: config.shots.content_threshold must be finite"),
    ("curate: negative threshold", "curate", ["--input", "{movie}", "--config.shots.content_threshold=-3"],
     "error: config.shots.content_threshold must be in [0, 255]"),
    ("curate: fraction above 1", "curate", ["--input", "{movie}", "--config.filters.static_changed_fraction=1.5"],
     "error: config.filters.static_changed_fraction must be in [0, 1]"),
    ("curate: zero-length samples", "curate", ["--input", "{movie}", "--config.single_shot.min_frames=0"],
     "error: config.single_shot.min_frames must be >= 1"),
    ("curate: crf out of range", "curate", ["--input", "{movie}", "--config.clip.crf=99"],
     "error: config.clip.crf must be in [0, 51]"),
    ("curate: no caption frames", "curate", ["--input", "{movie}", "--config.caption.frames_per_shot=0"],
     "error: config.caption.frames_per_shot must be in [1, 64]"),
    ("curate: NaN caption timeout", "curate", ["--input", "{movie}", "--config.caption.kind=openai",
                                               "--config.caption.openai.model=m",
                                               "--config.caption.openai.timeout_s=nan"],
     "error: config.caption.openai.timeout_s must be finite"),
    ("curate: negative edge frames", "curate", ["--input", "{movie}", "--config.multi_shot.max_edge_frames=-5"],
     "error: config.multi_shot.max_edge_frames must be >= 0"),
    ("curate: --out is a file", "curate", ["--input", "{movie}", "--out", "{root}/afile"],
     "is a file; give a directory"),
    ("shards: no curated directory", "shards", ["--curated", "{root}/missing"], "manifest.jsonl does not exist"),
    ("shards: truncated clip", "shards", ["--curated", "{truncated}"], "do not hold their recorded frames"),
    ("shards: frame count differs", "shards", ["--curated", "{frames}"], "the manifest records"),
    ("shards: clip outside the directory", "shards", ["--curated", "{escape}"], "is not a path inside"),
    ("shards: NaN fps in the manifest", "shards", ["--curated", "{nanfps}"], "must be finite and positive"),
    ("shards: NaN validation fraction", "shards", ["--curated", "{curated}", "--validation_fraction=nan"],
     "validation_fraction must be in [0, 1)"),
    ("shards: zero text length", "shards", ["--curated", "{curated}", "--text_max_length=0"],
     "text_max_length must be an integer >= 1"),
]


@pytest.mark.slow
def test_probe_table_through_the_commands(movie, curated, tmp_path):
    assert len(PROBES) >= 15
    values = _probe_inputs(tmp_path / "probe", movie, curated)
    curated_before = _tree(curated)
    failures = []
    for name, command, args, fragment in PROBES:
        out = tmp_path / "out" / name.replace(" ", "_").replace(":", "")
        args = [a.format(**values) for a in args]
        if command == "curate" and "--out" not in args:
            args += ["--out", str(out), "--config.progress=false"]
        watched = {a: _tree(Path(a)) for a in args if a.startswith(str(tmp_path / "probe"))}
        t0 = time.perf_counter()
        proc = _run(command, *args)
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
              and "Traceback" not in proc.stderr and not out.exists())
        for path, before in watched.items():  # inputs unchanged; a curated dir gets no tfds/ (the lock file only)
            after = {k: v for k, v in _tree(Path(path)).items() if k != ".tfds.lock"}
            ok = ok and after == before
        if not ok:
            failures.append((name, proc.returncode, proc.stderr[-600:], round(time.perf_counter() - t0, 1)))
    assert _tree(curated) == curated_before
    assert (tmp_path / "probe" / "afile").read_text() == "keep me"
    assert not failures, failures


class _StallingCaptionServer:
    """A chat-completions endpoint that holds its first request until ``release()``, then answers 500.

    A curate run pointed at it (``caption.fallback=template``) is held mid-source, with its lock,
    for as long as the test needs: the overlap of two runs is certain, not a race.
    """

    def __init__(self):
        import http.server
        import threading

        self.requested, self.released = threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requested.set()
                outer.released.wait(300)
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_concurrent_commands_on_one_output_never_duplicate_lines(movie, tmp_path):
    """Two real curate processes on one --out: the second is refused while the first writes; no duplicates."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):
        write_synthetic_movie(inputs / f"m{k}.mp4", k, [20, 24, 18], 48, 64)
    with open(os.path.join(os.fsencode(inputs), BAD_NAME), "wb") as f:
        f.write(movie.read_bytes())
    out = tmp_path / "out"
    server = _StallingCaptionServer()
    args = ["--input", str(inputs), "--out", str(out), "--config.progress=false", "--config.caption.kind=openai",
            f"--config.caption.openai.url={server.url}", "--config.caption.openai.model=m",
            "--config.caption.openai.retries=0", "--config.caption.fallback=template"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    first = subprocess.Popen([sys.executable, "-m", "director_jax.curate", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.requested.wait(120), "the first run never asked for a caption"
        second = _run("curate", *args)  # the first run is held inside its first source, holding the lock
        server.release()
        _, stderr = first.communicate(timeout=300)
    finally:
        server.close()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert second.returncode == 2 and second.stderr.startswith(f"error: another curate run is writing {out}"), \
        second.stderr
    assert second.stderr.count("\n") == 1
    manifest = _lines(out / "manifest.jsonl")
    assert len({m["id"] for m in manifest}) == len(manifest) > 0
    assert len(_lines(out / "shots.jsonl")) == 3
    third = _run("curate", *args)  # the lock went with the first process: a rerun resumes, adds nothing
    assert third.returncode == 0, third.stderr
    assert _lines(out / "manifest.jsonl") == manifest
