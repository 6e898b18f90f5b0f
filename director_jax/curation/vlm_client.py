"""Calls to a chat-completions server at corpus scale: retries, a rate limit, requests in flight, answers kept.

The VLM captioner (``captioners.OpenAICaptioner``) builds one request per sample; ``ChatClient`` sends it:

* **retries**: timeouts, connection errors, HTTP 429 and 5xx and answers the caller cannot parse are retried
  with exponential backoff (``backoff_s`` * 2^attempt, or the server's Retry-After, capped at 60 s); other 4xx
  fail at once with a hint. Failures raise ``CaptionError``.
* **rate limit**: at most ``max_requests_per_s`` request starts per second from this client (0: no limit), so a
  worker stays under a hosted API's quota whatever its concurrency; retries count too.
* **in flight**: ``submit`` runs up to ``concurrency`` requests at once on a thread pool, so a worker keeps a
  batching server (vLLM, SGLang) busy while it decodes and encodes; ``request`` is the same call, blocking.
* **answers kept**: with an ``AnswerCache`` (the curation run's ``OUT/caption_cache.jsonl``), every parsed answer
  is appended, keyed by the SHA-256 of the request's bytes (model, prompt, frames, sampling settings), and an
  identical request later, in a rerun after a crash say, is answered from it without a call: nothing is paid twice.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class CaptionError(RuntimeError):
    """A caption could not be made for a sample (a server error, a bad answer, a missing entry)."""


class RetryableError(Exception):
    """A failure worth another attempt; ``retry_after``: the server's requested delay in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class AnswerCache:
    """Parsed answers by request digest, in an append-only JSON-lines file (fsynced per answer).

    A line torn by a crash, or any unreadable line, is ignored (its request is simply made again), and the
    next answer starts on a line of its own."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self.hits = 0
        self._lock = threading.Lock()
        self._torn = False  # the file ends inside a line (a crash): the next answer starts a new line
        if self.path.exists():
            with self.path.open("rb") as f:
                self._torn = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
            with self.path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.answers[str(entry["key"])] = str(entry["answer"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            answer = self.answers.get(key)
            self.hits += answer is not None
            return answer

    def put(self, key: str, answer: str) -> None:
        line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._torn:
                line, self._torn = "\n" + line, False
            self.answers[key] = answer
            with self.path.open("a", encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # whole lines when several worker processes share the file
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
                fcntl.flock(f, fcntl.LOCK_UN)


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart across threads (``rate`` <= 0: no limit)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Returns when this request may start: threads wait their turn, each at least ``1 / rate`` after the
        previous one really started (a late wake-up delays the next start instead of bunching two)."""
        if not self.interval:
            return
        with self._lock:
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = time.monotonic() + self.interval


def completed_future(fn: Callable[..., str], *args) -> concurrent.futures.Future:
    """``fn(*args)`` run now, its result or error delivered as a done Future (for captioners that call no server)."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    try:
        done.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - delivered through the future, like a request's failure
        done.set_exception(e)
    return done


class ChatClient:
    """POSTs chat-completions requests to ``endpoint`` under the module's rules (see the module doc)."""

    def __init__(self, endpoint: str, api_key: str | None = None, *, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 1.0, max_requests_per_s: float = 0.0, concurrency: int = 1,
                 cache: AnswerCache | None = None):
        self.endpoint, self.api_key = endpoint, api_key
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.limiter = RateLimiter(float(max_requests_per_s))
        self.concurrency = int(concurrency)
        self.cache = cache
        self.calls = 0  # requests actually sent (retries included)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def post(self, data: bytes) -> dict:
        """One POST; the decoded JSON answer, or ``RetryableError`` / ``CaptionError``."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        self.limiter.wait()
        self.calls += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")[:500] if e.fp is not None else ""
            message = f"{self.endpoint} answered HTTP {e.code}: {body!r}"
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                try:
                    delay = min(float(retry_after), 60.0) if retry_after else None
                except ValueError:
                    delay = None
                raise RetryableError(message, delay) from None
            hint = {401: " Check api_key.", 403: " Check api_key and its permissions.",
                    404: " Check the url (the base ends in /v1) and the model name.",
                    413: " Send fewer or smaller frames (max_image_side)."}.get(e.code, "")
            raise CaptionError(message + hint) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RetryableError(f"{self.endpoint}: {type(reason).__name__}: {reason} "
                                 f"(timeout_s={self.timeout_s})") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise RetryableError(f"{self.endpoint} answered non-JSON: {raw[:300]!r}") from None

    def request(self, data: bytes, parse: Callable[[dict], str], what: str) -> str:
        """``parse`` of the answer to ``data`` (from the cache when it holds one), retried per the module doc;
        ``parse`` raises ``RetryableError`` for an answer worth asking again. ``what`` names it in messages."""
        key = None
        if self.cache is not None:
            key = self.cache.key(data)
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        last, delay = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
            try:
                answer = parse(self.post(data))
            except RetryableError as e:
                last = str(e)
                delay = e.retry_after if e.retry_after is not None else self.backoff_s * 2 ** attempt
                log.warning("%s, attempt %d/%d failed: %s", what, attempt + 1, self.retries + 1, last)
                continue
            if key is not None:
                self.cache.put(key, answer)
            return answer
        raise CaptionError(f"no answer for {what} after {self.retries + 1} attempt(s); last error: {last}")

    def submit(self, data: bytes, parse: Callable[[dict], str], what: str) -> concurrent.futures.Future:
        """``request`` on the client's pool of ``concurrency`` threads; its result or error comes with the future."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="vlm")
        return self._pool.submit(self.request, data, parse, what)

    def close(self) -> None:
        """Drops the requests not yet started, waits for those in flight, stops the pool (a later ``submit``
        starts a new one)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
