"""Shot-structured captions: one caption string for a video of one or several shots.

The paper captions every training sequence in one structured form::

    The video features 2 shots. Shot 1: a woman opens a door. Shot 2: a hard cut to a dark corridor.

``format_multishot_caption`` builds that string from one caption per shot and
``parse_multishot_caption`` takes it apart again. The whole string is *one* caption: it is embedded
by the text encoder once (``python -m director_jax.embed_text``), not shot by shot.

Choices made here (the paper shows the form but not every detail):

- **One shot is structured too**: ``["a cat sleeps."]`` gives ``"The video features 1 shot. Shot 1:
  a cat sleeps."``. With the shot count always stated, "1 shot" tells the model that no cut is
  wanted, and a plain caption never has to be guessed as single- or multi-shot. Every training
  caption then has the same form. ``parse_multishot_caption`` still reads plain text (a user's
  prompt) as one shot.
- **"a hard cut to"** opens every shot after the first. Shot captions are given without it; one
  that already starts with it is not given it twice (and ``parse`` returns it without).
- **Shot captions are kept verbatim** apart from whitespace (runs of whitespace, newlines included,
  become one space, as the Wan prompt cleaning does anyway, and the caption stays on one line for
  one-caption-per-line files). Case and punctuation are not touched, so ``parse`` inverts
  ``format`` exactly; captioners should write shot captions that read well after "a hard cut to"
  and end like sentences.

**Window captions.** A training window cut from a multi-shot sample shows a contiguous run of its
shots, first..last; its caption is the caption of those shots alone (``shot_range_caption``:
re-numbered from Shot 1, the header's count right), so it never names a shot the window lacks. The
whole run is the sample's caption verbatim (whatever its spacing), so its stored embedding serves.
Every range has an index in one canonical order (``shot_ranges``): by first shot, then by last,
``(0, 0), (0, 1), .., (0, n-1), (1, 1), .., (n-1, n-1)`` (0-based, inclusive); the *proper* ranges
are the same list without the whole ``(0, n-1)``: ``n (n + 1) / 2 - 1`` of them, none for one shot.
The shards store the proper ranges' embeddings in that order (``director_jax.curation.shards``).
"""

from __future__ import annotations

import re

CUT_PHRASE = "a hard cut to"

_HEADER = re.compile(r"^The video features (\d+) shots?\.\s*")
_MARKER = re.compile(r"\bShot (\d+):")
_CUT = re.compile(r"^" + re.escape(CUT_PHRASE) + r"\b\s*", re.IGNORECASE)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _strip_cut(text: str) -> str:
    return _CUT.sub("", text, count=1)


def format_multishot_caption(shot_captions: list[str] | tuple[str, ...]) -> str:
    """One caption per shot -> the structured caption of the whole video (see the module doc)."""
    if isinstance(shot_captions, str):
        raise TypeError("format_multishot_caption takes a list of shot captions, not one string.")
    if not shot_captions:
        raise ValueError("a video has at least one shot: got no shot captions.")
    parts = []
    for k, caption in enumerate(shot_captions, start=1):
        text = _normalize(caption)
        if k > 1:
            text = _strip_cut(text)
        if not text:
            raise ValueError(f"shot {k} has an empty caption ({caption!r}); every shot needs one.")
        if _MARKER.search(text) or _HEADER.match(text):
            raise ValueError(f"shot {k}'s caption {text!r} contains a 'Shot N:' marker or the 'The video features' "
                             "header, so the structured caption could not be parsed back; reword it.")
        parts.append(f"Shot {k}: {text}" if k == 1 else f"Shot {k}: {CUT_PHRASE} {text}")
    n = len(parts)
    return f"The video features {n} shot{'s' if n != 1 else ''}. " + " ".join(parts)


def parse_multishot_caption(text: str) -> list[str]:
    """The structured caption -> one caption per shot (without the "a hard cut to" openings).

    Text without the "The video features N shots." header is a plain caption: one shot. A header
    whose shot markers do not run 1..N raises ValueError.
    """
    text = _normalize(text)
    header = _HEADER.match(text)
    if header is None:
        return [text]
    n = int(header.group(1))
    body = text[header.end():]
    markers = list(_MARKER.finditer(body))
    numbers = [int(m.group(1)) for m in markers]
    if numbers != list(range(1, n + 1)) or not markers or markers[0].start() != 0:
        found = ", ".join(f"Shot {k}:" for k in numbers) or "none"
        raise ValueError(f"caption says {n} shot(s) but its shot markers are {found} "
                         f"(they must be Shot 1: .. Shot {n}: in order, right after the header): {text[:200]!r}")
    shots = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(body)
        shot = body[m.end():end].strip()
        if i > 0:
            shot = _strip_cut(shot)
        if not shot:
            raise ValueError(f"shot {i + 1} of the caption is empty: {text[:200]!r}")
        shots.append(shot)
    return shots


def shot_ranges(num_shots: int, *, proper: bool = False) -> list[tuple[int, int]]:
    """Every contiguous shot range ``(first, last)`` (0-based, inclusive) in the canonical order (module doc);
    ``proper=True`` leaves out the whole range ``(0, num_shots - 1)``."""
    if isinstance(num_shots, bool) or not isinstance(num_shots, int) or num_shots < 1:
        raise ValueError(f"a video has at least one shot: got num_shots={num_shots!r}.")
    return [(a, b) for a in range(num_shots) for b in range(a, num_shots)
            if not (proper and (a, b) == (0, num_shots - 1))]


def checked_shots(caption: str, num_shots: int | None = None) -> list[str]:
    """``parse_multishot_caption(caption)``, which must give ``num_shots`` shots when that is given."""
    shots = parse_multishot_caption(caption)
    if num_shots is not None and len(shots) != num_shots:
        raise ValueError(f"the caption describes {len(shots)} shot(s) but the video has {num_shots}: "
                         f"{_normalize(caption)[:200]!r}")
    return shots


def shot_range_caption(caption: str, first: int, last: int, *, num_shots: int | None = None) -> str:
    """The caption of shots ``first..last`` (0-based, inclusive) of a structured caption: those shots'
    captions through ``format_multishot_caption``, or ``caption`` itself when the range is every shot.

    ``num_shots`` (the video's shot count, e.g. ``len(cuts) + 1``), when given, must be the caption's.
    """
    shots = checked_shots(caption, num_shots)
    if not 0 <= first <= last < len(shots):
        raise ValueError(f"shot range {first}..{last} is outside the caption's {len(shots)} shot(s).")
    if (first, last) == (0, len(shots) - 1):
        return caption
    return format_multishot_caption(shots[first:last + 1])


def shot_range_captions(caption: str, *, num_shots: int | None = None, proper: bool = False) -> list[str]:
    """The captions of ``shot_ranges(n, proper=proper)`` in that order (``n``: the caption's shot count)."""
    shots = checked_shots(caption, num_shots)
    whole = (0, len(shots) - 1)
    return [caption if r == whole else format_multishot_caption(shots[r[0]:r[1] + 1])
            for r in shot_ranges(len(shots), proper=proper)]
