"""Adversarial review where features meet: odd input on the invoke hot path, durable jobs and
tasks, approvals and capability changes. Real broker, OpenBao, upstreams; SQLite and PostgreSQL.
"""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from broker.demo import ServerThread
from broker.devserver import DevVault
from tests import test_breaker as brk
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream
from tests.test_idempotency import cap
from tests.test_invoke import SECRET, echo_manifest
from tests.test_jobs import GateUpstream, invoke_async, wait_for

URL = "/v1/capabilities/test.echo/invoke"


@pytest.fixture
def rb(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    running_broker.secret("tests/echo", {"token": SECRET})
    running_broker.admin.put_capability(echo_manifest(upstream.url))
    running_broker.admin.add_policy("role:tester", "test.*")
    return running_broker


def raw_post(rb: RunningBroker, path: bytes, token: str | None, body: bytes) -> int:
    """POST with a path sent byte for byte (httpx would normalise it); the status code."""
    where = urlsplit(rb.url)
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    request = (
        b"POST " + path + b" HTTP/1.1\r\nHost: broker\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        + b"Connection: close\r\n\r\n" + body
    )  # fmt: skip
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(request)
        head = s.recv(65536)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("name", [b"x" * 300, b"test%00echo", b"a%FF" + b"b" * 200])
@pytest.mark.parametrize("agent", [True, False])
def test_an_impossible_capability_name_is_404_and_audited(
    rb: RunningBroker, name: bytes, agent: bool
) -> None:
    """A name no capability can have (too long, NUL, not a name) is a client mistake: 404,
    nothing looked up, and the refusal is on record. On PostgreSQL the raw name used to go
    into the bounded ``capability`` column: the record was refused, and with it every other
    record of the same audit batch (other agents' ``call.started`` among them)."""
    token = rb.agent("alice", ["tester"]) if agent else None
    status = raw_post(rb, b"/v1/capabilities/" + name + b"/invoke", token, b'{"args": {}}')
    assert status == (404 if agent else 401)
    code = "capability_not_found" if agent else "unauthenticated"
    assert [e["reason"] for e in rb.audit(kind="call.rejected")] == [code]
    # The hot path's oversize refusal takes the name from the path too.
    big = b'{"args": {"message": "' + b"m" * 1_100_000 + b'"}}'
    assert raw_post(rb, b"/v1/capabilities/" + name + b"/invoke", token, big) == 413
    reasons = sorted(e["reason"] for e in rb.audit(kind="call.rejected"))
    assert reasons == sorted([code, "request_too_large"])
    assert rb.admin.verify_audit()["ok"]


@pytest.mark.parametrize("path", [b"/invoke", b"/v1/invoke", b"/v1/capabilities/invoke"])
def test_an_oversize_body_to_any_invoke_like_path_is_413(rb: RunningBroker, path: bytes) -> None:
    """The body limit audits its refusal with the capability taken from the path; a path that
    merely ends in /invoke used to make that an IndexError, and the client got a 500."""
    big = b'{"args": {"message": "' + b"m" * 1_100_000 + b'"}}'
    assert raw_post(rb, path, None, big) == 413
    assert [e["reason"] for e in rb.audit(kind="call.rejected")] == ["request_too_large"]


def test_a_job_keeps_its_task_and_idempotency_key(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    """A job's records carry the task and the key like a synchronous call's: a query by task
    finds the job's execution (and its cost), and the declared header gets the agent's key.
    The worker used to rebuild the call without them (and stored the raw header value)."""
    rb.admin.put_capability(
        cap(upstream.url, "test.keyed", "/echo", idempotency_header="Idempotency-Key")
    )
    http = rb.http(rb.agent("alice", ["tester"]))
    headers = {"Prefer": "respond-async", "Idempotency-Key": '"order-9"', "X-Broker-Task": "t-9"}
    r = http.post("/v1/capabilities/test.keyed/invoke", json={"args": {"message": "j"}},
                  headers=headers)  # fmt: skip
    assert r.status_code == 202, r.text
    call_id = r.json()["call_id"]
    assert rb.admin.wait_call(call_id)["state"] == "succeeded"
    assert upstream.requests[-1].header("idempotency-key") == "order-9"
    kinds = [e["kind"] for e in rb.audit(task="t-9")]
    assert kinds == ["call.queued", "call.started", "call.finished"]
    assert {e["idempotency_key"] for e in rb.audit(call_id=call_id)} == {"order-9"}


@pytest.mark.parametrize("change", ["delete", "unmark"])
def test_approvers_never_see_a_sensitive_argument_after_the_capability_changes(
    rb: RunningBroker, upstream: RunningUpstream, change: str
) -> None:
    """The approvals list masks ``x-sensitive`` values by the capability's current manifest;
    once it was deleted or replaced without the mark, the value of the waiting call was shown
    in clear (the audit log only ever holds its HMAC)."""
    manifest = echo_manifest(upstream.url, "test.held")
    manifest["approval"] = "required"
    manifest["input"]["properties"]["note"] = {"type": "string", "x-sensitive": True}
    rb.admin.put_capability(manifest)
    http = rb.http(rb.agent("alice", ["tester"]))
    args = {"message": "m", "note": "pin-4711"}
    r = http.post("/v1/capabilities/test.held/invoke", json={"args": args})
    assert r.status_code == 202, r.text
    if change == "delete":
        rb.admin.delete_capability("test.held")
    else:
        manifest["input"]["properties"]["note"] = {"type": "string"}
        rb.admin.put_capability(manifest)
    listed = rb.http(rb.admin_token).get("/v1/approvals")
    assert listed.status_code == 200
    assert "pin-4711" not in listed.text


@pytest.fixture
def slow_retries(openbao: DevVault, database_url: str, tmp_path: Path) -> Iterator[RunningBroker]:
    """Two failures open a circuit; an idempotent call waits 3 to 6 s before its retry."""
    slow = {"breaker_failure_threshold": 2, "retry_attempts": 2, "retry_backoff": 3.0,
            "retry_backoff_max": 3.0}  # fmt: skip
    rb = start_broker(openbao, database_url, tmp_path / "data", **{**brk.FAST, **slow})
    rb.secret("tests/brk", {"token": brk.SECRET})
    rb.admin.add_policy("role:tester", "brk.*")
    yield rb
    rb.close()


def test_a_retry_refused_by_the_breaker_still_charges_the_attempt_that_was_sent(
    slow_retries: RunningBroker, upstream: RunningUpstream
) -> None:
    """An idempotent call's first attempt reaches the upstream (503), and while it waits to
    retry, another call opens the circuit: the retry is refused (upstream_unavailable). The
    first attempt was sent, so the hold is charged, not refunded as if nothing had left."""
    rb = slow_retries
    down = f"{upstream.url}/status/503"
    rb.admin.put_capability(brk.manifest("brk.read", down, idempotent=True, timeout="30s", cost=1))
    rb.admin.put_capability(brk.manifest("brk.write", down))
    token = rb.agent("ivy", ["tester"])
    rb.admin.set_budget(10, "day", agent="ivy")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(brk.invoke, rb, token, "brk.read")
        wait_for(lambda: brk.sent(upstream, "/status/503") == 1, "the first attempt")
        assert brk.invoke(rb, token, "brk.write").json()["upstream_status"] == 503  # opens
        r = first.result()
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert brk.sent(upstream, "/status/503") == 2  # the retry never left
    assert brk.finished(rb, r.json()["error"]["call_id"])["cost"] == 1.0
    assert rb.admin.get_budget(agent="ivy")["spent"] == 1.0


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/calls/call_%00"),
        ("GET", "/v1/audit?agent=a%00"),
        ("POST", "/v1/approvals/apr_%00/approve"),
        ("GET", "/v1/capabilities/test%00echo"),
        ("DELETE", "/v1/agents/a%00"),
    ],
)
def test_a_nul_in_the_path_or_query_is_a_client_mistake(
    rb: RunningBroker, method: str, path: str
) -> None:
    """PostgreSQL refuses a NUL in text: the driver's DataError became 503
    storage_unavailable, blaming the broker for the client's request."""
    r = rb.http(rb.admin_token).request(method, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert [e["reason"] for e in rb.audit(kind="admin.rejected")] == ["invalid_request"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/agents", {"name": "a\x00b", "roles": []}),
        ("POST", "/v1/policies", {"subject": "role:x\x00", "object": "test.*"}),
        ("POST", "/v1/policies", {"subject": "role:x", "object": "test.*", "condition": "'\x00'"}),
        (
            "PUT",
            "/v1/capabilities/test.nul",
            {"name": "test.nul", "description": "\x00", "http": {"url": "http://127.0.0.1:1/x"}},
        ),
        ("POST", "/v1/policies/check", {"agent": "a\x00", "object": "test.echo"}),
        ("POST", "/v1/policies/replay", {"policy": "p, role:x, test.*\n", "since": "2026\x00"}),
        ("POST", "/v1/policies/apply", {"policy": "p, role:x\x00, test.*, invoke, allow\n"}),
        ("POST", "/v1/agents", {"name": "ok", "roles": [], "attributes": {"t\x00": "x"}}),
        ("PUT", "/v1/agents/ivy/budget", {"limit": 1, "period": "day", "note\x00": [["\x00"]]}),
    ],
)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_a_nul_in_an_admin_json_body_is_a_client_mistake(
    rb: RunningBroker, method: str, path: str, body: dict[str, object], encoding: str
) -> None:
    """A JSON string can carry a NUL (\\u0000); PostgreSQL refuses one in text, which came
    back as 503 storage_unavailable. It is a 400 before any route runs, and audited, in every
    encoding the JSON parser accepts."""
    raw = json.dumps(body).encode(encoding)
    headers = {"Content-Type": "application/json"}
    r = rb.http(rb.admin_token).request(method, path, content=raw, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "NUL" in r.json()["error"]["message"]
    assert [e["reason"] for e in rb.audit(kind="admin.rejected")] == ["invalid_request"]
    agents = rb.http(rb.admin_token).get("/v1/agents").json()["agents"]
    assert [a["id"] for a in agents] == ["admin"]  # nothing was created


def test_an_escaped_backslash_before_u0000_is_not_a_nul(rb: RunningBroker) -> None:
    body = {"name": "plain", "roles": [], "attributes": {"note": "\\u0000 is text here"}}
    r = rb.http(rb.admin_token).post("/v1/agents", json=body)
    assert r.status_code == 201, r.text
    stored = rb.http(rb.admin_token).get("/v1/agents/plain").json()
    assert stored["attributes"]["note"] == "\\u0000 is text here"


@pytest.fixture
def held() -> Iterator[tuple[str, GateUpstream]]:
    """An upstream that holds requests until its gate opens (test_jobs.GateUpstream)."""
    app = GateUpstream()
    with ServerThread(app) as server:
        yield server.url, app
        app.gate.set()


def test_a_requeued_job_after_a_restart_leaves_no_budget_held(
    openbao: DevVault, database_url: str, tmp_path: Path, held: tuple[str, GateUpstream]
) -> None:
    """An idempotent paid job interrupted by a stop is run again at the next start, and the
    hold of the interrupted run is settled. The workers started before the reservations a
    stop left were recovered: a re-run could reserve first (its reservation row, keyed by the
    same call id, was then not written) and recovery took the old row, so the re-run's hold
    was never settled and ``reserved`` stayed up for good."""
    data, gate = tmp_path / "data", held
    rb = start_broker(openbao, database_url, data)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        paid = echo_manifest(gate[0], "test.paid")
        paid.update(idempotent=True, limits={"cost": 1})
        rb.admin.put_capability(paid)
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("alice", ["tester"])
        rb.admin.set_budget(2, "day", agent="alice")
        body = invoke_async(rb, token, "test.paid", "twice")
        wait_for(lambda: gate[1].count("twice") == 1, "the job to reach the upstream")
        rb.broker.deferred.stop_grace = 0.1  # leave the job running at shutdown
    finally:
        rb.close()
    gate[1].gate.set()
    rb = start_broker(openbao, database_url, data)
    try:
        assert rb.sdk(token).wait_call(body["call_id"])["state"] == "succeeded"
        wait_for(lambda: rb.admin.get_budget(agent="alice")["reserved"] == 0, "no hold left")
        assert rb.admin.get_budget(agent="alice")["spent"] == 2  # each run may have acted
    finally:
        rb.close()


def _refuse_key_updates(url: str, on: bool) -> None:
    """A real database refusing one statement: UPDATEs of idempotency keys fail (a trigger)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS no_key_update")
            if on:
                conn.exec_driver_sql(
                    "CREATE TRIGGER no_key_update BEFORE UPDATE ON idempotency_keys "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
        else:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS no_key_update ON idempotency_keys")
            if on:
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(
                    "CREATE TRIGGER no_key_update BEFORE UPDATE ON idempotency_keys "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
    engine.dispose()


def test_a_deferred_call_whose_key_was_left_in_flight_is_not_accepted_twice(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    """A job is stored, but its Idempotency-Key cannot be completed (left in flight for the
    next start to resolve). At the next start the key was released, because the call had no
    ``call.started``; a retry with the key then queued a second job: the call ran twice."""
    data = tmp_path / "data"
    rb = start_broker(openbao, database_url, data, job_workers=0)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("alice", ["tester"])
        url = rb.settings.resolved_database_url()
        _refuse_key_updates(url, True)
        headers = {"Prefer": "respond-async", "Idempotency-Key": "once"}
        first = rb.http(token).post(URL, json={"args": {"message": "one"}}, headers=headers)
        assert first.status_code == 202, first.text
    finally:
        rb.close()
        _refuse_key_updates(url, False)
    rb = start_broker(openbao, database_url, data, job_workers=0)
    try:
        again = rb.http(token).post(URL, json={"args": {"message": "one"}}, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["call_id"] == first.json()["call_id"]
        assert again.headers["idempotent-replayed"] == "true"
    finally:
        rb.close()


# The cancelled job's storage thread is still waiting for the lock while the broker disposes
# of its engine; the connection it then returns to the disposed pool is dropped unclosed.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_job_stopped_before_it_started_runs_after_the_restart(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    """A job claimed by a worker but stopped before ``call.started`` (here: waiting for its
    budget hold) never ran. It used to be ended ``outcome_unknown`` at the next start (its
    capability is not idempotent) and was never run; jobs not started are resumed."""
    if not database_url.startswith("postgresql"):
        pytest.skip("holds the job with a PostgreSQL table lock")
    data = tmp_path / "data"
    rb = start_broker(openbao, database_url, data, job_workers=1)
    token = _paid_job_setup(rb, upstream.url, cost=1)
    engine = sa.create_engine(database_url)
    lock = engine.connect()
    lock.exec_driver_sql("LOCK TABLE budget_usage IN EXCLUSIVE MODE")  # the hold must wait
    try:
        body = invoke_async(rb, token, "test.paid", "not-yet")
        wait_for(lambda: rb.sdk(token).get_call(body["call_id"])["state"] == "running", "a worker")
        rb.broker.deferred.stop_grace = 0.1
        with ThreadPoolExecutor(1) as pool:
            closing = pool.submit(rb.close)  # waits for the held thread once the job is cancelled
            wait_for(lambda: not rb.broker.deferred._jobs, "the job to be cancelled")
            lock.rollback()
            closing.result()
    finally:
        lock.close()
        engine.dispose()
    assert not any(e["kind"] == "call.started" for e in _audit_rows(database_url, body["call_id"]))
    rb = start_broker(openbao, database_url, data)
    try:
        done = rb.sdk(token).wait_call(body["call_id"])
        assert done["state"] == "succeeded", done
        assert brk.sent(upstream, "/echo") == 1
    finally:
        rb.close()
        # Collect the dropped connection here, under this test's filters: left to a later
        # collection it is reported as an error of whichever test runs then.
        gc.collect()


def _paid_job_setup(rb: RunningBroker, upstream_url: str, *, cost: float) -> str:
    """test.paid (costs ``cost``), alice may call it with a budget of 10 a day; her token."""
    rb.secret("tests/echo", {"token": SECRET})
    paid = echo_manifest(upstream_url, "test.paid")
    paid["limits"] = {"cost": cost}
    rb.admin.put_capability(paid)
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(10, "day", agent="alice")
    return token


def _audit_rows(url: str, call_id: str) -> list[dict[str, object]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT kind FROM audit_events WHERE call_id = %(c)s", {"c": call_id}
        ).all()
    engine.dispose()
    return [dict(r._mapping) for r in rows]


def test_a_key_in_flight_does_not_expire_under_a_running_call(
    openbao: DevVault, database_url: str, tmp_path: Path, held: tuple[str, GateUpstream]
) -> None:
    """Retention counts from the claim, and expired rows were deleted whatever their state:
    a call running longer than the retention lost its key, a repeat executed a second time
    beside it, and the first call's answer then overwrote the second's."""
    rb = start_broker(openbao, database_url, tmp_path / "data", idempotency_retention=0.5)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(held[0], "test.gate"))
        rb.admin.add_policy("role:tester", "test.*")
        http = rb.http(rb.agent("alice", ["tester"]))
        call = {"json": {"args": {"message": "slow"}}, "headers": {"Idempotency-Key": "k"}}
        token = http.headers["authorization"].split()[1]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/v1/capabilities/test.gate/invoke", **call)
            wait_for(lambda: held[1].count("slow") == 1, "the first call upstream")
            time.sleep(1.0)  # past the retention while the first call still runs
            second = pool.submit(rb.http(token).post, "/v1/capabilities/test.gate/invoke", **call)
            wait_for(lambda: second.done() or held[1].count("slow") == 2, "the repeat")
            held[1].gate.set()
            assert first.result().status_code == 200
            again = second.result()
        assert again.status_code == 409, again.text
        assert held[1].count("slow") == 1
    finally:
        rb.close()


def test_a_body_cut_off_by_a_disconnect_is_never_run(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    """A client that sends a whole JSON document as the first chunk of a chunked body and then
    goes away has not sent a request: the broker runs nothing."""
    rb = running_broker
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    where = urlsplit(rb.url)
    chunk = b'{"args": {"message": "partial"}}'
    head = (
        b"POST /v1/capabilities/test.echo/invoke HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection((where.hostname, where.port)) as sock:
        sock.sendall(head + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        time.sleep(0.3)  # the broker has the chunk and waits for the rest
    time.sleep(0.5)
    assert upstream.requests == []
    assert [e for e in rb.audit() if e["kind"] == "call.started"] == []
    # The same body, sent whole, does run (the test's request is well formed).
    r = rb.http(token).post("/v1/capabilities/test.echo/invoke", content=chunk,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text


def test_a_trailing_slash_is_a_404_envelope_not_a_redirect(running_broker: RunningBroker) -> None:
    r = running_broker.http(running_broker.admin_token).post(
        "/v1/capabilities/test.echo/invoke/", json={"args": {}}, headers={"Host": "evil.example"}
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert "location" not in r.headers


def test_a_connection_given_back_after_dispose_is_closed(tmp_path: Path) -> None:
    """A storage thread that outlives the broker's close gives its connection back to a
    disposed pool: it is closed then, not left to the garbage collector (a ResourceWarning,
    reported as an error of whichever test runs at that moment)."""
    import sqlite3

    from broker import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    conn = engine.connect()
    raw = conn.connection.dbapi_connection
    assert raw is not None
    db.dispose(engine)
    conn.close()
    with pytest.raises(sqlite3.ProgrammingError):
        raw.execute("SELECT 1")


def _finished_waiting(rb: RunningBroker) -> bool:
    """A call.finished record is with the audit writer and not yet confirmed."""
    from broker.audit import _KIND

    log = rb.broker.audit.inner  # type: ignore[attr-defined]
    return any(
        item.values[_KIND] == "call.finished" and item.future is not None and not item.future.done()
        for pending in list(log._pending.values())
        for item in list(pending)
    )


def test_the_kill_switch_while_a_job_records_its_end_writes_one_call_finished(
    openbao: DevVault, database_url: str, tmp_path: Path, held: tuple[str, GateUpstream]
) -> None:
    """A job cancelled by the kill switch while its call.finished waited for the audit log
    got a second call.finished (cancelled) beside the first: two ends for one call."""
    if not database_url.startswith("postgresql"):
        pytest.skip("holds the audit writer with a PostgreSQL table lock")
    rb = start_broker(openbao, database_url, tmp_path / "data", job_workers=1)
    engine = sa.create_engine(database_url)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(held[0], "test.gate"))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("alice", ["tester"])
        body = invoke_async(rb, token, "test.gate", "ending")
        wait_for(lambda: held[1].count("ending") == 1, "the job upstream")
        with engine.connect() as lock, ThreadPoolExecutor(1) as pool:
            lock.exec_driver_sql("LOCK TABLE audit_events IN EXCLUSIVE MODE")
            held[1].gate.set()  # the answer arrives; its call.finished waits for the lock
            wait_for(lambda: _finished_waiting(rb), "call.finished to wait for the audit log")
            admin = rb.http(rb.admin_token)
            disabling = pool.submit(admin.post, "/v1/agents/alice/disable")
            wait_for(lambda: not rb.broker.deferred._jobs, "the kill switch to cancel the job")
            lock.rollback()
            assert disabling.result().status_code == 200
        ends = [
            e for e in _audit_rows(database_url, body["call_id"]) if e["kind"] == "call.finished"
        ]
        assert len(ends) == 1
        assert rb.sdk(rb.admin_token).get_call(body["call_id"])["state"] == "cancelled"
        assert rb.admin.verify_audit()["ok"] is True
    finally:
        engine.dispose()
        rb.close()


def _lock_waits(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        waiting = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )  # this test's database only: other workers' tests run beside it
        return int(waiting.scalar() or 0)


def test_the_kill_switch_while_a_job_reserves_its_budget_refunds_the_hold(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    """A job cancelled while its budget reservation waited for the database left the hold
    in place once the reservation landed: the agent's budget stayed short until a restart."""
    if not database_url.startswith("postgresql"):
        pytest.skip("holds the reservation with a PostgreSQL table lock")
    rb = start_broker(openbao, database_url, tmp_path / "data", job_workers=1)
    engine = sa.create_engine(database_url)
    try:
        token = _paid_job_setup(rb, upstream.url, cost=3)
        with engine.connect() as lock, ThreadPoolExecutor(1) as pool:
            lock.exec_driver_sql("LOCK TABLE budget_usage IN EXCLUSIVE MODE")
            body = invoke_async(rb, token, "test.paid", "held")
            wait_for(lambda: _lock_waits(engine) > 0, "the reservation to wait for the lock")
            disabling = pool.submit(rb.http(rb.admin_token).post, "/v1/agents/alice/disable")
            time.sleep(0.2)
            lock.rollback()
            assert disabling.result().status_code == 200
        wait_for(lambda: not rb.broker.deferred._jobs, "the job to end")
        budget = rb.admin.get_budget(agent="alice")
        assert (budget["reserved"], budget["spent"]) == (0.0, 0.0)
        kinds = [e["kind"] for e in _audit_rows(database_url, body["call_id"])]
        assert "call.started" not in kinds and brk.sent(upstream, "/echo") == 0
        assert rb.sdk(rb.admin_token).get_call(body["call_id"])["state"] == "cancelled"
    finally:
        engine.dispose()
        rb.close()
