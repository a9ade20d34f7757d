"""Adversarial tests through the real HTTP API: a real broker, real OpenBao, hostile upstreams.

Each test asserts the safe behaviour for invariants 1-5 and 8 (DESIGN.md "Invariants"); a failing
test is a bug. Only loopback traffic: an autouse guard refuses (and records) any connect() to
another address, so refusal tests also prove no connection was attempted.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, unquote

import pytest

from broker.devserver import DevVault
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import Receive, RunningUpstream, Scope, Send, ServerThread, _read_body

SECRET = "tk-9f/Q+zX=w&v?Lr7"  # url-encodes, base64s, JSON- and HTML-escapes in telling ways


# --- guards and helpers -----------------------------------------------------------------------


def recoverable_forms(text: str) -> list[str]:
    """What an agent could trivially turn the text into (to look for the secret in each)."""
    forms = [text, text.replace("\x00", ""), html.unescape(text), unquote(text)]
    forms.append(text.replace("\\/", "/"))
    forms.append(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text))
    forms.append(unquote(html.unescape(text)))
    return forms


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _strings(v)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def assert_no_secret(text: str, secret: str = SECRET) -> None:
    """The secret is not in the text, nor in any string of it once JSON-decoded."""
    try:
        decoded = list(_strings(json.loads(text)))
    except ValueError:
        decoded = []
    for inner in decoded:
        _assert_no_secret(inner, secret)
    _assert_no_secret(text, secret)


def _assert_no_secret(text: str, secret: str) -> None:
    raw = secret.encode()
    encoded = [
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(secret, safe=""),
        quote_plus(secret),
    ]
    for form in recoverable_forms(text):
        for enc in encoded:
            assert enc not in form, f"secret form {enc!r} recoverable from the text"


def invoke(rb: RunningBroker, token: str | None, name: str, args: Any = None, **kw: Any) -> Any:
    return rb.http(token).post(f"/v1/capabilities/{name}/invoke", json={"args": args or {}}, **kw)


def invoke_raw(rb: RunningBroker, token: str, name: str, body: bytes) -> Any:
    return rb.http(token).post(
        f"/v1/capabilities/{name}/invoke",
        content=body,
        headers={"Content-Type": "application/json"},
    )


def manifest(
    name: str,
    url: str,
    *,
    secret_path: str,
    properties: dict[str, Any] | None = None,
    required: list[str] | None = None,
    **http: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "GET",
        "url": url,
        "headers": {"Authorization": "Bearer {secrets.tok}"},
        "timeout": "5s",
    }
    spec.update(http)
    return {
        "name": name,
        "input": {
            "type": "object",
            "required": required or [],
            "properties": properties or {},
        },
        "secrets": {"tok": {"path": secret_path, "key": "token"}},
        "http": spec,
    }


# --- a hostile upstream -----------------------------------------------------------------------


def _credential(scope: Scope) -> str:
    for k, v in scope["headers"]:
        if k.lower() == b"authorization":
            return v.decode("latin-1").removeprefix("Bearer ")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("key", [""])[-1]


def _lower_pct(value: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(value, safe=""))


def _go_json(value: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe: & < > escaped)."""
    out = json.dumps(value)
    return out.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


