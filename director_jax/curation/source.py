"""One source of a curation run: decode, detect, filter, assemble, then write its clips and manifest lines.

Each source is decoded twice, streaming, never held whole:

1. analysis pass: small BGR frames (at most ``shots.analysis_width`` wide) feed the PySceneDetect
   detector and the per-frame statistics (``director_jax.curation.shots``); the filters then judge each
   shot and ``director_jax.curation.assembly`` makes the samples;
2. clip pass: full frames are resized once each (short side <= ``clip.max_short_side``) and go to
   one H.264 encoder per *open* sample (a sample is open from its first to its last frame), which
   also keeps the few frames per shot its captioner gets. Memory is bounded by the samples that
   overlap one frame (at most a few), not by the movie's length.

Every clip is written to a temp file, fsynced and renamed into place; on any error the clips of the
source written so far are removed (the bookkeeping around it: ``director_jax.curation.outdir``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import tempfile
from concurrent.futures import Future
from fractions import Fraction
from pathlib import Path

import numpy as np

from director_jax.curation import assembly, decode, shots
from director_jax.curation.outdir import CLIPS
from director_jax.curation.vlm_client import completed_future
from director_jax.data.captions import parse_multishot_caption


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    max_short_side: int = 480
    crf: int = 18
    preset: str = "medium"

    def __post_init__(self) -> None:
        shots.check_numbers(self, "clip", {"max_short_side": (2, 16384), "crf": (0, 51)})


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
        frames_per_shot = shots.check_number("caption.frames_per_shot", cfg.caption.frames_per_shot, int, (1, 64))
        return cls(frozenset(e.lower().lstrip(".") for e in cfg.inputs.extensions),
                   shots.DetectorConfig.from_config(cfg.shots), shots.FilterConfig.from_config(cfg.filters),
                   assembly.AssemblyConfig.from_config(cfg),
                   shots.section_dataclass(ClipConfig, cfg.clip, "clip"), frames_per_shot)


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
    bar = _frames_bar(progress, 2 * info.num_frames if info.num_frames else None, Path(source).name)
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
    # samples whose captions are being made: up to twice the captioner's requests in flight, written in order
    captioning: collections.deque[tuple[dict, Future, int]] = collections.deque()
    window = 2 * int(getattr(captioner, "concurrency", 1))
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
                captioning.append(_manifest_line(o, source, info, clip_w, clip_h, captioner))
                while len(captioning) > window:  # the oldest caption is needed before more are asked for
                    _write_line(lines, *captioning.popleft())
        if pending or open_:
            raise decode.VideoReadError(path, "truncated", f"the clip pass ended after {decoded} frames")
        while captioning:
            _write_line(lines, *captioning.popleft())
        lines.close()
    except BaseException:
        lines.close()
        for _, caption, _ in captioning:
            caption.cancel()
        for o in open_:
            o.writer.abort()
        for f in written:  # orphans without manifest lines
            f.unlink(missing_ok=True)
        raise
    return decoded, max_open, max_caption


def submit_caption(captioner, shot_frames: list[np.ndarray], sample: dict) -> Future:
    """The captioner's ``submit`` where it has one (requests in flight), else its caption made now, as a Future."""
    if hasattr(captioner, "submit"):
        return captioner.submit(shot_frames, sample)
    return completed_future(captioner.caption, shot_frames, sample)


def _write_line(lines, line: dict, caption: Future, num_shots: int) -> None:
    line["caption"] = _check_caption(caption.result(), num_shots, line["id"])
    lines.write(json.dumps(line) + "\n")


def _manifest_line(o: _OpenSample, source: str, info: decode.VideoInfo, width: int, height: int, captioner
                   ) -> tuple[dict, Future, int]:
    """The sample's manifest line, its caption asked for (a Future), and its shot count."""
    s = o.sample
    if o.writer.count != s.num_frames:
        raise RuntimeError(f"clip {o.id} got {o.writer.count} frames for a {s.num_frames}-frame sample (a bug).")
    building = {"id": o.id, "source": source, "start_frame": s.start, "end_frame": s.end, "fps": info.fps,
                "cuts": s.cuts, "kind": s.kind, "shots": [list(seg) for seg in s.segments]}
    shot_frames = [np.stack(f) for f in o.shot_frames]
    caption = submit_caption(captioner, shot_frames, building)
    line = {"id": o.id, "source": source, "start_frame": s.start, "end_frame": s.end, "fps": info.fps,
            "cuts": s.cuts, "kind": s.kind, "caption": None, "clip": f"{CLIPS}/{o.id}.mp4",
            "width": width, "height": height, "num_frames": s.num_frames,
            "keyframe_candidates": s.keyframe_candidates}
    return line, caption, len(s.segments)
