"""Delegations stored in the database: a user lets an agent act for them (DelegationStore).

One row per (user, agent): the capability patterns and the expiry. Every call on behalf of a
user reads the row afresh (no cache), so a revocation holds from the next call on.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from broker import db
from broker.ports import Delegation


class SqlDelegationStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def put(self, delegation: Delegation) -> Delegation:
        return await db.run(self._put, delegation)

    def _put(self, d: Delegation) -> Delegation:
        t = db.delegations
        values = {
            "capabilities": db.dumps(list(d.capabilities)),
            "expires_at": d.expires_at,
            "created_at": d.created_at,
            "created_by": d.created_by,
        }
        key = (t.c.user_id == d.user_id, t.c.agent_id == d.agent_id)
        with self._engine.begin() as conn:
            # Replace in place, else insert: one transaction, no window without a row.
            if not conn.execute(update(t).where(*key).values(**values)).rowcount:
                conn.execute(insert(t).values(user_id=d.user_id, agent_id=d.agent_id, **values))
        return d

    async def get(self, user_id: str, agent_id: str) -> Delegation | None:
        return await db.run(self._get, user_id, agent_id)

    def _get(self, user_id: str, agent_id: str) -> Delegation | None:
        t = db.delegations
        with self._engine.connect() as conn:
            row = conn.execute(
                select(t).where(t.c.user_id == user_id, t.c.agent_id == agent_id)
            ).first()
        return _delegation(row._mapping) if row else None

    async def delete(self, user_id: str, agent_id: str) -> bool:
        return await db.run(self._delete, user_id, agent_id)

    def _delete(self, user_id: str, agent_id: str) -> bool:
        t = db.delegations
        with self._engine.begin() as conn:
            res = conn.execute(delete(t).where(t.c.user_id == user_id, t.c.agent_id == agent_id))
            return bool(res.rowcount)

    async def list(self, user_id: str) -> builtins.list[Delegation]:
        return await db.run(self._list, user_id)

    def _list(self, user_id: str) -> builtins.list[Delegation]:
        t = db.delegations
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(t).where(t.c.user_id == user_id).order_by(t.c.agent_id)
            ).all()
        return [_delegation(r._mapping) for r in rows]


def _delegation(row: Any) -> Delegation:
    return Delegation(
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        capabilities=tuple(json.loads(row["capabilities"])),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )
