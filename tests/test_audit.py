"""The audit log you can prove: chain, checkpoints, tampering found, offline export, HMACs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from broker import audit, chain, db
from broker.audit import SqlAuditLog
from broker.cli import cli
from broker.db import make_engine, migrate
from broker.devserver import DevVault
from broker.errors import AuditUnavailable
from broker.keyring import AuditKeys
from broker.ports import AuditEvent
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import echo_manifest, invoke


def make_history(rb: RunningBroker, upstream: RunningUpstream, calls: int = 8) -> None:
    rb.secret("tests/echo", {"token": "audit-test-credential"})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("ava", ["tester"])
    for i in range(calls):
        invoke(rb, token, {"message": f"m{i}"})
    invoke(rb, rb.agent("ben"), {"message": "denied"})


@pytest.fixture
def history(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> tuple[str, Path]:
    """A stopped broker's log (checkpoints every 5 records and at shutdown)."""
    data = tmp_path / "data"
    rb = start_broker(openbao, database_url, data, audit_checkpoint_every=5)
    make_history(rb, upstream)
    rb.close()
    return database_url, data


def restart(openbao: DevVault, where: tuple[str, Path]) -> RunningBroker:
    return start_broker(openbao, where[0], where[1], audit_checkpoint_every=5)


def sql(url: str, *statements: str, params: dict[str, Any] | None = None) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for s in statements:
            conn.execute(sa.text(s), params or {})
    engine.dispose()


def rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = [
            dict(r._mapping)
            for r in conn.execute(sa.text("SELECT * FROM audit_events ORDER BY chain_id, seq"))
        ]
    engine.dispose()
    return out


def verify(openbao: DevVault, where: tuple[str, Path]) -> dict[str, Any]:
    rb = restart(openbao, where)
    try:
        report: dict[str, Any] = rb.admin.verify_audit()
        return report
    finally:
        rb.close()


