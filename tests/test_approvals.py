"""Approvals end to end: a real broker, OpenBao and a counting upstream, SQLite and PostgreSQL.

A capability with ``approval: required`` answers 202; an admin approves or denies; the call
then runs exactly once, bound to its agent, capability and arguments; expiry counts as a
denial; every refusal is in the audit log with its code.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
import sqlalchemy as sa

from broker import errors
from broker.devserver import DevVault
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import SECRET, echo_manifest

CAP = "test.approve"


def approval_manifest(url: str, name: str = CAP) -> dict[str, Any]:
    m = echo_manifest(url, name)
    m["approval"] = "required"
    m["input"]["properties"]["note"] = {"type": "string", "x-sensitive": True}
    return m


def configure(rb: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(approval_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    return rb


@pytest.fixture
def rb(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> Iterator[RunningBroker]:
    running = start_broker(openbao, database_url, tmp_path / "data")
    yield configure(running, upstream)
    running.close()


def ask(
    rb: RunningBroker, token: str, args: dict[str, Any], approval_id: str | None = None
) -> httpx.Response:
    headers = {"X-Broker-Approval": approval_id} if approval_id else {}
    return rb.http(token).post(
        f"/v1/capabilities/{CAP}/invoke", json={"args": args}, headers=headers
    )


def sent(upstream: RunningUpstream) -> int:
    return sum(1 for r in upstream.requests if r.raw_path.startswith("/echo"))


def decide(rb: RunningBroker, approval_id: str, verb: str, reason: str | None = None) -> Any:
    body = {"reason": reason} if reason is not None else None
    return rb.http(rb.admin_token).post(f"/v1/approvals/{approval_id}/{verb}", json=body)


def kinds(rb: RunningBroker, call_id: str) -> list[str]:
    return [e["kind"] for e in rb.audit(call_id=call_id)]


def refusals(rb: RunningBroker, code: str) -> list[dict[str, Any]]:
    return [e for e in rb.audit() if e["reason"] == code and e["decision"] == "deny"]


def test_approve_runs_the_call_once_and_its_result_is_kept(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    r = ask(rb, token, {"message": "deploy", "note": "hidden-value"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "approval_pending" and body["approval_id"].startswith("apr_")
    assert r.headers["location"] == f"/v1/calls/{body['call_id']}"
    call_id, approval_id = body["call_id"], body["approval_id"]
    assert sent(upstream) == 0  # nothing runs before the decision
    assert kinds(rb, call_id) == ["approval.requested"]

    alice = rb.sdk(token)
    assert alice.get_call(call_id)["state"] == "approval_pending"
    [pending] = rb.admin.list_approvals("pending")
    assert pending["id"] == approval_id and pending["agent_id"] == "alice"
    assert pending["args"] == {"message": "deploy", "note": "[SENSITIVE]"}
    assert len(pending["args_hash"]) == 64

    decided = rb.admin.approve(approval_id, reason="change ticket 42")
    assert decided["status"] == "approved" and decided["approver"] == "admin"
    done = alice.wait_call(call_id)
    assert done["state"] == "succeeded" and done["http_status"] == 200
    assert done["response"]["call_id"] == call_id
    assert done["response"]["result"]["json"]["message"] == "deploy"
    assert done["response"]["result"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert done["approval"]["used_at"] is not None
    assert sent(upstream) == 1

    events = rb.audit(call_id=call_id)
    assert [e["kind"] for e in events] == [
        "approval.requested", "approval.approved", "call.started", "call.finished",
    ]  # fmt: skip
    assert events[1]["detail"]["approver"] == "admin"
    assert events[1]["detail"]["reason"] == "change ticket 42"
    assert events[0]["args"]["note"] != "hidden-value"  # sensitive args stay HMACs

    # Approving twice, or presenting a used approval, is refused and audited; nothing re-runs.
    again = decide(rb, approval_id, "approve")
    assert again.status_code == 409 and again.json()["error"]["code"] == "approval_used"
    replay = ask(rb, token, {"message": "deploy", "note": "hidden-value"}, approval_id)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "approval_used"
    assert {e["kind"] for e in refusals(rb, "approval_used")} == {
        "approval.refused", "call.rejected",
    }  # fmt: skip
    time.sleep(0.3)  # a worker that wrongly re-ran it would have sent by now
    assert sent(upstream) == 1

    with pytest.raises(errors.ApprovalUsed):  # the SDK maps the code back to its class
        rb.admin.approve(approval_id)

    # Another agent does not see the call.
    bob = rb.http(rb.agent("bob", ["tester"])).get(f"/v1/calls/{call_id}")
    assert bob.status_code == 404 and bob.json()["error"]["code"] == "call_not_found"


def test_deny_ends_the_call_without_running_it(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    body = ask(rb, token, {"message": "drop table"}).json()
    decided = rb.admin.deny(body["approval_id"], reason="not today")
    assert decided["status"] == "denied" and decided["reason"] == "not today"
    call = rb.sdk(token).get_call(body["call_id"])
    assert call["state"] == "denied" and call["ended"] is True
    assert call["response"]["error"]["code"] == "approval_denied"
    late = decide(rb, body["approval_id"], "approve")
    assert late.status_code == 409 and late.json()["error"]["code"] == "approval_denied"
    [denied] = [e for e in rb.audit(call_id=body["call_id"]) if e["kind"] == "approval.denied"]
    assert denied["detail"]["approver"] == "admin" and denied["detail"]["reason"] == "not today"
    assert refusals(rb, "approval_denied")
    assert rb.admin.list_approvals("pending") == []
    assert sent(upstream) == 0


def test_changed_arguments_or_another_agent_do_not_match(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    body = ask(rb, token, {"message": "pay 10"}).json()
    approval_id = body["approval_id"]
    changed = ask(rb, token, {"message": "pay 10000"}, approval_id)
    assert changed.status_code == 403 and changed.json()["error"]["code"] == "approval_mismatch"
    other = ask(rb, rb.agent("mallory", ["tester"]), {"message": "pay 10"}, approval_id)
    assert other.status_code == 403 and other.json()["error"]["code"] == "approval_mismatch"
    assert len(refusals(rb, "approval_mismatch")) == 2
    # The same agent and arguments get the same pending call back, not a new one.
    same = ask(rb, token, {"message": "pay 10"}, approval_id)
    assert same.status_code == 202 and same.json()["call_id"] == body["call_id"]
    unknown = ask(rb, token, {"message": "pay 10"}, "apr_nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "approval_not_found"
    assert len(rb.admin.list_approvals("pending")) == 1
    assert sent(upstream) == 0


def test_only_approvers_decide(rb: RunningBroker) -> None:
    token = rb.agent("alice", ["tester"])
    body = ask(rb, token, {"message": "m"}).json()
    r = rb.http(token).post(f"/v1/approvals/{body['approval_id']}/approve")
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_denied"
    listing = rb.http(token).get("/v1/approvals")
    assert listing.status_code == 403
    assert any(e["kind"] == "admin.denied" for e in rb.audit(agent="alice"))
    missing = decide(rb, "apr_missing", "approve")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "approval_not_found"


def test_expired_approval_is_a_denial_the_agent_can_see(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    rb = configure(
        start_broker(openbao, database_url, tmp_path / "data", approval_ttl=0.2), upstream
    )
    try:
        token = rb.agent("alice", ["tester"])
        body = ask(rb, token, {"message": "late"}).json()
        time.sleep(0.5)  # past the approval's expiry
        call = rb.sdk(token).get_call(body["call_id"])
        assert call["state"] == "expired"
        assert call["response"]["error"]["code"] == "approval_expired"
        r = decide(rb, body["approval_id"], "approve")
        assert r.status_code == 409 and r.json()["error"]["code"] == "approval_expired"
        presented = ask(rb, token, {"message": "late"}, body["approval_id"])
        assert presented.status_code == 409
        assert [e["kind"] for e in rb.audit(call_id=body["call_id"])][:2] == [
            "approval.requested", "approval.expired",
        ]  # fmt: skip
        assert len(refusals(rb, "approval_expired")) >= 3  # the expiry and both refusals
        assert sent(upstream) == 0
    finally:
        rb.close()


def test_cli_lists_and_decides(rb: RunningBroker, upstream: RunningUpstream) -> None:
    from tests.test_cli import run

    token = rb.agent("alice", ["tester"])
    first = ask(rb, token, {"message": "one"}).json()
    second = ask(rb, token, {"message": "two"}).json()
    listing = run(rb, "approvals", "list", "--status", "pending")
    assert listing.exit_code == 0 and first["approval_id"] in listing.output
    ok = run(rb, "approvals", "approve", first["approval_id"], "--reason", "fine")
    assert ok.exit_code == 0, ok.output
    no = run(rb, "approvals", "deny", second["approval_id"], "--reason", "no")
    assert no.exit_code == 0, no.output
    rb.sdk(token).wait_call(first["call_id"])
    shown = run(rb, "call", "get", first["call_id"], token=token)
    assert shown.exit_code == 0 and '"succeeded"' in shown.output
    twice = run(rb, "approvals", "approve", first["approval_id"])
    assert twice.exit_code == 1 and "approval_used" in twice.output
    assert sent(upstream) == 1


def test_mcp_gets_a_readable_pending_result(rb: RunningBroker, upstream: RunningUpstream) -> None:
    from tests.test_mcp import call_tool, text_of

    token = rb.agent("alice", ["tester"])
    result = call_tool(rb, token, "auto", CAP, {"message": "via mcp"})
    assert result.is_error is False
    text = text_of(result)
    assert text.startswith("approval_pending:") and "approval_id apr_" in text
    assert result.structured_content is not None
    call_id = result.structured_content["call_id"]
    assert rb.sdk(token).get_call(call_id)["state"] == "approval_pending"
    assert sent(upstream) == 0


def test_a_policy_rule_can_require_an_approval_for_some_arguments(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    """Action "approve" in a policy rule: allowed = this call waits for a human. Its condition
    sees the arguments, so only large counts wait; a deny exempts an agent."""
    rb.admin.put_capability(echo_manifest(upstream.url, "test.pay"))
    rb.admin.add_policy("role:tester", "test.pay", "approve", "allow", "args.count > 10")
    token = rb.agent("alice", ["tester"])
    http = rb.http(token)
    small = http.post(
        "/v1/capabilities/test.pay/invoke", json={"args": {"message": "a", "count": 5}}
    )
    assert small.status_code == 200, small.text  # runs at once
    big = http.post(
        "/v1/capabilities/test.pay/invoke", json={"args": {"message": "b", "count": 50}}
    )
    assert big.status_code == 202, big.text
    assert big.json()["status"] == "approval_pending"
    assert sent(upstream) == 1
    requested = [
        e for e in rb.audit(call_id=big.json()["call_id"]) if e["kind"] == "approval.requested"
    ]
    assert requested[0]["detail"]["required_by"].startswith("pol_")
    assert decide(rb, big.json()["approval_id"], "approve").status_code == 200
    done = rb.sdk(token).wait_call(big.json()["call_id"], timeout=20)
    assert done["state"] == "succeeded" and sent(upstream) == 2
    # An explicit deny of "approve" exempts bob from the approval.
    bob = rb.agent("bob", ["tester"])
    rb.admin.add_policy("agent:bob", "test.pay", "approve", "deny")
    r = rb.http(bob).post(
        "/v1/capabilities/test.pay/invoke", json={"args": {"message": "c", "count": 50}}
    )
    assert r.status_code == 200, r.text


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _stored_call(rb: RunningBroker, call_id: str) -> dict[str, Any]:
    engine = sa.create_engine(rb.settings.resolved_database_url())
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM calls WHERE call_id = :c"), {"c": call_id})
            return dict(row.one()._mapping)
    finally:
        engine.dispose()


def _set_stored_args(rb: RunningBroker, call_id: str, args: str) -> None:
    engine = sa.create_engine(rb.settings.resolved_database_url())
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE calls SET args = :a WHERE call_id = :c"), {"a": args, "c": call_id}
            )
    finally:
        engine.dispose()


def test_a_waiting_calls_arguments_are_sealed_at_rest(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    """A call waiting for its approval keeps its arguments in the database for hours; an
    x-sensitive value must not be readable there (the audit log only ever HMACs it)."""
    token = rb.agent("alice", ["tester"])
    value = "pin-4711/secret?x=1"
    body = ask(rb, token, {"message": "deploy", "note": value}).json()
    row = _stored_call(rb, body["call_id"])
    text = json.dumps(row, default=str)
    for form in (value, quote(value, safe=""), quote_plus(value), b64(value), "deploy"):
        assert form not in text
    assert str(row["args"]).startswith("sealed:v1:sk-")
    key_file = rb.settings.data_dir / "calls-seal-key.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    rb.admin.approve(body["approval_id"])
    done = rb.sdk(token).wait_call(body["call_id"])
    assert done["state"] == "succeeded", done
    assert done["response"]["result"]["json"]["message"] == "deploy"  # opened for the run


def test_arguments_that_do_not_open_are_never_run(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    """Changed in the database, moved from another call's row, or replaced by plain JSON
    (as rows were stored before sealing): the call fails closed (503 storage_unavailable),
    nothing is sent and no call.started is written."""
    token = rb.agent("alice", ["tester"])
    first = ask(rb, token, {"message": "one", "note": "a"}).json()
    second = ask(rb, token, {"message": "two", "note": "b"}).json()
    third = ask(rb, token, {"message": "three", "note": "c"}).json()
    _set_stored_args(rb, third["call_id"], json.dumps({"message": "swapped", "note": "c"}))
    stored = str(_stored_call(rb, first["call_id"])["args"])
    _set_stored_args(rb, second["call_id"], stored)  # another row's sealed arguments
    flipped = stored[:-3] + ("A" if stored[-3] != "A" else "B") + stored[-2:]
    _set_stored_args(rb, first["call_id"], flipped)  # one character changed
    for call in (first, second, third):
        rb.admin.approve(call["approval_id"])
        done = rb.sdk(token).wait_call(call["call_id"])
        assert done["state"] == "failed", done
        assert done["response"]["error"]["code"] == "storage_unavailable"
        assert "call.started" not in kinds(rb, call["call_id"])
    assert sent(upstream) == 0
