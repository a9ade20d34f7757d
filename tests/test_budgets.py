"""Budgets end to end: real broker, OpenBao, SQLite/PostgreSQL and upstreams that count requests.

Reservations are atomic in the database (no overspend under 100 parallel calls), agent and task
budgets are independent and held both or none, metered costs settle to the upstream's reported
usage, calls that never left are refunded, periods roll over on UTC boundaries (the store takes
a clock, so the test crosses an hour without sleeping), and a crash's reservations are settled
at the next start.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from broker.budgets import SqlBudgets, period_start, stamp
from broker.cli import cli
from broker.client import AsyncBrokerClient
from broker.db import make_engine, migrate
from broker.demo import ServerThread
from broker.devserver import DevVault
from broker.errors import BudgetExhausted
from broker.ports import AuditEvent
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream, _read_body, _send_json

# -- helpers ---------------------------------------------------------------------------------


def paid_manifest(url: str, name: str = "test.paid", cost: Any = 1, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "input": {"type": "object", "properties": {"tokens": {"type": "integer"}}},
        "http": {"method": "POST", "url": url, "json": {"tokens": "{args.tokens}"}},
        "limits": {"cost": cost},
        **extra,
    }


def call(
    rb: RunningBroker, token: str, name: str = "test.paid", task: str | None = None, **args: Any
) -> httpx.Response:
    headers = {"X-Broker-Task": task} if task else {}
    return rb.http(token).post(
        f"/v1/capabilities/{name}/invoke", json={"args": args}, headers=headers
    )


def spent(rb: RunningBroker, **target: str) -> tuple[float, float]:
    b = rb.admin.get_budget(**target)
    return b["spent"], b["reserved"]


class MeteredUpstream:
    """An LLM-like API on loopback: answers ``{"usage": {"total_tokens": N}}`` for
    ``{"tokens": N}`` (no usage at all when N is absent), and counts what it received."""

    def __init__(self) -> None:
        self.received = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await _read_body(receive) or b"{}")
        with self._lock:
            self.received += 1
        answer: dict[str, Any] = {"answer": "42"}
        if isinstance(body.get("tokens"), int):
            answer["usage"] = {"prompt_tokens": 1, "total_tokens": body["tokens"]}
        await _send_json(send, 200, answer)


@pytest.fixture
def metered() -> Iterator[tuple[str, MeteredUpstream]]:
    app = MeteredUpstream()
    with ServerThread(app) as server:
        yield server.url, app


@pytest.fixture
def rb(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    running_broker.admin.put_capability(paid_manifest(f"{upstream.url}/echo"))
    running_broker.admin.add_policy("role:tester", "test.*")
    return running_broker


# -- no overspend under concurrency -------------------------------------------------------------

# The busy timeout follows BROKER_AUDIT_TIMEOUT: a loaded CI machine with two brokers writing one
# SQLite file can wait longer than the 2 s other tests use (the refusal would then be a 503).
PATIENT = {"audit_timeout": 10.0}


@pytest.fixture
def patient(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> Iterator[RunningBroker]:
    broker = start_broker(openbao, database_url, tmp_path / "data", **PATIENT)
    broker.admin.put_capability(paid_manifest(f"{upstream.url}/echo"))
    broker.admin.add_policy("role:tester", "test.*")
    yield broker
    broker.close()


def outcome(r: httpx.Response) -> str:
    """ok, budget_exhausted, or any other code with its message (for the assertion's report)."""
    if r.status_code == 200:
        return "ok"
    error = r.json()["error"]
    return error["code"] if r.status_code == 402 else f"{error['code']}: {error['message']}"


def test_100_parallel_calls_against_a_budget_of_10_execute_10(
    patient: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = patient
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(10, "day", agent="alice")
    url = f"{rb.url}/v1/capabilities/test.paid/invoke"

    def one(_: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.post(url, json={"args": {}}, headers=headers, timeout=60, trust_env=False)

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(one, range(100)))
    codes = [outcome(r) for r in answers]
    assert (codes.count("ok"), codes.count("budget_exhausted")) == (10, 90), codes
    assert len(upstream.requests) == 10  # what the upstream actually received
    refused = [r.json()["error"] for r in answers if r.status_code == 402]
    assert {e["code"] for e in refused} == {"budget_exhausted"}
    assert all(e["call_id"] for e in refused)
    rejected = rb.audit(kind="call.rejected")
    assert sorted(e["call_id"] for e in rejected if e["reason"] == "budget_exhausted") == sorted(
        e["call_id"] for e in refused
    )
    finished = rb.audit(kind="call.finished")
    assert [e["cost"] for e in finished] == [1.0] * 10
    assert spent(rb, agent="alice") == (10, 0)


def test_two_broker_instances_on_one_database_never_overspend(
    patient: RunningBroker, upstream: RunningUpstream, database_url: str, tmp_path: Path
) -> None:
    rb = patient
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(10, "total", agent="alice")
    # A second instance: same database and admin token, its own audit chain and data dir.
    other = start_broker(
        rb.vault, database_url, tmp_path / "other", audit_chain_id="other-instance",
        bootstrap_admin_token=rb.admin_token, **PATIENT,
    )  # fmt: skip
    try:
        urls = [f"{b.url}/v1/capabilities/test.paid/invoke" for b in (rb, other)]

        def one(i: int) -> str:
            headers = {"Authorization": f"Bearer {token}"}
            return outcome(httpx.post(urls[i % 2], json={"args": {}}, headers=headers,
                                      timeout=60, trust_env=False))  # fmt: skip

        with ThreadPoolExecutor(max_workers=32) as pool:
            codes = list(pool.map(one, range(100)))
    finally:
        other.close()
    assert (codes.count("ok"), codes.count("budget_exhausted")) == (10, 90), codes
    assert len(upstream.requests) == 10
    assert spent(rb, agent="alice") == (10, 0)


def test_calls_with_no_budget_to_hold_against_read_the_budgets_once_per_ttl(
    rb: RunningBroker,
) -> None:
    """Whether any budget applies is cached (1 s): without it, every paid call read the
    budgets table in a worker thread (~0.6 ms of a ~1.1 ms call)."""
    token = rb.agent("alice", ["tester"])
    engine = rb.broker.budgets._engine  # type: ignore[attr-defined]
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM budgets" in statement:
            reads.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        assert [call(rb, token).status_code for _ in range(20)] == [200] * 20
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert 1 <= len(reads) <= 3, reads  # one per TTL (a slow machine may cross one or two)


def test_a_budget_set_through_another_instance_holds_calls_within_the_ttl(
    patient: RunningBroker, database_url: str, tmp_path: Path
) -> None:
    rb = patient
    token = rb.agent("alice", ["tester"])
    other = start_broker(
        rb.vault, database_url, tmp_path / "other", audit_chain_id="other-instance",
        bootstrap_admin_token=rb.admin_token, **PATIENT,
    )  # fmt: skip
    try:
        assert call(other, token).status_code == 200  # other now knows alice has no budget
        rb.admin.set_budget(1, "total", agent="alice")
        # Through the instance that set it: at once.
        assert [call(rb, token).status_code for _ in range(2)] == [200, 402]
        time.sleep(1.2)  # past the other instance's 1 s TTL
        r = call(other, token)
        assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exhausted", r.text
        rb.admin.delete_budget(agent="alice")
        assert call(rb, token).status_code == 200  # a deletion applies at once here too
    finally:
        other.close()


# -- agent and task budgets ---------------------------------------------------------------------


def test_task_budget_is_independent_of_the_agent_budget(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    alice, bob = rb.agent("alice", ["tester"]), rb.agent("bob", ["tester"])
    rb.admin.set_budget(5, "day", agent="alice")
    rb.admin.set_budget(2, "week", task="ticket-1")
    assert [call(rb, alice, task="ticket-1").status_code for _ in range(3)] == [200, 200, 402]
    # The refused call held nothing on the agent's budget either (both or none).
    assert spent(rb, agent="alice") == (2, 0)
    assert spent(rb, task="ticket-1") == (2, 0)
    # The task budget binds every agent working on the task; bob has no budget of his own.
    assert call(rb, bob, task="ticket-1").status_code == 402
    assert call(rb, bob, task="ticket-2").status_code == 200
    # Without a task, or with another one, only alice's own budget counts.
    assert [call(rb, alice).status_code for _ in range(3)] == [200, 200, 200]
    r = call(rb, alice, task="ticket-2")
    assert r.status_code == 402
    assert "agent budget of 'alice'" in r.json()["error"]["message"]
    assert spent(rb, agent="alice") == (5, 0)
    assert len(upstream.requests) == 6


def test_get_budget_shows_limit_period_spend_and_period_start(rb: RunningBroker) -> None:
    token = rb.agent("alice", ["tester"])
    put = rb.admin.set_budget(3, "month", agent="alice")
    assert put["spent"] == 0 and put["reserved"] == 0
    assert call(rb, token).status_code == 200
    got = rb.admin.get_budget(agent="alice")
    now = datetime.now(UTC)
    assert got == {
        "scope": "agent",
        "subject": "alice",
        "limit": 3,
        "period": "month",
        "spent": 1,
        "reserved": 0,
        "period_start": stamp(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)),
    }
    # Changing the limit keeps what was spent in the period.
    assert rb.admin.set_budget(1, "month", agent="alice")["spent"] == 1
    assert call(rb, token).status_code == 402
    rb.admin.delete_budget(agent="alice")
    assert call(rb, token).status_code == 200
    kinds = [e["kind"] for e in rb.audit() if e["kind"].startswith("admin.budget")]
    assert kinds == ["admin.budget.put", "admin.budget.put", "admin.budget.delete"]


def test_free_capabilities_are_not_limited(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    rb.admin.put_capability(paid_manifest(f"{upstream.url}/echo", "test.free", cost=0))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(0, "total", agent="alice")
    assert call(rb, token, "test.free").status_code == 200
    assert spent(rb, agent="alice") == (0, 0)


# -- metered costs ------------------------------------------------------------------------------


def test_metered_cost_settles_to_the_reported_usage(
    running_broker: RunningBroker, metered: tuple[str, MeteredUpstream]
) -> None:
    rb, (url, app) = running_broker, metered
    cost = {"metered": "usage.total_tokens", "reserve": 100}
    # The result shows only "answer": the usage is read before the result is shaped.
    rb.admin.put_capability(paid_manifest(url, "test.llm", cost, result={"fields": ["answer"]}))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(250, "total", agent="alice")

    r = call(rb, token, "test.llm", tokens=30)
    assert r.status_code == 200 and r.json()["result"] == {"answer": "42"}
    assert spent(rb, agent="alice") == (30, 0)
    assert call(rb, token, "test.llm", tokens=150).status_code == 200
    assert spent(rb, agent="alice") == (180, 0)
    # 70 left is less than the 100 a call reserves: refused before anything is sent.
    r = call(rb, token, "test.llm", tokens=1)
    assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exhausted"
    assert app.received == 2
    costs = [e["cost"] for e in rb.audit(kind="call.finished", capability="test.llm")]
    assert sorted(costs) == [30.0, 150.0]


def test_metered_answer_without_usage_is_charged_the_reservation(
    running_broker: RunningBroker, metered: tuple[str, MeteredUpstream]
) -> None:
    rb, (url, _app) = running_broker, metered
    rb.admin.put_capability(
        paid_manifest(url, "test.llm", {"metered": "usage.total_tokens", "reserve": 40})
    )
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(1000, "day", task="t-1")
    assert call(rb, token, "test.llm", task="t-1").status_code == 200  # no usage reported
    assert spent(rb, task="t-1") == (40, 0)


# -- refunds and charges when something fails ---------------------------------------------------


def test_nothing_executed_is_refunded(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    port = upstream.url.rsplit(":", 1)[1]
    missing = {"s": {"path": "tests/never-written", "key": "token"}}
    headers = {"Authorization": "Bearer {secrets.s}"}
    nosecret = paid_manifest(f"{upstream.url}/echo", "test.nosecret", 5, secrets=missing)
    nosecret["http"]["headers"] = headers
    rb.admin.put_capability(nosecret)
    # 127.0.0.2 is loopback but outside BROKER_EGRESS_ALLOW: refused before any connect.
    rb.admin.put_capability(paid_manifest(f"http://127.0.0.2:{port}/echo", "test.egress", 5))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(5, "day", agent="alice")

    r = call(rb, token, "test.nosecret")
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
    assert spent(rb, agent="alice") == (0, 0)
    r = call(rb, token, "test.egress")
    assert r.status_code == 403 and r.json()["error"]["code"] == "egress_denied"
    assert spent(rb, agent="alice") == (0, 0)
    assert upstream.requests == []
    failed = rb.audit(kind="call.finished")
    assert {e["status"] for e in failed} == {"failed"} and [e["cost"] for e in failed] == [None] * 2
    # The whole budget is still there.
    rb.admin.put_capability(paid_manifest(f"{upstream.url}/echo", "test.paid", 5))
    assert call(rb, token).status_code == 200
    assert spent(rb, agent="alice") == (5, 0)


def test_a_call_that_may_have_reached_the_upstream_is_charged(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    manifest = paid_manifest(f"{upstream.url}/slow-drip", "test.slow", 2)
    manifest["http"]["timeout"] = "300ms"
    rb.admin.put_capability(manifest)
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(10, "day", agent="alice")
    r = call(rb, token, "test.slow")
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert spent(rb, agent="alice") == (2, 0)
    assert [e["cost"] for e in rb.audit(kind="call.finished")] == [2.0]


# -- periods ------------------------------------------------------------------------------------


def test_period_starts_are_utc_boundaries() -> None:
    now = datetime(2026, 11, 26, 13, 45, 7, 123, tzinfo=UTC)  # a Thursday
    assert period_start("hour", now) == datetime(2026, 11, 26, 13, tzinfo=UTC)
    assert period_start("day", now) == datetime(2026, 11, 26, tzinfo=UTC)
    assert period_start("week", now) == datetime(2026, 11, 23, tzinfo=UTC)  # Monday
    assert period_start("month", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert period_start("total", now) == datetime(1970, 1, 1, tzinfo=UTC)
    east = now.astimezone(timezone(timedelta(hours=14)))
    assert period_start("day", east) == datetime(2026, 11, 26, tzinfo=UTC)  # UTC, not local


def test_period_rollover_with_an_injected_clock(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    clock = [datetime(2026, 11, 26, 10, 59, 30, tzinfo=UTC)]
    store = SqlBudgets(engine, instance="test", clock=lambda: clock[0])

    async def scenario() -> None:
        await store.put("agent", "alice", 3, "hour")
        await store.settle(await store.reserve("c1", "alice", None, 2), 2)
        with pytest.raises(BudgetExhausted):
            await store.reserve("c2", "alice", None, 2)
        late = await store.reserve("c3", "alice", None, 1)  # in flight across the boundary
        clock[0] = datetime(2026, 11, 26, 11, 0, 1, tzinfo=UTC)
        view = await store.get("agent", "alice")
        assert view is not None
        assert (view.spent, view.reserved) == (0, 0)
        assert view.period_start == "2026-11-26T11:00:00.000000Z"
        # The late call settles into the period it reserved in, not the new one.
        await store.settle(late, 1)
        c4 = await store.reserve("c4", "alice", None, 3)
        await store.settle(c4, 3)
        await store.settle(c4, 3)  # settling is once-only (recovery may race a settle)
        view = await store.get("agent", "alice")
        assert view is not None and (view.spent, view.reserved) == (3, 0)
        with pytest.raises(BudgetExhausted):
            await store.reserve("c5", "alice", None, 1)

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


# -- crash recovery -----------------------------------------------------------------------------


def test_reservations_left_by_a_crash_are_settled_at_start(
    openbao: DevVault, database_url: str, tmp_path: Path
) -> None:
    rb = start_broker(openbao, database_url, tmp_path / "data")
    try:
        rb.agent("alice")
        rb.admin.set_budget(100, "total", agent="alice")
        engine = make_engine(database_url)
        me = rb.settings.audit_chain_id
        two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
        ours = SqlBudgets(engine, instance=me)
        dead = SqlBudgets(engine, instance="gone-host", clock=lambda: two_hours_ago)
        live = SqlBudgets(engine, instance="other-host")

        async def leave() -> None:
            await ours.reserve("call_started", "alice", None, 7)  # reached call.started
            await ours.reserve("call_unstarted", "alice", None, 11)  # crashed before it
            await dead.reserve("call_stale", "alice", None, 13)  # another, long-dead instance
            await live.reserve("call_live", "alice", None, 17)  # another live instance
            event = AuditEvent(kind="call.started", call_id="call_started", agent_id="alice")
            await rb.broker.audit.append(event)

        asyncio.run(leave())
        engine.dispose()
        assert rb.admin.get_budget(agent="alice")["reserved"] == 48
    finally:
        rb.close()
    again = start_broker(openbao, database_url, tmp_path / "data")
    try:
        # Started: charged its whole reservation. Not started or stale: refunded. Live: kept.
        assert spent(again, agent="alice") == (7, 17)
    finally:
        again.close()


def test_the_migration_creates_the_tables_db_py_describes(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from broker import db

    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
    finally:
        engine.dispose()
    # Only the budget tables are this test's business (each names its table in its repr).
    assert [d for d in diff if "budget" in repr(d)] == []


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"limit": -1, "period": "day"},
        {"limit": 10, "period": "fortnight"},
        {"limit": "lots", "period": "day"},
        {"period": "day"},
        {"limit": 10, "period": "day", "currency": "EUR"},
    ],
)
def test_bad_budget_input_is_422(running_broker: RunningBroker, body: dict[str, Any]) -> None:
    rb = running_broker
    rb.agent("alice")
    r = rb.http(rb.admin_token).put("/v1/agents/alice/budget", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unprocessable" and "budget" in error["message"]
    assert set(error) >= {"code", "message", "call_id"}
    assert any(e["reason"] == "unprocessable" for e in rb.audit(kind="admin.rejected"))
    r = rb.http(rb.admin_token).get("/v1/agents/alice/budget")
    assert r.status_code == 404


def test_budget_admin_refusals(running_broker: RunningBroker) -> None:
    rb = running_broker
    token = rb.agent("alice")
    http = rb.http(rb.admin_token)
    body = {"limit": 1, "period": "day"}
    assert http.put("/v1/agents/nobody/budget", json=body).status_code == 404
    assert http.put("/v1/tasks/a%20b/budget", json=body).status_code == 422
    r = rb.http(token).put("/v1/agents/alice/budget", json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_denied"
    assert rb.http(token).get("/v1/tasks/t/budget").status_code == 403
    assert http.delete("/v1/tasks/never-set/budget").status_code == 404


@pytest.mark.parametrize(
    "cost",
    [
        -1,
        {"metered": "usage.total_tokens"},
        {"metered": "usage.total_tokens", "reserve": 0},
        {"metered": "usage..total_tokens", "reserve": 10},
        {"metered": "usage.total_tokens", "reserve": 10, "per": 2},
    ],
)
def test_bad_cost_in_a_manifest_is_422(running_broker: RunningBroker, cost: Any) -> None:
    r = running_broker.http(running_broker.admin_token).put(
        "/v1/capabilities/test.bad", json=paid_manifest("http://127.0.0.1:9/x", "test.bad", cost)
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_manifest"
    assert "limits.cost" in r.json()["error"]["message"]


# -- SDK and CLI --------------------------------------------------------------------------------


def test_async_sdk_budgets_for_a_task_id_with_a_slash(running_broker: RunningBroker) -> None:
    rb = running_broker

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with AsyncBrokerClient(rb.url, rb.admin_token) as client:
            put = await client.set_budget(9.5, "week", task="team/ticket-7")
            return put, await client.get_budget(task="team/ticket-7")

    put, got = asyncio.run(go())
    assert put == got
    assert (got["scope"], got["subject"], got["limit"], got["period"]) == (
        "task", "team/ticket-7", 9.5, "week",
    )  # fmt: skip
    with pytest.raises(ValueError):
        rb.admin.get_budget()


def test_cli_budget_set_get_delete(rb: RunningBroker) -> None:
    env = {"BROKER_URL": rb.url, "BROKER_TOKEN": rb.admin_token}
    token = rb.agent("alice", ["tester"])
    out = CliRunner().invoke(
        cli, ["budget", "set", "--agent", "alice", "--limit", "4", "--period", "day"], env=env
    )
    assert out.exit_code == 0, out.output
    assert "alice" in out.output and "day" in out.output
    assert call(rb, token).status_code == 200
    out = CliRunner().invoke(cli, ["budget", "get", "--agent", "alice", "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["spent"] == 1
    out = CliRunner().invoke(cli, ["budget", "get"], env=env)
    assert out.exit_code == 1 and "exactly one of --agent or --task" in out.output
    out = CliRunner().invoke(
        cli, ["budget", "set", "--task", "t", "--limit", "-3", "--period", "day"], env=env
    )
    assert out.exit_code == 1 and "error: unprocessable" in out.output
    out = CliRunner().invoke(cli, ["budget", "delete", "--agent", "alice"], env=env)
    assert out.exit_code == 0
    out = CliRunner().invoke(cli, ["budget", "get", "--agent", "alice"], env=env)
    assert out.exit_code == 1 and "error: not_found" in out.output


# -- durable jobs -------------------------------------------------------------------------------


def test_a_job_reserves_when_it_runs_and_a_short_budget_is_its_402_outcome(
    rb: RunningBroker, upstream: RunningUpstream
) -> None:
    token = rb.agent("alice", ["tester"])
    rb.admin.set_budget(1, "total", agent="alice")
    sdk = rb.sdk(token)
    first = sdk.invoke("test.paid", {}, respond_async=True)
    assert sdk.wait_call(first["call_id"])["state"] == "succeeded"
    second = sdk.invoke("test.paid", {}, respond_async=True)  # accepted: it reserves when run
    done = sdk.wait_call(second["call_id"])
    assert (done["state"], done["http_status"]) == ("failed", 402), done
    assert done["response"]["error"]["code"] == "budget_exhausted"
    assert len(upstream.requests) == 1
    assert spent(rb, agent="alice") == (1, 0)
    refused = rb.audit(call_id=second["call_id"], kind="call.rejected")
    assert [e["reason"] for e in refused] == ["budget_exhausted"]