def hold_audit_table(conn: sa.Connection) -> None:
    """Another client holds the audit table: writes hang, as on a stuck disk or database."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")


def checkpoint_seqs(data: Path) -> list[int]:
    [file] = (data / "audit-checkpoints").glob("*.jsonl")
    return sorted(json.loads(line)["seq"] for line in file.read_text().splitlines())


# -- the hash stays byte for byte what it was ---------------------------------------------------


def test_record_hash_and_data_text_are_stable() -> None:
    """Exported logs are verified by other versions: the canonical text must never drift (the
    expected values were computed before the writer's encoders were rebuilt for speed)."""
    data = {
        "args": {"m": 'é\n"x"', "n": [1, 2.5, None, True]},
        "secrets": [{"path": "p", "version": 1}],
        "detail": {"z": 1, "a": "☃"},
    }
    text = '{"args":{"m":"é\\n\\"x\\"","n":[1,2.5,null,true]},"detail":{"a":"☃","z":1},"secrets":[{"path":"p","version":1}]}'  # noqa: E501
    assert audit._dumps(data) == text == db.dumps(data)
    record = dict(
        chain_id="main", seq=3, event_id="0123456789abcdef0123456789abcdef",
        time="2026-11-26T11:21:09.551000Z", kind="call.finished", call_id="call_x",
        agent_id="ava", capability="test.echo", capability_version=2, decision="allow",
        rule=None, reason=None, status="succeeded", upstream_status=200, latency_ms=12.345,
        cost=1.0, task_id="t-ü", trace_id=None, idempotency_key=None, data=text,
        prev_hash="ab" * 32,
    )  # fmt: skip
    expected = "92e671eb154800b6c52cdc58eb714ac99381dd72b98e41ff8b9b9be81523076f"
    assert chain.record_hash(record) == expected
    with pytest.raises(ValueError):  # NaN is not JSON: such a record cannot be hashed
        chain.record_hash({**record, "cost": float("nan")})


def test_writer_batches_and_recovers_after_a_failed_write(
    database_url: str, tmp_path: Path
) -> None:
    """Straight on the writer: a burst is grouped into batches (several INSERT sizes, or COPY)
    with checkpoints inside them; a failed write refuses its records, and once the database
    takes writes again the writer goes on from the last durable record."""
    engine = make_engine(database_url)
    migrate(engine)
    log = SqlAuditLog(
        engine, keys=AuditKeys(tmp_path / "sign.pem", tmp_path / "hmac.json"),
        checkpoint_dir=tmp_path / "cp", chain_id="w", checkpoint_every=100,
    )  # fmt: skip
    pg = engine.dialect.name == "postgresql"
    refuse = (
        ["CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'full'; "
         "END $$ LANGUAGE plpgsql",
         "CREATE TRIGGER refuse BEFORE INSERT ON audit_events FOR EACH ROW "
         "EXECUTE FUNCTION refuse_audit()"]
        if pg else
        ["CREATE TRIGGER refuse BEFORE INSERT ON audit_events "
         "BEGIN SELECT RAISE(ABORT, 'full'); END"]
    )  # fmt: skip
    accept = (
        ["DROP TRIGGER refuse ON audit_events", "DROP FUNCTION refuse_audit()"]
        if pg else ["DROP TRIGGER refuse"]
    )  # fmt: skip

    async def scenario() -> dict[str, Any]:
        await log.start()
        burst = [AuditEvent(kind="call.finished", call_id=f"c{i}", cost=i) for i in range(333)]
        seqs = await asyncio.gather(*(log.append(e) for e in burst))
        assert sorted(seqs) == list(range(1, 334))
        sql(database_url, *refuse)
        with pytest.raises(AuditUnavailable):
            await log.append(AuditEvent(kind="call.finished"))
        sql(database_url, *accept)
        assert await log.append(AuditEvent(kind="call.finished", latency_ms=1.23456)) == 334
        await log.close()  # signs the head
        return await log.verify()

    try:
        report = asyncio.run(scenario())
    finally:
        engine.dispose()
    assert report["ok"] is True and report["checked"] == 334
    # One rode in the burst's transaction (at least 100 records), one at close.
    assert report["chains"][0]["checkpoints"] >= 2
    stored = {r["seq"]: r for r in rows(database_url)}
    assert stored[334]["latency_ms"] == 1.235 and stored[7]["cost"] == 6.0


# -- an honest log verifies --------------------------------------------------------------------


def test_untouched_log_verifies(openbao: DevVault, history: tuple[str, Path]) -> None:
    report = verify(openbao, history)
    assert report["ok"] is True and report["first_bad_seq"] is None
    assert report["checked"] >= 20
    [c] = report["chains"]
    assert c["checkpoints"] >= 3 and c["head_seq"] == report["checked"]
    stored = rows(history[0])
    assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))
    assert stored[0]["prev_hash"] == chain.GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(stored))


