"""Shot-structured captions: the exact format, the inverse, and the refusals."""

from __future__ import annotations

import pytest

from director_jax.data.captions import format_multishot_caption, parse_multishot_caption


def test_format_exact_text():
    assert format_multishot_caption(["A woman opens a door.", "a dark corridor.", "her face, lit by a torch."]) == (
        "The video features 3 shots. Shot 1: A woman opens a door. Shot 2: a hard cut to a dark corridor. "
        "Shot 3: a hard cut to her face, lit by a torch.")
    assert format_multishot_caption(["A cat sleeps."]) == "The video features 1 shot. Shot 1: A cat sleeps."


@pytest.mark.parametrize("shots", [
    ["A cat sleeps."],
    ["A woman opens a door.", "a dark corridor."],
    ["Rain on a window; Shot-by-shot: no.", "a close-up: 2 eyes.", "the city at night, 3 shots of neon.",
     "Café — ünïcode, \"quotes\" & <tags>."],
])
def test_round_trip(shots):
    text = format_multishot_caption(shots)
    assert parse_multishot_caption(text) == shots
    assert format_multishot_caption(parse_multishot_caption(text)) == text
    assert "\n" not in text


def test_normalization_and_cut_phrase():
    text = format_multishot_caption(["  A man\n walks.  ", "A hard cut to a street."])
    assert text == "The video features 2 shots. Shot 1: A man walks. Shot 2: a hard cut to a street."
    assert parse_multishot_caption(text) == ["A man walks.", "a street."]
    # Shot 1 is never given (or stripped of) the cut phrase.
    assert parse_multishot_caption(format_multishot_caption(["a hard cut to black."])) == ["a hard cut to black."]


def test_plain_text_is_one_shot():
    assert parse_multishot_caption("  A dog runs on the beach. ") == ["A dog runs on the beach."]
    assert parse_multishot_caption("") == [""]


def test_refusals():
    with pytest.raises(ValueError, match="at least one shot"):
        format_multishot_caption([])
    with pytest.raises(TypeError):
        format_multishot_caption("one string")
    with pytest.raises(ValueError, match="shot 2 has an empty caption"):
        format_multishot_caption(["a.", "   "])
    with pytest.raises(ValueError, match="marker"):
        format_multishot_caption(["a.", "then Shot 3: b."])
    with pytest.raises(ValueError, match="says 3 shot"):
        parse_multishot_caption("The video features 3 shots. Shot 1: a. Shot 2: a hard cut to b.")
    with pytest.raises(ValueError, match="in order"):
        parse_multishot_caption("The video features 2 shots. Shot 2: a. Shot 1: b.")
