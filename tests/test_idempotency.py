"""Idempotency keys (invariant 6): one execution per (agent, capability, key), replays after.

Real broker, OpenBao and a recording upstream that counts what it receives; SQLite and
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.client import BrokerClient
from broker.demo import ServerThread
from broker.devserver import DevVault
from tests.support.brokers import RunningBroker, start_broker
from tests.support.openbao import write_secret
from tests.support.upstreams import RecordingUpstream, RunningUpstream
from tests.test_crash import broker_process
from tests.test_invoke import SECRET, assert_no_secret, echo_manifest

URL = "/v1/capabilities/test.echo/invoke"


@pytest.fixture
def setup(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    rb = running_broker
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.put_capability(cap(upstream.url, "test.slow", "/delay?ms=600"))
    rb.admin.put_capability(cap(upstream.url, "test.fail", "/status/500"))
    rb.admin.add_policy("role:tester", "test.*")
    return rb


def cap(base: str, name: str, path: str, **http: Any) -> dict[str, Any]:
    """The echo capability of test_invoke, sent to another path of the upstream."""
    manifest = echo_manifest(base, name, **http)
    manifest["http"]["url"] = base + path
    return manifest


def post(
    http: httpx.Client, key: str | None, args: dict[str, Any], name: str = "test.echo"
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return http.post(f"/v1/capabilities/{name}/invoke", json={"args": args}, headers=headers)


def received(upstream: RunningUpstream, path: str = "") -> int:
    return sum(1 for r in upstream.requests if r.raw_path.startswith(path))


def test_fifty_concurrent_calls_with_one_key_execute_once(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = setup.agent("alice", ["tester"])
    key = "k-" + secrets.token_hex(8)
    http = setup.http(token)
    barrier = threading.Barrier(50)

    def call(_: int) -> httpx.Response:
        with httpx.Client(base_url=setup.url, timeout=30, trust_env=False) as c:
            barrier.wait()
            return c.post(
                "/v1/capabilities/test.slow/invoke",
                json={"args": {"message": "once"}},
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
            )

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(call, range(50)))
    codes = sorted(r.status_code for r in answers)
    assert received(upstream, "/delay") == 1  # executed exactly once
    winners = [r for r in answers if r.status_code == 200 and not r.json().get("replayed")]
    assert len(winners) == 1
    for r in answers:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_in_flight"
            assert r.headers["Retry-After"] == "1"
        else:
            assert r.status_code == 200, r.text
            assert r.json()["call_id"] == winners[0].json()["call_id"]
    assert codes.count(409) >= 1  # the 600 ms upstream keeps the first in flight

    # A later repeat gets the stored answer, marked as a replay, and executes nothing.
    again = post(http, key, {"message": "once"}, "test.slow")
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    body = again.json()
    assert body["replayed"] is True
    first = winners[0].json()
    assert {k: body[k] for k in first} == first
    assert_no_secret(again.text)
    assert received(upstream, "/delay") == 1

    rejected = setup.audit(kind="call.rejected")
    assert sum(e["reason"] == "idempotency_in_flight" for e in rejected) == codes.count(409)
    replays = setup.audit(kind="call.replayed")
    assert len(replays) == codes.count(200) - 1 + 1
    assert all(e["detail"]["replay_of"] == first["call_id"] for e in replays)


def test_same_key_other_arguments_is_refused(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    http = setup.http(setup.agent("alice", ["tester"]))
    assert post(http, "key-1", {"message": "a", "count": 1}).status_code == 200
    # Key order and spacing do not change the fingerprint: this is the same request.
    same = http.post(
        URL,
        content=b'{"args": {"count": 1,   "message": "a"}}',
        headers={"Idempotency-Key": "key-1", "Content-Type": "application/json"},
    )
    assert same.status_code == 200 and same.json()["replayed"] is True
    other = post(http, "key-1", {"message": "b", "count": 1})
    assert other.status_code == 422
    err = other.json()["error"]
    assert err["code"] == "idempotency_key_reused" and err["call_id"].startswith("call_")
    assert received(upstream, "/echo") == 1
    events = setup.audit(call_id=err["call_id"])
    assert [e["kind"] for e in events] == ["call.rejected"]
    assert events[0]["reason"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "key",
    ["", " ", "a b", "ключ", "x" * 256, 'a"b', "a\\b", "\t"],
    ids=["empty", "space", "inner-space", "non-ascii", "too-long", "quote", "backslash", "tab"],
)
def test_malformed_keys_are_refused(
    setup: RunningBroker, upstream: RunningUpstream, key: str
) -> None:
    http = setup.http(setup.agent("alice", ["tester"]))
    try:
        r = post(http, key, {"message": "x"})
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # the client library refuses to send it at all: nothing reached the broker
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_idempotency_key"
    assert received(upstream) == 0
    assert [e["reason"] for e in setup.audit(kind="call.rejected")] == ["invalid_idempotency_key"]


def test_structured_field_and_bare_forms_are_the_same_key(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    http = setup.http(setup.agent("alice", ["tester"]))
    first = post(http, '"8e03978e-40d5-43e8-bc93-6894a57f9324"', {"message": "x"})
    second = post(http, "8e03978e-40d5-43e8-bc93-6894a57f9324", {"message": "x"})
    assert first.status_code == second.status_code == 200
    assert second.json()["replayed"] is True
    assert received(upstream, "/echo") == 1
    started = setup.audit(kind="call.started")
    assert started[0]["idempotency_key"] == "8e03978e-40d5-43e8-bc93-6894a57f9324"


def test_keys_are_scoped_per_agent_and_capability(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    alice = setup.http(setup.agent("alice", ["tester"]))
    bob = setup.http(setup.agent("bob", ["tester"]))
    assert post(alice, "shared", {"message": "x"}).status_code == 200
    r = post(bob, "shared", {"message": "x"})
    assert r.status_code == 200 and "replayed" not in r.json()  # bob's own call
    r = post(alice, "shared", {"message": "x"}, "test.fail")
    assert r.status_code == 200 and "replayed" not in r.json()  # another capability
    assert received(upstream, "/echo") == 2 and received(upstream, "/status") == 1


def test_upstream_errors_are_stored_and_replayed(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    http = setup.http(setup.agent("alice", ["tester"]))
    first = post(http, "fail-1", {"message": "x"}, "test.fail")
    assert first.status_code == 200 and first.json()["status"] == "upstream_error"
    again = post(http, "fail-1", {"message": "x"}, "test.fail")
    assert again.json()["replayed"] is True
    assert again.json()["upstream_status"] == 500
    assert received(upstream, "/status") == 1


def test_a_broker_error_after_sending_is_stored_and_replayed(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(cap(upstream.url, "test.drip", "/slow-drip", timeout="1s"))
    rb.admin.add_policy("role:tester", "test.*")
    http = rb.http(rb.agent("alice", ["tester"]))
    first = post(http, "drip", {"message": "x"}, "test.drip")
    assert first.status_code == 504
    call_id = first.json()["error"]["call_id"]
    again = post(http, "drip", {"message": "x"}, "test.drip")
    assert again.status_code == 504
    assert again.headers["Idempotent-Replayed"] == "true"
    err = again.json()["error"]
    assert err["code"] == "upstream_timeout" and err["replayed"] is True
    assert err["call_id"] == call_id
    assert received(upstream, "/slow-drip") == 1


def test_refusals_before_execution_store_nothing(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = setup.agent("carol")  # no role yet: the policy denies
    http = setup.http(token)
    assert post(http, "k", {"message": "x"}).status_code == 403
    assert post(http, "k", {"message": 5}).status_code == 422  # invalid arguments
    setup.admin.grant_role("carol", "tester")
    setup.secret("tests/echo", {"other": "no token key"})  # the secret is now unusable
    assert post(http, "k", {"message": "x"}).status_code == 503
    setup.secret("tests/echo", {"token": SECRET})
    r = post(http, "k", {"message": "x"})
    assert r.status_code == 200 and "replayed" not in r.json()  # executed now, for the first time
    assert received(upstream, "/echo") == 1


def test_keys_expire_after_the_retention(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    rb = start_broker(openbao, database_url, tmp_path / "data", idempotency_retention=1.0)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        http = rb.http(rb.agent("alice", ["tester"]))
        assert "replayed" not in post(http, "old", {"message": "x"}).json()
        assert post(http, "old", {"message": "x"}).json()["replayed"] is True
        time.sleep(1.2)
        r = post(http, "old", {"message": "y"})  # forgotten: a new call, other args allowed
        assert r.status_code == 200 and "replayed" not in r.json()
        assert received(upstream, "/echo") == 2
    finally:
        rb.close()


def test_sdk_replays_with_the_same_key(setup: RunningBroker, upstream: RunningUpstream) -> None:
    client = setup.sdk(setup.agent("alice", ["tester"]))
    first = client.invoke("test.echo", {"message": "x"}, idempotency_key="sdk-key")
    second = client.invoke("test.echo", {"message": "x"}, idempotency_key="sdk-key")
    assert second["call_id"] == first["call_id"] and second["replayed"] is True
    assert received(upstream, "/echo") == 1


def test_a_key_in_flight_at_a_crash_replays_outcome_unknown(
    openbao: DevVault, database_url: str, tmp_path: Path
) -> None:
    """kill -9 while the upstream holds the call: after restart the key answers
    outcome_unknown (the upstream may have acted) and the call is never sent again."""
    app = RecordingUpstream()
    broker, admin = broker_process(openbao, database_url, tmp_path)
    write_secret(openbao, "tests/echo", {"token": SECRET})
    with ServerThread(app) as upstream:
        broker.start()
        try:
            with BrokerClient(broker.url, admin) as client:
                client.put_capability(cap(upstream.url, "test.slow", "/delay?ms=5000"))
                client.add_policy("role:tester", "test.*")
                token = client.create_agent("crash", ["tester"])["token"]
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "crash-key"}
            body = {"args": {"message": "x"}}

            def doomed() -> None:
                with contextlib.suppress(httpx.HTTPError):  # the broker dies under the call
                    httpx.post(
                        f"{broker.url}/v1/capabilities/test.slow/invoke",
                        json=body,
                        headers=headers,
                        timeout=10,
                    )

            t = threading.Thread(target=doomed)
            t.start()
            deadline = time.monotonic() + 10
            while not app.requests and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(app.requests) == 1  # the upstream has the call
            broker.kill()
            t.join(15)
            broker.start()
            r = httpx.post(
                f"{broker.url}/v1/capabilities/test.slow/invoke", json=body, headers=headers
            )
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "outcome_unknown"
            assert r.headers["Idempotent-Replayed"] == "true"
            time.sleep(0.2)
            assert len(app.requests) == 1  # never sent again
        finally:
            broker.stop()


def test_a_capability_passes_the_key_upstream_in_its_declared_header(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    setup.admin.put_capability(
        cap(upstream.url, "test.keyed", "/echo", idempotency_header="Idempotency-Key")
    )
    http = setup.http(setup.agent("alice", ["tester"]))
    r = post(http, '"order-77"', {"message": "x"}, "test.keyed")
    assert r.status_code == 200
    assert upstream.requests[-1].header("idempotency-key") == "order-77"
    r = post(http, None, {"message": "x"}, "test.keyed")
    assert upstream.requests[-1].header("idempotency-key") == r.json()["call_id"]
    # Without the declaration the key stays with the broker.
    post(http, "private-key", {"message": "x"})
    assert upstream.requests[-1].header("idempotency-key") is None


@pytest.mark.parametrize("header", ["Host", "Bad Header", "Authorization"])
def test_the_idempotency_header_cannot_clash(
    setup: RunningBroker, upstream: RunningUpstream, header: str
) -> None:
    manifest = cap(upstream.url, "test.clash", "/echo", idempotency_header=header)
    r = setup.http(setup.admin_token).put("/v1/capabilities/test.clash", json=manifest)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_manifest"


def test_a_deferred_call_replays_its_202(setup: RunningBroker, upstream: RunningUpstream) -> None:
    """A call held for an approval (or queued as a job) is answered 202 once; a repeat with
    the key gets the same call and approval ids back, not a second pending call."""
    manifest = cap(upstream.url, "test.held", "/echo")
    manifest["approval"] = "required"
    setup.admin.put_capability(manifest)
    http = setup.http(setup.agent("alice", ["tester"]))
    first = post(http, "held-1", {"message": "x"}, "test.held")
    assert first.status_code == 202, first.text
    again = post(http, "held-1", {"message": "x"}, "test.held")
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["call_id"] == first.json()["call_id"]
    assert again.json()["approval_id"] == first.json()["approval_id"]
    assert len(setup.admin.list_approvals(status="pending")) == 1
    queued = http.post(
        "/v1/capabilities/test.echo/invoke",
        json={"args": {"message": "x"}},
        headers={"Idempotency-Key": "job-1", "Prefer": "respond-async"},
    )
    assert queued.status_code == 202
    repeat = post(http, "job-1", {"message": "x"})
    assert repeat.status_code == 202 and repeat.json()["call_id"] == queued.json()["call_id"]
    assert received(upstream, "/echo") <= 1  # the job ran at most once