@dataclass
class Hostile:
    """An ASGI upstream that hands the credential back in shapes careless servers use."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        cred = _credential(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        self.seen.append(
            {"method": scope["method"], "path": path, "query": query, "headers": headers}
        )
        route = path.split("/")[1] if path.count("/") >= 1 else ""
        handler = getattr(self, "r_" + route.replace("-", "_"), None)
        if handler is None:
            await _send(send, 404, b"no such route", "text/plain")
            return
        await handler(scope, receive, send, cred)

    async def r_err401json(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        body = {"error": f"invalid token {cred}", "echo": {cred: cred}}
        await _send(send, 401, json.dumps(body).encode(), "application/json")

    async def r_lowerpct(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        await _send(send, 200, f"received token={_lower_pct(cred)}".encode(), "text/plain")

    async def r_html401(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        page = f"<html><body><p>Invalid token: {html.escape(cred)}</p></body></html>"
        await _send(send, 401, page.encode(), "text/html")

    async def r_ndjson(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        lines = [f'{{"event":"auth","token":{_go_json(cred)}}}', '{"event":"done"}']
        await _send(send, 200, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")

    async def r_utf16(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        body = json.dumps({"token": cred}).encode("utf-16-le")
        await _send(send, 200, body, "application/json; charset=utf-16le")

    async def r_jsonp(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        # PHP's json_encode escapes "/" as "\/" by default; JSONP is not JSON.
        escaped = json.dumps({"token": cred}).replace("/", "\\/")
        await _send(send, 200, f"callback({escaped});".encode(), "application/javascript")

    async def r_uescaped(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        escaped = "".join(f"\\u{ord(c):04x}" for c in cred)
        await _send(send, 200, f'{{"token": "{escaped}"}}'.encode(), "application/json")

    async def r_headers(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        extra = [(b"x-echo-token", cred.encode()), (b"set-cookie", f"s={cred}".encode())]
        await _send(send, 200, b'{"ok": true}', "application/json", extra)

    async def r_header_bomb(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        extra = [(f"x-h{i}".encode(), cred.encode()) for i in range(500)]
        await _send(send, 200, b"{}", "application/json", extra)

    async def r_list(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        body = [{"id": 1, "internal_note": "do-not-show"}, {"id": 2, "internal_note": "x"}]
        await _send(send, 200, json.dumps(body).encode(), "application/json")

    async def r_nan(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        await _send(send, 200, b'{"value": NaN, "other": Infinity}', "application/json")

    async def r_surrogate(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        await _send(send, 200, b'{"value": "a\\ud800b"}', "application/json")

    async def r_path(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        body = {"path": scope["path"], "raw_path": (scope.get("raw_path") or b"").decode()}
        await _send(send, 200, json.dumps(body).encode(), "application/json")

    async def r_cookie(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        got = dict((k.decode(), v.decode()) for k, v in scope["headers"]).get("cookie")
        extra = [(b"set-cookie", b"session=upstream-session; Path=/")]
        await _send(send, 200, json.dumps({"cookie": got}).encode(), "application/json", extra)

    async def r_redirect307(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        to = parse_qs(scope.get("query_string", b"").decode()).get("to", ["/"])[-1]
        await _send(send, 307, b"", "text/plain", [(b"location", to.encode())])

    async def r_ampbomb(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        # ~4 MB that every decoding check has to walk '&' by '&', then the credential.
        body = {"junk": "&a" * 2_000_000, "token": html.escape(cred)}
        await _send(send, 200, json.dumps(body).encode(), "application/json")

    async def r_hang(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        # Accept the request, never answer; stop when the client goes away (at most 20 s).
        try:
            await asyncio.wait_for(_until_disconnect(receive), 20)
        except TimeoutError:
            return

    async def r_echo(self, scope: Scope, receive: Receive, send: Send, cred: str) -> None:
        body = await _read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        out = {
            "method": scope["method"],
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        }
        await _send(send, 200, json.dumps(out).encode(), "application/json")


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type.encode()), *(extra or [])]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class HostileServer:
    url: str
    app: Hostile


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    app = Hostile()
    with ServerThread(app) as server:
        yield HostileServer(server.url, app)


@dataclass
class Env:
    rb: RunningBroker
    path: str  # the secret's KV path
    token: str  # an agent allowed to invoke adv.*


@pytest.fixture
def env(running_broker: RunningBroker) -> Env:
    rb = running_broker
    path = f"adv/{uuid.uuid4().hex[:12]}"
    rb.secret(path, {"token": SECRET})
    rb.admin.add_policy("role:adv", "adv.*")
    return Env(rb, path, rb.agent("mallory", ["adv"]))


def put(env: Env, name: str, url: str, **kw: Any) -> str:
    env.rb.admin.put_capability(manifest(name, url, secret_path=env.path, **kw))
    return name


def assert_nothing_leaked(
    env: Env,
    *texts: str,
    caplog: pytest.LogCaptureFixture | None = None,
    upstream_threads: tuple[str, ...] = (),
) -> None:
    for text in texts:
        assert_no_secret(text)
    assert_no_secret(json.dumps(env.rb.audit()))
    assert_no_secret(json.dumps(env.rb.raw_audit_rows(), default=str))
    if caplog is not None:
        # Only the broker's own records: the test upstreams log their own (raw) requests.
        ours = [r for r in caplog.records if r.threadName not in upstream_threads]
        assert_no_secret("\n".join(r.getMessage() for r in ours))
        assert_no_secret("\n".join(caplog.handler.format(r) for r in ours))


# === invariant 3: secrets never leave the broker ==============================================


def test_secret_echoed_in_4xx_json_body_is_redacted_in_result_and_audit(
    env: Env, hostile: HostileServer
) -> None:
    name = put(env, "adv.err401", f"{hostile.url}/err401json")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "upstream_error" and r.json()["upstream_status"] == 401
    assert hostile.app.seen[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert "[REDACTED]" in r.text
    assert_nothing_leaked(env, r.text)


def test_secret_fully_unicode_escaped_in_json_is_redacted(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.uescaped", f"{hostile.url}/uescaped")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"token": "[REDACTED]"}


def test_secret_in_upstream_response_headers_is_not_returned(
    env: Env, hostile: HostileServer
) -> None:
    name = put(env, "adv.headers", f"{hostile.url}/headers")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"ok": True}
    assert_nothing_leaked(env, r.text)


def test_secret_in_lowercase_percent_encoding_is_redacted(env: Env, hostile: HostileServer) -> None:
    # RFC 3986 says %2f and %2F are the same octet; many encoders emit lower case.
    name = put(env, "adv.lowerpct", f"{hostile.url}/lowerpct")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert_nothing_leaked(env, r.text)


def test_secret_html_escaped_in_an_error_page_is_redacted(env: Env, hostile: HostileServer) -> None:
    # "Invalid token: tk-9f/Q+zX=w&amp;v?Lr7" - the usual shape of a framework's 401 page.
    name = put(env, "adv.html401", f"{hostile.url}/html401")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert r.json()["upstream_status"] == 401
    assert_nothing_leaked(env, r.text)


def test_secret_go_escaped_in_ndjson_is_redacted(env: Env, hostile: HostileServer) -> None:
    # NDJSON is not one JSON document, so it is returned as text; Go writes "&" as \u0026.
    name = put(env, "adv.ndjson", f"{hostile.url}/ndjson")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    lines = result.splitlines() if isinstance(result, str) else [json.dumps(result)]
    for line in lines:
        assert SECRET not in json.dumps(json.loads(line), ensure_ascii=False)
    assert_nothing_leaked(env, r.text)


def test_secret_php_slash_escaped_in_jsonp_is_redacted(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.jsonp", f"{hostile.url}/jsonp")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert_nothing_leaked(env, r.text)


def test_secret_in_a_utf16_body_is_redacted(env: Env, hostile: HostileServer) -> None:
    # The body is decoded as UTF-8 whatever its charset: every other character becomes NUL and
    # the secret, interleaved with NULs, passes the redactor; removing the NULs gives it back.
    name = put(env, "adv.utf16", f"{hostile.url}/utf16")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert_nothing_leaked(env, r.text)


def test_secret_in_url_of_a_failed_connection_stays_out_of_errors_logs_and_audit(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused
    name = put(
        env,
        "adv.refused",
        f"http://127.0.0.1:{port}/x/{{secrets.tok}}",
        query={"key": "{secrets.tok}"},
    )
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    [finished] = env.rb.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")
    assert finished["status"] == "failed"
    assert_nothing_leaked(env, r.text, caplog=caplog)


def test_secret_in_query_and_path_stays_out_of_debug_logs(
    env: Env, hostile: HostileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for logger in ("aiohttp", "aiohttp.client", "hvac", "urllib3", "uvicorn", "uvicorn.access"):
        logging.getLogger(logger).setLevel(logging.DEBUG)
    name = put(
        env,
        "adv.logs",
        f"{hostile.url}/err401json/{{secrets.tok}}",
        query={"key": "{secrets.tok}"},
    )
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    bomb = put(env, "adv.logs.bomb", f"{hostile.url}/header-bomb", query={"key": "{secrets.tok}"})
    r2 = invoke(env.rb, env.token, bomb)
    assert r2.status_code == 502, r2.text
    port = hostile.url.rsplit(":", 1)[1]
    assert_nothing_leaked(env, r.text, r2.text, caplog=caplog, upstream_threads=(f"asgi-{port}",))


def test_result_fields_hold_when_the_upstream_answers_a_list(
    env: Env, hostile: HostileServer
) -> None:
    # "result.fields: only these reach the agent" - also when the body is not an object.
    m = manifest("adv.fields", f"{hostile.url}/list", secret_path=env.path)
    m["result"] = {"fields": ["id"]}
    env.rb.admin.put_capability(m)
    r = invoke(env.rb, env.token, "adv.fields")
    assert r.status_code == 200, r.text
    assert "internal_note" not in r.text and "do-not-show" not in r.text


# === invariant 4: only broker tokens; agent credentials never forwarded =====================


def test_agent_headers_never_reach_the_upstream(env: Env, hostile: HostileServer) -> None:
    m = manifest(
        "adv.echo",
        f"{hostile.url}/echo",
        secret_path=env.path,
        properties={"m": {"type": "string"}},
        headers={"Authorization": "Bearer {secrets.tok}", "Accept": "application/json"},
        json={"m": "{args.m}"},
        method="POST",
    )
    env.rb.admin.put_capability(m)
    agent_headers = {
        "Cookie": "agent_session=AGENTCOOKIE",
        "Proxy-Authorization": "Basic QUdFTlRQUk9YWQ==",
        "X-Api-Key": "AGENTAPIKEY",
        "X-Forwarded-For": "10.9.9.9",
        "Forwarded": "for=10.9.9.9",
        "X-Real-IP": "10.9.9.9",
        "X-HTTP-Method-Override": "DELETE",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Idempotency-Key": "idem-AGENTKEY",
        "X-Broker-Task": "task-AGENTTASK",
        "Origin": "https://agent.example",
    }
    r = invoke(env.rb, env.token, "adv.echo", {"m": "hi"}, headers=agent_headers)
    assert r.status_code == 200, r.text
    got = hostile.app.seen[-1]["headers"]
    assert got["authorization"] == f"Bearer {SECRET}"  # the manifest's, not the agent's
    assert env.token not in json.dumps(got)
    for value in agent_headers.values():
        assert value not in json.dumps(got), f"agent header value {value!r} reached upstream"
    allowed = {
        "host", "authorization", "accept", "accept-encoding", "user-agent",
        "content-type", "content-length", "traceparent",
    }  # fmt: skip
    assert set(got) <= allowed, set(got) - allowed
    # The broker's own traceparent: the agent's trace continues, under the broker's span.
    assert got["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert "b7ad6b7169203331" not in got["traceparent"]
    assert hostile.app.seen[-1]["method"] == "POST"


def test_token_variants_are_rejected(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.tok", f"{hostile.url}/echo")
    t = env.token
    variants = [
        f"Bearer {t.upper()}",
        f"Bearer {t}x",
        f"Bearer {t[:-1]}",
        f"Bearer {t} {t}",
        f"Token {t}",
        f"Basic {base64.b64encode(f'x:{t}'.encode()).decode()}",
        t,
        f"Bearer {t.removeprefix('cbk_')}",
    ]
    for header in variants:
        r = env.rb.http().post(
            f"/v1/capabilities/{name}/invoke", json={"args": {}}, headers={"Authorization": header}
        )
        assert r.status_code == 401, (header, r.text)
    # A token anywhere but the Authorization header counts for nothing.
    for kw in ({"params": {"access_token": t}}, {"headers": {"X-Api-Key": t}},
               {"headers": {"Cookie": f"token={t}"}}):  # fmt: skip
        with env.rb.http() as client:
            r = client.post(f"/v1/capabilities/{name}/invoke", json={"args": {}}, **kw)
        assert r.status_code == 401, (kw, r.text)
    assert hostile.app.seen == []


def test_disabled_agent_cannot_use_any_token_old_or_new(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.dis", f"{hostile.url}/echo")
    admin = env.rb.admin
    first = env.rb.agent("trudy", ["adv"])
    second = admin.issue_token("trudy")["token"]
    assert invoke(env.rb, second, name).status_code == 200
    admin.disable_agent("trudy")
    third = admin.issue_token("trudy")["token"]  # issued after the disable
    for token in (first, second, third):
        r = invoke(env.rb, token, name)
        assert r.status_code == 401, r.text
    # Granting a role again does not bring a disabled agent back.
    admin.grant_role("trudy", "adv")
    assert invoke(env.rb, third, name).status_code == 401
    assert len(hostile.app.seen) == 1


def test_upstream_cookies_are_not_kept_between_calls(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.cookie", f"{hostile.url}/cookie")
    other = env.rb.agent("oscar", ["adv"])
    assert invoke(env.rb, env.token, name).json()["result"] == {"cookie": None}
    assert invoke(env.rb, other, name).json()["result"] == {"cookie": None}


# === invariant 5: the destination is fixed ====================================================


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[fd00:ec2::254]",
        "10.0.0.1",
        "100.100.100.200",
        "0.0.0.0",
        "[::]",
        "[::1]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:a9fe:a9fe::1]",
    ],
)
def test_private_and_metadata_addresses_refused_before_connecting(
    env: Env, host: str, loopback_only: list[Any]
) -> None:
    # egress_allow is 127.0.0.1/32 here: none of these may be reached.
    name = put(env, "adv.meta", f"http://{host}:8080/latest/meta-data/{{secrets.tok}}")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 403 and r.json()["error"]["code"] == "egress_denied", r.text
    assert loopback_only == []
    assert_nothing_leaked(env, r.text)


@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433", "0x7f.1", "localhost."])
def test_loopback_spellings_refused_without_egress_allow(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    hostile: HostileServer,
    host: str,
) -> None:
    rb = start_broker(openbao, database_url, tmp_path, egress_allow="")
    try:
        path = f"adv/{uuid.uuid4().hex[:12]}"
        rb.secret(path, {"token": SECRET})
        port = hostile.url.rsplit(":", 1)[1]
        rb.admin.put_capability(manifest("adv.lo", f"http://{host}:{port}/echo", secret_path=path))
        rb.admin.add_policy("role:adv", "adv.*")
        r = invoke(rb, rb.agent("lou", ["adv"]), "adv.lo")
        assert r.status_code in (403, 502), r.text
        assert r.json()["error"]["code"] in ("egress_denied", "upstream_error")
        assert hostile.app.seen == []
    finally:
        rb.close()


@pytest.mark.parametrize(
    "owner", ["../../admin", "..%2F..%2Fadmin", "a/../../b", "..\\..\\admin", "%2e%2e/x"]
)
def test_path_argument_adds_no_segment_as_the_upstream_sees_it(
    env: Env, hostile: HostileServer, owner: str
) -> None:
    # The broker sends one encoded segment ("..%2F..%2Fadmin"), but ASGI/WSGI servers and
    # many proxies decode %2F before routing: the upstream app then sees extra segments and
    # dot-segments. A segment value with "/" or "\" must not be sent at all.
    m = manifest(
        "adv.seg",
        f"{hostile.url}/path/{{args.owner}}/items",
        secret_path=env.path,
        properties={"owner": {"type": "string"}},
        required=["owner"],
    )
    env.rb.admin.put_capability(m)
    r = invoke(env.rb, env.token, "adv.seg", {"owner": owner})
    if r.status_code == 422:
        assert hostile.app.seen == []
        return
    assert r.status_code == 200, r.text
    seen_path = hostile.app.seen[-1]["path"]
    segments = seen_path.split("/")
    assert len(segments) == 4 and segments[-1] == "items", seen_path
    assert ".." not in segments


def test_json_key_slot_cannot_overwrite_a_fixed_field(env: Env, hostile: HostileServer) -> None:
    # A careless operator lets the agent name one extra field; the agent names "role".
    m = manifest(
        "adv.key",
        f"{hostile.url}/echo",
        secret_path=env.path,
        properties={"field": {"type": "string"}, "value": {"type": "string"}},
        required=["field", "value"],
        method="POST",
        json={"role": "viewer", "{args.field}": "{args.value}"},
    )
    # Keys are fixed by the manifest: such a manifest is refused at registration.
    r = env.rb.http(env.rb.admin_token).put("/v1/capabilities/adv.key", json=m)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_manifest"
    assert "key" in r.json()["error"]["message"]


@pytest.mark.parametrize("method", ["HEAD", "DELETE"])
def test_method_is_fixed_whatever_the_arguments(
    env: Env, hostile: HostileServer, method: str
) -> None:
    m = manifest(
        "adv.method",
        f"{hostile.url}/echo",
        secret_path=env.path,
        properties={"method": {"type": "string"}, "q": {"type": "string"}},
        method=method,
        query={"q": "{args.q}"},
    )
    env.rb.admin.put_capability(m)
    r = invoke(
        env.rb, env.token, "adv.method", {"method": "POST", "q": "x&_method=PUT", "extra": "1"}
    )
    assert r.status_code == 200, r.text
    assert [s["method"] for s in hostile.app.seen] == [method]
    assert "x-http-method-override" not in hostile.app.seen[-1]["headers"]


def test_307_redirect_with_secret_is_not_followed(
    env: Env, hostile: HostileServer, second_upstream: RunningUpstream
) -> None:
    name = put(
        env, "adv.r307", f"{hostile.url}/redirect307", query={"to": f"{second_upstream.url}/echo"}
    )
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 200, r.text
    assert r.json()["upstream_status"] == 307
    assert second_upstream.requests == []


def test_unicode_and_percent_tricks_in_query_stay_one_parameter(
    env: Env, hostile: HostileServer
) -> None:
    m = manifest(
        "adv.q",
        f"{hostile.url}/echo",
        secret_path=env.path,
        properties={"q": {"type": "string"}},
        query={"q": "{args.q}"},
    )
    env.rb.admin.put_capability(m)
    for q in ["a%26b%3Dc", "a\uff06b\uff1dc", "a&b=c#frag", "a\u2028b", "x" * 20000]:
        r = invoke(env.rb, env.token, "adv.q", {"q": q})
        assert r.status_code in (200, 502), r.text
    for seen in hostile.app.seen:
        assert seen["path"] == "/echo"
        assert list(parse_qs(seen["query"])) == ["q"] and seen["query"].count("&") == 0


# === invariant 8 (and the audit of refusals): bounds ==========================================


def test_response_header_flood_is_refused_cleanly(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.hbomb", f"{hostile.url}/header-bomb")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
    assert_nothing_leaked(env, r.text)


def test_gzip_bomb_is_cut_at_the_response_cap(env: Env, upstream: RunningUpstream) -> None:
    name = put(env, "adv.gz", f"{upstream.url}/gzip-bomb", max_response_bytes=1_000_000)
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_response_too_large"


def test_upstream_that_never_answers_is_cut_at_the_deadline(
    env: Env, hostile: HostileServer
) -> None:
    name = put(env, "adv.hang", f"{hostile.url}/hang", timeout="1s")
    r = invoke(env.rb, env.token, name)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    [event] = env.rb.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")
    assert event["latency_ms"] < 5000


def test_deeply_nested_arguments_are_refused_and_audited(env: Env, hostile: HostileServer) -> None:
    name = put(env, "adv.deep", f"{hostile.url}/echo", properties={"m": {}})
    depth = 100_000  # 200 KB, well under the request body limit
    body = b'{"args": {"m": ' + b"[" * depth + b"]" * depth + b"}}"
    before = len(env.rb.audit())
    r = invoke_raw(env.rb, env.token, name, body)
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["call_id"] is not None
    assert len(env.rb.audit()) > before, "the refusal left no audit record"
    assert hostile.app.seen == []


@pytest.mark.parametrize("where", ["body", "header", "query"])
def test_lone_surrogate_arguments_are_refused_and_audited(
    env: Env, hostile: HostileServer, where: str
) -> None:
    http: dict[str, Any] = {
        "body": {"method": "POST", "json": {"m": "{args.m}"}},
        "header": {"headers": {"Authorization": "Bearer {secrets.tok}", "X-Note": "{args.m}"}},
        "query": {"query": {"m": "{args.m}"}},
    }[where]
    m = manifest(
        f"adv.sur.{where}",
        f"{hostile.url}/echo",
        secret_path=env.path,
        properties={"m": {"type": "string"}},
        **http,
    )
    env.rb.admin.put_capability(m)
    before = len(env.rb.audit())
    r = invoke_raw(env.rb, env.token, f"adv.sur.{where}", b'{"args": {"m": "a\\ud800b"}}')
    assert hostile.app.seen == []  # fail closed held: nothing was sent
    assert r.status_code in (200, 400, 422), r.text
    call_id = (r.json().get("error") or r.json()).get("call_id")
    assert call_id is not None
    assert len(env.rb.audit()) > before, "the call left no audit record"


def test_non_finite_numbers_from_the_upstream_do_not_break_the_answer(
    env: Env, hostile: HostileServer
) -> None:
    # NaN/Infinity are accepted by json.loads but not by the API's JSON encoder: the call is
    # audited "succeeded" and the agent gets a 500 instead of its result.
    name = put(env, "adv.nan", f"{hostile.url}/nan")
    r = invoke(env.rb, env.token, name)
    assert r.status_code in (200, 502), r.text
    if r.status_code == 200:
        json.loads(r.text)  # standard JSON, no NaN
    finished = env.rb.audit(capability=name, kind="call.finished")
    assert finished and finished[-1]["status"] in ("succeeded", "failed")
    if r.status_code == 200:
        assert finished[-1]["status"] == "succeeded"


def test_lone_surrogate_in_the_upstream_json_does_not_break_the_answer(
    env: Env, hostile: HostileServer
) -> None:
    # json.loads turns "\\ud800" into a lone surrogate, which UTF-8 cannot encode.
    name = put(env, "adv.usur", f"{hostile.url}/surrogate")
    r = invoke(env.rb, env.token, name)
    assert r.status_code in (200, 502), r.text
    finished = env.rb.audit(capability=name, kind="call.finished")
    assert finished
    assert finished[-1]["status"] == ("succeeded" if r.status_code == 200 else "failed")


def test_a_huge_answer_does_not_hold_the_broker_while_it_is_checked(
    env: Env, hostile: HostileServer
) -> None:
    """Checking ~4 MB of '&a' for hidden secrets takes a while; meanwhile the broker keeps
    answering. Self-calibrating: the slowest health check during the call must be far
    shorter than the call (shaped on the event loop, it waited for nearly all of it)."""
    name = put(env, "adv.ampbomb", f"{hostile.url}/ampbomb")
    done: dict[str, Any] = {}

    def call() -> None:
        started = time.perf_counter()
        done["response"] = invoke(env.rb, env.token, name)
        done["seconds"] = time.perf_counter() - started

    caller = threading.Thread(target=call)
    caller.start()
    while len(hostile.app.seen) == 0:  # the broker has sent the request
        time.sleep(0.005)
    waits = []
    with env.rb.http() as http:
        while caller.is_alive():
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.01)
    caller.join()
    r = done["response"]
    assert r.status_code == 200, r.text
    assert r.json()["result"]["token"] == "[REDACTED]"
    assert SECRET not in r.text and html.escape(SECRET) not in r.text
    assert len(waits) >= 3 and max(waits) < done["seconds"] / 3, (max(waits), done["seconds"])


def test_declared_rate_limit_is_enforced(env: Env, hostile: HostileServer) -> None:
    m = manifest("adv.rate", f"{hostile.url}/echo", secret_path=env.path)
    m["limits"] = {"rate": "1/minute"}
    env.rb.admin.put_capability(m)
    assert invoke(env.rb, env.token, "adv.rate").status_code == 200
    r = invoke(env.rb, env.token, "adv.rate")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
    assert len(hostile.app.seen) == 1


# === invariants 1 and 2: fail closed ============================================================


@pytest.mark.parametrize("attr", [{}, {"team": "../frank"}, {"team": "a/b"}, {"team": "."}])
def test_unusable_per_agent_secret_path_fails_closed(
    env: Env, hostile: HostileServer, attr: dict[str, str]
) -> None:
    env.rb.secret("teams/frank/adv", {"token": "frank-team-credential"})
    m = manifest("adv.team", f"{hostile.url}/echo", secret_path="teams/{agent.attributes.team}/adv")
    env.rb.admin.put_capability(m)
    token = env.rb.agent("sly", ["adv"], attr)
    r = invoke(env.rb, token, "adv.team")
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable", r.text
    assert hostile.app.seen == []


def test_secret_that_cannot_be_used_fails_closed_without_leaking(
    env: Env, hostile: HostileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "line1\r\nX-Injected: " + SECRET
    path = f"adv/{uuid.uuid4().hex[:12]}"
    env.rb.secret(path, {"token": bad})
    env.rb.admin.put_capability(manifest("adv.crlf", f"{hostile.url}/echo", secret_path=path))
    r = invoke(env.rb, env.token, "adv.crlf")
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable", r.text
    assert hostile.app.seen == []
    assert_nothing_leaked(env, r.text, caplog=caplog)


@pytest.mark.parametrize("escape", ["", "\\u0041"])
def test_upstream_json_too_deep_to_walk_comes_back_as_redacted_text(escape: str) -> None:
    """JSON that parses but is too deep to walk must not fail a call whose upstream already
    acted: it is returned as text, and redacted as text."""
    from broker.capabilities import Capability
    from broker.ports import UpstreamResponse
    from broker.redaction import Redactor
    from broker.service import shape

    cap = Capability.model_validate({"name": "t.deep", "http": {"url": "http://127.0.0.1:1/"}})
    deep = "[" * 600 + f'"{escape}s3cr3t-value"' + "]" * 600  # parses; too deep to walk
    response = UpstreamResponse(200, (("content-type", "application/json"),), deep.encode())
    status, result, upstream_status = shape(cap, response, Redactor(["s3cr3t-value"]))
    assert (status, upstream_status) == ("succeeded", 200)
    assert isinstance(result, str) and "s3cr3t-value" not in result and "[REDACTED]" in result


def _shaped(body: str, fields: list[str] | None = None, secret: str = "tok_SECRET123") -> Any:
    from broker.capabilities import Capability
    from broker.ports import UpstreamResponse
    from broker.redaction import Redactor
    from broker.service import shape

    spec: dict[str, Any] = {"name": "t.shape", "http": {"url": "http://127.0.0.1:1/"}}
    if fields is not None:
        spec["result"] = {"fields": fields}
    response = UpstreamResponse(200, (("content-type", "application/json"),), body.encode())
    status, result, _ = shape(Capability.model_validate(spec), response, Redactor([secret]))
    assert status == "succeeded"
    return result


@pytest.mark.parametrize(
    ("inner", "secret"),
    [
        # Go's \u0026 escape of '&' around HTML numeric references: text redaction runs the
        # HTML step before the JSON one, so only the parsed strings show the secret.
        ('"' + "".join(f"\\u0026#{ord(c)};" for c in "tok_SECRET123") + '"', "tok_SECRET123"),
        # JSON inside JSON: the secret's quote is escaped twice in the text.
        (json.dumps({"payload": json.dumps({"token": 'p"w0rd-XYZ'})}), 'p"w0rd-XYZ'),
        (json.dumps({"payload": json.dumps({"token": "C:\\key-XYZ"})}), "C:\\key-XYZ"),
    ],
)
def test_too_deep_json_holding_a_secret_is_withheld_whole(inner: str, secret: str) -> None:
    """Past the depth the redactor rebuilds, the parsed strings are still checked: an answer
    with a secret anywhere in it comes back as the placeholder alone."""
    for depth in (10, 300):
        result = _shaped("[" * depth + inner + "]" * depth, secret=secret)
        assert secret not in json.dumps(result) and secret not in str(result)
        assert "[REDACTED]" in json.dumps(result)
    assert _shaped("[" * 300 + inner + "]" * 300, secret=secret) == "[REDACTED]"


def test_too_deep_json_without_a_secret_comes_back_as_its_text() -> None:
    body = "[" * 300 + '"fine"' + "]" * 300
    assert _shaped(body) == body
    nested = "[" * 250 + '"fine"' + "]" * 250  # at the limit: still a structure
    assert json.dumps(_shaped(nested), separators=(",", ":")) == nested


def test_a_declared_field_too_deep_is_null_and_the_others_stay() -> None:
    deep = "[" * 300 + '"fine"' + "]" * 300
    leaky = "[" * 300 + '"tok_SECRET123"' + "]" * 300
    body = f'{{"a": {deep}, "b": "ok", "c": {leaky}, "d": "x tok_SECRET123"}}'
    result = _shaped(body, fields=["a", "b", "c", "d"])
    assert result == {"a": None, "b": "ok", "c": "[REDACTED]", "d": "x [REDACTED]"}


def test_a_numeric_reference_too_long_to_decode_is_redacted_not_a_failure() -> None:
    # html.unescape raises ValueError past 4,300 digits; the string cannot be shown clean.
    huge = "&#" + "1" * 5000 + ";"
    assert _shaped(json.dumps({"a": huge, "b": "ok"})) == {"a": "[REDACTED]", "b": "ok"}


def test_only_a_surrogate_escape_costs_the_cleaning_walk() -> None:
    # A lone surrogate cannot be encoded as UTF-8: the cleaning walk makes it a '?'.
    assert _shaped('{"a": "x\\ud800y", "b": ["\\u00e9"]}') == {"a": "x?y", "b": ["\u00e9"]}
    assert _shaped('{"a": "\\\\ud800"}') == {"a": "\\ud800"}  # an escaped backslash, no escape
