"""The timeline: T pixel frames, some spans given (keyframes, conditioning videos), the rest generated.

Every mode of SmartDirector is a timeline (docs/design.md): one keyframe anywhere, several keyframes,
multi-shot, extension forward / backward / in-between, pacing. This module turns a timeline into
the Multi-Chunk layout the DiT sees:

* **Chunks** are cut at frame 0 and at the start of every given span (and at the end of a given
  video span whose length is not 4n+1, so no latent frame mixes given and generated frames). Each
  chunk starts with its own frame, which the causal VAE encodes alone: every keyframe gets a clean
  latent frame of its own.
* A chunk whose length is not 4n+1 is **padded** to the next 4n+1 by repeating its last frame; the
  padding is dropped after decoding, so keyframes land on exactly the frames asked for (the paper
  snaps them to the 4n+1 grid instead).
* The chunk latents are laid **end to end**. Per latent frame the layout records the chunk id,
  whether it is given (clean) or generated, the first pixel frame it covers, and its **MC-RoPE**
  temporal position: that frame index / 4 (a keyframe at frame s sits at s/4, the chunk's next
  latents at s/4 + 1/4, s/4 + 5/4, ...).

The layout is plain Python / NumPy and static, so it fixes shapes before tracing, and the data
loaders use it without JAX; ``models/multichunk.py`` encodes and decodes a video over it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import numpy as np

TEMPORAL_FACTOR = 4  # pixel frames per latent frame after a chunk's first (the Wan VAE's temporal compression)


def padded_length(length: int) -> int:
    """The smallest 4n+1 >= length (the clip lengths the causal VAE encodes)."""
    if length < 1:
        raise ValueError(f"a chunk needs at least one frame, got {length}.")
    return length + (-(length - 1)) % TEMPORAL_FACTOR


def latent_count(length: int) -> int:
    """Latent frames of a chunk of ``length`` pixel frames (after padding to 4n+1)."""
    return (padded_length(length) - 1) // TEMPORAL_FACTOR + 1


@dataclasses.dataclass(frozen=True, order=True)
class Span:
    """Given pixel frames [start, start + length): a keyframe (length 1) or a conditioning video."""

    start: int
    length: int = 1

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of the timeline encoded as one clip; starts with its own first frame."""

    index: int
    start: int  # first pixel frame (timeline index)
    length: int  # real pixel frames
    given_frames: int  # frames at the chunk start that are given (0: the chunk is generated)
    latent_offset: int  # index of its first latent frame in the sequence

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def padded_length(self) -> int:
        return padded_length(self.length)

    @property
    def num_latents(self) -> int:
        return latent_count(self.length)


@dataclasses.dataclass(frozen=True)
class Timeline:
    """``num_frames`` pixel frames with given spans at exact frame indices."""

    num_frames: int
    spans: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        spans = tuple(sorted(Span(*s) if isinstance(s, tuple) else s for s in self.spans))
        object.__setattr__(self, "spans", spans)
        if self.num_frames < 1:
            raise ValueError(f"the timeline is empty (num_frames={self.num_frames}): give at least one frame.")
        given_frames = sum(max(s.length, 0) for s in spans)
        if given_frames > self.num_frames:
            raise ValueError(
                f"{len(spans)} given spans hold {given_frames} frames but the timeline has only {self.num_frames}: "
                "make the video longer (more frames or a higher fps) or give fewer keyframes."
            )
        for span in spans:
            if span.length < 1:
                raise ValueError(f"given span at frame {span.start} has length {span.length}; it needs >= 1 frame.")
            if span.start < 0 or span.end > self.num_frames:
                raise ValueError(
                    f"given frames {span.start}..{span.end - 1} lie outside the timeline of {self.num_frames} "
                    f"frames (valid frame indices are 0..{self.num_frames - 1})."
                )
        for a, b in zip(spans, spans[1:], strict=False):
            if a.start == b.start:
                raise ValueError(f"frame {a.start} is given twice: each keyframe / span needs its own frame.")
            if b.start < a.end:
                raise ValueError(
                    f"given spans overlap: frames {a.start}..{a.end - 1} and {b.start}..{b.end - 1}."
                )

    @classmethod
    def from_keyframes(cls, num_frames: int, keyframes: Iterable[int], videos: Iterable[tuple[int, int]] = ()):
        """Keyframes at frame indices, plus (start, length) conditioning videos."""
        keyframes = list(keyframes)
        duplicates = sorted({k for k in keyframes if keyframes.count(k) > 1})
        if duplicates:
            raise ValueError(f"keyframe indices {duplicates} are given more than once.")
        return cls(num_frames, tuple(Span(int(k)) for k in keyframes) + tuple(Span(*v) for v in videos))

    @functools.cached_property
    def layout(self) -> TimelineLayout:
        return TimelineLayout.build(self)


