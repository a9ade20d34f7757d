"""Durable audit records per second, and the latency durability adds to one call.

For SQLite (WAL, synchronous=FULL) and, when BROKER_TEST_POSTGRES_URL or --postgres is given,
PostgreSQL (synchronous_commit=on): the audit writer with group commit against a baseline of
single-record commits (the same writer with batches of one), in the same process. Numbers, not
a test. Call ids grow with time, as the broker's do (``service.new_call_id``); ``--random-ids``
uses random ones instead, to show what they cost the call_id index. ``cpu us/rec`` is the
process's CPU time per record at the highest concurrency: on a machine shared with other work
it moves less than the rate does.

    python bench/audit.py [--records 20000] [--postgres postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from broker.audit import SqlAuditLog
from broker.db import make_engine, metadata, migrate
from broker.keyring import AuditKeys
from broker.ports import AuditEvent

CONCURRENCY = (16, 256, 1024)
_calls = itertools.count()
RANDOM_IDS = False


def call_id() -> str:
    return f"call_{uuid.uuid4().hex}" if RANDOM_IDS else f"call_{next(_calls):032x}"


def event(i: int) -> AuditEvent:
    return AuditEvent(
        kind="call.finished",
        call_id=call_id(),
        agent_id="bench",
        capability="bench.echo",
        capability_version=1,
        decision="allow",
        status="succeeded",
        upstream_status=200,
        latency_ms=1.234,
        cost=1,
        args={"message": "hello", "n": i},
        secrets=[{"path": "bench", "version": 1}],
    )


async def throughput(log: SqlAuditLog, records: int, concurrency: int) -> float:
    per_task = max(1, records // concurrency)  # at least one record per appender

    async def worker(w: int) -> None:
        for i in range(per_task):
            await log.append(event(w * per_task + i))

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    n = per_task * concurrency
    CPU_US[concurrency] = (time.process_time() - cpu) / n * 1e6
    return n / (time.perf_counter() - start)


CPU_US: dict[int, float] = {}


async def latency(log: SqlAuditLog, n: int) -> tuple[float, float]:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await log.append(event(i))
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * len(samples))]


async def run_one(url: str, tmp: Path, *, max_batch: int, records: int) -> dict[str, Any]:
    engine = make_engine(url)
    if not url.startswith("sqlite"):
        with engine.begin() as conn:
            for table in (*reversed(metadata.sorted_tables), sa.table("alembic_version")):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table.name} CASCADE")
    migrate(engine)
    keys = AuditKeys(tmp / "sign.pem", tmp / "hmac.json")
    log = SqlAuditLog(
        engine,
        keys=keys,
        checkpoint_dir=tmp / "cp",
        chain_id="bench",
        max_batch=max_batch,
        timeout=60,
    )
    await log.start()
    try:
        p50, p99 = await latency(log, 500)
        # Each appender waits for its record to be durable before the next (as a call
        # must), so a commit can group at most as many records as there are appenders.
        rates = {c: await throughput(log, records, concurrency=c) for c in CONCURRENCY}
        report = await log.verify()
        assert report["ok"], report
    finally:
        await log.close()
        engine.dispose()
    cpu = CPU_US[CONCURRENCY[-1]]
    return {"records_per_s": rates, "cpu_us_per_record": cpu, "append_p50_ms": p50,
            "append_p99_ms": p99}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--postgres", default=os.environ.get("BROKER_TEST_POSTGRES_URL"))
    parser.add_argument("--random-ids", action="store_true")
    args = parser.parse_args()
    global RANDOM_IDS
    RANDOM_IDS = args.random_ids
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"sqlite": f"sqlite:///{tmp}/bench.db"}
        if args.postgres:
            targets["postgres"] = args.postgres
        for name, url in targets.items():
            for mode, batch in (("baseline_single_commit", 1), ("group_commit", 512)):
                if url.startswith("sqlite"):
                    for f in Path(tmp).glob("bench.db*"):
                        f.unlink()
                sub = Path(tmp) / f"{name}-{mode}"
                sub.mkdir()
                n = args.records if batch > 1 else max(2000, args.records // 10)
                results[f"{name}/{mode}"] = await run_one(url, sub, max_batch=batch, records=n)
    heads = "".join(f"{f'rec/s @{c}':>13}" for c in CONCURRENCY)
    print(f"{'target':32}{heads} {'cpu us/rec':>11} {'append p50 ms':>14} {'append p99 ms':>14}")
    for key, r in results.items():
        rates = "".join(f"{r['records_per_s'][c]:13.0f}" for c in CONCURRENCY)
        print(
            f"{key:32}{rates} {r['cpu_us_per_record']:11.1f} {r['append_p50_ms']:14.3f}"
            f" {r['append_p99_ms']:14.3f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
