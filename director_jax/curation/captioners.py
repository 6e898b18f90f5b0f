"""Captioners: one shot-structured caption per curated sample, from a VLM server, a file or a template.

The curation pipeline calls ``captioner.caption(shot_frames, sample)`` for every sample it builds:
``shot_frames`` holds, per shot of the sample, a few frames sampled from it (uint8 (n, H, W, 3) RGB)
and ``sample`` is the manifest line being built (``id``, ``source``, ``start_frame``, ``end_frame``,
``fps``, ``cuts``, ``kind`` and ``shots`` = [[start, end), ...] in source frames). The answer is the
structured caption of ``director_jax.data.captions.format_multishot_caption``.

- ``OpenAICaptioner``: any OpenAI-compatible chat-completions server with vision (vLLM, SGLang,
  llama.cpp server, a hosted API). Standard library only, so curation needs no client package.
- ``JsonlCaptioner``: captions made elsewhere (by hand, by a batch job), looked up by sample id or
  by (source, start_frame, end_frame).
- ``TemplateCaptioner``: the shot structure only ("a 3.0-second shot"); for tests, the CPU demo and
  as the last fallback, so curation never stops for want of a caption.
- ``FallbackCaptioner`` tries one and falls back on another when the first raises ``CaptionError``.
- ``make_captioner(kind, **options)`` builds them from a config.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from director_jax.curation.shots import check_number
from director_jax.curation.vlm_client import AnswerCache, CaptionError, ChatClient, RetryableError, completed_future
from director_jax.data.captions import format_multishot_caption, parse_multishot_caption

log = logging.getLogger(__name__)


class MissingCaptionError(CaptionError):
    """A captions file has no entry for a sample."""


class Captioner(Protocol):
    def caption(self, shot_frames: list[np.ndarray], sample: dict) -> str:
        """The structured caption of ``sample`` (see the module doc)."""
        ...


def sample_shots(sample: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The [start, end) source frames of each shot of a sample: ``shots`` if given, else from ``cuts``."""
    if sample.get("shots"):
        return [(int(a), int(b)) for a, b in sample["shots"]]
    try:
        bounds = [int(sample["start_frame"]), *(int(c) for c in sample.get("cuts", ())), int(sample["end_frame"])]
    except KeyError as e:
        raise ValueError(f"sample {sample.get('id')!r} has neither 'shots' nor 'start_frame'/'end_frame' "
                         f"(missing {e}); captioners need the shot structure.") from None
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _sample_name(sample: Mapping[str, Any]) -> str:
    return (f"sample {sample.get('id')!r} ({sample.get('source')!r} frames "
            f"{sample.get('start_frame')}..{sample.get('end_frame')})")


def _check_shot_frames(shot_frames: Sequence[np.ndarray], sample: Mapping[str, Any]) -> int:
    num_shots = len(sample_shots(sample))
    if len(shot_frames) != num_shots:
        raise ValueError(f"{_sample_name(sample)} has {num_shots} shot(s) but {len(shot_frames)} lists of shot "
                         "frames were given; pass one (n, H, W, 3) array per shot.")
    for k, frames in enumerate(shot_frames, start=1):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or frames.dtype != np.uint8:
            raise ValueError(f"shot {k} frames of {_sample_name(sample)} have shape {frames.shape} and dtype "
                             f"{frames.dtype}; expected uint8 (n >= 1, H, W, 3) RGB.")
    return num_shots


# --- OpenAI-compatible chat completions ----------------------------------------------------------------

DEFAULT_PROMPT = (
    "You are captioning a video clip for training a video generation model. The clip has {num_shots} shot(s) "
    "({durations}). {cut_note} The images below are frames sampled in order from each shot, each group "
    "labelled with its shot number.\n"
    "Describe each shot in one or two sentences: the main subjects and how they look, what they do and how "
    "they move, the setting, the lighting, and the camera framing and camera movement. Describe only what "
    "is visible. Start each caption with a lower-case noun phrase (e.g. \"a woman in a red coat opens a "
    "door.\") and end it with a full stop; do not mention frames, shots, cuts or their number in a caption.\n"
    "Answer with JSON only, no other text, in exactly this form with {num_shots} caption(s), one per shot in "
    "order: {\"shots\": [\"<caption of shot 1>\", ...]}"
)


