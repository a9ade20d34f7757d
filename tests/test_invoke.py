"""The call pipeline end to end: real broker, OpenBao and upstreams, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream

SECRET = "tk-9f/Q+zX=w&v?Lr7"  # has characters that url-encode and base64 in telling ways


def echo_manifest(url: str, name: str = "test.echo", **http: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "POST",
        "url": f"{url}/echo",
        "headers": {"Authorization": "Bearer {secrets.tok}"},
        "json": {"message": "{args.message}", "count": "{args.count}"},
        "timeout": "5s",
    }
    spec.update(http)
    return {
        "name": name,
        "description": "echo for tests",
        "input": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string", "maxLength": 1000},
                "count": {"type": "integer"},
            },
        },
        "secrets": {"tok": {"path": "tests/echo", "key": "token"}},
        "http": spec,
    }


@pytest.fixture
def setup(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    rb = running_broker
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    return rb


def invoke(
    rb: RunningBroker,
    token: str | None,
    args: dict[str, Any] | None = None,
    name: str = "test.echo",
    **kw: Any,
) -> Any:
    return rb.http(token).post(f"/v1/capabilities/{name}/invoke", json={"args": args or {}}, **kw)


def secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(secret, safe=""),
        quote_plus(secret),
    ]


def assert_no_secret(text: str, secret: str = SECRET) -> None:
    for form in secret_forms(secret):
        assert form not in text, f"secret form {form!r} leaked"


# -- the happy path --------------------------------------------------------------------------


def test_secret_is_injected_and_the_result_is_redacted(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = setup.agent("alice", ["tester"])
    r = invoke(setup, token, {"message": "hi", "count": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["upstream_status"] == 200
    assert body["call_id"].startswith("call_")
    seen = upstream.requests[-1]
    assert seen.header("authorization") == f"Bearer {SECRET}"  # the upstream got the credential
    assert json.loads(seen.body) == {"message": "hi", "count": 3}  # types kept
    assert body["result"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert_no_secret(r.text)


def test_httpbin_authenticates_with_the_injected_bearer(
    running_broker: RunningBroker, httpbin_url: str
) -> None:
    rb = running_broker
    rb.secret("tests/httpbin", {"token": SECRET})
    rb.admin.put_capability(
        {
            "name": "httpbin.bearer",
            "secrets": {"t": {"path": "tests/httpbin", "key": "token"}},
            "http": {
                "method": "GET",
                "url": f"{httpbin_url}/bearer",
                "headers": {"Authorization": "Bearer {secrets.t}"},
            },
        }
    )
    rb.admin.add_policy("role:tester", "httpbin.*")
    r = invoke(rb, rb.agent("bob", ["tester"]), name="httpbin.bearer")
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"authenticated": True, "token": "[REDACTED]"}


def test_declared_result_fields_only(setup: RunningBroker, upstream: RunningUpstream) -> None:
    manifest = echo_manifest(upstream.url, "test.fields")
    manifest["result"] = {"fields": ["method", "json.message"]}
    setup.admin.put_capability(manifest)
    r = invoke(setup, setup.agent("carol", ["tester"]), {"message": "m"}, name="test.fields")
    assert r.json()["result"] == {"method": "POST", "json.message": "m"}


# -- secrets never leave the broker ------------------------------------------------------------


def reflect_manifest(url: str) -> dict[str, Any]:
    """The upstream reflects the credential back in raw, base64 and url-encoded forms."""
    m = echo_manifest(url, "test.reflect")
    m["http"]["url"] = f"{url}/reflect"
    m["http"]["query"] = {"key": "{secrets.tok}"}
    m["http"]["json"] = {"message": "{args.message}", "cred": "user:{secrets.tok}"}
    return m


def test_secret_absent_from_response_errors_logs_and_audit(
    setup: RunningBroker, upstream: RunningUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rb = setup
    rb.admin.put_capability(reflect_manifest(upstream.url))
    token = rb.agent("dave", ["tester"])
    ok = invoke(rb, token, {"message": "x"}, name="test.reflect")
    assert ok.status_code == 200, ok.text
    reflected = ok.json()["result"]
    assert set(reflected) >= {"raw", "b64", "b64url", "url", "basic", "query"}
    # An error after the secret was read: the upstream times out.
    slow = reflect_manifest(upstream.url)
    slow.update(name="test.slow")
    slow["http"].update(url=f"{upstream.url}/slow-drip", timeout="0.5s")
    rb.admin.put_capability(slow)
    err = invoke(rb, token, {"message": "x"}, name="test.slow")
    assert err.status_code == 504 and err.json()["error"]["code"] == "upstream_timeout"
    # The secret really was sent upstream ...
    assert any(SECRET in (r.header("authorization") or "") for r in upstream.requests)
    # ... and nothing the broker said or kept has it, in any form.
    assert_no_secret(ok.text)
    assert_no_secret(err.text)
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records))
    assert_no_secret(caplog.text)
    assert_no_secret(json.dumps(rb.audit()))
    assert_no_secret(json.dumps(rb.raw_audit_rows(), default=str))


def test_per_agent_secret_paths(running_broker: RunningBroker, upstream: RunningUpstream) -> None:
    rb = running_broker
    manifest = echo_manifest(upstream.url, "test.mine")
    manifest["secrets"] = {"tok": {"path": "agents/{agent.id}/echo", "key": "token"}}
    rb.admin.put_capability(manifest)
    rb.admin.add_policy("role:tester", "test.*")
    rb.secret("agents/erin/echo", {"token": "erin-credential-1"})
    rb.secret("agents/frank/echo", {"token": "frank-credential-2"})
    tokens = {name: rb.agent(name, ["tester"]) for name in ("erin", "frank", "gina")}
    for name in ("erin", "frank", "erin"):
        assert invoke(rb, tokens[name], {"message": "m"}, name="test.mine").status_code == 200
    sent = [r.header("authorization") for r in upstream.requests]
    assert sent == [
        "Bearer erin-credential-1",
        "Bearer frank-credential-2",
        "Bearer erin-credential-1",
    ]
    # An agent without its own secret gets no one else's: 503, nothing sent.
    r = invoke(rb, tokens["gina"], {"message": "m"}, name="test.mine")
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
    assert len(upstream.requests) == 3


# -- authentication and authorisation ----------------------------------------------------------


@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer nope", "Basic YWRtaW46YWRtaW4=", "Bearer cbk_forged"]
)
def test_unauthenticated_is_401_and_audited(
    setup: RunningBroker, upstream: RunningUpstream, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = setup.http().post(
        "/v1/capabilities/test.echo/invoke", json={"args": {"message": "m"}}, headers=headers
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    call_id = r.json()["error"]["call_id"]
    assert [e["reason"] for e in setup.audit(call_id=call_id)] == ["unauthenticated"]
    assert upstream.requests == []


def test_upstream_credential_is_not_a_broker_token(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    for stolen in (SECRET, setup.vault.root_token):
        r = invoke(setup, stolen, {"message": "m"})
        assert r.status_code == 401
        assert_no_secret(r.text, stolen)
    assert upstream.requests == []


def test_unauthorised_is_403_policy_denied(setup: RunningBroker, upstream: RunningUpstream) -> None:
    r = invoke(setup, setup.agent("hank"), {"message": "m"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "policy_denied" and err["rule"] is None
    [event] = setup.audit(call_id=err["call_id"])
    assert event["kind"] == "call.denied" and event["decision"] == "deny"
    assert upstream.requests == []


def test_explicit_deny_beats_allow(setup: RunningBroker, upstream: RunningUpstream) -> None:
    token = setup.agent("ivan", ["tester"])
    deny = setup.admin.add_policy("agent:ivan", "test.echo", effect="deny")
    setup.admin.add_policy("agent:ivan", "test.echo", effect="allow")
    r = invoke(setup, token, {"message": "m"})
    assert r.status_code == 403 and r.json()["error"]["rule"] == deny["id"]
    [event] = setup.audit(call_id=r.json()["error"]["call_id"])
    assert event["rule"] == deny["id"]
    setup.admin.delete_policy(deny["id"])
    assert invoke(setup, token, {"message": "m"}).status_code == 200


def test_revocations_take_effect_on_the_next_call(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    admin = setup.admin
    token = setup.agent("judy", ["tester"])
    assert invoke(setup, token, {"message": "m"}).status_code == 200
    admin.revoke_role("judy", "tester")
    assert invoke(setup, token, {"message": "m"}).status_code == 403
    admin.grant_role("judy", "tester")
    assert invoke(setup, token, {"message": "m"}).status_code == 200
    second = admin.issue_token("judy")
    admin.revoke_token("judy", second["token_id"])
    assert invoke(setup, second["token"], {"message": "m"}).status_code == 401
    assert invoke(setup, token, {"message": "m"}).status_code == 200
    admin.disable_agent("judy")
    assert invoke(setup, token, {"message": "m"}).status_code == 401
    assert len(upstream.requests) == 3


def test_agent_lists_only_what_it_may_invoke(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    setup.admin.put_capability(echo_manifest(upstream.url, "other.echo"))
    setup.admin.put_capability(echo_manifest(upstream.url, "test.hidden"))
    setup.admin.add_policy("role:tester", "test.hidden", effect="deny")
    token = setup.agent("kate", ["tester"])
    listed = setup.http(token).get("/v1/capabilities").json()["capabilities"]
    assert [c["name"] for c in listed] == ["test.echo"]
    assert "secrets" not in listed[0] and "http" not in listed[0]
    assert setup.http(token).get("/v1/capabilities/other.echo").status_code == 404
    everything = setup.admin.list_capabilities(all=True)
    assert {c["name"] for c in everything} == {"test.echo", "other.echo", "test.hidden"}
    assert setup.http(token).get("/v1/capabilities?all=true").status_code == 403


def test_admin_api_goes_through_the_policy(setup: RunningBroker) -> None:
    token = setup.agent("leo", ["tester"])
    r = setup.http(token).post("/v1/agents", json={"name": "mallory"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_denied"
    assert setup.http(token).get("/v1/audit").status_code == 403
    # The admin role holds admin actions, not invoke.
    r = invoke(setup, setup.admin_token, {"message": "m"})
    assert r.status_code == 403
    kinds = {e["kind"] for e in setup.audit()}
    assert {"admin.denied", "admin.agent.create", "admin.capability.put"} <= kinds


# -- bad input: refused, nothing executed, audited ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"args": {}},  # missing required
        {"args": {"message": 5}},
        {"args": {"message": "m", "extra": 1}},
        {"args": {"message": "x" * 1001}},
        {"args": {"message": "m", "count": "3"}},
        {"args": []},
    ],
)
def test_invalid_arguments_are_422_and_nothing_is_sent(
    setup: RunningBroker, upstream: RunningUpstream, body: Any
) -> None:
    token = setup.agent("nina", ["tester"])
    r = setup.http(token).post("/v1/capabilities/test.echo/invoke", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_arguments"
    assert upstream.requests == []
    [event] = setup.audit(call_id=r.json()["error"]["call_id"])
    assert event["kind"] == "call.rejected" and event["reason"] == "invalid_arguments"


@pytest.mark.parametrize("raw", [b"{not json", b'"args"', b'{"args": {}, "x": 1}', b"\xff\xfe"])
def test_malformed_bodies_are_400(
    setup: RunningBroker, upstream: RunningUpstream, raw: bytes
) -> None:
    token = setup.agent("olga", ["tester"])
    r = setup.http(token).post(
        "/v1/capabilities/test.echo/invoke",
        content=raw,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert upstream.requests == []
    assert setup.audit(call_id=r.json()["error"]["call_id"])[0]["kind"] == "call.rejected"


def test_unknown_capability_is_404_and_audited(setup: RunningBroker) -> None:
    r = invoke(setup, setup.agent("pete", ["tester"]), name="test.nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "capability_not_found"
    assert setup.audit(call_id=r.json()["error"]["call_id"])[0]["reason"] == "capability_not_found"


def injection_manifest(url: str) -> dict[str, Any]:
    return {
        "name": "test.inject",
        "input": {
            "type": "object",
            "required": ["owner", "q", "h"],
            "properties": {
                "owner": {"type": "string"},
                "q": {"type": "string"},
                "h": {"type": "string"},
            },
        },
        "http": {
            "method": "GET",
            "url": f"{url}/echo/{{args.owner}}/items",
            "query": {"q": "{args.q}"},
            "headers": {"X-Note": "{args.h}"},
        },
    }


@pytest.mark.parametrize(
    "owner",
    ["x?admin=1", "x#frag", "@evil.example", "x y", "caf\u00e9", "%41"],
)
def test_path_arguments_stay_one_segment(
    setup: RunningBroker, upstream: RunningUpstream, owner: str
) -> None:
    setup.admin.put_capability(injection_manifest(upstream.url))
    r = invoke(
        setup,
        setup.agent("quinn", ["tester"]),
        {"owner": owner, "q": "a&admin=1", "h": "ok"},
        name="test.inject",
    )
    assert r.status_code == 200, r.text
    [seen] = upstream.requests
    path, _, query = seen.raw_path.partition("?")
    assert path == f"/echo/{quote(owner, safe='')}/items"
    assert query == "q=a%26admin%3D1"  # one parameter, whatever the argument says


@pytest.mark.parametrize(
    "owner", ["..", ".", "", "../../admin", "a/b", "%2e%2e", "%2F", "a\\b", "%5c", "a\x00"]
)
def test_path_arguments_that_change_depth_are_refused(
    setup: RunningBroker, upstream: RunningUpstream, owner: str
) -> None:
    setup.admin.put_capability(injection_manifest(upstream.url))
    r = invoke(
        setup,
        setup.agent("rita", ["tester"]),
        {"owner": owner, "q": "a", "h": "ok"},
        name="test.inject",
    )
    assert r.status_code == 422
    assert upstream.requests == []


@pytest.mark.parametrize("value", ["ok\r\nX-Admin: 1", "ok\nHost: evil", "ok\x00"])
def test_header_injection_is_refused(
    setup: RunningBroker, upstream: RunningUpstream, value: str
) -> None:
    setup.admin.put_capability(injection_manifest(upstream.url))
    r = invoke(
        setup,
        setup.agent("sam", ["tester"]),
        {"owner": "a", "q": "a", "h": value},
        name="test.inject",
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_arguments"
    assert upstream.requests == []


def test_manifest_cannot_put_slots_in_the_host(setup: RunningBroker) -> None:
    bad = echo_manifest("http://{args.message}")
    r = setup.http(setup.admin_token).put("/v1/capabilities/test.echo", json=bad)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_manifest"


# -- the destination is fixed ------------------------------------------------------------------


def test_redirects_are_not_followed(
    setup: RunningBroker, upstream: RunningUpstream, second_upstream: RunningUpstream
) -> None:
    manifest = echo_manifest(upstream.url, "test.redirect")
    manifest["http"].update(
        method="GET",
        json=None,
        url=f"{upstream.url}/redirect",
        query={"to": f"{second_upstream.url}/echo"},
    )
    setup.admin.put_capability(manifest)
    r = invoke(setup, setup.agent("tina", ["tester"]), {"message": "m"}, name="test.redirect")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "upstream_error" and r.json()["upstream_status"] == 302
    assert len(upstream.requests) == 1
    assert second_upstream.requests == []  # the secret never travelled to the new host


def test_loopback_upstream_refused_without_egress_allow(
    openbao: Any, database_url: str, tmp_path: Any, upstream: RunningUpstream
) -> None:
    rb = start_broker(openbao, database_url, tmp_path, egress_allow="")
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        r = invoke(rb, rb.agent("uma", ["tester"]), {"message": "m"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "egress_denied"
        assert upstream.requests == []
        finished = rb.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")
        assert finished[0]["reason"] == "egress_denied"
    finally:
        rb.close()


# -- fail closed -------------------------------------------------------------------------------


def test_vault_stopped_mid_test_is_503_and_nothing_sent(
    fresh_openbao: Any, database_url: str, tmp_path: Any, upstream: RunningUpstream
) -> None:
    rb = start_broker(fresh_openbao, database_url, tmp_path)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("vera", ["tester"])
        assert invoke(rb, token, {"message": "m"}).status_code == 200
        fresh_openbao.stop()
        r = invoke(rb, token, {"message": "m"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
        assert len(upstream.requests) == 1
        assert rb.http().get("/readyz").status_code == 503
    finally:
        rb.close()


def test_vault_sealed_is_503_and_nothing_sent(
    fresh_openbao: Any, database_url: str, tmp_path: Any, upstream: RunningUpstream
) -> None:
    rb = start_broker(fresh_openbao, database_url, tmp_path)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("wes", ["tester"])
        fresh_openbao.seal()
        r = invoke(rb, token, {"message": "m"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
        assert upstream.requests == []
    finally:
        rb.close()


def test_deleted_secret_is_503(setup: RunningBroker, upstream: RunningUpstream) -> None:
    from broker.vault import VaultSecretStore

    store = VaultSecretStore(url=setup.vault.addr, token=setup.vault.root_token, cache_ttl=0)
    store.delete_latest("secret", "tests/echo")
    import asyncio

    asyncio.run(store.close())
    r = invoke(setup, setup.agent("xena", ["tester"]), {"message": "m"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
    assert upstream.requests == []


def break_audit_table(rb: RunningBroker) -> None:
    """Make every audit insert fail, as a full disk or a broken volume would."""
    import sqlalchemy as sa

    engine = sa.create_engine(rb.settings.resolved_database_url())
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION no_audit() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION no_audit()"
            )
    engine.dispose()


def test_audit_unwritable_is_503_and_nothing_executed(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = setup.agent("yuri", ["tester"])
    break_audit_table(setup)
    r = invoke(setup, token, {"message": "m"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
    assert upstream.requests == []


def test_audit_locked_is_503_within_the_audit_timeout(
    openbao: Any, tmp_path: Any, upstream: RunningUpstream
) -> None:
    import sqlite3

    rb = start_broker(openbao, f"sqlite:///{tmp_path / 'b.db'}", tmp_path, audit_timeout=0.5)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("zoe", ["tester"])
        holder = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            r = invoke(rb, token, {"message": "m"})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert upstream.requests == []
    finally:
        rb.close()


# -- every call is bounded ---------------------------------------------------------------------


def test_oversize_request_is_413_and_audited(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = setup.agent("abe", ["tester"])
    big = {"args": {"message": "x" * (setup.settings.max_request_bytes + 10)}}
    r = setup.http(token).post("/v1/capabilities/test.echo/invoke", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit holds on streamed bytes too
        for _ in range(2000):
            yield b"x" * 1024

    r2 = setup.http(token).post("/v1/capabilities/test.echo/invoke", content=chunks())
    assert r2.status_code == 413
    assert upstream.requests == []
    rejected = setup.audit(kind="call.rejected")
    assert [e["reason"] for e in rejected] == ["request_too_large", "request_too_large"]
    assert rejected[0]["agent_id"] == "abe" and rejected[0]["capability"] == "test.echo"


def test_oversize_upstream_response_is_refused(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    manifest = echo_manifest(upstream.url, "test.big")
    manifest["http"].update(
        method="GET",
        json=None,
        url=f"{upstream.url}/big",
        query={"n": "200000"},
        max_response_bytes=100_000,
    )
    setup.admin.put_capability(manifest)
    r = invoke(setup, setup.agent("bea", ["tester"]), {"message": "m"}, name="test.big")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_response_too_large"
    assert (
        setup.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")[0]["reason"]
        == "upstream_response_too_large"
    )


def test_slow_dripping_upstream_is_cut_at_the_deadline(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    manifest = echo_manifest(upstream.url, "test.drip")
    manifest["http"].update(method="GET", json=None, url=f"{upstream.url}/slow-drip", timeout="1s")
    setup.admin.put_capability(manifest)
    r = invoke(setup, setup.agent("cal", ["tester"]), {"message": "m"}, name="test.drip")
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    # The deadline is total: the drip sends a byte every 100 ms, so a per-read timeout
    # would never fire. The broker answered, so it cut the call (this is a bound, not a timing).
    [event] = setup.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")
    assert event["latency_ms"] < 5000


# -- the audit trail ---------------------------------------------------------------------------


def test_a_call_leaves_started_then_finished(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    version = setup.secret("tests/echo", {"token": SECRET})
    r = invoke(
        setup, setup.agent("dan", ["tester"]), {"message": "m"}, headers={"X-Broker-Task": "task-1"}
    )
    call_id = r.json()["call_id"]
    events = setup.audit(call_id=call_id)
    assert [e["kind"] for e in events] == ["call.started", "call.finished"]
    started, finished = events
    assert started["seq"] < finished["seq"]
    assert finished["status"] == "succeeded" and finished["upstream_status"] == 200
    assert finished["agent_id"] == "dan" and finished["capability"] == "test.echo"
    assert finished["capability_version"] == 1 and finished["task_id"] == "task-1"
    assert finished["secrets"] == [
        {"mount": "secret", "path": "tests/echo", "key": "token", "version": version}
    ]
    assert started["args"] == {"message": "m"}


def test_audit_query_filters_and_pages(setup: RunningBroker, upstream: RunningUpstream) -> None:
    token = setup.agent("eve", ["tester"])
    for i in range(5):
        invoke(setup, token, {"message": str(i)})
    invoke(setup, setup.agent("fay"), {"message": "no"})
    pages, cursor = [], None
    while True:
        page = setup.admin.audit(agent="eve", kind="call.finished", limit=2, cursor=cursor)
        pages.append(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    seqs = [e["seq"] for p in pages for e in p]
    assert len(seqs) == 5 and seqs == sorted(seqs) and [len(p) for p in pages] == [2, 2, 1]
    denied = setup.admin.audit(decision="deny", agent="fay")["events"]
    assert [e["kind"] for e in denied] == ["call.denied"]
    r = setup.http(setup.admin_token).get("/v1/audit?cursor=abc")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_rate_limit_is_429_with_retry_after(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    manifest = echo_manifest(upstream.url, "test.rated")
    manifest["limits"] = {"rate": "2/minute"}
    setup.admin.put_capability(manifest)
    alice, bob = setup.agent("rae", ["tester"]), setup.agent("rob", ["tester"])
    codes = [
        invoke(setup, alice, {"message": "m"}, name="test.rated").status_code for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    r = invoke(setup, alice, {"message": "m"}, name="test.rated")
    assert r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert invoke(setup, bob, {"message": "m"}, name="test.rated").status_code == 200  # per agent
    assert len(upstream.requests) == 3
    assert [e["reason"] for e in setup.audit(kind="call.rejected", agent="rae")] == [
        "rate_limited",
        "rate_limited",
    ]


def test_concurrency_cap_refuses_instead_of_queueing(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    import threading

    manifest = echo_manifest(upstream.url, "test.single")
    manifest["http"].update(
        method="GET", json=None, url=f"{upstream.url}/slow-drip", timeout="1.5s"
    )
    manifest["limits"] = {"concurrency": 1}
    setup.admin.put_capability(manifest)
    token = setup.agent("sol", ["tester"])
    first: list[int] = []
    worker = threading.Thread(
        target=lambda: first.append(
            invoke(setup, token, {"message": "m"}, name="test.single").status_code
        )
    )
    worker.start()
    for _ in range(1000):  # wait (bounded) until the first call is in flight at the upstream
        if upstream.requests:
            break
        threading.Event().wait(0.01)
    second = invoke(setup, token, {"message": "m"}, name="test.single")
    worker.join()
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
    assert first == [504]  # the first one ran (to its deadline)
    assert invoke(setup, token, {"message": "m"}, name="test.single").status_code == 504  # freed


def test_a_replaced_capability_applies_to_the_next_call(
    setup: RunningBroker, upstream: RunningUpstream, openbao: Any, database_url: str, tmp_path: Any
) -> None:
    """The registry caches manifests on the invoke path: a change through this instance applies
    at once, and another instance sharing the database sees it within the cache TTL (1 s)."""
    token = setup.agent("alice", ["tester"])
    other = start_broker(openbao, database_url, tmp_path / "other", audit_chain_id="other")
    try:
        for rb in (setup, other):
            assert invoke(rb, token, {"message": "a"}).json()["result"]["path"] == "/echo"
        # (The second instance took over the bootstrap admin token: administer through it.)
        other.admin.put_capability(echo_manifest(upstream.url + "/echo/v2"))
        assert invoke(other, token, {"message": "b"}).json()["result"]["path"] == "/echo/v2/echo"
        time.sleep(1.1)
        assert invoke(setup, token, {"message": "c"}).json()["result"]["path"] == "/echo/v2/echo"
        other.admin.delete_capability("test.echo")
        assert invoke(other, token, {"message": "d"}).status_code == 404
    finally:
        other.close()


def test_a_token_revoked_elsewhere_stops_working_within_a_second(
    setup: RunningBroker, openbao: Any, database_url: str, tmp_path: Any
) -> None:
    """Token lookups are cached for 1 s; a revocation through this instance applies at once,
    through another instance sharing the database within the TTL."""
    token = setup.agent("alice", ["tester"])
    second = setup.admin.issue_token("alice")["token"]
    other = start_broker(openbao, database_url, tmp_path / "other", audit_chain_id="other")
    try:
        assert invoke(setup, token, {"message": "a"}).status_code == 200
        assert invoke(setup, second, {"message": "a"}).status_code == 200
        agent = other.admin.get_agent("alice")
        first_id = agent["tokens"][0]["id"]
        other.admin.revoke_token("alice", first_id)
        assert invoke(other, token, {"message": "b"}).status_code == 401  # at once, here
        time.sleep(1.1)
        assert invoke(setup, token, {"message": "c"}).status_code == 401  # within the TTL there
        other.admin.disable_agent("alice")
        assert invoke(other, second, {"message": "d"}).status_code == 401
        time.sleep(1.1)
        assert invoke(setup, second, {"message": "d"}).status_code == 401
    finally:
        other.close()


def test_integers_past_64_bits_survive_the_round_trip(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    """The answer is encoded with orjson, which refuses integers past 64 bits; those answers
    fall back to the standard encoder instead of failing."""
    token = setup.agent("alice", ["tester"])
    big = 10**30
    r = setup.http(token).post(
        "/v1/capabilities/test.echo/invoke",
        content=b'{"args": {"message": "big", "count": %d}}' % big,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"]["json"]["count"] == big


def test_the_openapi_document_still_describes_invoke(running_broker: RunningBroker) -> None:
    doc = running_broker.http().get("/openapi.json").json()
    op = doc["paths"]["/v1/capabilities/{name}/invoke"]["post"]
    names = {p["name"].lower() for p in op["parameters"]}
    assert {"idempotency-key", "x-broker-task", "prefer", "x-broker-user-assertion"} <= names
