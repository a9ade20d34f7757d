"""Durable jobs and the kill switch: real broker, OpenBao, upstreams; SQLite and PostgreSQL.

``Prefer: respond-async`` (or a ``long_running`` capability) answers 202 with a call id; the
job row is on disk before that; the broker's workers run it; ``GET /v1/calls/{id}`` gives
the result. A restart resumes queued jobs, re-runs interrupted idempotent ones and reports
interrupted non-idempotent ones ``outcome_unknown`` without sending them again.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.client import AsyncBrokerClient, BrokerClient
from broker.demo import ServerThread
from broker.devserver import DevVault, free_port
from tests.support.brokers import RunningBroker, start_broker
from tests.support.openbao import write_secret
from tests.support.upstreams import RunningUpstream
from tests.test_crash import BrokerProcess
from tests.test_invoke import SECRET, echo_manifest


class GateUpstream:
    """An upstream that holds every request until the test opens the gate, and counts them.

    A real HTTP server on loopback: it keeps a job "running" for as long as a test needs to
    stop the broker or disable the agent in the middle of it.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.messages: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        with self._lock:
            self.messages.append(body.decode())
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    def count(self, word: str) -> int:
        with self._lock:
            return sum(word in m for m in self.messages)


@pytest.fixture
def gate() -> Iterator[tuple[str, GateUpstream]]:
    app = GateUpstream()
    with ServerThread(app) as server:
        yield server.url, app
        app.gate.set()  # let held requests finish so the server can stop


def configure(rb: RunningBroker, upstream_url: str, gate_url: str | None = None) -> None:
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream_url))
    long = echo_manifest(upstream_url, "test.long")
    long["long_running"] = True
    rb.admin.put_capability(long)
    if gate_url:
        rb.admin.put_capability(echo_manifest(gate_url, "test.gate"))
        idem = echo_manifest(gate_url, "test.gate.idem")
        idem["idempotent"] = True
        rb.admin.put_capability(idem)
        approve = echo_manifest(gate_url, "test.gate.approve")
        approve["approval"] = "required"
        rb.admin.put_capability(approve)
    rb.admin.add_policy("role:tester", "test.*")


