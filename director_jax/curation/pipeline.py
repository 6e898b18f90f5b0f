"""Movie curation: input files -> shots -> filtered shots -> samples -> H.264 clips + captions + manifest.

``curate(inputs, out_dir, cfg)`` (the ``python -m director_jax.curate`` command) writes the layout of
the data contract (``OUT/shots.jsonl``, ``manifest.jsonl``, ``skipped.jsonl``, ``clips/``,
``summary.json``). Each source is decoded twice, streaming, never held whole:

1. analysis pass: small BGR frames (at most ``shots.analysis_width`` wide) feed the PySceneDetect
   detector and the per-frame statistics (``director_jax.curation.shots``); the filters then judge each
   shot and ``director_jax.curation.assembly`` makes the samples;
2. clip pass: full frames are resized once each (short side <= ``clip.max_short_side``) and go to
   one H.264 encoder per *open* sample (a sample is open from its first to its last frame), which
   also keeps the few frames per shot its captioner gets. Memory is bounded by the samples that
   overlap one frame (at most a few), not by the movie's length.

Crash safety and resume follow the contract: per source, every clip is written (temp file, fsync,
rename), then all its manifest lines in one appended write (fsync), then its shots.jsonl line
(fsync), which marks the source done. A rerun drops manifest lines of sources without a
shots.jsonl line, duplicates, torn last lines and leftover temp or orphan clip files, then does
only the sources not yet done or skipped. A file that cannot be read as a video is skipped with a
reason (skipped.jsonl); a captioner failure stops the run (a rerun resumes), since it is usually a
server or configuration problem that would otherwise skip everything (``caption.fallback`` makes
failed captions fall back instead).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.curation import assembly, decode, shots
from director_jax.data.captions import parse_multishot_caption
from director_jax.io_utils import atomic_write_text

log = logging.getLogger(__name__)

SHOTS, MANIFEST, SKIPPED, SUMMARY, CLIPS = "shots.jsonl", "manifest.jsonl", "skipped.jsonl", "summary.json", "clips"
_CLIP_NAME = re.compile(r"^[0-9a-f]{16}\.mp4$")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    max_short_side: int = 480
    crf: int = 18
    preset: str = "medium"

    def __post_init__(self) -> None:
        if self.max_short_side < 2 or not 0 <= self.crf <= 51:
            raise ValueError(f"config.clip: need max_short_side >= 2 and 0 <= crf <= 51, got {self}.")


@dataclasses.dataclass(frozen=True)
class CurationSettings:
    """The checked settings of one run (from the ``configs/curate.py`` ConfigDict)."""

    extensions: frozenset[str]
    detector: shots.DetectorConfig
    filters: shots.FilterConfig
    assembly: assembly.AssemblyConfig
    clip: ClipConfig
    frames_per_shot: int

    @classmethod
    def from_config(cls, cfg) -> CurationSettings:
        frames_per_shot = int(cfg.caption.frames_per_shot)
        if frames_per_shot < 1:
            raise ValueError("config.caption.frames_per_shot must be >= 1.")
        return cls(frozenset(e.lower().lstrip(".") for e in cfg.inputs.extensions),
                   shots.DetectorConfig.from_config(cfg.shots), shots.FilterConfig.from_config(cfg.filters),
                   assembly.AssemblyConfig.from_config(cfg),
                   shots.section_dataclass(ClipConfig, cfg.clip, "clip"), frames_per_shot)


def build_captioner(caption_cfg):
    """The captioner ``config.caption`` names, with that kind's options."""
    from director_jax.curation.captioners import make_captioner

    kind = caption_cfg.kind
    options: dict[str, Any] = {}
    if kind == "openai":
        options = caption_cfg.openai.to_dict()
        if not options.get("model"):
            raise ValueError("config.caption.kind=openai needs --config.caption.openai.model "
                             "(the served model's name).")
        if not options.get("api_key_env"):
            options.pop("api_key_env", None)
    elif kind == "jsonl":
        options = caption_cfg.jsonl.to_dict()
        if not options.get("path"):
            raise ValueError("config.caption.kind=jsonl needs --config.caption.jsonl.path (the captions file).")
    if caption_cfg.fallback:
        options["fallback"] = caption_cfg.fallback
    return make_captioner(kind, **options)


