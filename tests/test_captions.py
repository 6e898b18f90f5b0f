"""Shot-structured captions: the exact format, the inverse, and the refusals."""

from __future__ import annotations

import pytest

from director_jax.data.captions import (
    format_multishot_caption,
    parse_multishot_caption,
    shot_range_caption,
    shot_range_captions,
    shot_ranges,
)


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


THREE = ("The video features 3 shots. Shot 1: A woman opens a door. Shot 2: a hard cut to a dark corridor. "
         "Shot 3: a hard cut to her face, lit by a torch.")


def test_shot_ranges_canonical_order():
    assert shot_ranges(3) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert shot_ranges(3, proper=True) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    assert shot_ranges(1) == [(0, 0)] and shot_ranges(1, proper=True) == []
    assert shot_ranges(2, proper=True) == [(0, 0), (1, 1)]
    for n in range(1, 8):  # every (first <= last) once: n (n + 1) / 2 of them
        assert len(set(shot_ranges(n))) == len(shot_ranges(n)) == n * (n + 1) // 2
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="at least one shot"):
            shot_ranges(bad)


def test_shot_range_caption_exact_text():
    assert shot_range_caption(THREE, 1, 2) == ("The video features 2 shots. Shot 1: a dark corridor. "
                                               "Shot 2: a hard cut to her face, lit by a torch.")
    assert shot_range_caption(THREE, 1, 1) == "The video features 1 shot. Shot 1: a dark corridor."
    assert shot_range_caption(THREE, 0, 1) == ("The video features 2 shots. Shot 1: A woman opens a door. "
                                               "Shot 2: a hard cut to a dark corridor.")
    last = "The video features 1 shot. Shot 1: her face, lit by a torch."
    assert shot_range_caption(THREE, 2, 2, num_shots=3) == last
    # all the shots: the caption verbatim (its stored embedding is the whole sample's), even when not canonical
    odd = THREE.replace("Shot 2: a hard cut", "Shot 2:  A hard cut")
    assert shot_range_caption(odd, 0, 2) == odd and shot_range_caption(THREE, 0, 2) == THREE
    assert shot_range_caption("A plain caption.", 0, 0, num_shots=1) == "A plain caption."
    with pytest.raises(ValueError, match=r"describes 3 shot\(s\) but the video has 2"):
        shot_range_caption(THREE, 0, 1, num_shots=2)
    with pytest.raises(ValueError, match="describes 1 shot"):
        shot_range_caption("A plain caption.", 0, 0, num_shots=2)
    for first, last in ((0, 3), (2, 1), (-1, 0)):
        with pytest.raises(ValueError, match="outside the caption's 3 shot"):
            shot_range_caption(THREE, first, last)


def test_shot_range_captions_follow_the_canonical_order():
    shots = ["A woman opens a door.", "a dark corridor.", "her face, lit by a torch."]
    ranges = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]  # by first shot, then last (written out)
    expected = [THREE if (a, b) == (0, 2) else format_multishot_caption(shots[a:b + 1]) for a, b in ranges]
    assert shot_range_captions(THREE) == expected
    assert shot_range_captions(THREE, proper=True) == [c for c in expected if c != THREE]
    assert len(set(expected)) == 6 and all(parse_multishot_caption(c) == shots[a:b + 1]
                                           for c, (a, b) in zip(expected, ranges, strict=True))
    one = format_multishot_caption(["a cat sleeps."])
    assert shot_range_captions(one) == [one] and shot_range_captions(one, proper=True) == []
    with pytest.raises(ValueError, match="but the video has 4"):
        shot_range_captions(THREE, num_shots=4)