def render_prompt(template: str, num_shots: int, durations: Sequence[float]) -> str:
    """Fills ``{num_shots}``, ``{durations}`` and ``{cut_note}`` (plain replacement: other braces stay)."""
    if num_shots == 1:
        cut_note = "It is one continuous shot, with no cut."
    else:
        cut_note = ("The shots are separated by hard cuts: each shot after the first begins right after a hard "
                    "cut from the previous one, so describe each shot on its own.")
    durations_text = ", ".join(f"shot {k}: {d:.1f} s" for k, d in enumerate(durations, start=1))
    return (template.replace("{num_shots}", str(num_shots)).replace("{durations}", durations_text)
            .replace("{cut_note}", cut_note))


def jpeg_data_url(frame: np.ndarray, max_side: int = 512, quality: int = 90) -> str:
    """A uint8 RGB frame as a ``data:image/jpeg;base64,...`` URL, shrunk so its long side <= max_side."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame))
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_completions_endpoint(url: str) -> str:
    """``http://host:8000/v1`` (base), ``http://host:8000`` or the full endpoint -> the full endpoint."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"captioner url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1.")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path else "/v1/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_shot_answer(text: str, num_shots: int) -> list[str]:
    """The model's answer -> one caption per shot. Raises ValueError saying what is wrong with it.

    Accepted: ``{"shots": [...]}`` (also "captions" / "shot_captions"), a bare JSON list, list items
    that are strings or ``{"caption": ...}``; optionally inside a ```json fence or with text around.
    """
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i:j + 1])
    answer, found = None, False
    for candidate in candidates:
        try:
            answer, found = json.loads(candidate.strip()), True
            break
        except json.JSONDecodeError:
            continue
    if not found:
        raise ValueError(f"the answer is not JSON: {text[:300]!r}")
    if isinstance(answer, dict):
        key = next((k for k in ("shots", "captions", "shot_captions") if k in answer), None)
        if key is None:
            raise ValueError(f"the JSON answer has no 'shots' list (keys: {sorted(answer)}): {text[:300]!r}")
        answer = answer[key]
    if not isinstance(answer, list):
        raise ValueError(f"the answer's shot captions are not a list: {text[:300]!r}")
    captions = []
    for item in answer:
        if isinstance(item, dict):
            item = item.get("caption", item.get("description"))
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"a shot caption is not a non-empty string ({item!r}): {text[:300]!r}")
        captions.append(item.strip())
    if len(captions) != num_shots:
        raise ValueError(f"the answer has {len(captions)} shot caption(s) for {num_shots} shot(s): {text[:300]!r}")
    return captions