# --- Inputs ---------------------------------------------------------------------------------------------

def split_inputs(values: Iterable[str]) -> list[str]:
    """--input values (repeated and/or comma separated) -> paths; a value naming an existing path is kept whole."""
    out: list[str] = []
    for value in values:
        if os.path.lexists(value):
            out.append(value)
        else:
            out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A file to curate (``reason`` None) or an input already known to be skipped (``reason`` set)."""

    source: str  # resolved absolute path (the key in shots.jsonl / skipped.jsonl)
    reason: str | None = None
    detail: str = ""


def _source_key(path: str) -> str:
    return str(Path(path).resolve()) if os.path.exists(path) else os.path.abspath(path)


def _not_a_file(path: str) -> Candidate:
    if os.path.islink(path) and not os.path.exists(path):
        return Candidate(_source_key(path), "broken_symlink", f"{path} -> {os.readlink(path)}")
    return Candidate(_source_key(path), "not_a_file", "neither a regular file nor a directory")


def walk_inputs(inputs: Sequence[str], extensions: frozenset[str], exclude: Path | None = None) -> Iterator[Candidate]:
    """Files to curate, in order: named files as given, directories walked (sorted, symlinks followed once).

    In a directory only files with a video extension are taken; any other file is reported as
    skipped (``not_video_extension``), as are unreadable directories and broken links, so nothing
    in the inputs is left out silently. ``exclude`` (the output directory) is never entered.
    """
    seen_dirs: set[str] = set()
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def walk(d: str) -> Iterator[Candidate]:
        real = os.path.realpath(d)
        if real in seen_dirs or real == excluded:
            return
        seen_dirs.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Candidate(_source_key(d), "unreadable_directory", f"{type(e).__name__}: {e.strerror or e}")
            return
        for entry in entries:
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as e:
                yield Candidate(_source_key(entry.path), "unreadable_file", str(e))
                continue
            if is_dir:
                yield from walk(entry.path)
            elif not is_file:
                yield _not_a_file(entry.path)
            elif entry.name.rsplit(".", 1)[-1].lower() in extensions and "." in entry.name:
                yield Candidate(_source_key(entry.path))
            else:
                yield Candidate(_source_key(entry.path), "not_video_extension",
                                f"extension not in config.inputs.extensions: {entry.name}")

    for path in inputs:
        if not os.path.lexists(path):
            yield Candidate(_source_key(path), "missing", "no such file or directory")
        elif os.path.isdir(path):
            yield from walk(path)
        elif os.path.isfile(path):
            yield Candidate(_source_key(path))
        else:
            yield _not_a_file(path)


# --- The output directory -------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON lines of ``path`` and how many lines were unreadable (a write torn by a crash)."""
    if not path.exists():
        return [], 0
    lines, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(value, dict) and "source" in value:
                lines.append(value)
            else:
                bad += 1
    return lines, bad


