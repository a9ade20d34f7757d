"""Identity: agents, their broker tokens, and role grants (SQL storage).

Tokens are 256-bit random values shown once; only their SHA-256 is stored (a salted slow
hash buys nothing for values with this much entropy, and lookup stays one indexed read).
The broker accepts only tokens it issued (or the configured bootstrap admin token).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from broker import db
from broker.errors import Conflict
from broker.ports import AgentRecord, Grant

TOKEN_PREFIX = "cbk_"  # noqa: S105 (a prefix, not a secret)


def new_token() -> tuple[str, str]:
    """(token_id, token). The token embeds no agent data; the id is for listing and revoking."""
    token_id = "tok_" + secrets.token_hex(8)
    return token_id, TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SqlDirectory:
    """Agents, tokens and grants in the broker's database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- agents ---------------------------------------------------------------------------

    async def create_agent(
        self, agent_id: str, name: str, attributes: Mapping[str, str]
    ) -> AgentRecord:
        return await db.run(self._create_agent, agent_id, name, dict(attributes))

    def _create_agent(self, agent_id: str, name: str, attributes: dict[str, str]) -> AgentRecord:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(db.agents).values(
                        id=agent_id,
                        name=name,
                        attributes=db.dumps(attributes),
                        disabled=False,
                        created_at=db.utcnow(),
                    )
                )
        except IntegrityError:
            raise Conflict(f"agent {agent_id!r} already exists") from None
        record = self._get_agent(agent_id)
        assert record is not None
        return record

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        return await db.run(self._get_agent, agent_id)

    def _get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(db.agents).where(db.agents.c.id == agent_id)).first()
            if row is None:
                return None
            return self._record(conn, row._mapping)

    async def list_agents(self) -> list[AgentRecord]:
        return await db.run(self._list_agents)

    def _list_agents(self) -> list[AgentRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(db.agents).order_by(db.agents.c.id)).all()
            return [self._record(conn, r._mapping) for r in rows]

    def _record(self, conn: Any, row: Any) -> AgentRecord:
        subject = f"agent:{row['id']}"
        roles = conn.execute(
            select(db.role_grants.c.role).where(db.role_grants.c.subject == subject)
        ).scalars()
        toks = conn.execute(
            select(db.tokens.c.id, db.tokens.c.created_at, db.tokens.c.revoked_at)
            .where(db.tokens.c.agent_id == row["id"])
            .order_by(db.tokens.c.created_at)
        ).all()
        return AgentRecord(
            id=row["id"],
            name=row["name"],
            roles=tuple(sorted(r.removeprefix("role:") for r in roles)),
            attributes=json.loads(row["attributes"]),
            disabled=bool(row["disabled"]),
            created_at=row["created_at"],
            tokens=tuple(
                {"id": t.id, "created_at": t.created_at, "revoked_at": t.revoked_at} for t in toks
            ),
        )

    async def set_disabled(self, agent_id: str, disabled: bool) -> bool:
        return await db.run(self._set_disabled, agent_id, disabled)

    def _set_disabled(self, agent_id: str, disabled: bool) -> bool:
        with self._engine.begin() as conn:
            res = conn.execute(
                update(db.agents).where(db.agents.c.id == agent_id).values(disabled=disabled)
            )
            return bool(res.rowcount)

    # -- tokens ---------------------------------------------------------------------------

    async def issue_token(self, agent_id: str) -> tuple[str, str]:
        token_id, token = new_token()
        await db.run(self._store_token, agent_id, token_id, hash_token(token))
        return token_id, token

    async def set_fixed_token(self, agent_id: str, token_id: str, token: str) -> None:
        await db.run(self._store_token, agent_id, token_id, hash_token(token))

    def _store_token(self, agent_id: str, token_id: str, token_hash: str) -> None:
        with self._engine.begin() as conn:
            # Replacing a fixed token (e.g. a new bootstrap token) retires the old hash.
            conn.execute(delete(db.tokens).where(db.tokens.c.id == token_id))
            conn.execute(delete(db.tokens).where(db.tokens.c.token_hash == token_hash))
            conn.execute(
                insert(db.tokens).values(
                    id=token_id, agent_id=agent_id, token_hash=token_hash, created_at=db.utcnow()
                )
            )

    async def revoke_token(self, agent_id: str, token_id: str) -> bool:
        return bool(await db.run(self._revoke, agent_id, token_id))

    async def revoke_all_tokens(self, agent_id: str) -> int:
        return await db.run(self._revoke, agent_id, None)

    def _revoke(self, agent_id: str, token_id: str | None) -> int:
        stmt = update(db.tokens).where(
            db.tokens.c.agent_id == agent_id, db.tokens.c.revoked_at.is_(None)
        )
        if token_id is not None:
            stmt = stmt.where(db.tokens.c.id == token_id)
        with self._engine.begin() as conn:
            return int(conn.execute(stmt.values(revoked_at=db.utcnow())).rowcount)

    async def find_token(self, token: str) -> tuple[AgentRecord, str] | None:
        return await db.run(self._find_token, hash_token(token))

    def _find_token(self, token_hash: str) -> tuple[AgentRecord, str] | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(db.tokens.c.id, db.tokens.c.agent_id, db.tokens.c.token_hash).where(
                    db.tokens.c.token_hash == token_hash, db.tokens.c.revoked_at.is_(None)
                )
            ).first()
            # The index finds the row; the constant-time compare keeps the check honest.
            if row is None or not secrets.compare_digest(row.token_hash, token_hash):
                return None
            agent = conn.execute(select(db.agents).where(db.agents.c.id == row.agent_id)).first()
            if agent is None or agent.disabled:
                return None
            return self._record(conn, agent._mapping), row.id

    # -- grants ---------------------------------------------------------------------------

    async def grant(self, subject: str, role: str) -> bool:
        return await db.run(self._grant, subject, role)

    def _grant(self, subject: str, role: str) -> bool:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(db.role_grants).values(
                        subject=subject, role=role, created_at=db.utcnow()
                    )
                )
            return True
        except IntegrityError:
            return False  # already granted: granting is idempotent

    async def revoke(self, subject: str, role: str) -> bool:
        return await db.run(self._revoke_grant, subject, role)

    def _revoke_grant(self, subject: str, role: str) -> bool:
        with self._engine.begin() as conn:
            res = conn.execute(
                delete(db.role_grants).where(
                    db.role_grants.c.subject == subject, db.role_grants.c.role == role
                )
            )
            return bool(res.rowcount)

    async def grants(self) -> list[Grant]:
        return await db.run(self._grants)

    def _grants(self) -> list[Grant]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(db.role_grants.c.subject, db.role_grants.c.role)).all()
            return [Grant(subject=r.subject, role=r.role) for r in rows]