class OpenAICaptioner:
    """Captions from a vision-language model behind an OpenAI-compatible ``/v1/chat/completions``.

    Frames go as JPEG data URLs (long side <= ``max_image_side``), grouped and labelled by shot; the
    prompt (``DEFAULT_PROMPT``; placeholders ``{num_shots}``, ``{durations}``, ``{cut_note}``) asks
    for JSON with one caption per shot. The calls go through ``vlm_client.ChatClient``: timeouts,
    connection errors, HTTP 429 and 5xx and malformed answers retried ``retries`` times with exponential
    backoff (``backoff_s`` * 2^attempt, or the server's Retry-After), other 4xx failing at once, at most
    ``max_requests_per_s`` requests a second (0: no limit), ``concurrency`` of them in flight through
    ``submit``, and answers kept in ``use_cache``'s file so an identical request is never paid twice.
    Failures raise ``CaptionError``.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_image_side: int = 512, prompt: str = DEFAULT_PROMPT,
                 max_tokens: int = 1024, temperature: float = 0.2, jpeg_quality: int = 90,
                 api_key_env: str | None = None, extra_body: Mapping[str, Any] | None = None,
                 max_requests_per_s: float = 0.0, concurrency: int = 1):
        for name, value, kind, bounds in (("timeout_s", timeout_s, float, (1e-3, 86400.0)),  # finite, in range
                ("retries", retries, int, (0, 100)), ("backoff_s", backoff_s, float, (0.0, 3600.0)),
                ("max_image_side", max_image_side, int, (16, 8192)), ("max_tokens", max_tokens, int, (1, 1 << 20)),
                ("temperature", temperature, float, (0.0, 2.0)), ("jpeg_quality", jpeg_quality, int, (1, 100)),
                ("max_requests_per_s", max_requests_per_s, float, (0.0, 1e6)),
                ("concurrency", concurrency, int, (1, 256))):
            check_number(f"caption.openai.{name}", value, kind, bounds)
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env={api_key_env!r} but that environment variable is not set.")
        self.endpoint = chat_completions_endpoint(url)
        self.model = model
        self.client = ChatClient(self.endpoint, api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                 max_requests_per_s=max_requests_per_s, concurrency=concurrency)
        self.max_image_side, self.prompt, self.jpeg_quality = int(max_image_side), prompt, int(jpeg_quality)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = dict(extra_body or {})

    def request_body(self, shot_frames: list[np.ndarray], sample: dict) -> dict:
        """The chat-completions request for one sample (also what the tests inspect)."""
        num_shots = _check_shot_frames(shot_frames, sample)
        fps = float(sample.get("fps") or 0.0)
        durations = [(b - a) / fps if fps > 0 else float(b - a) for a, b in sample_shots(sample)]
        content: list[dict] = [{"type": "text", "text": render_prompt(self.prompt, num_shots, durations)}]
        for k, frames in enumerate(shot_frames, start=1):
            label = f"Shot {k} of {num_shots}" + (" (after a hard cut):" if k > 1 else ":")
            content.append({"type": "text", "text": label})
            for frame in np.asarray(frames):
                url = jpeg_data_url(frame, self.max_image_side, self.jpeg_quality)
                content.append({"type": "image_url", "image_url": {"url": url}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature, **self.extra_body}

    def use_cache(self, path: str | os.PathLike) -> None:
        """Keeps every answer in ``path`` (JSON lines) and answers identical requests from it."""
        self.client.cache = AnswerCache(path)

    def _parse(self, answer: dict, num_shots: int) -> str:
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RetryableError(f"{self.endpoint} answered without choices[0].message.content: "
                                 f"{json.dumps(answer)[:300]}") from None
        if isinstance(text, list):  # content given as parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        try:
            return format_multishot_caption(parse_shot_answer(str(text or ""), num_shots))
        except ValueError as e:
            raise RetryableError(f"{self.endpoint} ({self.model}) gave a malformed answer: {e}") from None

    def _call(self, shot_frames: list[np.ndarray], sample: dict) -> tuple[bytes, Any, str]:
        num_shots = len(sample_shots(sample))
        data = json.dumps(self.request_body(shot_frames, sample)).encode("utf-8")
        return data, lambda answer: self._parse(answer, num_shots), f"captioning {_sample_name(sample)}"

    def caption(self, shot_frames: list[np.ndarray], sample: dict) -> str:
        """The structured caption, from the server's per-shot captions (see the class doc)."""
        return self.client.request(*self._call(shot_frames, sample))

    def submit(self, shot_frames: list[np.ndarray], sample: dict) -> Future:
        """``caption`` in flight: the request is built now (the frames can go), sent on the client's pool."""
        return self.client.submit(*self._call(shot_frames, sample))

    def close(self) -> None:
        self.client.close()

    @property
    def concurrency(self) -> int:
        return self.client.concurrency