def _jsonl_text(lines: Iterable[dict]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def _append(path: Path, lines: Sequence[dict]) -> None:
    """One appended write of whole lines, flushed and fsynced (a crash leaves at most a torn last line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(_jsonl_text(lines))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """The curated directory's state: done and skipped sources, sample ids; recovery after a crash."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.clips = self.root / CLIPS
        self.clips.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.num_samples = 0
        self.recovered = {"torn_lines": 0, "manifest_lines_dropped": 0, "sources_redone": 0, "files_removed": 0}

    def recover(self) -> dict:
        """Makes the files consistent after any crash (see the module doc); returns what it removed."""
        shot_lines, bad_shots = _read_jsonl(self.root / SHOTS)
        skip_lines, bad_skips = _read_jsonl(self.root / SKIPPED)
        manifest, bad_manifest = _read_jsonl(self.root / MANIFEST)
        self.recovered["torn_lines"] = bad_shots + bad_skips + bad_manifest
        done = {}
        for line in shot_lines:
            done.setdefault(line["source"], line)
        # A done source whose clip files went missing is done again (its lines go).
        by_source: dict[str, list[dict]] = collections.defaultdict(list)
        seen_ids: set[str] = set()
        for line in manifest:
            if line["source"] in done and line.get("id") not in seen_ids:
                seen_ids.add(line["id"])
                by_source[line["source"]].append(line)
        broken = {s for s, lines in by_source.items() if not all((self.root / x["clip"]).is_file() for x in lines)}
        for source in broken:
            log.warning("%s: clip files listed in the manifest are missing; curating the source again", source)
            del done[source], by_source[source]
        kept_ids = {line["id"] for lines in by_source.values() for line in lines}
        kept = []
        for line in manifest:  # file order, first line of each id
            if line.get("id") in kept_ids and line["source"] in by_source:
                kept.append(line)
                kept_ids.discard(line["id"])
        self.recovered["manifest_lines_dropped"] = len(manifest) - len(kept)
        self.recovered["sources_redone"] = len(broken)
        self.done = done
        self.skipped = {}
        for line in skip_lines:
            if line["source"] not in done:
                self.skipped.setdefault(line["source"], line.get("reason", "unknown"))
        # Rewrite whatever changed, each file atomically.
        if bad_shots or len(done) != len(shot_lines):
            atomic_write_text(self.root / SHOTS, _jsonl_text(done.values()))
        if bad_skips or len(self.skipped) != len(skip_lines):
            atomic_write_text(self.root / SKIPPED, _jsonl_text({"source": s, "reason": r}
                                                               for s, r in self.skipped.items()))
        if bad_manifest or len(kept) != len(manifest) or not (self.root / MANIFEST).exists():
            atomic_write_text(self.root / MANIFEST, _jsonl_text(kept))
        self.num_samples = len(kept)
        for f in self.root.glob(f".{MANIFEST}.*.tmp"):  # a source's manifest spool, never appended
            f.unlink()
            self.recovered["files_removed"] += 1
        referenced = {Path(line["clip"]).name for line in kept}
        for f in self.clips.iterdir():
            leftover_tmp = f.name.startswith(".") and ".tmp" in f.name
            if leftover_tmp or (_CLIP_NAME.match(f.name) and f.name not in referenced):
                f.unlink()
                self.recovered["files_removed"] += 1
        return dict(self.recovered)

    def add_skipped(self, source: str, reason: str) -> None:
        if source not in self.skipped:
            _append(self.root / SKIPPED, [{"source": source, "reason": reason}])
            self.skipped[source] = reason

    def spool(self) -> Path:
        """A fresh temp file for one source's manifest lines (kept on disk, not in memory, until it is done)."""
        fd, path = tempfile.mkstemp(dir=self.root, prefix=f".{MANIFEST}.", suffix=".tmp")
        os.close(fd)
        return Path(path)

    def add_source(self, shots_line: dict, spool: Path, num_samples: int) -> None:
        """The source's manifest lines (from its spool file), then its shots.jsonl line (which marks it done)."""
        _fsync_dir(self.clips)
        if num_samples:
            with spool.open("rb") as src, (self.root / MANIFEST).open("ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        _append(self.root / SHOTS, [shots_line])
        spool.unlink(missing_ok=True)
        self.done[shots_line["source"]] = shots_line
        self.num_samples += num_samples


# --- One source -----------------------------------------------------------------------------------------

def _default_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class _ClipWriter:
    """One sample's H.264 encoder, written to a temp file in clips/ and renamed into place when done."""

    def __init__(self, clips_dir: Path, clip_id: str, rate: Fraction, width: int, height: int, cfg: ClipConfig):
        import av

        self.final = clips_dir / f"{clip_id}.mp4"
        fd, self.tmp = tempfile.mkstemp(dir=clips_dir, prefix=f".{clip_id}.mp4.", suffix=".tmp.mp4")
        os.close(fd)
        self.container = av.open(self.tmp, "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}
        self.time_base = Fraction(1) / rate
        self.count = 0

    def encode(self, frame) -> None:
        frame.pts, frame.time_base = self.count, self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> Path:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, _default_mode())
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the encoder is being thrown away; its error does not matter
            self.container.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class _OpenSample:
    """A sample whose frames are streaming past: its clip writer and the frames kept for its captioner."""

    def __init__(self, sample: assembly.Sample, clip_id: str, writer: _ClipWriter, frames_per_shot: int):
        self.sample, self.id, self.writer = sample, clip_id, writer
        self.wanted: dict[int, int] = {}  # source frame -> shot index
        for k, (a, b) in enumerate(sample.segments):
            for f in assembly.even_frames(b - a, frames_per_shot):
                self.wanted[a + f] = k
        self.shot_frames: list[list[np.ndarray]] = [[] for _ in sample.segments]


@dataclasses.dataclass
class SourceResult:
    shots_line: dict
    samples: dict[str, int]  # samples written, per kind
    verdicts: list[shots.ShotVerdict]
    frames_decoded: int
    max_open_samples: int
    max_caption_frames: int


def _frames_bar(progress: bool, total: int, name: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name[-40:], unit="frame", leave=False, position=1, dynamic_ncols=True)


def analyse(path: str, settings: CurationSettings, info: decode.VideoInfo, bar=None):
    """Pass 1: shot starts and frame statistics of one source, from small streamed frames."""
    aw, ah = decode.fit_size(info.width, info.height, max_width=settings.detector.analysis_width)
    detector = shots.StreamingShotDetector(settings.detector, info.fps, static_gap=settings.filters.static_gap,
                                            static_pixel_delta=settings.filters.static_pixel_delta)
    for frame in decode.iter_frames(path, size=(ah, aw), format="bgr24"):
        detector.feed(frame)
        if bar is not None:
            bar.update(1)
    return detector.finish()


def _check_caption(caption: str, num_shots: int, sample_id: str) -> str:
    if not isinstance(caption, str):
        raise TypeError(f"the captioner returned {type(caption).__name__} for sample {sample_id}; it must return str.")
    parsed = parse_multishot_caption(caption)
    if len(parsed) != num_shots:
        raise ValueError(f"the captioner's caption for sample {sample_id} has {len(parsed)} shot(s), the sample "
                         f"{num_shots}: {caption[:200]!r}")
    return caption


def curate_source(path: str, source: str, settings: CurationSettings, captioner, clips_dir: Path, spool: Path,
                  progress: bool = False) -> SourceResult:
    """Decode, detect, filter, assemble, write the clips of one source and its manifest lines to ``spool``.

    Returns the shots.jsonl line (not yet written). On any error the clips written so far are removed.
    """
    info = decode.probe(path)
    bar = _frames_bar(progress, 2 * info.num_frames if info.num_frames else None, Path(path).name)
    try:
        starts, stats = analyse(path, settings, info, bar)
        num_frames = stats.num_frames
        verdicts = shots.judge_shots(starts, num_frames, stats, settings.filters)
        kept = [(v.start, v.end) for v in verdicts if v.reason is None]
        samples = assembly.assemble(kept, stats, settings.assembly)
        clip_w, clip_h = decode.fit_size(info.width, info.height, max_short_side=settings.clip.max_short_side,
                                         even=True)
        counts, frames_decoded, max_open, max_caption = {"single_shot": 0, "multi_shot": 0}, num_frames, 0, 0
        if samples:
            decoded, max_open, max_caption = _write_samples(
                path, source, info, samples, (clip_w, clip_h), settings, captioner, clips_dir, spool, bar)
            frames_decoded += decoded
            for x in samples:
                counts[x.kind] += 1
    finally:
        if bar is not None:
            bar.close()
    shots_line = {"source": source, "fps": info.fps, "num_frames": num_frames, "width": info.width,
                  "height": info.height, "shot_starts": starts, "kept_shots": [list(k) for k in kept],
                  "dropped_shots": [{"start": v.start, "end": v.end, "reason": v.reason}
                                    for v in verdicts if v.reason is not None]}
    return SourceResult(shots_line, counts, verdicts, frames_decoded, max_open, max_caption)


def _write_samples(path, source, info, samples, clip_size, settings, captioner, clips_dir, spool, bar):
    """Pass 2: stream the full frames once, feeding every open sample's encoder (see the module doc)."""
    clip_w, clip_h = clip_size
    pending = collections.deque(samples)  # sorted by start
    open_: list[_OpenSample] = []
    written: list[Path] = []
    max_open = max_caption = decoded = 0
    stop = max(s.end for s in samples)
    lines = spool.open("w", encoding="utf-8")
    try:
        for i, frame in enumerate(decode.iter_video_frames(path, stop=stop)):
            decoded += 1
            if bar is not None:
                bar.update(1)
            while pending and pending[0].start == i:
                s = pending.popleft()
                clip_id = assembly.sample_id(source, s.start, s.end)
                open_.append(_OpenSample(s, clip_id, _ClipWriter(clips_dir, clip_id, info.rate, clip_w, clip_h,
                                                                 settings.clip), settings.frames_per_shot))
            if not open_:
                continue
            max_open = max(max_open, len(open_))
            small = frame.reformat(width=clip_w, height=clip_h, format="yuv420p", interpolation="AREA")
            rgb = None
            for o in open_:
                o.writer.encode(small)
                if i in o.wanted:
                    if rgb is None:
                        rgb = small.to_ndarray(format="rgb24")
                    o.shot_frames[o.wanted[i]].append(rgb)
            max_caption = max(max_caption, sum(len(f) for o in open_ for f in o.shot_frames))
            for o in [o for o in open_ if o.sample.end == i + 1]:
                open_.remove(o)
                written.append(o.writer.close())
                lines.write(json.dumps(_manifest_line(o, source, info, clip_w, clip_h, captioner)) + "\n")
        if pending or open_:
            raise decode.VideoReadError(path, "truncated", f"the clip pass ended after {decoded} frames")
        lines.close()
    except BaseException:
        lines.close()
        for o in open_:
            o.writer.abort()
        for f in written:  # orphans without manifest lines
            f.unlink(missing_ok=True)
        raise
    return decoded, max_open, max_caption


def _manifest_line(o: _OpenSample, source: str, info: decode.VideoInfo, width: int, height: int, captioner) -> dict:
    s = o.sample
    if o.writer.count != s.num_frames:
        raise RuntimeError(f"clip {o.id} got {o.writer.count} frames for a {s.num_frames}-frame sample (a bug).")
    building = {"id": o.id, "source": source, "start_frame": s.start, "end_frame": s.end, "fps": info.fps,
                "cuts": s.cuts, "kind": s.kind, "shots": [list(seg) for seg in s.segments]}
    shot_frames = [np.stack(f) for f in o.shot_frames]
    caption = _check_caption(captioner.caption(shot_frames, building), len(s.segments), o.id)
    return {"id": o.id, "source": source, "start_frame": s.start, "end_frame": s.end, "fps": info.fps,
            "cuts": s.cuts, "kind": s.kind, "caption": caption, "clip": f"{CLIPS}/{o.id}.mp4",
            "width": width, "height": height, "num_frames": s.num_frames,
            "keyframe_candidates": s.keyframe_candidates}


# --- The run --------------------------------------------------------------------------------------------

def curate(inputs: Sequence[str], out_dir: str | os.PathLike, cfg, *, captioner=None,
           progress: bool | None = None) -> dict:
    """Curates ``inputs`` (files and directories) into ``out_dir``; returns (and writes) the run's summary."""
    t0 = time.perf_counter()
    settings = CurationSettings.from_config(cfg)
    captioner = build_captioner(cfg.caption) if captioner is None else captioner
    progress = bool(cfg.get("progress", True)) if progress is None else progress
    out = OutputDir(out_dir)
    recovered = out.recover()
    if any(recovered.values()):
        log.info("recovered %s: %s", out.root, recovered)

    candidates = list({c.source: c for c in walk_inputs(split_inputs(inputs), settings.extensions,
                                                        exclude=out.root)}.values())
    summary: dict[str, Any] = {
        "sources": {"seen": len(candidates), "done": 0, "skipped": {}, "already_done": 0, "already_skipped": 0},
        "shots": {"kept": 0, "dropped": {}},
        "samples": {"single_shot": 0, "multi_shot": 0, "total": 0},
        "frames": 0, "frames_decoded": 0, "seconds": 0.0, "frames_per_second": 0.0,
        "max_open_samples": 0, "max_caption_frames": 0, "recovered": recovered,
    }
    src, shot_counts = summary["sources"], summary["shots"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidates), unit="source", desc="curate", position=0, dynamic_ncols=True)
    try:
        for c in candidates:
            if c.source in out.done:
                src["already_done"] += 1
            elif c.source in out.skipped:
                src["already_skipped"] += 1
            elif c.reason is not None:
                _skip(out, src, c.source, c.reason, c.detail)
            else:
                spool = out.spool()
                try:
                    result = curate_source(c.source, c.source, settings, captioner, out.clips, spool, progress)
                except decode.VideoReadError as e:
                    spool.unlink(missing_ok=True)
                    _skip(out, src, c.source, e.reason, e.detail)
                except BaseException:
                    spool.unlink(missing_ok=True)
                    raise
                else:
                    out.add_source(result.shots_line, spool, sum(result.samples.values()))
                    _count(summary, result)
                    log.info("%s: %d frames, %d shots (%d kept), %d samples", c.source,
                             result.shots_line["num_frames"], len(result.verdicts),
                             len(result.shots_line["kept_shots"]), sum(result.samples.values()))
            if bar is not None:
                bar.update(1)
                seconds = time.perf_counter() - t0
                bar.set_postfix(frames=summary["frames"], fps=f"{summary['frames'] / max(seconds, 1e-9):.0f}",
                                samples=summary["samples"]["total"])
    finally:
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        summary["seconds"] = round(seconds, 3)
        summary["frames_per_second"] = round(summary["frames"] / max(seconds, 1e-9), 1)
        summary["output"] = {"sources_done": len(out.done), "sources_skipped": len(out.skipped),
                             "samples": out.num_samples}
        src["skipped"] = dict(sorted(src["skipped"].items()))
        shot_counts["dropped"] = dict(sorted(shot_counts["dropped"].items()))
        atomic_write_text(out.root / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _skip(out: OutputDir, src: dict, source: str, reason: str, detail: str) -> None:
    log.warning("skipping %s: %s%s", source, reason, f" ({detail})" if detail else "")
    out.add_skipped(source, reason)
    src["skipped"][reason] = src["skipped"].get(reason, 0) + 1


def _count(summary: dict, result: SourceResult) -> None:
    summary["sources"]["done"] += 1
    summary["frames"] += result.shots_line["num_frames"]
    summary["frames_decoded"] += result.frames_decoded
    summary["max_open_samples"] = max(summary["max_open_samples"], result.max_open_samples)
    summary["max_caption_frames"] = max(summary["max_caption_frames"], result.max_caption_frames)
    for v in result.verdicts:
        if v.reason is None:
            summary["shots"]["kept"] += 1
        else:
            summary["shots"]["dropped"][v.reason] = summary["shots"]["dropped"].get(v.reason, 0) + 1
    for kind, n in result.samples.items():
        summary["samples"][kind] += n
        summary["samples"]["total"] += n


def format_summary(summary: dict, out_dir: str | os.PathLike) -> str:
    """The summary as the few lines the command prints at the end."""
    s, sh, sa = summary["sources"], summary["shots"], summary["samples"]
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in sh["dropped"].items()) or "none"
    o = summary["output"]
    return "\n".join([
        f"sources: {s['seen']} seen, {s['done']} curated, {sum(s['skipped'].values())} skipped ({skipped}), "
        f"{s['already_done']} already done, {s['already_skipped']} already skipped",
        f"shots: {sh['kept']} kept, {sum(sh['dropped'].values())} dropped ({dropped})",
        f"samples: {sa['total']} ({sa['single_shot']} single-shot, {sa['multi_shot']} multi-shot)",
        f"frames: {summary['frames']} in {summary['seconds']:.1f} s ({summary['frames_per_second']:.0f} frames/s)",
        f"{out_dir}: {o['sources_done']} sources done, {o['sources_skipped']} skipped, {o['samples']} samples",
    ])