def test_every_record_is_durable_and_chained_under_concurrency(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    make_history(running_broker, upstream, calls=0)
    token = running_broker.agent("cat", ["tester"])
    codes: list[int] = []

    def worker(n: int) -> None:
        for i in range(10):
            codes.append(invoke(running_broker, token, {"message": f"{n}-{i}"}).status_code)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 80
    finished = running_broker.audit(kind="call.finished", agent="cat")
    assert len(finished) == 80
    report = running_broker.admin.verify_audit()
    assert report["ok"] is True


# -- tampering is found, and the first bad record named ----------------------------------------


def test_edited_field_is_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    sql(history[0], "UPDATE audit_events SET agent_id = 'someone-else' WHERE seq = 7")
    report = verify(openbao, history)
    assert report["ok"] is False and report["first_bad_seq"] == 7
    assert "edited" in report["chains"][0]["problem"]


def test_edited_args_are_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    target = next(r for r in rows(history[0]) if r["kind"] == "call.started")
    data = target["data"].replace('"m', '"M', 1)
    assert data != target["data"]
    sql(
        history[0],
        "UPDATE audit_events SET data = :d WHERE seq = :s",
        params={"d": data, "s": target["seq"]},
    )
    assert verify(openbao, history)["first_bad_seq"] == target["seq"]


def test_deleted_record_is_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    sql(history[0], "DELETE FROM audit_events WHERE seq = 9")
    report = verify(openbao, history)
    assert report["first_bad_seq"] == 9 and "missing" in report["chains"][0]["problem"]


def test_swapped_records_are_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    sql(
        history[0],
        "UPDATE audit_events SET seq = -1 WHERE seq = 11",
        "UPDATE audit_events SET seq = 11 WHERE seq = 12",
        "UPDATE audit_events SET seq = 12 WHERE seq = -1",
    )
    assert verify(openbao, history)["first_bad_seq"] == 11


def test_truncated_tail_is_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    total = len(rows(history[0]))
    sql(history[0], "DELETE FROM audit_events WHERE seq > :n", params={"n": total - 4})
    # Cover the tracks in the database too: only the file outside it still knows.
    sql(history[0], "DELETE FROM audit_checkpoints")
    report = verify(openbao, history)
    assert report["ok"] is False and report["first_bad_seq"] == total - 3
    assert "missing" in report["chains"][0]["problem"]


def test_rewritten_and_rehashed_log_is_found(openbao: DevVault, history: tuple[str, Path]) -> None:
    url, data = history
    stored = rows(url)
    k = 13
    prev = stored[k - 2]["hash"]
    for rec in stored[k - 1 :]:
        if rec["seq"] == k:
            rec["agent_id"] = "forged"
        rec["prev_hash"] = prev
        rec["hash"] = prev = chain.record_hash(rec)
        sql(
            url,
            "UPDATE audit_events SET agent_id = :a, prev_hash = :p, hash = :h "
            "WHERE chain_id = :c AND seq = :s",
            params={
                "a": rec["agent_id"],
                "p": rec["prev_hash"],
                "h": rec["hash"],
                "c": rec["chain_id"],
                "s": rec["seq"],
            },
        )
    sql(url, "DELETE FROM audit_checkpoints")  # the forger also removes the evidence it can reach
    report = verify(openbao, history)
    assert report["ok"] is False
    last_good = max(s for s in checkpoint_seqs(data) if s < k)
    assert report["first_bad_seq"] == last_good + 1 <= k
    assert "rewritten" in report["chains"][0]["problem"]


def test_forged_checkpoint_is_refused(openbao: DevVault, history: tuple[str, Path]) -> None:
    _, data = history
    [file] = (data / "audit-checkpoints").glob("*.jsonl")
    lines = file.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["seq"] -= 1
    file.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    report = verify(openbao, history)
    assert report["ok"] is False and "signature" in report["chains"][0]["problem"]


# -- export and offline verification -----------------------------------------------------------


def test_export_verifies_offline_and_tampering_shows(
    openbao: DevVault, history: tuple[str, Path], tmp_path: Path
) -> None:
    rb = restart(openbao, history)
    export = tmp_path / "audit.jsonl"
    try:
        env = {"BROKER_URL": rb.url, "BROKER_TOKEN": rb.admin_token}
        out = CliRunner().invoke(cli, ["audit", "export", "-o", str(export)], env=env)
        assert out.exit_code == 0, out.output
    finally:
        rb.close()
    pem = tmp_path / "key.pem"
    pem.write_text(json.loads(export.read_text().splitlines()[0])["public_keys"].popitem()[1])
    # Offline: no broker is running now.
    ok = CliRunner().invoke(
        cli, ["audit", "verify", "--file", str(export), "--public-key", str(pem)]
    )
    assert ok.exit_code == 0, ok.output
    assert "ok:" in ok.output
    lines = export.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if '"seq": 5' in line and '"record"' in line)
    rec = json.loads(lines[i])
    rec["kind"] = "call.finished" if rec["kind"] != "call.finished" else "call.started"
    lines[i] = json.dumps(rec)
    export.write_text("\n".join(lines) + "\n")
    bad = CliRunner().invoke(
        cli, ["audit", "verify", "--file", str(export), "--public-key", str(pem)]
    )
    assert bad.exit_code == 1 and "audit_tampered" in bad.output and "5" in bad.output


