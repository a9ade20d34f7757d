"""The audit log: the only writer of audit records, and their query.

Every append is committed (durable) before it returns; if it cannot be, the caller gets
``AuditUnavailable`` within ``timeout`` seconds and must not go on (invariant 1). One
writer per instance: appends are serialised in-process, which is also where the hash
chain (``prev_hash``/``hash``, per ``chain_id``) will be computed.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from sqlalchemy import Engine, insert, select

from broker import db
from broker.errors import AuditUnavailable, InvalidRequest
from broker.ports import AuditEvent, AuditQuery

MAX_LIMIT = 1000
_COLUMNS = (
    "call_id", "kind", "agent_id", "capability", "capability_version", "decision", "rule",
    "reason", "status", "upstream_status", "latency_ms", "cost", "task_id", "trace_id",
    "idempotency_key",
)  # fmt: skip


class SqlAuditLog:
    def __init__(self, engine: Engine, *, chain_id: str = "main", timeout: float = 5.0) -> None:
        self._engine = engine
        self._chain_id = chain_id
        self._timeout = timeout
        self._lock = threading.Lock()

    async def append(self, event: AuditEvent) -> int:
        return await db.run(self._append, event, error=AuditUnavailable, timeout=self._timeout)

    def _append(self, event: AuditEvent) -> int:
        values: dict[str, Any] = {c: getattr(event, c) for c in _COLUMNS}
        values.update(
            chain_id=self._chain_id,
            event_id=uuid.uuid4().hex,
            time=db.utcnow(),
            data=db.dumps({"args": event.args, "secrets": event.secrets, "detail": event.detail}),
        )
        with self._lock, self._engine.begin() as conn:
            result = conn.execute(insert(db.audit_events).values(**values))
            pk = result.inserted_primary_key
            return int(pk[0]) if pk else 0

    async def query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        return await db.run(self._query, q)

    def _query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        t = db.audit_events
        limit = min(max(q.limit, 1), MAX_LIMIT)
        stmt = select(t).order_by(t.c.seq).limit(limit + 1)
        filters = {
            t.c.agent_id: q.agent,
            t.c.capability: q.capability,
            t.c.kind: q.kind,
            t.c.decision: q.decision,
            t.c.call_id: q.call_id,
            t.c.task_id: q.task_id,
        }
        for column, value in filters.items():
            if value is not None:
                stmt = stmt.where(column == value)
        if q.since:
            stmt = stmt.where(t.c.time >= q.since)
        if q.until:
            stmt = stmt.where(t.c.time < q.until)
        if q.cursor:
            stmt = stmt.where(t.c.seq > _decode_cursor(q.cursor))
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).all()
        events = [_event(r._mapping) for r in rows[:limit]]
        next_cursor = str(events[-1]["seq"]) if len(rows) > limit else None
        return events, next_cursor

    async def ready(self) -> bool:
        return await db.run(db.ping, self._engine)


def _decode_cursor(cursor: str) -> int:
    if not cursor.isdigit():
        raise InvalidRequest("cursor is not one this broker issued")
    return int(cursor)


def _event(row: Any) -> dict[str, Any]:
    data = json.loads(row["data"])
    out = {k: row[k] for k in ("seq", "event_id", "chain_id", "time", *_COLUMNS)}
    out.update(
        args=data.get("args"), secrets=data.get("secrets", []), detail=data.get("detail", {})
    )
    out.update(prev_hash=row["prev_hash"], hash=row["hash"])
    return out
