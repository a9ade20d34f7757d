"""The benches keep running: each script in bench/ is run here with tiny settings, and what it
prints is checked. Their numbers are not asserted (speed is measured in bench/, not in tests);
that they measure the right things is: every target answered, the counters saw what they count,
and the durable reference really makes its records durable in a chain."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TARGETS = ("direct", "proxy", "durable", "broker")


def run_bench(script: str, *args: str, timeout: float = 240) -> str:
    # Without the PostgreSQL URL: bench/audit.py would drop and recreate the tables there.
    env = {k: v for k, v in os.environ.items() if k != "BROKER_TEST_POSTGRES_URL"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def load_gateway() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gateway", BENCH / "gateway.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gateway_bench_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    # Concurrency 4, not 16: four servers and the load share two cores with the other tests.
    args = ("--seconds", "0.3", "--rounds", "1", "--concurrency", "1,4", "--json", str(out))
    stdout = run_bench("gateway.py", *args)
    result: dict[str, Any] = json.loads(out.read_text())
    rows = {(r["target"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(t, c) for t in TARGETS for c in (1, 4)}
    for (target, concurrency), row in rows.items():
        assert row["calls"] > 0, (target, concurrency)
        # The table shows the same figures as the file.
        line = f"{target:8} {concurrency:5} {row['calls']:7} {row['p50_ms']:8.3f}"
        assert line in stdout
    assert result["errors"] == dict.fromkeys(TARGETS, 0)  # every call of every target was a 200
    # The relay sees the broker's first read of the secret, and no call waited for Vault later.
    # (This run is shorter than the secret's refresh point, so it sees no refresh either; that
    # a refresh is told from a miss is tested in test_vault.py.)
    assert result["vault_reads_warm_up"] >= 1
    assert result["calls_waiting_for_vault"] == 0
    assert result["vault_background_refreshes"] == result["vault_reads_steady_state"]
    summary = result["summary"]
    for key in ("added_p50_ms_c1", "durable_added_p50_ms_c1", "broker_over_durable_throughput_c4"):
        assert key in summary and f"{key:38}" in stdout
    assert set(result["broker_stage_ms"]["4"]) >= {"authenticate", "decide", "upstream", "audit"}


def test_the_durable_reference_commits_a_chain_of_records(tmp_path: Path) -> None:
    """The floor the bench prints is only a floor if its records are really durable: WAL with
    synchronous=FULL in the broker's audit table, one row per record, chained, lone or grouped."""
    gateway = load_gateway()
    ledger = gateway.Ledger(tmp_path / "ledger.db")
    commits: list[tuple[bool, int]] = []  # (on the test's own thread?, rows in the commit)
    commit, here = ledger._commit, threading.get_ident()

    def watched(rows: list[Any]) -> None:
        commits.append((threading.get_ident() == here, len(rows)))
        commit(rows)

    ledger._commit = watched

    async def calls() -> None:
        ledger.in_flight = 1  # a lone call commits on the loop's thread
        for i in range(3):
            await ledger.write("call.started", f"lone{i}")
        ledger.in_flight = 16  # concurrent ones go through the writer thread

        async def call(i: int) -> None:
            await ledger.write("call.started", f"c{i}")
            await ledger.write("call.finished", f"c{i}")

        await asyncio.gather(*(call(i) for i in range(60)))

    asyncio.run(calls())
    try:
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        ledger.close()
    # The lone records were committed on the caller's thread, one each; the concurrent ones by
    # the writer thread, grouped (60 calls at once cannot all have gone one by one).
    assert commits[:3] == [(True, 1)] * 3
    grouped = commits[3:]
    assert all(not mine for mine, _ in grouped) and sum(n for _, n in grouped) == 120
    assert max(n for _, n in grouped) > 1
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = db.execute(
            "SELECT seq, call_id, kind, prev_hash, hash FROM audit_events ORDER BY seq"
        )
        stored = rows.fetchall()
    assert [seq for seq, *_ in stored] == list(range(1, 124))
    assert [prev for *_, prev, _ in stored[1:]] == [h for *_, h in stored[:-1]]
    calls_seen = {call_id for _, call_id, *_ in stored}
    assert calls_seen == {f"lone{i}" for i in range(3)} | {f"c{i}" for i in range(60)}
    # Past CHECKPOINT_EVERY records the writer thread checkpointed the WAL, off the calls' path.
    assert ledger._checkpointed >= ledger.CHECKPOINT_EVERY


def last_json(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_micro_benches_run_and_end_with_their_json() -> None:
    policy = last_json(run_bench("policy.py", "--decisions", "200", "--repeats", "1"))
    # Every size ran its decisions on both the index and casbin itself.
    assert [r["rules"] for r in policy["results"]] == [100, 1000, 10000]
    assert all(r["decisions"] == 200 and r["casbin_decisions"] > 0 for r in policy["results"])
    # shape.py asserts itself that the shaped answer equals the walked one (no secret in it).
    shape = last_json(run_bench("shape.py", "--loops", "1", "--repeats", "1"))
    assert [r["answer"] for r in shape["rows"]][:2] == ["json 1 items", "json 10 items"]
    # audit.py verifies the chain it wrote before it reports; both SQLite modes are there.
    audit = last_json(run_bench("audit.py", "--records", "400"))
    for mode in ("sqlite/baseline_single_commit", "sqlite/group_commit"):
        assert set(audit[mode]["records_per_s"]) == {"16", "256", "1024"}