def frame_at_time(when: str | float, fps: float, num_frames: int) -> int:
    """A keyframe time -> a frame index: seconds (``2.5``, ``"2.5"``, ``"2.5s"``) or ``"#frame"``.

    Seconds are rounded to the nearest frame. Times past the end (or before 0) are refused with the
    video's duration in the message, not clipped: a keyframe silently moved is a wrong video.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    duration = num_frames / fps
    text = str(when).strip()
    if text.startswith("#"):
        try:
            frame = int(text[1:])
        except ValueError:
            raise ValueError(f"keyframe time {when!r}: '#' takes a whole frame index, e.g. #12.") from None
        label = f"frame {frame}"
    else:
        try:
            seconds = float(text[:-1] if text.endswith("s") else text)
        except ValueError:
            raise ValueError(f"keyframe time {when!r} is neither seconds (2.5) nor a frame index (#12).") from None
        frame = int(round(seconds * fps))
        label = f"{seconds:g} s (frame {frame} at {fps:g} fps)"
    if not 0 <= frame < num_frames:
        raise ValueError(f"keyframe time {label} is outside the video: {num_frames} frames = {duration:g} s, valid "
                         f"frames 0..{num_frames - 1}, times 0..{(num_frames - 1) / fps:g} s.")
    return frame


@dataclasses.dataclass(frozen=True, eq=False)
class TimelineLayout:
    """The chunks of a timeline and the metadata of every latent frame of the sequence."""

    timeline: Timeline
    chunks: tuple[Chunk, ...]
    chunk_id: np.ndarray  # (L,) int32
    given: np.ndarray  # (L,) bool: clean (t = 0) tokens
    first_frame: np.ndarray  # (L,) int32: first pixel frame covered (timeline index)
    position: np.ndarray  # (L,) float32: MC-RoPE temporal position = first_frame / 4

    @property
    def num_latents(self) -> int:
        return int(self.chunk_id.shape[0])

    @classmethod
    def build(cls, timeline: Timeline) -> TimelineLayout:
        given_at = {s.start: s.length for s in timeline.spans}
        cuts = {0, *given_at}
        for span in timeline.spans:  # a video span of other than 4n+1 frames ends its own chunk
            if (span.length - 1) % TEMPORAL_FACTOR and span.end < timeline.num_frames:
                cuts.add(span.end)
        cuts = sorted(cuts)
        chunks, offset = [], 0
        chunk_id, given, first_frame = [], [], []
        for i, (start, end) in enumerate(zip(cuts, [*cuts[1:], timeline.num_frames], strict=True)):
            chunk = Chunk(i, start, end - start, given_at.get(start, 0), offset)
            chunks.append(chunk)
            for j in range(chunk.num_latents):
                first = start if j == 0 else start + TEMPORAL_FACTOR * j - (TEMPORAL_FACTOR - 1)
                last_real = min(start + TEMPORAL_FACTOR * j, chunk.end - 1)
                chunk_id.append(i)
                given.append(chunk.given_frames > 0 and last_real < start + chunk.given_frames)
                first_frame.append(first)
            offset += chunk.num_latents
        first_frame = np.asarray(first_frame, np.int32)
        return cls(
            timeline=timeline,
            chunks=tuple(chunks),
            chunk_id=np.asarray(chunk_id, np.int32),
            given=np.asarray(given, bool),
            first_frame=first_frame,
            position=first_frame.astype(np.float32) / TEMPORAL_FACTOR,
        )

    def latent_of_frame(self, frame: int) -> int:
        """Index of the latent frame that covers pixel ``frame`` (a keyframe's own clean latent)."""
        if not 0 <= frame < self.timeline.num_frames:
            raise ValueError(f"frame {frame} is outside the timeline of {self.timeline.num_frames} frames.")
        chunk = next(c for c in reversed(self.chunks) if c.start <= frame)
        return chunk.latent_offset + -(-(frame - chunk.start) // TEMPORAL_FACTOR)

    def chunks_by_padded_length(self) -> dict[int, list[Chunk]]:
        """Chunks grouped by padded length: each group is encoded / decoded in one batched call."""
        groups: dict[int, list[Chunk]] = {}
        for chunk in self.chunks:
            groups.setdefault(chunk.padded_length, []).append(chunk)
        return groups

    def describe(self) -> str:
        """One line per chunk, for logs and error messages."""
        lines = []
        for c in self.chunks:
            kind = f"given {c.given_frames}" if c.given_frames else "generated"
            lines.append(
                f"chunk {c.index}: frames {c.start}..{c.end - 1} ({c.length}, padded {c.padded_length}, {kind}), "
                f"latents {c.latent_offset}..{c.latent_offset + c.num_latents - 1}, "
                f"positions {self.position[c.latent_offset:c.latent_offset + c.num_latents].tolist()}"
            )
        return "\n".join(lines)


def place_given_frames(
    num_frames: int, frames: dict[int, np.ndarray] | Sequence[tuple[int, np.ndarray]], fill: float = 0.0
) -> np.ndarray:
    """Builds a (T, H, W, C) video holding given frames (or runs of frames) at their start indices.

    ``frames`` maps a start frame to one frame (H, W, C) or a run (n, H, W, C); other frames hold
    ``fill`` (they are generated, so their content does not matter to the given latents).
    """
    items = list(frames.items()) if isinstance(frames, dict) else list(frames)
    if not items:
        raise ValueError("no given frames: pass at least one keyframe or video span.")
    first = np.asarray(items[0][1])
    shape = first.shape if first.ndim == 3 else first.shape[1:]
    out = np.full((num_frames, *shape), fill, np.float32)
    for start, value in items:
        value = np.asarray(value, np.float32)
        value = value[None] if value.ndim == 3 else value
        if value.shape[1:] != shape:
            raise ValueError(f"given frames at {start} are {value.shape[1:]}, others {shape}: sizes must match.")
        if start < 0 or start + len(value) > num_frames:
            raise ValueError(f"given frames {start}..{start + len(value) - 1} lie outside 0..{num_frames - 1}.")
        out[start:start + len(value)] = value
    return out
