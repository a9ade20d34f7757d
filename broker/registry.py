"""The capability registry: manifests stored in the database, with versions.

Replacing a capability raises its version to one past the higher of the stored and the
submitted version, so a version number always names exactly one manifest.
"""

from __future__ import annotations

import builtins
import json

from sqlalchemy import Engine, delete, insert, select, update

from broker import db
from broker.cache import LookupCache
from broker.capabilities import Capability

CACHE_MAX = 10_000


class SqlCapabilityRegistry:
    """``cache_ttl``: how long a looked-up manifest is reused on the invoke path. Changes made
    through this instance apply at once; other instances sharing the database see them within
    the TTL."""

    def __init__(self, engine: Engine, *, cache_ttl: float = 1.0) -> None:
        self._engine = engine
        # Unknown names are kept too (as None): CACHE_MAX bounds them.
        self._cache: LookupCache[str, Capability | None] = LookupCache(
            self._lookup, ttl=cache_ttl, max_size=CACHE_MAX
        )

    async def put(self, cap: Capability) -> Capability:
        try:
            return await db.run(self._put, cap)
        finally:
            self._forget(cap.name)

    def _put(self, cap: Capability) -> Capability:
        table = db.capabilities
        with self._engine.begin() as conn:
            row = conn.execute(
                select(table.c.version, table.c.manifest).where(table.c.name == cap.name)
            ).first()
            if row is None:
                conn.execute(
                    insert(table).values(
                        name=cap.name,
                        version=cap.version,
                        manifest=_encode(cap),
                        created_at=db.utcnow(),
                        updated_at=db.utcnow(),
                    )
                )
                return cap
            if json.loads(row.manifest) == _as_dict(
                cap.model_copy(update={"version": row.version})
            ):
                return cap.model_copy(update={"version": row.version})  # unchanged: no new version
            stored = cap.model_copy(update={"version": max(row.version + 1, cap.version)})
            conn.execute(
                update(table)
                .where(table.c.name == cap.name)
                .values(version=stored.version, manifest=_encode(stored), updated_at=db.utcnow())
            )
            return stored

    async def get(self, name: str) -> Capability | None:
        return await self._cache.get(name)

    async def _lookup(self, name: str) -> Capability | None:
        return await db.run(self._get, name)

    def _forget(self, name: str) -> None:
        self._cache.forget(name)

    def _get(self, name: str) -> Capability | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(db.capabilities.c.manifest).where(db.capabilities.c.name == name)
            ).first()
        return None if row is None else Capability.model_validate_json(row.manifest)

    async def list(self) -> builtins.list[Capability]:
        return await db.run(self._list)

    def _list(self) -> builtins.list[Capability]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(db.capabilities.c.manifest).order_by(db.capabilities.c.name)
            ).all()
        return [Capability.model_validate_json(r.manifest) for r in rows]

    async def delete(self, name: str) -> bool:
        try:
            return await db.run(self._delete, name)
        finally:
            self._forget(name)

    def _delete(self, name: str) -> bool:
        with self._engine.begin() as conn:
            res = conn.execute(delete(db.capabilities).where(db.capabilities.c.name == name))
            return bool(res.rowcount)


def _as_dict(cap: Capability) -> dict[str, object]:
    return cap.model_dump(mode="json", by_alias=True)


def _encode(cap: Capability) -> str:
    return db.dumps(_as_dict(cap))
