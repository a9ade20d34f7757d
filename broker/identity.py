"""Identity: agents, their broker tokens, and role grants (SQL storage).

Tokens are 256-bit random values shown once; only their SHA-256 is stored (a salted slow
hash buys nothing for values with this much entropy, and lookup stays one indexed read).
The broker accepts only tokens it issued (or the configured bootstrap admin token).

Token lookups on the invoke path are cached for ``token_cache_ttl`` (1 s by default): a change
made through this instance (revoke, disable, a new fixed token) empties the cache at once;
other instances sharing the database stop accepting a revoked token within the TTL.
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
from broker.cache import LookupCache
from broker.errors import Conflict
from broker.ports import AgentRecord, Grant

TOKEN_CACHE_MAX = 10_000
TOKEN_PREFIX = "cbk_"  # noqa: S105 (a prefix, not a secret)


def new_token() -> tuple[str, str]:
    """(token_id, token). The token embeds no agent data; the id is for listing and revoking."""
    token_id = "tok_" + secrets.token_hex(8)
    return token_id, TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SqlDirectory:
    """Agents, tokens and grants in the broker's database."""

    def __init__(self, engine: Engine, *, token_cache_ttl: float = 1.0) -> None:
        self._engine = engine
        # Only live tokens are kept: random guesses must not fill the cache.
        self._tokens: LookupCache[str, tuple[AgentRecord, str] | None] = LookupCache(
            self._lookup_token, ttl=token_cache_ttl, max_size=TOKEN_CACHE_MAX,
            keep=lambda found: found is not None,
        )  # fmt: skip

    def _changed(self) -> None:
        self._tokens.forget()

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
        try:
            return await db.run(self._set_disabled, agent_id, disabled)
        finally:
            self._changed()

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
        try:
            await db.run(self._store_token, agent_id, token_id, hash_token(token))
        finally:
            self._changed()

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
        try:
            return bool(await db.run(self._revoke, agent_id, token_id))
        finally:
            self._changed()

    async def revoke_all_tokens(self, agent_id: str) -> int:
        try:
            return await db.run(self._revoke, agent_id, None)
        finally:
            self._changed()

    def _revoke(self, agent_id: str, token_id: str | None) -> int:
        stmt = update(db.tokens).where(
            db.tokens.c.agent_id == agent_id, db.tokens.c.revoked_at.is_(None)
        )
        if token_id is not None:
            stmt = stmt.where(db.tokens.c.id == token_id)
        with self._engine.begin() as conn:
            return int(conn.execute(stmt.values(revoked_at=db.utcnow())).rowcount)

    async def find_token(self, token: str) -> tuple[AgentRecord, str] | None:
        """The live token's agent (its token list left empty) and token id, or None."""
        return await self._tokens.get(hash_token(token))

    async def _lookup_token(self, token_hash: str) -> tuple[AgentRecord, str] | None:
        return await db.run(self._find_token, token_hash)

    def _find_token(self, token_hash: str) -> tuple[AgentRecord, str] | None:
        t, a = db.tokens, db.agents
        with self._engine.connect() as conn:
            row = conn.execute(
                select(t.c.id, t.c.token_hash, a.c.id.label("agent_id"), a.c.name, a.c.attributes)
                .join(a, a.c.id == t.c.agent_id)
                .where(t.c.token_hash == token_hash, t.c.revoked_at.is_(None), ~a.c.disabled)
            ).first()
        # The index finds the row; the constant-time compare keeps the check honest.
        if row is None or not secrets.compare_digest(row.token_hash, token_hash):
            return None
        attributes = json.loads(row.attributes)
        agent = AgentRecord(row.agent_id, row.name, (), attributes, False, "", ())
        return agent, row.id

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
