"""HttpUpstream against real loopback servers: egress, no redirects, deadline, size cap, errors.

Only loopback traffic: an autouse guard refuses (and records) any connect() to another address,
so the tests of private and link-local literals also prove no connection was even attempted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from broker.capabilities import parse_manifest
from broker.errors import (
    BrokerError,
    EgressDenied,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)
from broker.ports import OutgoingRequest, UpstreamResponse
from broker.render import render
from broker.upstream import HttpUpstream, _PinnedResolver, non_public_reason, translate
from tests.support.upstreams import RunningUpstream

LOCAL = ("127.0.0.1/32", "::1/128")
SECRET = "s3cr3t-T0KEN-value"


def send(
    url: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes | None = None,
    allow: tuple[str, ...] = LOCAL,
    timeout: float = 5.0,
    max_bytes: int = 1_000_000,
) -> UpstreamResponse:
    request = OutgoingRequest(method=method, url=url, headers=headers, body=body)
    return asyncio.run(_send_once(request, allow, timeout, max_bytes))


async def _send_once(
    request: OutgoingRequest, allow: tuple[str, ...], timeout: float, max_bytes: int
) -> UpstreamResponse:
    upstream = HttpUpstream(egress_allow=allow)
    try:
        return await upstream.send(request, timeout=timeout, max_bytes=max_bytes)
    finally:
        await upstream.close()


def as_json(resp: UpstreamResponse) -> Any:
    return json.loads(resp.body)


def header(resp: UpstreamResponse, name: str) -> str | None:
    return next((v for k, v in resp.headers if k.lower() == name.lower()), None)


# --- ordinary calls -----------------------------------------------------------------------


def test_get_json_from_recording_upstream(upstream: RunningUpstream) -> None:
    resp = send(f"{upstream.url}/json")
    assert resp.status == 200
    assert as_json(resp) == {"ok": True, "items": [1, 2, 3], "name": "fixed"}
    assert resp.content_type.startswith("application/json")
    assert [r.raw_path for r in upstream.requests] == ["/json"]


def test_rendered_request_arrives_exactly(upstream: RunningUpstream) -> None:
    cap = parse_manifest(
        {
            "name": "test.echo",
            "input": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
            },
            "secrets": {"tok": {"path": "p", "key": "k"}},
            "http": {
                "method": "POST",
                "url": f"{upstream.url}/echo/{{args.name}}?q={{args.name}}",
                "headers": {"Authorization": "Bearer {secrets.tok}"},
                "json": {"name": "{args.name}", "n": "{args.n}"},
            },
        }
    )
    req = render(cap, {"name": "..admin?x=1&y#", "n": 4}, {"tok": SECRET}, "agent-1")
    resp = send(req.url, method=req.method, headers=tuple(req.headers), body=req.body)
    echo = as_json(resp)
    # Percent-encoding survives untouched: the server sees one segment and one parameter.
    assert echo["path"] == "/echo/..admin%3Fx%3D1%26y%23"
    assert echo["query"] == "q=..admin%3Fx%3D1%26y%23"
    assert echo["method"] == "POST"
    assert echo["json"] == {"name": "..admin?x=1&y#", "n": 4}
    assert echo["headers"]["authorization"] == f"Bearer {SECRET}"
    assert echo["headers"]["user-agent"] == "capbroker"
    assert echo["headers"]["content-type"] == "application/json"
    assert "cookie" not in echo["headers"]


def test_status_codes_are_responses_not_errors(upstream: RunningUpstream) -> None:
    assert send(f"{upstream.url}/status/500").status == 500
    assert send(f"{upstream.url}/status/404").body == b"status body"
    resp = send(f"{upstream.url}/status/204")
    assert (resp.status, resp.body) == (204, b"")


def test_concurrent_calls_share_one_pool(upstream: RunningUpstream) -> None:
    async def many() -> list[UpstreamResponse]:
        client = HttpUpstream(egress_allow=LOCAL, pool_size=4)
        try:
            request = OutgoingRequest("GET", f"{upstream.url}/json", ())
            return await asyncio.gather(
                *(client.send(request, timeout=5, max_bytes=10_000) for _ in range(20))
            )
        finally:
            await client.close()

    assert [r.status for r in asyncio.run(many())] == [200] * 20
    assert len(upstream.requests) == 20


def test_httpbin_get(httpbin_url: str) -> None:
    resp = send(f"{httpbin_url}/get?x=1&y=two", headers=(("X-Probe", "yes"),))
    data = as_json(resp)
    assert data["args"] == {"x": "1", "y": "two"}
    assert data["headers"]["X-Probe"] == "yes"


def test_httpbin_post_anything_json(httpbin_url: str) -> None:
    body = json.dumps({"a": [1, 2], "b": None}).encode()
    resp = send(
        f"{httpbin_url}/anything/x",
        method="POST",
        body=body,
        headers=(("Content-Type", "application/json"),),
    )
    data = as_json(resp)
    assert (data["method"], data["json"]) == ("POST", {"a": [1, 2], "b": None})


def test_httpbin_headers_echo(httpbin_url: str) -> None:
    data = as_json(send(f"{httpbin_url}/headers", headers=(("Authorization", f"Bearer {SECRET}"),)))
    assert data["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_gzip_is_decoded_and_encoding_headers_dropped(httpbin_url: str) -> None:
    resp = send(f"{httpbin_url}/gzip")
    assert as_json(resp)["gzipped"] is True
    assert header(resp, "Content-Encoding") is None and header(resp, "Content-Length") is None


# --- redirects ----------------------------------------------------------------------------


def test_redirect_not_followed(upstream: RunningUpstream, second_upstream: RunningUpstream) -> None:
    target = f"{second_upstream.url}/json"
    resp = send(
        f"{upstream.url}/redirect?to={target}", headers=(("Authorization", f"Bearer {SECRET}"),)
    )
    assert resp.status == 302
    assert header(resp, "Location") == target
    assert second_upstream.requests == []


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_httpbin_redirect_to_not_followed(
    httpbin_url: str, second_upstream: RunningUpstream, code: int
) -> None:
    target = f"{second_upstream.url}/json"
    resp = send(
        f"{httpbin_url}/redirect-to?url={target}&status_code={code}",
        method="POST",
        body=b"{}",
        headers=(("Authorization", f"Bearer {SECRET}"),),
    )
    assert resp.status == code
    assert header(resp, "Location") == target
    assert second_upstream.requests == []


# --- egress -------------------------------------------------------------------------------


def test_loopback_refused_without_allow_list(upstream: RunningUpstream) -> None:
    with pytest.raises(EgressDenied) as info:
        send(f"{upstream.url}/json", allow=())
    assert "loopback" in info.value.message
    assert upstream.requests == []


def test_allow_list_must_cover_the_address(upstream: RunningUpstream) -> None:
    with pytest.raises(EgressDenied):
        send(f"{upstream.url}/json", allow=("127.0.0.2/32", "10.0.0.0/8"))
    assert upstream.requests == []


def test_hostname_resolved_once_and_pinned(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    real = asyncio.BaseEventLoop.getaddrinfo

    async def counting(self: asyncio.BaseEventLoop, host: Any, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        return await real(self, host, *args, **kw)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", counting)
    url = upstream.url.replace("127.0.0.1", "localhost")
    assert send(f"{url}/json").status == 200
    assert lookups == ["localhost"]  # checked once; the connector asked nobody else
    with pytest.raises(EgressDenied):
        send(f"{url}/json", allow=())
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "100.64.0.1",
        "0.0.0.0",
        "[::]",
        "[fe80::1]",
        "[fd00::1]",
        "224.0.0.1",
        "255.255.255.255",
        "127.0.0.2",
        "[64:ff9b::a00:1]",
        "[2002:a00:1::]",
    ],
)
def test_non_public_literals_refused_before_connecting(host: str, loopback_only: list[Any]) -> None:
    with pytest.raises(EgressDenied):
        send(f"http://{host}:8080/path?token={SECRET}", allow=())
    assert loopback_only == []


def test_allow_list_opens_private_ranges_and_guard_catches_it(loopback_only: list[Any]) -> None:
    # With 10/8 allowed the broker does try to connect; the test guard refuses that connect()
    # before any packet leaves, which also shows the literal tests above would have noticed.
    with pytest.raises(UpstreamError):
        send("http://10.255.255.1:9/x", allow=("10.0.0.0/8",), timeout=2)
    assert [addr[0] for addr in loopback_only] == ["10.255.255.1"]
    loopback_only.clear()


def test_resolver_refuses_unchecked_hosts() -> None:
    async def outside_send() -> None:
        await _PinnedResolver().resolve("example.com", 443)

    with pytest.raises(OSError):
        asyncio.run(outside_send())


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("8.8.8.8", True),
        ("100.64.0.1", False),
        ("100.127.255.254", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("240.0.0.1", False),
        ("::ffff:10.1.2.3", False),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::", False),
        ("fc00::1", False),
        ("ff02::1", False),
        # NAT64 is refused even towards a public IPv4: Python counts it inside ::/8 (reserved).
        ("64:ff9b::808:808", False),
    ],
)
def test_address_classification(address: str, public: bool) -> None:
    assert (non_public_reason(ipaddress.ip_address(address)) is None) is public


# --- deadline and size --------------------------------------------------------------------


def test_slow_drip_cut_at_deadline(upstream: RunningUpstream) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        send(f"{upstream.url}/slow-drip", timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3
    assert [r.raw_path for r in upstream.requests] == ["/slow-drip"]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversize_body_refused(upstream: RunningUpstream, chunked: bool) -> None:
    flag = "&chunked=1" if chunked else ""
    with pytest.raises(UpstreamResponseTooLarge):
        send(f"{upstream.url}/big?n=200000{flag}", max_bytes=100_000)
    assert len(send(f"{upstream.url}/big?n=100000{flag}", max_bytes=100_000).body) == 100_000


def test_gzip_bomb_cut(upstream: RunningUpstream) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamResponseTooLarge):
        send(f"{upstream.url}/gzip-bomb", max_bytes=1_000_000)
    assert time.monotonic() - started < 10


# --- failures and translation -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connection_refused_message_names_host_only() -> None:
    url = f"http://127.0.0.1:{closed_port()}/private/path?token={SECRET}"
    with pytest.raises(UpstreamError) as info:
        send(url, headers=(("Authorization", f"Bearer {SECRET}"),))
    assert type(info.value) is UpstreamError
    message = str(info.value)
    assert "127.0.0.1" in message
    for leak in ("private", "path", "token", SECRET):
        assert leak not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def all_subclasses(cls: type[BaseException]) -> list[type[BaseException]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(all_subclasses(sub))
    return out


@pytest.mark.parametrize("cls", all_subclasses(aiohttp.ClientError), ids=lambda c: c.__name__)
def test_translate_total_over_aiohttp_errors(cls: type[BaseException]) -> None:
    exc = cls.__new__(cls)  # constructors differ; translate must not depend on their state
    err = translate(exc, "api.example.com")
    assert isinstance(err, UpstreamTimeout if issubclass(cls, TimeoutError) else UpstreamError)
    assert "api.example.com" in err.message


def test_translate_timeouts_and_leaks() -> None:
    assert isinstance(translate(TimeoutError()), UpstreamTimeout)
    assert isinstance(translate(aiohttp.ServerTimeoutError("x")), UpstreamTimeout)
    bad = aiohttp.InvalidURL(f"http://h/secret?token={SECRET}")
    assert SECRET not in translate(bad, "h").message
    own = EgressDenied("kept")
    assert translate(own) is own
    assert isinstance(translate(RuntimeError(SECRET)), BrokerError)
    assert SECRET not in translate(RuntimeError(SECRET)).message