def test_export_signed_by_another_key_is_refused(
    openbao: DevVault, history: tuple[str, Path], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rb = restart(openbao, history)
    try:
        lines = list(rb.admin.export_audit())
    finally:
        rb.close()
    other = tmp_path / "other.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    export = tmp_path / "audit.jsonl"
    export.write_text("\n".join(lines) + "\n")
    out = CliRunner().invoke(
        cli, ["audit", "verify", "--file", str(export), "--public-key", str(other)]
    )
    assert out.exit_code == 1 and "signature" in out.output


# -- sensitive values --------------------------------------------------------------------------


def test_sensitive_arguments_are_stored_as_keyed_hmacs(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    m = echo_manifest(upstream.url, "test.secretive")
    m["input"]["properties"]["message"]["x-sensitive"] = True
    rb.secret("tests/echo", {"token": "audit-test-credential"})
    rb.admin.put_capability(m)
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("dee", ["tester"])
    assert (
        invoke(
            rb, token, {"message": "patient-4711", "count": 2}, name="test.secretive"
        ).status_code
        == 200
    )
    assert "patient-4711" not in json.dumps(rb.raw_audit_rows(), default=str)
    [started] = rb.audit(kind="call.started", agent="dee")
    assert started["args"]["count"] == 2
    assert started["args"]["message"].startswith("hmac-sha256:")
    [h] = rb.admin.hash_value("patient-4711")
    assert h == started["args"]["message"]
    assert [e["call_id"] for e in rb.audit(contains=h)] == [started["call_id"]]
    # Rotation: new records use the new key, old ones stay findable and the chain verifies.
    new_key = rb.admin.rotate_hmac_key()
    invoke(rb, token, {"message": "patient-4711"}, name="test.secretive")
    hashes = rb.admin.hash_value("patient-4711")
    assert len(hashes) == 2 and hashes[0].split(":")[1] == new_key
    found = {e["call_id"] for h in hashes for e in rb.audit(contains=h, kind="call.started")}
    assert len(found) == 2
    assert rb.admin.verify_audit()["ok"] is True


# -- fail closed, bounded ----------------------------------------------------------------------


def test_hung_audit_store_is_503_within_the_timeout_and_not_ready(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    import time

    rb = start_broker(openbao, database_url, tmp_path / "data", audit_timeout=1.0)
    engine = sa.create_engine(database_url)
    try:
        make_history(rb, upstream, calls=1)
        token = rb.agent("eli", ["tester"])
        before = len(upstream.requests)
        with engine.connect() as conn:
            hold_audit_table(conn)
            start = time.monotonic()
            r = invoke(rb, token, {"message": "m"})
            took = time.monotonic() - start
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert took < 10  # bounded: the audit timeout, not forever
            assert rb.http().get("/readyz").status_code == 503
            conn.rollback()
        assert len(upstream.requests) == before  # nothing executed
        assert invoke(rb, token, {"message": "m"}).status_code == 200  # and it recovers
        assert rb.http().get("/readyz").status_code == 200
        assert rb.admin.verify_audit()["ok"] is True
    finally:
        engine.dispose()
        rb.close()


def test_cli_verify_online_and_hash(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    make_history(rb, upstream, calls=2)
    env = {"BROKER_URL": rb.url, "BROKER_TOKEN": rb.admin_token}
    ok = CliRunner().invoke(cli, ["audit", "verify"], env=env)
    assert ok.exit_code == 0 and "ok:" in ok.output, ok.output
    hashed = CliRunner().invoke(cli, ["audit", "hash", "some value"], env=env)
    assert hashed.exit_code == 0 and hashed.output.startswith("hmac-sha256:")
    sql(rb.settings.resolved_database_url(), "UPDATE audit_events SET kind = 'x' WHERE seq = 3")
    bad = CliRunner().invoke(cli, ["audit", "verify"], env=env)
    assert bad.exit_code == 1 and "first bad seq 3" in bad.output


class TcpProxy:
    """A loopback TCP relay to PostgreSQL that the test can cut, as a network or a crash would."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket

        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[Any] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        import socket

        self.open = False
        self.listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


@pytest.mark.postgres
def test_database_down_mid_run_is_503_and_nothing_executed(
    openbao: DevVault, tmp_path: Path, upstream: RunningUpstream
) -> None:
    from tests.support.brokers import POSTGRES_URL, postgres_url, reset_postgres

    if not POSTGRES_URL:
        pytest.skip("BROKER_TEST_POSTGRES_URL is not set")
    reset_postgres(postgres_url())
    url = sa.engine.make_url(postgres_url())
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    rb = start_broker(openbao, via_proxy, tmp_path / "data", audit_timeout=2.0)
    try:
        make_history(rb, upstream, calls=1)
        token = rb.agent("dan", ["tester"])
        before = len(upstream.requests)
        proxy.cut()
        r = invoke(rb, token, {"message": "m"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] in ("audit_unavailable", "storage_unavailable")
        assert len(upstream.requests) == before
        assert rb.http().get("/readyz").status_code == 503
    finally:
        rb.close()


# -- a lone call writes its own record ---------------------------------------------------------


def _log(engine: sa.Engine, tmp_path: Path, **kw: Any) -> SqlAuditLog:
    return SqlAuditLog(
        engine, keys=AuditKeys(tmp_path / "sign.pem", tmp_path / "hmac.json"),
        checkpoint_dir=tmp_path / "audit-checkpoints", chain_id="lone", **kw,
    )  # fmt: skip


def _sqlite_engine(tmp_path: Path) -> sa.Engine:
    """A migrated SQLite file (tmp_path/a.db): the lone path exists on SQLite only."""
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    migrate(engine)
    return engine


def _finished_at_once(log: SqlAuditLog, event: AuditEvent) -> int | None:
    """The seq if a lone append completed without ever waiting (no other thread involved),
    else None (the coroutine suspended: the record went down the queue)."""
    coro = log.append(event, alone=True)
    try:
        coro.send(None)
    except StopIteration as done:
        return int(done.value)
    coro.close()  # the queued record is written anyway; nobody waits for it here
    return None


def test_lone_appends_skip_the_writer_on_sqlite_only_and_share_one_chain(
    database_url: str, tmp_path: Path
) -> None:
    """A lone record on an idle SQLite writer is durable before append returns, without a hand
    over to the writer thread; PostgreSQL always queues. Lone and queued records interleave
    in one chain that verifies, with no gap and no seq twice."""
    engine = make_engine(database_url)
    migrate(engine)
    log = _log(engine, tmp_path, checkpoint_interval=3600)  # no time-due checkpoint
    sqlite = engine.dialect.name == "sqlite"

    async def scenario() -> dict[str, Any]:
        await log.start()
        seqs: list[int] = []
        for round_ in range(20):
            at_once = _finished_at_once(log, AuditEvent(kind="call.started", call_id=f"l{round_}"))
            assert (at_once is not None) is sqlite
            if at_once is not None:
                seqs.append(at_once)
                assert stored_kinds(database_url)[at_once] == "call.started"  # durable already
            burst = [AuditEvent(kind="call.finished", call_id=f"q{round_}.{i}") for i in range(5)]
            lone = [log.append(e, alone=True) for e in burst[:2]]
            seqs += await asyncio.gather(*(log.append(e) for e in burst[2:]), *lone)
        await asyncio.sleep(0.2)  # the queued records of PostgreSQL's coroutines that closed
        await log.close()
        return await log.verify()

    try:
        report = asyncio.run(scenario())
    finally:
        engine.dispose()
    assert report["ok"] is True
    assert len(seqs_stored := sorted(stored_kinds(database_url))) == report["checked"] == 120
    assert seqs_stored == list(range(1, 121))


def stored_kinds(url: str) -> dict[int, str]:
    return {r["seq"]: r["kind"] for r in rows(url)}


def test_lone_append_on_a_locked_store_never_holds_the_event_loop(
    database_url: str, tmp_path: Path
) -> None:
    """Another client holds the audit table: the lone append gives up on writing itself at
    once and waits on the queue like any other, so the event loop keeps running while it
    times out with AuditUnavailable; once the lock goes, lone records are written again."""
    engine = make_engine(database_url)
    migrate(engine)
    log = _log(engine, tmp_path, timeout=1.0)
    locker = sa.create_engine(database_url)
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    async def scenario() -> dict[str, Any]:
        await log.start()
        assert await log.append(AuditEvent(kind="call.started"), alone=True) == 1
        with locker.connect() as conn:
            hold_audit_table(conn)
            stop = asyncio.Event()
            ticking = asyncio.create_task(ticker(stop))
            await asyncio.sleep(0.05)  # ticking before the append starts
            with pytest.raises(AuditUnavailable):
                await log.append(AuditEvent(kind="call.started", call_id="held"), alone=True)
            stop.set()
            await ticking
            conn.rollback()
        for _ in range(100):  # the writer gets its batch through once the lock is gone
            if await log.ready():
                break
            await asyncio.sleep(0.05)
        seq = await log.append(AuditEvent(kind="call.finished"), alone=True)
        await log.close()
        assert seq >= 2
        return await log.verify()

    try:
        report = asyncio.run(scenario())
    finally:
        locker.dispose()
        engine.dispose()
    assert report["ok"] is True
    assert max(gaps) < 0.3, f"the event loop stood still for {max(gaps):.3f} s"
    kinds = stored_kinds(database_url)
    # The held record landed late (after its caller gave up) and was closed as abandoned.
    assert (
        list(kinds.values()).count("call.abandoned")
        == list(kinds.values()).count("call.started") - 1
    )


def test_a_due_checkpoint_sends_the_lone_record_to_the_writer(tmp_path: Path) -> None:
    """Signing and the checkpoint file stay on the writer thread: a lone record that makes a
    checkpoint due is queued, and the checkpoint rides in its batch."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path, checkpoint_every=3)

    async def scenario() -> list[int | None]:
        await log.start()
        got = []
        for i in range(7):
            seq = _finished_at_once(log, AuditEvent(kind="call.started", call_id=f"c{i}"))
            if seq is None:
                await asyncio.sleep(0.2)  # the queued record lands
            got.append(seq)
        await log.close()
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        engine.dispose()
    assert got == [1, 2, None, 4, 5, None, 7]
    assert checkpoint_seqs(tmp_path)[:2] == [3, 6]


# -- partial indexes: the bulk of records costs them nothing ------------------------------------


def test_queries_for_rare_kinds_and_users_use_their_partial_indexes(
    database_url: str, tmp_path: Path
) -> None:
    """call.started/call.finished records have no `kind` index entry and records without a
    user no `user_id` one (migration 0005). The audit query still finds every kind and user,
    and what it sends for a rare kind or a user is a statement the database can answer from
    the partial index (checked with the database's own EXPLAIN)."""
    from broker.ports import AuditQuery

    engine = make_engine(database_url)
    migrate(engine)
    log = _log(engine, tmp_path)
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "audit_events" in statement:
            sent.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", capture)

    async def scenario() -> dict[str, list[str]]:
        await log.start()
        for i in range(6):
            await log.append(AuditEvent(kind="call.started", call_id=f"c{i}"))
            await log.append(AuditEvent(kind="call.finished", call_id=f"c{i}"))
        await log.append(AuditEvent(kind="call.denied", call_id="d", user_id="u-1"))
        found = {}
        for name, q in {
            "denied": AuditQuery(kind="call.denied"),
            "finished": AuditQuery(kind="call.finished"),
            "user": AuditQuery(user="u-1"),
        }.items():
            sent.clear()
            events, _ = await log.query(q)
            found[name] = [e["call_id"] for e in events]
            explain_of[name] = sent[-1]
        await log.close()
        return found

    explain_of: dict[str, tuple[str, Any]] = {}
    try:
        found = asyncio.run(scenario())
        assert found == {"denied": ["d"], "finished": [f"c{i}" for i in range(6)], "user": ["d"]}
        for name, index in (
            ("denied", "ix_audit_events_kind"),
            ("user", "ix_audit_events_user_id"),
        ):
            statement, params = explain_of[name]
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":
                    plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
                else:
                    conn.exec_driver_sql("SET enable_seqscan = off")  # tiny table: force the choice
                    conn.exec_driver_sql("SET enable_bitmapscan = off")
                    plan = conn.exec_driver_sql(f"EXPLAIN {statement}", params).all()
            assert index in " ".join(str(col) for row in plan for col in row), (name, plan)
        with engine.connect() as conn:  # and they are partial: hot records are not in them
            if engine.dialect.name == "sqlite":
                defs = "SELECT sql FROM sqlite_master WHERE name = :n"
            else:
                defs = "SELECT indexdef FROM pg_indexes WHERE indexname = :n"
            kind_def = conn.execute(sa.text(defs), {"n": "ix_audit_events_kind"}).scalar_one()
            user_def = conn.execute(sa.text(defs), {"n": "ix_audit_events_user_id"}).scalar_one()
        assert "call.started" in kind_def and "call.finished" in kind_def
        assert "WHERE" in kind_def.upper() and "IS NOT NULL" in user_def.upper()
    finally:
        engine.dispose()


class _FaultyConnection:
    """The lone path's DBAPI connection with its commit replaced: a fault no real SQLite file
    produces on demand (an fsync that stalls, a COMMIT that reports an I/O error after the
    row landed). Everything else is the real connection."""

    def __init__(self, raw: Any, commit: Any) -> None:
        self.raw, self.commit = raw, commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def test_the_lone_path_connection_never_returns_to_the_pool(tmp_path: Path) -> None:
    """Its busy_timeout is 0: a pooled connection with it would make the next user of the
    engine (directory, registry, a restarted log) fail at once on a lock instead of waiting."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path)

    async def scenario() -> None:
        await log.start()
        assert _finished_at_once(log, AuditEvent(kind="call.started")) == 1
        await log.close()

    asyncio.run(scenario())
    pooled = [engine.raw_connection() for _ in range(engine.pool.checkedin())]  # type: ignore[attr-defined]
    try:
        timeouts = [c.cursor().execute("PRAGMA busy_timeout").fetchone()[0] for c in pooled]
    finally:
        for c in pooled:
            c.close()
        engine.dispose()
    assert timeouts and 0 not in timeouts


def test_a_commit_that_fails_after_the_row_landed_is_not_refused(tmp_path: Path) -> None:
    """COMMIT reports an I/O error but the row is stored ("may or may not have committed"):
    the lone path looks, finds its own hash at its seq and answers that seq. Queuing it again
    would have put the seq in twice and refused the writer's whole batch."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path, checkpoint_interval=3600)

    async def scenario() -> tuple[int, int]:
        await log.start()
        raw = log._inline_raw

        def commit_then_fail() -> None:
            raw.commit()
            raise sqlite3.OperationalError("disk I/O error")

        log._inline_raw = _FaultyConnection(raw, commit_then_fail)
        first = await log.append(AuditEvent(kind="call.started", call_id="c1"), alone=True)
        log._inline_raw = raw
        second = await log.append(AuditEvent(kind="call.started", call_id="c2"))
        await log.close()
        return first, second

    try:
        first, second = asyncio.run(scenario())
        report = asyncio.run(log.verify())
    finally:
        engine.dispose()
    kinds = {r["call_id"]: r["seq"] for r in rows(str(engine.url))}
    assert (first, second) == (kinds["c1"], kinds["c2"]) == (1, 2)
    assert report["ok"] is True


def test_a_slow_lone_commit_sends_records_to_the_queue_for_a_while(tmp_path: Path) -> None:
    """A lone commit holds the event loop while it lasts: after one that took longer than
    INLINE_SLOW (a failing disk), records go down the queue (where audit_timeout bounds the
    wait) instead of holding the loop again."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path, checkpoint_interval=3600)

    async def scenario() -> list[int | None]:
        await log.start()
        raw = log._inline_raw

        def slow_commit() -> None:
            time.sleep(audit.INLINE_SLOW * 2)
            raw.commit()

        log._inline_raw = _FaultyConnection(raw, slow_commit)
        got = [_finished_at_once(log, AuditEvent(kind="call.started", call_id="slow"))]
        log._inline_raw = raw
        for i in range(3):
            got.append(_finished_at_once(log, AuditEvent(kind="call.started", call_id=f"c{i}")))
            await asyncio.sleep(0.1)  # the queued record lands
        await log.close()
        return got

    try:
        got = asyncio.run(scenario())
        report = asyncio.run(log.verify())
    finally:
        engine.dispose()
    assert got == [1, None, None, None]
    assert report["ok"] is True and report["checked"] == 4


def test_no_lone_record_lands_after_the_head_close_signs(tmp_path: Path) -> None:
    """close() takes the lone path away before the writer drains and signs the head: an
    append that comes during close is queued (written in the writer's last batch if it makes
    it, else it times out), never written after the last signed checkpoint."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path, checkpoint_interval=3600, timeout=0.5)

    async def scenario() -> int | None:
        await log.start()
        assert _finished_at_once(log, AuditEvent(kind="call.started", call_id="c1")) == 1
        closing = asyncio.create_task(log.close())
        await asyncio.sleep(0)  # close() has begun
        late = _finished_at_once(log, AuditEvent(kind="call.finished", call_id="c1"))
        await closing
        return late

    try:
        late = asyncio.run(scenario())
        url = str(engine.url)
        with sa.create_engine(url).connect() as conn:
            signed = conn.exec_driver_sql("SELECT max(seq) FROM audit_checkpoints").scalar()
    finally:
        engine.dispose()
    assert late is None  # not written on the caller's thread
    # Written with the writer's last batch (then covered by the head it signs), or not at all.
    assert max(r["seq"] for r in rows(url)) == signed


def test_lone_records_get_their_wal_checkpointed_by_the_writer(tmp_path: Path) -> None:
    """The lone path's connection does not checkpoint (that writes and fsyncs the database
    file); it asks the writer every INLINE_CHECKPOINT_EVERY records, so the WAL keeps being
    started over instead of growing with every record."""
    engine = _sqlite_engine(tmp_path)
    log = _log(engine, tmp_path, checkpoint_interval=3600, checkpoint_every=10**6)
    n = audit.INLINE_CHECKPOINT_EVERY * 5

    async def scenario() -> int:
        await log.start()
        lone = 0
        for i in range(n):
            seq = _finished_at_once(log, AuditEvent(kind="call.started", call_id=f"c{i}"))
            if seq is None:
                await asyncio.sleep(0.01)  # queued behind a WAL checkpoint
            else:
                lone += 1
        await log.close()
        return lone

    try:
        lone = asyncio.run(scenario())
        wal = (tmp_path / "a.db-wal").stat().st_size
    finally:
        engine.dispose()
    assert lone >= n * 0.9
    # ~9 pages a record: without checkpoints the WAL would hold every record's pages.
    pages_per_record = 8
    assert wal < audit.INLINE_CHECKPOINT_EVERY * 3 * pages_per_record * 4096 < n * 8 * 4096


@pytest.mark.parametrize("inline", [True, False])
def test_broker_audit_inline_decides_whether_a_lone_call_writes_its_own_records(
    openbao: DevVault, database_url: str, tmp_path: Path, inline: bool
) -> None:
    """BROKER_AUDIT_INLINE=false (a disk whose fsync may hang) leaves every write to the
    writer thread; the default lets a lone record on SQLite skip it. The log verifies."""
    rb = start_broker(openbao, database_url, tmp_path / "data", audit_inline=inline)
    try:
        sql_log = rb.broker.audit.inner  # type: ignore[attr-defined]

        async def lone() -> int | None:
            seq = _finished_at_once(sql_log, AuditEvent(kind="call.started", call_id="c1"))
            await asyncio.sleep(0.2)  # a queued record lands meanwhile
            return seq

        seq = asyncio.run(lone())
        assert (seq is not None) is (inline and database_url.startswith("sqlite"))
        assert rb.admin.verify_audit()["ok"] is True
    finally:
        rb.close()
