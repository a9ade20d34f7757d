"""Durable calls and approvals (SQL storage): the ``calls`` and ``approvals`` tables.

A call that outlives its request (an asynchronous job, or a call waiting for a human
approval) is a ``calls`` row; its approval, if any, an ``approvals`` row. Every state change
is a single ``UPDATE ... WHERE state IN (...)``, so of two workers claiming a job, or two
admins deciding an approval, exactly one wins; the loser sees ``False``/``None``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import Engine, insert, select, update

from broker import db
from broker.chain import SEALED, Sealer
from broker.ports import ApprovalRecord, StoredCall

log = logging.getLogger("broker.jobs")
_CALL_FIELDS = tuple(StoredCall.__dataclass_fields__)
_APPROVAL_FIELDS = tuple(ApprovalRecord.__dataclass_fields__)
WAITING = ("approval_pending", "queued")


class SqlCallStore:
    """``args`` are sealed at rest (``chain.Sealer``, bound to the call id): they can hold
    ``x-sensitive`` values for as long as a call waits for its approval or its worker."""

    def __init__(self, engine: Engine, sealer: Sealer) -> None:
        self._engine = engine
        self._sealer = sealer

    # -- create and read --------------------------------------------------------------------

    async def create(self, call: StoredCall, approval: ApprovalRecord | None = None) -> None:
        await db.run(self._create, call, approval)

    def _create(self, call: StoredCall, approval: ApprovalRecord | None) -> None:
        now = db.utcnow()
        row = asdict(call)
        row.update(
            args=self._sealer.seal(db.dumps(call.args).encode(), call.call_id.encode()),
            response=None if call.response is None else db.dumps(call.response),
            created_at=now,
            updated_at=now,
        )
        with self._engine.begin() as conn:
            conn.execute(insert(db.calls).values(**row))
            if approval is not None:
                conn.execute(insert(db.approvals).values(**asdict(approval)))

    async def get_call(self, call_id: str) -> StoredCall | None:
        return await db.run(self._get_call, call_id)

    def _get_call(self, call_id: str) -> StoredCall | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(db.calls).where(db.calls.c.call_id == call_id)).first()
        return self._call(row._mapping) if row else None

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        return await db.run(self._get_approval, approval_id)

    def _get_approval(self, approval_id: str) -> ApprovalRecord | None:
        t = db.approvals
        with self._engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.id == approval_id)).first()
        return _approval(row._mapping) if row else None

    async def list_approvals(self, status: str | None, limit: int) -> list[ApprovalRecord]:
        return await db.run(self._list_approvals, status, limit)

    def _list_approvals(self, status: str | None, limit: int) -> list[ApprovalRecord]:
        t = db.approvals
        stmt = select(t).order_by(t.c.created_at, t.c.id).limit(limit)
        if status:
            stmt = stmt.where(t.c.status == status)
        with self._engine.connect() as conn:
            return [_approval(r._mapping) for r in conn.execute(stmt)]

    async def running(self, runner: str) -> list[StoredCall]:
        return await db.run(self._running, runner)

    def _running(self, runner: str) -> list[StoredCall]:
        t = db.calls
        stmt = select(t).where(t.c.state == "running", t.c.runner == runner)
        with self._engine.connect() as conn:
            return [self._call(r._mapping) for r in conn.execute(stmt.order_by(t.c.created_at))]

    # -- state changes ----------------------------------------------------------------------

    async def expire_due(self, now: str) -> list[ApprovalRecord]:
        return await db.run(self._expire_due, now)

    def _expire_due(self, now: str) -> list[ApprovalRecord]:
        t = db.approvals
        expired = []
        with self._engine.begin() as conn:
            due = conn.execute(select(t).where(t.c.status == "pending", t.c.expires_at <= now))
            for row in list(due):
                if self._set_approval(conn, row.id, "expired", decided_at=now):
                    self._set_call(conn, row.call_id, ("approval_pending",), "expired")
                    expired.append(_approval({**row._mapping, "status": "expired"}))
        return expired

    async def decide(
        self, approval_id: str, approve: bool, approver: str, reason: str | None
    ) -> ApprovalRecord | None:
        return await db.run(self._decide, approval_id, approve, approver, reason)

    def _decide(
        self, approval_id: str, approve: bool, approver: str, reason: str | None
    ) -> ApprovalRecord | None:
        status = "approved" if approve else "denied"
        now = db.utcnow()
        with self._engine.begin() as conn:
            fields = {"approver": approver, "reason": reason, "decided_at": now}
            # Not past its expiry, even if no sweep has marked it expired yet.
            if not self._set_approval(conn, approval_id, status, live_at=now, **fields):
                return None
            row = conn.execute(select(db.approvals).where(db.approvals.c.id == approval_id)).one()
            call_state = "queued" if approve else "denied"
            self._set_call(conn, row.call_id, ("approval_pending",), call_state)
        return _approval(row._mapping)

    async def claim_next(self, runner: str) -> StoredCall | None:
        return await db.run(self._claim_next, runner)

    def _claim_next(self, runner: str) -> StoredCall | None:
        t = db.calls
        while True:
            with self._engine.begin() as conn:
                row = conn.execute(
                    select(t).where(t.c.state == "queued").order_by(t.c.created_at).limit(1)
                ).first()
                if row is None:
                    return None
                if not self._set_call(conn, row.call_id, ("queued",), "running", runner=runner):
                    continue  # another worker took it first
                if row.approval_id:
                    conn.execute(
                        update(db.approvals)
                        .where(db.approvals.c.id == row.approval_id)
                        .values(used_at=db.utcnow())
                    )
                return self._call({**row._mapping, "state": "running", "runner": runner})

    async def transition(
        self,
        call_id: str,
        from_states: Sequence[str],
        to_state: str,
        *,
        http_status: int | None = None,
        response: Any = None,
    ) -> bool:
        return await db.run(
            self._transition, call_id, tuple(from_states), to_state, http_status, response
        )

    def _transition(
        self,
        call_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        http_status: int | None,
        response: Any,
    ) -> bool:
        values: dict[str, Any] = {}
        if response is not None:
            values.update(http_status=http_status, response=db.dumps(response))
        with self._engine.begin() as conn:
            return self._set_call(conn, call_id, from_states, to_state, **values)

    async def cancel_agent(self, agent_id: str) -> tuple[int, list[str]]:
        return await db.run(self._cancel_agent, agent_id)

    def _cancel_agent(self, agent_id: str) -> tuple[int, list[str]]:
        a, c = db.approvals, db.calls
        now = db.utcnow()
        with self._engine.begin() as conn:
            approvals = conn.execute(
                update(a)
                .where(a.c.agent_id == agent_id, a.c.status == "pending")
                .values(status="cancelled", decided_at=now, reason="agent disabled")
            ).rowcount
            waiting = conn.execute(
                select(c.c.call_id).where(c.c.agent_id == agent_id, c.c.state.in_(WAITING))
            ).scalars()
            cancelled = [cid for cid in list(waiting)
                         if self._set_call(conn, cid, WAITING, "cancelled")]  # fmt: skip
        return int(approvals or 0), cancelled

    @staticmethod
    def _set_approval(
        conn: Any, approval_id: str, status: str, live_at: str | None = None, **values: Any
    ) -> bool:
        t = db.approvals
        stmt = update(t).where(t.c.id == approval_id, t.c.status == "pending")
        if live_at is not None:
            stmt = stmt.where(t.c.expires_at > live_at)
        done = conn.execute(stmt.values(status=status, **values))
        return bool(done.rowcount == 1)

    def _call(self, row: Any) -> StoredCall:
        data = {k: row[k] for k in _CALL_FIELDS}
        data["args"] = self._open_args(data["call_id"], data["args"])
        data["response"] = None if data["response"] is None else json.loads(data["response"])
        return StoredCall(**data)

    def _open_args(self, call_id: str, stored: str) -> Any:
        """The arguments; None if they cannot be opened (another key, or changed): such a
        call never runs (``Deferred`` ends it ``storage_unavailable``)."""
        if not stored.startswith(SEALED):
            return json.loads(stored)  # stored before arguments were sealed
        try:
            return json.loads(self._sealer.open(stored, call_id.encode()))
        except ValueError as exc:
            log.error("call %s: its stored arguments do not open: %s", call_id, exc)
            return None

    @staticmethod
    def _set_call(
        conn: Any, call_id: str, from_states: Sequence[str], to_state: str, **values: Any
    ) -> bool:
        t = db.calls
        done = conn.execute(
            update(t)
            .where(t.c.call_id == call_id, t.c.state.in_(tuple(from_states)))
            .values(state=to_state, updated_at=db.utcnow(), **values)
        )
        return bool(done.rowcount == 1)


def _approval(row: Any) -> ApprovalRecord:
    return ApprovalRecord(**{k: row[k] for k in _APPROVAL_FIELDS})