def invoke_async(rb: RunningBroker, token: str, cap: str, message: str) -> dict[str, Any]:
    r = rb.http(token).post(
        f"/v1/capabilities/{cap}/invoke",
        json={"args": {"message": message}},
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "respond-async"
    body: dict[str, Any] = r.json()
    assert body["status"] == "queued" and r.headers["location"] == f"/v1/calls/{body['call_id']}"
    return body


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def sent(upstream: RunningUpstream, message: str) -> int:
    return sum(message.encode() in r.body for r in upstream.requests)


@pytest.fixture
def rb(
    running_broker: RunningBroker, upstream: RunningUpstream, gate: tuple[str, GateUpstream]
) -> RunningBroker:
    configure(running_broker, upstream.url, gate[0])
    return running_broker


def test_respond_async_runs_the_job_and_keeps_its_result(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    body = invoke_async(rb, token, "test.echo", "later")
    done = rb.sdk(token).wait_call(body["call_id"])
    assert done["state"] == "succeeded" and done["http_status"] == 200
    result = done["response"]
    assert set(result) == {"call_id", "status", "result", "upstream_status"}  # an invoke body
    assert result["result"]["json"]["message"] == "later"
    assert result["result"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert sent(upstream, "later") == 1
    assert [e["kind"] for e in rb.audit(call_id=body["call_id"])] == [
        "call.queued", "call.started", "call.finished",
    ]  # fmt: skip


def test_long_running_capability_is_always_a_job(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    r = rb.http(token).post("/v1/capabilities/test.long/invoke", json={"args": {"message": "x"}})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert "preference-applied" not in r.headers
    done = rb.sdk(token).wait_call(r.json()["call_id"])
    assert done["state"] == "succeeded"
    listed = {c["name"]: c for c in rb.sdk(token).list_capabilities()}
    assert listed["test.long"]["long_running"] is True


def test_async_sdk_waits_for_a_job(rb: RunningBroker, upstream: RunningUpstream) -> None:
    token = rb.agent("alice", ["tester"])

    async def main() -> dict[str, Any]:
        async with AsyncBrokerClient(rb.url, token) as client:
            queued = await client.invoke("test.echo", {"message": "a-sdk"}, respond_async=True)
            assert queued["status"] == "queued"
            return await client.wait_call(queued["call_id"])

    done = asyncio.run(main())
    assert done["state"] == "succeeded" and sent(upstream, "a-sdk") == 1


def test_a_failed_job_keeps_the_error_envelope(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    rb.admin.put_capability(echo_manifest("http://10.255.255.1:9", "test.blocked"))
    body = invoke_async(rb, token, "test.blocked", "nowhere")
    done = rb.sdk(token).wait_call(body["call_id"])
    assert done["state"] == "failed" and done["http_status"] == 403
    assert done["response"]["error"]["code"] == "egress_denied"
    assert done["response"]["error"]["call_id"] == body["call_id"]


def test_job_rechecks_policy_when_it_runs(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    rb = start_broker(openbao, database_url, tmp_path / "data", job_workers=0)
    try:
        configure(rb, upstream.url)
        token = rb.agent("alice", ["tester"])
        body = invoke_async(rb, token, "test.echo", "revoked-meanwhile")
        rule = rb.admin.add_policy("agent:alice", "test.echo", effect="deny")
    finally:
        rb.close()
    rb = start_broker(openbao, database_url, tmp_path / "data")
    try:
        done = rb.admin.wait_call(body["call_id"])
        assert done["state"] == "failed"
        assert done["response"]["error"]["code"] == "policy_denied"
        assert sent(upstream, "revoked-meanwhile") == 0
        denied = [e for e in rb.audit(call_id=body["call_id"]) if e["kind"] == "call.denied"]
        assert denied and denied[0]["rule"] == rule["id"]
    finally:
        rb.close()


def test_queued_jobs_survive_a_restart(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    # No workers: the job is only stored when the broker stops.
    rb = start_broker(openbao, database_url, tmp_path / "data", job_workers=0)
    try:
        configure(rb, upstream.url)
        token = rb.agent("alice", ["tester"])
        body = invoke_async(rb, token, "test.echo", "survivor")
        assert rb.sdk(token).get_call(body["call_id"])["state"] == "queued"
    finally:
        rb.close()
    assert sent(upstream, "survivor") == 0
    rb = start_broker(openbao, database_url, tmp_path / "data")
    try:
        done = rb.sdk(token).wait_call(body["call_id"])
        assert done["state"] == "succeeded"
        assert done["response"]["result"]["json"]["message"] == "survivor"
        assert sent(upstream, "survivor") == 1
    finally:
        rb.close()


def interrupt(
    openbao: DevVault, database_url: str, data: Path, upstream_url: str,
    gate: tuple[str, GateUpstream], cap: str,
) -> tuple[str, str]:  # fmt: skip
    """Start a job that hangs in the gate upstream, then stop the broker under it."""
    rb = start_broker(openbao, database_url, data)
    try:
        configure(rb, upstream_url, gate[0])
        token = rb.agent("alice", ["tester"])
        body = invoke_async(rb, token, cap, "interrupted")
        wait_for(lambda: gate[1].count("interrupted") == 1, "the job to reach the upstream")
        assert rb.sdk(token).get_call(body["call_id"])["state"] == "running"
        rb.broker.deferred.stop_grace = 0.1  # do not wait for the held request at shutdown
    finally:
        rb.close()
    return token, body["call_id"]


def test_interrupted_non_idempotent_job_is_outcome_unknown_and_not_resent(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    gate: tuple[str, GateUpstream],
) -> None:
    data = tmp_path / "data"
    token, call_id = interrupt(openbao, database_url, data, upstream.url, gate, "test.gate")
    gate[1].gate.set()
    rb = start_broker(openbao, database_url, data)
    try:
        done = rb.sdk(token).get_call(call_id)
        assert done["state"] == "outcome_unknown" and done["ended"] is True
        assert done["response"]["error"]["code"] == "outcome_unknown"
        kinds = {e["kind"]: e for e in rb.audit(call_id=call_id)}
        assert kinds["call.interrupted"]["reason"] == "outcome_unknown"
        assert "call.abandoned" in kinds  # the audit log closes the open call.started too
        time.sleep(0.3)  # a worker that wrongly re-ran it would have sent by now
        assert gate[1].count("interrupted") == 1
    finally:
        rb.close()


def test_interrupted_idempotent_job_runs_again(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    gate: tuple[str, GateUpstream],
) -> None:
    data = tmp_path / "data"
    token, call_id = interrupt(openbao, database_url, data, upstream.url, gate, "test.gate.idem")
    gate[1].gate.set()
    rb = start_broker(openbao, database_url, data)
    try:
        done = rb.sdk(token).wait_call(call_id)
        assert done["state"] == "succeeded"
        assert gate[1].count("interrupted") == 2
        interrupted = [e for e in rb.audit(call_id=call_id) if e["kind"] == "call.interrupted"]
        assert interrupted[0]["reason"] == "requeued"
    finally:
        rb.close()


def test_disable_cancels_approvals_and_jobs_with_one_audit_event(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    gate: tuple[str, GateUpstream],
) -> None:
    rb = start_broker(openbao, database_url, tmp_path / "data", job_workers=1)
    try:
        configure(rb, upstream.url, gate[0])
        token = rb.agent("alice", ["tester"])
        running = invoke_async(rb, token, "test.gate", "held")
        wait_for(lambda: gate[1].count("held") == 1, "the job to reach the upstream")
        queued = invoke_async(rb, token, "test.gate", "waiting")  # the one worker is busy
        pending = rb.sdk(token).invoke("test.gate.approve", {"message": "asking"})
        assert pending["status"] == "approval_pending"

        rb.admin.disable_agent("alice")

        [event] = [e for e in rb.audit(kind="admin.agent.disable")]
        assert event["detail"]["tokens_revoked"] == 1
        assert event["detail"]["approvals_cancelled"] == 1
        assert event["detail"]["jobs_cancelled"] == [running["call_id"]]
        assert sorted(event["detail"]["calls_cancelled"]) == sorted(
            [queued["call_id"], pending["call_id"]]
        )
        states = {c: rb.admin.get_call(c)["state"] for c in
                  (running["call_id"], queued["call_id"], pending["call_id"])}  # fmt: skip
        assert set(states.values()) == {"cancelled"}, states
        finished = [e for e in rb.audit(call_id=running["call_id"]) if e["kind"] == "call.finished"]
        assert finished[0]["status"] == "cancelled"
        assert rb.admin.list_approvals("pending") == []
        late = rb.http(rb.admin_token).post(f"/v1/approvals/{pending['approval_id']}/approve")
        assert late.status_code == 409 and late.json()["error"]["code"] == "approval_denied"

        r = rb.http(token).post(
            "/v1/capabilities/test.echo/invoke", json={"args": {"message": "m"}}
        )
        assert r.status_code == 401
        gate[1].gate.set()
        time.sleep(0.3)  # a cancelled job that wrongly ran would have sent by now
        assert gate[1].count("waiting") == 0 and gate[1].count("asking") == 0
    finally:
        rb.close()


def test_sigkill_mid_job_is_outcome_unknown_after_restart(
    openbao: DevVault, database_url: str, tmp_path: Path, gate: tuple[str, GateUpstream]
) -> None:
    """A real crash (kill -9 of a `broker serve` process) while a job is in the upstream."""
    port, admin = free_port(), "adm_sigkill_test_token_0123456789"
    env = {
        **os.environ,
        "BROKER_PORT": str(port), "BROKER_DATA_DIR": str(tmp_path / "data"),
        "BROKER_DATABASE_URL": database_url, "BROKER_VAULT_ADDR": openbao.addr,
        "BROKER_VAULT_TOKEN": openbao.root_token, "BROKER_BOOTSTRAP_ADMIN_TOKEN": admin,
        "BROKER_EGRESS_ALLOW": "127.0.0.1/32", "BROKER_LOG_LEVEL": "warning",
    }  # fmt: skip
    write_secret(openbao, "tests/echo", {"token": SECRET})
    broker = BrokerProcess(env, port)
    broker.start()
    try:
        with BrokerClient(broker.url, admin) as client:
            client.put_capability(echo_manifest(gate[0], "test.gate"))
            client.add_policy("role:tester", "test.*")
            token = client.create_agent("crash", ["tester"])["token"]
        with BrokerClient(broker.url, token) as agent:
            call_id = agent.invoke("test.gate", {"message": "killed"}, respond_async=True)[
                "call_id"
            ]
            wait_for(lambda: gate[1].count("killed") == 1, "the job to reach the upstream")
        broker.kill()
        gate[1].gate.set()
        broker.start()
        with BrokerClient(broker.url, token) as agent:
            done = agent.get_call(call_id)
        assert done["state"] == "outcome_unknown"
        assert done["response"]["error"]["code"] == "outcome_unknown"
        time.sleep(0.3)  # a worker that wrongly re-ran it would have sent by now
        assert gate[1].count("killed") == 1
    finally:
        broker.stop()
