"""Budgets: spend limits per agent and per task (``X-Broker-Task``), per UTC period (SQL storage).

A call holds its bounded cost (the manifest's fixed ``limits.cost``, or a metered cost's
``reserve``) against every budget that applies before it runs, and is settled to what it
actually cost afterwards (refunded when nothing ran). Correctness across threads and broker
instances comes from the database, not from process memory:

- spend lives in one ``budget_usage`` row per budget and period; a reservation is the
  conditional ``UPDATE ... SET reserved = reserved + :a WHERE spent + reserved + :a <= :limit``
  and counts only if it changed the row; the agent's and the task's reservations happen in one
  transaction, so a call holds both or none (always agent first: one lock order, no deadlock);
- every open reservation has a ``budget_reservations`` row by call id, tagged with the broker
  instance (its audit chain id). At start, ``recover_reservations`` settles what a crash left:
  a call whose ``call.started`` is on record may have reached the upstream, so it is charged
  its whole reservation; a call without one ran nothing (invariant 1) and is refunded. Rows of
  other instances are recovered the same way once they are older than ``STALE_AFTER`` (far
  beyond any call's deadline), so a broker that never comes back leaks nothing forever.

On SQLite the write transactions start with ``BEGIN IMMEDIATE`` (the write lock is taken
first, waiting up to the busy timeout), so concurrent reservations queue instead of failing.

Most calls that cost something have no budget to hold against. Whether any budget applies to
an (agent, task) pair is looked up once per ``cache_ttl`` (1 s; a lookup in a worker thread
cost ~0.6 ms of every call), so a budget set through another instance starts holding calls
here within that TTL; one set or deleted through this instance applies at once. A pair that
has a budget still goes to the database for every reservation, which is what keeps spend exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from sqlalchemy import Connection, Engine, Table, and_, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from broker import db
from broker.cache import LookupCache
from broker.errors import BudgetExhausted
from broker.models import BudgetPeriod
from broker.ports import AuditLog, AuditQuery, BudgetHold, BudgetView, stamp

log = logging.getLogger("broker.budgets")

PERIODS: tuple[str, ...] = get_args(BudgetPeriod)
SCOPES = ("agent", "task")  # the order reservations take their locks in
STALE_AFTER = timedelta(hours=1)  # a call's deadline is at most 300 s; this is far beyond it
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BUDGETED_CACHE_MAX = 10_000  # (agent, task) pairs: task ids come from callers

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def period_start(period: str, now: datetime) -> datetime:
    """The UTC boundary the current period began at (weeks begin on Monday, ISO 8601)."""
    now = now.astimezone(UTC)
    if period == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    if period == "total":
        return EPOCH
    raise ValueError(f"unknown budget period {period!r}")


class SqlBudgets:
    """The Budgets port on the broker's database (SQLite or PostgreSQL, same statements)."""

    def __init__(
        self, engine: Engine, *, instance: str, clock: Clock = utc_now, cache_ttl: float = 1.0
    ) -> None:
        self._engine = engine
        self._instance = instance
        self._clock = clock  # injectable so tests can cross a period boundary without sleeping
        self._sqlite = engine.dialect.name == "sqlite"
        self._budgeted: LookupCache[tuple[str, str | None], bool] = LookupCache(
            self._lookup_budgeted, ttl=cache_ttl, max_size=BUDGETED_CACHE_MAX
        )

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            if self._sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    def _upsert(self, conn: Connection, table: Table, values: dict[str, Any], update: bool) -> None:
        """INSERT, or on a primary key conflict update the row (``update``) or leave it."""
        dialect = sqlite if self._sqlite else postgresql
        stmt = dialect.insert(table).values(**values)
        keys = [c.name for c in table.primary_key.columns]
        if update:
            changed = {k: v for k, v in values.items() if k not in keys and k != "created_at"}
            conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=changed))
        else:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=keys))

    # -- administration ---------------------------------------------------------------------

    async def put(self, scope: str, subject: str, limit: float, period: str) -> BudgetView:
        try:
            return await db.run(self._put, scope, subject, limit, period)
        finally:
            self._budgeted.forget()

    def _put(self, scope: str, subject: str, limit: float, period: str) -> BudgetView:
        period_start(period, EPOCH)  # refuses an unknown period before anything is stored
        now = db.utcnow()
        values = dict(scope=scope, subject=subject, limit_value=limit, period=period,
                      created_at=now, updated_at=now)  # fmt: skip
        with self._write() as conn:
            self._upsert(conn, db.budgets, values, update=True)
        view = self._get(scope, subject)
        assert view is not None
        return view

    async def get(self, scope: str, subject: str) -> BudgetView | None:
        return await db.run(self._get, scope, subject)

    def _get(self, scope: str, subject: str) -> BudgetView | None:
        b, u = db.budgets, db.budget_usage
        with self._engine.connect() as conn:
            row = conn.execute(
                select(b).where(and_(b.c.scope == scope, b.c.subject == subject))
            ).first()
            if row is None:
                return None
            start = stamp(period_start(row.period, self._clock()))
            usage = conn.execute(
                select(u.c.spent, u.c.reserved).where(_usage_key(scope, subject, row.period, start))
            ).first()
        spent, reserved = (usage.spent, usage.reserved) if usage else (0.0, 0.0)
        return BudgetView(scope, subject, row.limit_value, row.period, spent, reserved, start)

    async def delete(self, scope: str, subject: str) -> bool:
        try:
            return await db.run(self._delete, scope, subject)
        finally:
            self._budgeted.forget()

    def _delete(self, scope: str, subject: str) -> bool:
        b = db.budgets
        with self._write() as conn:
            gone = conn.execute(delete(b).where(and_(b.c.scope == scope, b.c.subject == subject)))
        return gone.rowcount > 0

    # -- calls ------------------------------------------------------------------------------

    async def reserve(
        self, call_id: str, agent_id: str, task_id: str | None, amount: float
    ) -> BudgetHold:
        if amount <= 0:
            return BudgetHold(call_id, 0.0)  # a free call is never refused for budget
        if not await self._budgeted.get((agent_id, task_id)):
            return BudgetHold(call_id, 0.0)  # no budget applies: nothing to hold, no write
        # The transaction runs on in its thread if the caller is cancelled (kill switch,
        # shutdown): then the hold is refunded once it lands instead of staying held until
        # the next start.
        task = asyncio.ensure_future(
            db.run(self._reserve, call_id, _subjects(agent_id, task_id), amount)
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.settle(await task, None)
            raise

    async def _lookup_budgeted(self, key: tuple[str, str | None]) -> bool:
        return await db.run(self._any_budget, _subjects(*key))

    def _any_budget(self, subjects: Sequence[tuple[str, str]]) -> bool:
        found = select(db.budgets.c.scope).where(_budgets_of(subjects)).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(found).first() is not None

    def _reserve(
        self, call_id: str, subjects: Sequence[tuple[str, str]], amount: float
    ) -> BudgetHold:
        b, now = db.budgets, self._clock()
        with self._engine.connect() as conn:
            rows = conn.execute(select(b).where(_budgets_of(subjects)))
            found = {(r.scope, r.subject): r for r in rows}
        if not found:
            return BudgetHold(call_id, 0.0)  # no budget applies: nothing to hold, no write
        held: list[str] = []
        with self._write() as conn:
            for scope, subject in subjects:  # agent first: the one lock order
                row = found.get((scope, subject))
                if row is not None:
                    self._hold(conn, call_id, row, amount, now)
                    held.append(f"{scope}:{subject}")
        # Raising inside the transaction rolled back every hold taken before: both or none.
        return BudgetHold(call_id, amount, tuple(held))

    def _hold(self, conn: Connection, call_id: str, row: Any, amount: float, now: datetime) -> None:
        u = db.budget_usage
        start = stamp(period_start(row.period, now))
        key = dict(scope=row.scope, subject=row.subject, period=row.period, period_start=start)
        self._upsert(conn, u, {**key, "spent": 0.0, "reserved": 0.0}, update=False)
        where = _usage_key(row.scope, row.subject, row.period, start)
        fits = u.c.spent + u.c.reserved + amount <= row.limit_value
        taken = conn.execute(
            update(u).where(and_(where, fits)).values(reserved=u.c.reserved + amount)
        )
        if taken.rowcount != 1:
            usage = conn.execute(select(u.c.spent, u.c.reserved).where(where)).one()
            raise BudgetExhausted(
                f"the {row.scope} budget of {row.subject!r} is exhausted for this {row.period}: "
                f"{_num(usage.spent)} spent and {_num(usage.reserved)} reserved of "
                f"{_num(row.limit_value)}; this call needs {_num(amount)}"
            )
        held = dict(call_id=call_id, amount=amount, instance=self._instance, created_at=stamp(now))
        self._upsert(conn, db.budget_reservations, {**key, **held}, update=False)

    async def settle(self, hold: BudgetHold, cost: float | None) -> None:
        if hold.budgets:
            await db.run(self._settle, hold.call_id, cost)

    def _settle(self, call_id: str, cost: float | None) -> None:
        r, u = db.budget_reservations, db.budget_usage
        with self._write() as conn:
            # Taking the rows with DELETE ... RETURNING makes settling once-only: a concurrent
            # settle of the same call (two instances recovering it) finds nothing left.
            taken = conn.execute(delete(r).where(r.c.call_id == call_id).returning(*r.c)).all()
            for row in sorted(taken, key=lambda t: SCOPES.index(t.scope)):  # the lock order
                conn.execute(
                    update(u)
                    .where(_usage_key(row.scope, row.subject, row.period, row.period_start))
                    .values(reserved=u.c.reserved - row.amount, spent=u.c.spent + (cost or 0.0))
                )

    # -- crash recovery ---------------------------------------------------------------------

    async def leftovers(self) -> list[tuple[str, float]]:
        """(call id, amount) of reservations this instance left open, or anyone's stale ones."""
        return await db.run(self._leftovers)

    def _leftovers(self) -> list[tuple[str, float]]:
        r = db.budget_reservations
        stale = stamp(self._clock() - STALE_AFTER)
        mine_or_stale = or_(r.c.instance == self._instance, r.c.created_at < stale)
        with self._engine.connect() as conn:
            rows = conn.execute(select(r.c.call_id, r.c.amount).where(mine_or_stale)).all()
        return sorted({(row.call_id, row.amount) for row in rows})

    async def settle_call(self, call_id: str, cost: float | None) -> None:
        await db.run(self._settle, call_id, cost)


async def recover_reservations(budgets: SqlBudgets, audit: AuditLog) -> None:
    """Settle reservations a crash left open (see the module docstring); runs at start."""
    charged = refunded = 0
    for call_id, amount in await budgets.leftovers():
        started, _ = await audit.query(AuditQuery(call_id=call_id, kind="call.started", limit=1))
        await budgets.settle_call(call_id, amount if started else None)
        charged, refunded = (charged + 1, refunded) if started else (charged, refunded + 1)
    if charged or refunded:
        log.warning(
            "budget reservations left by a crash: %d charged (the call had started), "
            "%d refunded (nothing ran)",
            charged,
            refunded,
        )


def _subjects(agent_id: str, task_id: str | None) -> list[tuple[str, str]]:
    """The budgets a call may hold against, in lock order (agent first)."""
    return [("agent", agent_id)] + ([("task", task_id)] if task_id else [])


def _budgets_of(subjects: Sequence[tuple[str, str]]) -> Any:
    """WHERE: the budget rows of these (scope, subject) pairs."""
    b = db.budgets
    return or_(*(and_(b.c.scope == scope, b.c.subject == subject) for scope, subject in subjects))


def _usage_key(scope: str, subject: str, period: str, start: str) -> Any:
    u = db.budget_usage
    return and_(
        u.c.scope == scope, u.c.subject == subject, u.c.period == period,
        u.c.period_start == start,
    )  # fmt: skip


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