# --- Captions from a file ------------------------------------------------------------------------------


class JsonlCaptioner:
    """Captions read from a JSONL file, one line per sample.

    A line holds ``"id"`` or ``"source"``, ``"start_frame"``, ``"end_frame"`` (a relative source is
    taken relative to the file's folder), and the caption as ``"caption"`` (a structured caption, a
    plain one for a one-shot sample, or a list of shot captions) or ``"shot_captions"`` (a list).
    A later line for the same key replaces an earlier one, so corrections can be appended. A sample
    without an entry raises ``MissingCaptionError``, or goes to ``fallback`` if one is given.
    """

    def __init__(self, path: str | os.PathLike, fallback: Captioner | None = None):
        self.path, self.fallback = Path(path), fallback
        if not self.path.is_file():
            raise FileNotFoundError(f"captions file {self.path} does not exist.")
        self._by_id: dict[str, tuple[list[str], int]] = {}
        self._by_range: dict[tuple[str, int, int], tuple[list[str], int]] = {}
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._add(line, lineno)

    def _where(self, lineno: int) -> str:
        return f"{self.path}:{lineno}"

    def _add(self, line: str, lineno: int) -> None:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._where(lineno)} is not JSON ({e.msg}); one JSON object per line.") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{self._where(lineno)} is not a JSON object.")
        value = entry.get("shot_captions", entry.get("caption"))
        if isinstance(value, str):
            try:
                shots = parse_multishot_caption(value)
            except ValueError as e:
                raise ValueError(f"{self._where(lineno)}: {e}") from None
        elif isinstance(value, list) and value and all(isinstance(s, str) for s in value):
            shots = list(value)
        else:
            raise ValueError(f"{self._where(lineno)} needs 'caption' (a string or a list of shot captions) or "
                             "'shot_captions' (a list of strings).")
        if not all(s.strip() for s in shots):
            raise ValueError(f"{self._where(lineno)} has an empty shot caption.")
        record = (shots, lineno)
        if "id" in entry:
            self._by_id[str(entry["id"])] = record
        elif {"source", "start_frame", "end_frame"} <= entry.keys():
            self._by_range[(self._source(entry["source"]), int(entry["start_frame"]), int(entry["end_frame"]))] = record
        else:
            raise ValueError(f"{self._where(lineno)} needs 'id' or 'source', 'start_frame' and 'end_frame'.")

    def _source(self, source: str) -> str:
        p = Path(source)
        return os.path.normpath(p if p.is_absolute() else self.path.parent / p)

    def __len__(self) -> int:
        return len(self._by_id) + len(self._by_range)

    def caption(self, shot_frames: list[np.ndarray], sample: dict) -> str:
        """The file's caption of ``sample`` (frames are not looked at)."""
        record = self._by_id.get(str(sample.get("id")))
        if record is None and "source" in sample:
            key = (os.path.normpath(str(sample["source"])), int(sample["start_frame"]), int(sample["end_frame"]))
            record = self._by_range.get(key)
        if record is None:
            error = MissingCaptionError(f"{self.path} has no caption for {_sample_name(sample)}; add a line with "
                                        "its 'id' (or source, start_frame, end_frame), or give a fallback captioner.")
            if self.fallback is None:
                raise error
            log.info("%s", error)
            return self.fallback.caption(shot_frames, sample)
        shots, lineno = record
        num_shots = len(sample_shots(sample))
        if len(shots) != num_shots:
            raise CaptionError(f"{self._where(lineno)} gives {len(shots)} shot caption(s) for {_sample_name(sample)}, "
                               f"which has {num_shots} shot(s).")
        return format_multishot_caption(shots)


# --- From the shot structure alone ---------------------------------------------------------------------


