"""Idempotency keys: the stored first answer of each (agent, capability, Idempotency-Key).

Semantics follow the IETF "The Idempotency-Key HTTP Header Field" draft and Stripe:

- the key is scoped to the agent and the capability, and remembers a fingerprint (SHA-256 of
  the canonical JSON of the arguments) of the call that first used it;
- the first call claims the key by inserting its row; the primary key makes the claim atomic
  across requests and broker instances sharing the database, so exactly one call executes;
- a repeat while that call runs is refused (409), a repeat with other arguments is refused
  (422), a repeat after it ended replays the stored answer (success or upstream error);
- a call refused before anything was executed releases the key (nothing is stored);
- rows of ended calls expire after the retention period (a setting) and are then forgotten;
  a row in flight does not expire while its call can still be running (``STALE_AFTER``).

A broker killed mid-call leaves its claims ``in_flight``; at start the owning instance
(``owner`` = its audit chain id) resolves them: released when the call never started, else
stored as ``outcome_unknown``, because whether the upstream acted cannot be known.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from broker import db, errors
from broker.ports import Claim, StoredAnswer, stamp

STALE_AFTER = timedelta(hours=1)  # a call's deadline is at most 300 s; this is far beyond it


class SqlIdempotencyStore:
    def __init__(self, engine: Engine, *, owner: str, retention: float) -> None:
        self._engine = engine
        self._owner = owner
        self._retention = timedelta(seconds=retention)

    async def claim(self, agent_id: str, capability: str, key: str, fp: str, call_id: str) -> Claim:
        """Claim the key for this call, or return the stored answer; 409/422 otherwise."""
        return await db.run(self._claim, agent_id, capability, key, fp, call_id)

    def _claim(self, agent_id: str, capability: str, key: str, fp: str, call_id: str) -> Claim:
        now = datetime.now(UTC)
        where = self._where(agent_id, capability, key)
        t = db.idempotency_keys
        try:
            # One transaction (one commit) on the call path: forget this key if it expired,
            # then claim it. A conflict rolls both back; the key was then live anyway.
            with self._engine.begin() as conn:
                # A key in flight still guards its running call, however long that outlives
                # the retention; only one older than any call's deadline (an instance that
                # never came back to resolve it) expires like an ended call's.
                stale = t.c.created_at < stamp(now - STALE_AFTER)
                ended_or_stale = or_(t.c.state == "done", stale)
                conn.execute(delete(t).where(where, ended_or_stale, t.c.expires_at < stamp(now)))
                conn.execute(
                    insert(t).values(
                        agent_id=agent_id,
                        capability=capability,
                        key=key,
                        owner=self._owner,
                        fingerprint=fp,
                        call_id=call_id,
                        state="in_flight",
                        created_at=stamp(now),
                        expires_at=stamp(now + self._retention),
                    )
                )
            return Claim(agent_id, capability, key)
        except IntegrityError:
            pass  # the key is taken: look at who holds it
        with self._engine.connect() as conn:
            row = conn.execute(select(t).where(where)).first()
        if row is None:  # expired and deleted between the two statements: the caller retries
            raise errors.IdempotencyInFlight(headers={"Retry-After": "1"})
        if row.fingerprint != fp:
            raise errors.IdempotencyKeyReused(
                "this Idempotency-Key was first used with other arguments; use a new key"
            )
        if row.state != "done":
            raise errors.IdempotencyInFlight(
                f"the call {row.call_id} with this Idempotency-Key is still running",
                headers={"Retry-After": "1"},
            )
        answer = StoredAnswer(row.call_id, row.http_status, json.loads(row.response))
        return Claim(agent_id, capability, key, answer)

    async def complete(self, claim: Claim, http_status: int, body: dict[str, Any]) -> None:
        """Store the answer every later repeat replays."""
        await db.run(self._complete, claim, http_status, db.dumps(body))

    def _complete(self, claim: Claim, http_status: int, body: str) -> None:
        t = db.idempotency_keys
        with self._engine.begin() as conn:
            conn.execute(
                update(t)
                .where(self._where(claim.agent_id, claim.capability, claim.key))
                .values(state="done", http_status=http_status, response=body)
            )

    async def release(self, claim: Claim) -> None:
        """Forget the key: the call was refused before anything was executed."""
        await db.run(self._release, claim)

    def _release(self, claim: Claim) -> None:
        t = db.idempotency_keys
        with self._engine.begin() as conn:
            conn.execute(
                delete(t).where(
                    self._where(claim.agent_id, claim.capability, claim.key),
                    t.c.state == "in_flight",
                )
            )

    async def dangling(self) -> list[Claim]:
        """Keys this instance left in flight (a crash): to be resolved at start."""
        return await db.run(self._dangling)

    def _dangling(self) -> list[Claim]:
        t = db.idempotency_keys
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(t.c.agent_id, t.c.capability, t.c.key, t.c.call_id).where(
                    t.c.owner == self._owner, t.c.state == "in_flight"
                )
            ).all()
        return [
            Claim(r.agent_id, r.capability, r.key, StoredAnswer(r.call_id, 0, {})) for r in rows
        ]

    @staticmethod
    def _where(agent_id: str, capability: str, key: str) -> Any:
        t = db.idempotency_keys
        return and_(t.c.agent_id == agent_id, t.c.capability == capability, t.c.key == key)
