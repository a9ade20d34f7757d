"""The rulebook: policy rules stored in the database (Casbin loads them; see policy.py)."""

from __future__ import annotations

import builtins

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from broker import db
from broker.ports import Rule


class SqlRulebook:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def add(self, rule: Rule) -> Rule:
        return await db.run(self._add, rule)

    def _add(self, rule: Rule) -> Rule:
        # Rule ids are derived from the rule's content, so adding it again is a no-op.
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(db.policies).values(
                        id=rule.id,
                        subject=rule.subject,
                        object=rule.object,
                        action=rule.action,
                        effect=rule.effect,
                        condition=rule.condition,
                        source=rule.source,
                        created_at=db.utcnow(),
                    )
                )
        except IntegrityError:
            pass
        return rule

    async def delete(self, rule_id: str) -> bool:
        return await db.run(self._delete, rule_id)

    def _delete(self, rule_id: str) -> bool:
        with self._engine.begin() as conn:
            return bool(
                conn.execute(delete(db.policies).where(db.policies.c.id == rule_id)).rowcount
            )

    async def list(self) -> builtins.list[Rule]:
        return await db.run(self._list)

    def _list(self) -> builtins.list[Rule]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(db.policies).order_by(db.policies.c.created_at)).all()
        return [
            Rule(
                id=r.id,
                subject=r.subject,
                object=r.object,
                action=r.action,
                effect=r.effect,
                condition=r.condition,
                source=r.source,
            )
            for r in rows
        ]