class TemplateCaptioner:
    """Captions that give the shot structure only, e.g. "The video features 2 shots. Shot 1: a 3.0-second
    shot. Shot 2: a hard cut to a 1.5-second shot."

    Says nothing of the content; it keeps the caption's shot structure (what the model must learn
    to follow) right when nothing better is available.
    """

    def caption(self, shot_frames: list[np.ndarray], sample: dict) -> str:
        """The template caption of ``sample``'s shots (frames are not looked at)."""
        fps = float(sample.get("fps") or 0.0)
        shots = sample_shots(sample)
        if fps > 0:
            return format_multishot_caption([f"a {(b - a) / fps:.1f}-second shot." for a, b in shots])
        return format_multishot_caption([f"a {b - a}-frame shot." for a, b in shots])


class FallbackCaptioner:
    """``primary``'s caption, or ``fallback``'s when the primary raises ``CaptionError`` (logged, counted)."""

    def __init__(self, primary: Captioner, fallback: Captioner):
        self.primary, self.fallback = primary, fallback
        self.num_fallbacks = 0

    def caption(self, shot_frames: list[np.ndarray], sample: dict) -> str:
        """The primary's caption, else the fallback's."""
        try:
            return self.primary.caption(shot_frames, sample)
        except CaptionError as e:
            self.num_fallbacks += 1
            log.warning("captioner %s failed for %s, using %s: %s", type(self.primary).__name__, sample.get("id"),
                        type(self.fallback).__name__, e)
            return self.fallback.caption(shot_frames, sample)

    def submit(self, shot_frames: list[np.ndarray], sample: dict) -> Future:
        """``caption`` in flight: the primary's request, its failure answered by the fallback when it comes."""
        if not hasattr(self.primary, "submit"):
            return completed_future(self.caption, shot_frames, sample)
        result: Future = Future()

        def settle(primary: Future) -> None:
            try:
                result.set_result(primary.result())
            except CaptionError as e:
                self.num_fallbacks += 1
                log.warning("captioner %s failed for %s, using %s: %s", type(self.primary).__name__,
                            sample.get("id"), type(self.fallback).__name__, e)
                try:
                    result.set_result(self.fallback.caption(shot_frames, sample))
                except BaseException as fallback_error:  # noqa: BLE001 - the caller gets it from the future
                    result.set_exception(fallback_error)
            except BaseException as other:  # noqa: BLE001
                result.set_exception(other)

        self.primary.submit(shot_frames, sample).add_done_callback(settle)
        return result

    @property
    def concurrency(self) -> int:
        return getattr(self.primary, "concurrency", 1)


KINDS = ("openai", "jsonl", "template")


def make_captioner(kind: str, **options: Any) -> Captioner:
    """A captioner from config values: ``kind`` in KINDS plus that class's options.

    ``fallback`` (a kind name, or a mapping with ``kind`` and its options) wraps the captioner in a
    ``FallbackCaptioner``; for "jsonl" it serves the samples the file lacks, as well as its failures.
    """
    options = dict(options)
    fallback = options.pop("fallback", None)
    classes = {"openai": OpenAICaptioner, "jsonl": JsonlCaptioner, "template": TemplateCaptioner}
    if kind not in classes:
        raise ValueError(f"captioner kind {kind!r} is unknown; choose one of {KINDS}.")
    try:
        captioner = classes[kind](**options)
    except TypeError as e:
        raise ValueError(f"bad options {sorted(options)} for captioner {kind!r}: {e}") from None
    if fallback is None:
        return captioner
    if isinstance(fallback, str):
        fallback_captioner = make_captioner(fallback)
    elif isinstance(fallback, Mapping) or hasattr(fallback, "to_dict"):
        spec = dict(fallback.to_dict() if hasattr(fallback, "to_dict") else fallback)
        if "kind" not in spec:
            raise ValueError(f"captioner fallback {spec} needs a 'kind'.")
        fallback_captioner = make_captioner(spec.pop("kind"), **spec)
    else:
        fallback_captioner = fallback  # a captioner object
    return FallbackCaptioner(captioner, fallback_captioner)
