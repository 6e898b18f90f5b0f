"""VLM calls at scale against a real HTTP server on 127.0.0.1: requests in flight, the rate limit, answers kept
on disk so that a rerun of a curation (after a crash, say) pays for no caption twice."""

import json
import time

import numpy as np
import pytest

from director_jax.curation.captioners import CaptionError, FallbackCaptioner, TemplateCaptioner
from director_jax.curation.pipeline import curate
from director_jax.curation.source import submit_caption
from director_jax.curation.vlm_client import AnswerCache
from director_jax.data.captions import parse_multishot_caption
from director_jax.data.synthetic import write_synthetic_movie
from tests.test_captioners import SAMPLE, WANT, FakeServer, _captioner, _shot_frames
from tests.test_curate import _config, _lines


class CountingServer(FakeServer):
    """The fake server, noting when each request arrives; every answer waits ``hold_s``."""

    def __init__(self, answer: str, hold_s: float):
        super().__init__([("sleep", hold_s, answer)])
        self.hold_s, self.starts = hold_s, []
        handler = self.httpd.RequestHandlerClass
        original = handler.do_POST
        server = self

        def do_post(handler_self):
            server.starts.append(time.monotonic())
            original(handler_self)

        handler.do_POST = do_post

    @property
    def most(self) -> int:
        """The most requests held at once: a request is held from its arrival until its answer, ``hold_s`` later
        (counted from arrivals: a handler thread may still be finishing when the client sends its next request)."""
        starts = sorted(self.starts)
        return max(sum(1 for s in starts if t - self.hold_s + 0.02 < s <= t) for t in starts)


@pytest.fixture
def counting():
    servers = []

    def start(answer, hold_s=0.0):
        servers.append(CountingServer(answer, hold_s))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


ANSWER = '{"shots": ["a red circle moves left.", "a blue square on grey."]}'


@pytest.mark.parametrize("concurrency", [1, 3])
def test_requests_in_flight_are_bounded_by_concurrency(counting, concurrency):
    server = counting(ANSWER, hold_s=0.3)
    captioner = _captioner(server.url, concurrency=concurrency)
    futures = [captioner.submit(_shot_frames(), {**SAMPLE, "id": f"{k:016x}"}) for k in range(6)]
    assert [f.result(timeout=30) for f in futures] == [WANT] * 6
    captioner.close()
    assert server.attempts == 6 and server.most == concurrency


def test_rate_limit_spaces_request_starts(counting):
    server = counting(ANSWER)
    captioner = _captioner(server.url, concurrency=4, max_requests_per_s=5.0)
    futures = [captioner.submit(_shot_frames(), {**SAMPLE, "id": f"{k:016x}"}) for k in range(5)]
    [f.result(timeout=30) for f in futures]
    # started 0.2 s apart by the client; seen by the server with some jitter in transit (a busy machine)
    starts = sorted(server.starts)
    gaps = np.diff(starts)
    assert len(gaps) == 4 and gaps.min() >= 0.1 and starts[-1] - starts[0] >= 0.7, gaps


def test_answers_are_kept_and_an_identical_request_is_not_sent_again(counting, tmp_path):
    server = counting(ANSWER)
    cache = tmp_path / "caption_cache.jsonl"
    first = _captioner(server.url)
    first.use_cache(cache)
    assert first.caption(_shot_frames(), SAMPLE) == WANT and server.attempts == 1
    with cache.open("a") as f:
        f.write('{"key": "torn')  # a crash in the middle of a line
    again = _captioner(server.url)
    again.use_cache(cache)
    assert again.caption(_shot_frames(), SAMPLE) == WANT and server.attempts == 1  # from the file
    other = [frames[:, ::-1] for frames in _shot_frames()]  # other frames: another request
    assert again.caption(other, SAMPLE) == WANT and server.attempts == 2
    assert len(AnswerCache(cache).answers) == 2 and again.client.cache.hits == 1


def test_fallback_answers_a_failed_request_in_flight(request):
    server = FakeServer([("error", 500, "down")])
    request.addfinalizer(server.close)
    fallback = FallbackCaptioner(_captioner(server.url, retries=1), TemplateCaptioner())
    got = fallback.submit(_shot_frames(), SAMPLE).result(timeout=30)
    assert len(parse_multishot_caption(got)) == 2 and fallback.num_fallbacks == 1 and server.attempts == 2
    failing = submit_caption(_captioner(server.url, retries=0), _shot_frames(), SAMPLE)
    with pytest.raises(CaptionError, match="HTTP 500"):
        failing.result(timeout=30)
    # a captioner without submit answers at once, through the same interface
    assert len(parse_multishot_caption(submit_caption(TemplateCaptioner(), _shot_frames(), SAMPLE).result())) == 2


def test_a_rerun_after_a_crash_pays_for_no_caption_twice(counting, tmp_path):
    """A curation whose records were lost after its captions were paid for (the crash case: clips and answers
    written, the source not yet recorded) is redone from the answers file: the same manifest, no request."""
    answer = '{"shots": ["a shot."]}'  # single-shot samples only: one caption per sample
    for seed in range(2):  # one-shot movies: one single-shot sample each
        write_synthetic_movie(tmp_path / "movies" / f"m{seed}.mp4", seed, [40], 48, 64)
    server = counting(answer, hold_s=0.05)
    cfg = _config()
    cfg.caption.kind = "openai"
    cfg.caption.openai.update(url=server.url, model="test-vlm", retries=0, concurrency=3)
    out = tmp_path / "out"
    summary = curate([str(tmp_path / "movies")], out, cfg)
    manifest = (out / "manifest.jsonl").read_bytes()
    paid = server.attempts
    assert paid == summary["samples"]["total"] > 1 and summary["caption_requests"] == {"sent": paid, "from_cache": 0}
    assert {m["caption"] for m in _lines(out / "manifest.jsonl")} == {"The video features 1 shot. Shot 1: a shot."}
    assert len(_lines(out / "caption_cache.jsonl")) == paid
    for name in ("shots.jsonl", "manifest.jsonl"):  # the source's records gone, its answers kept
        (out / name).unlink()
    again = curate([str(tmp_path / "movies")], out, cfg)
    assert server.attempts == paid and again["caption_requests"] == {"sent": 0, "from_cache": paid}
    assert (out / "manifest.jsonl").read_bytes() == manifest
    assert json.loads((out / "summary.json").read_text())["caption_requests"]["from_cache"] == paid
