"""Real HTTP upstreams on loopback for tests: a recording ASGI app and PyPI's httpbin.

Fixtures: ``upstream`` and ``second_upstream`` (RecordingUpstream servers, function scoped),
``httpbin_url`` (session scoped). Servers run in background threads; only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import json
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote

import pytest

from broker.demo import ServerThread  # the same runner `broker dev` uses

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = "127.0.0.1"
GZIP_BOMB_SIZE = 32 * 1024 * 1024


# --- servers ------------------------------------------------------------------------------


class WSGIServerThread:
    """Runs a WSGI app (httpbin) under werkzeug's threaded server on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:
                return None

        self._server = make_server(LOOPBACK, 0, app, threaded=True, request_handler=QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"wsgi-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> WSGIServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --- the recording upstream ---------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream saw it."""

    method: str
    raw_path: str  # path exactly as sent (percent-encoding kept) plus "?query" when present
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@functools.cache
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * GZIP_BOMB_SIZE, compresslevel=9)


class RecordingUpstream:
    """A plain ASGI app that records every request and answers according to the path.

    /echo[/...]       JSON of what it got: method, path (raw), query, headers, json
    /delay?ms=N       the same as /echo, after N milliseconds
    /redirect?to=URL  302 to URL
    /slow-drip        one byte every 100 ms for a minute (stops when the client goes away)
    /big?n=N          N bytes with Content-Length; add &chunked=1 to stream without it
    /status/{code}    that status
    /gzip-bomb        a small gzip body that decompresses to 32 MiB (Content-Encoding: gzip)
    /json             a fixed JSON document
    /reflect          the bearer credential it got, reflected raw, base64 and url-encoded
    /flaky            the status set by ``fail_next`` while failures are left, then 200 JSON
    """

    FIXED_JSON: ClassVar[dict[str, Any]] = {"ok": True, "items": [1, 2, 3], "name": "fixed"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._failures_left = 0
        self._failure_status = 503

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next ``count`` requests to /flaky answer ``status``; later ones answer 200."""
        with self._lock:
            self._failures_left, self._failure_status = count, status

    def _flaky_status(self) -> int:
        with self._lock:
            if self._failures_left <= 0:
                return 200
            self._failures_left -= 1
            return self._failure_status

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        recorded = Recorded(
            method=scope["method"],
            raw_path=(raw_path + (b"?" + query if query else b"")).decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=body,
        )
        with self._lock:
            self._requests.append(recorded)
        params = {k: v[-1] for k, v in parse_qs(query.decode("latin-1")).items()}
        await self._route(scope["path"], params, recorded, receive, send)

    async def _route(
        self, path: str, params: dict[str, str], rec: Recorded, receive: Receive, send: Send
    ) -> None:
        if path == "/echo" or path.startswith("/echo/"):
            await _send_json(send, 200, _echo(rec))
        elif path == "/delay":
            await asyncio.sleep(int(params.get("ms", "0")) / 1000)
            await _send_json(send, 200, _echo(rec))
        elif path == "/redirect":
            await _send(send, 302, b"", [(b"location", params.get("to", "/").encode())])
        elif path == "/slow-drip":
            await _slow_drip(receive, send)
        elif path == "/big":
            await _big(send, int(params.get("n", "0")), chunked=params.get("chunked") == "1")
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            await _send(send, code, b"" if code in (204, 304) else b"status body")
        elif path == "/gzip-bomb":
            headers = [(b"content-encoding", b"gzip"), (b"content-type", b"text/plain")]
            await _send(send, 200, _gzip_bomb(), headers)
        elif path == "/reflect":
            await _send_json(send, 200, _reflect(rec))
        elif path == "/json":
            await _send_json(send, 200, self.FIXED_JSON)
        elif path == "/flaky":
            status = self._flaky_status()
            await _send_json(send, status, {"ok": status == 200, "status": status})
        else:
            await _send(send, 404, b"not found")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _echo(rec: Recorded) -> dict[str, Any]:
    path, _, query = rec.raw_path.partition("?")
    try:
        body: Any = json.loads(rec.body) if rec.body else None
    except ValueError:
        body = rec.body.decode("utf-8", "replace")
    return {
        "method": rec.method,
        "path": path,
        "query": query,
        "headers": {k.lower(): v for k, v in rec.headers},
        "json": body,
    }


def _reflect(rec: Recorded) -> dict[str, Any]:
    """Hand the credential back in the forms a careless upstream might (tests redaction)."""
    cred = (rec.header("authorization") or "").removeprefix("Bearer ")
    raw = cred.encode()
    return {
        "raw": cred,
        "b64": base64.b64encode(raw).decode(),
        "b64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "url": quote(cred, safe=""),
        "basic": "Basic " + base64.b64encode(b"user:" + raw).decode(),
        "query": rec.raw_path.partition("?")[2],
        "body": rec.body.decode("utf-8", "replace"),
    }


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = list(headers or [])
    if status not in (204, 304):
        all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, data: Any) -> None:
    await _send(send, status, json.dumps(data).encode(), [(b"content-type", b"application/json")])


async def _big(send: Send, n: int, *, chunked: bool) -> None:
    if not chunked:
        await _send(send, 200, b"x" * n)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    step = 64 * 1024
    for start in range(0, n, step):
        await send(
            {"type": "http.response.body", "body": b"x" * min(step, n - start), "more_body": True}
        )
    await send({"type": "http.response.body", "body": b""})


async def _slow_drip(receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    # Watch for the client going away so the server can shut down promptly.
    gone = asyncio.ensure_future(receive())
    try:
        for _ in range(600):
            await send({"type": "http.response.body", "body": b".", "more_body": True})
            done, _ = await asyncio.wait({gone}, timeout=0.1)
            if done:
                return
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()


# --- fixtures -----------------------------------------------------------------------------


@dataclass
class RunningUpstream:
    """A RecordingUpstream being served: its base URL and what it has received."""

    url: str
    app: RecordingUpstream

    @property
    def requests(self) -> list[Recorded]:
        return self.app.requests


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    app = RecordingUpstream()
    with ServerThread(app) as server:
        yield RunningUpstream(server.url, app)


@pytest.fixture
def second_upstream() -> Iterator[RunningUpstream]:
    app = RecordingUpstream()
    with ServerThread(app) as server:
        yield RunningUpstream(server.url, app)


@pytest.fixture(scope="session")
def httpbin_url() -> Iterator[str]:
    with warnings.catch_warnings():
        # httpbin's dependencies (flasgger and friends) emit deprecation warnings on import.
        warnings.simplefilter("ignore")
        from httpbin import app
    server = WSGIServerThread(app).start()
    try:
        yield server.url
    finally:
        server.stop()
