"""The audit log: the only writer of audit records; chain, checkpoints, recovery, query, verify.

One writer thread per broker instance owns one chain (``chain_id``). Callers hand it records
and wait; it takes everything queued (up to ``max_batch``), links the records into the hash
chain (``chain.py``), inserts them in one transaction and commits (group commit: a batch never
waits for more records, so a lone call pays one commit and a busy broker shares commits).
A caller's ``append`` returns only after its record is durable; if that does not happen within
``timeout`` it raises ``AuditUnavailable`` and the record is dropped if not yet written (or
followed by ``call.abandoned`` if it landed late). Signed checkpoints of the chain head ride in
the transaction of the batch that makes them due (every ``checkpoint_every`` records or
``checkpoint_interval`` seconds) and are appended to a file outside the database after it
commits; an idle writer checkpoints on its own.

A caller that says it is ``alone`` (no other call in flight) on SQLite writes its record itself,
on its own thread, when the writer is idle: the two thread hand-overs of the queue (to the
writer and back to the event loop) cost ~0.08 ms an append, a third of a lone call's wait. The
chain lock keeps one writer of the head at a time; a busy database (or a due checkpoint, or any
failure) sends the record down the queue as usual, so failures are handled in one place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import operator
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from broker import chain, db
from broker.errors import AuditUnavailable, InvalidRequest
from broker.keyring import AuditKeys
from broker.ports import AuditEvent, AuditQuery

log = logging.getLogger("broker.audit")
MAX_LIMIT = 1000
_COLUMNS = (
    "call_id", "kind", "agent_id", "capability", "capability_version", "decision", "rule",
    "reason", "status", "upstream_status", "latency_ms", "cost", "task_id", "trace_id",
    "idempotency_key", "user_id",
)  # fmt: skip
_STORED = (*chain.HASHED_FIELDS, "hash")
# A record travels as the list of its values in HASHED_FIELDS order: chain_id, seq, event_id,
# time, the event's own fields, data, prev_hash, then the fields appended later (user_id). The
# writer fills in seq and prev_hash, hashes the list as it is (chain.values_hash leaves unset
# late fields out) and appends the hash, and the list is the row's INSERT parameters.
_DATA_AT = chain.HASHED_FIELDS.index("data")
_EVENT_FIELDS = chain.HASHED_FIELDS[4:_DATA_AT]
_LATE_FIELDS = chain.HASHED_FIELDS[chain.PREV_HASH + 1 :]
if (
    set(_EVENT_FIELDS) | set(_LATE_FIELDS) != set(_COLUMNS)
    or chain.PREV_HASH != _DATA_AT + 1
    or not _LATE_FIELDS
):
    raise RuntimeError("audit.py's record layout no longer matches chain.HASHED_FIELDS")
_event_values = operator.attrgetter(*_EVENT_FIELDS)


def _late_values(event: AuditEvent) -> list[Any]:
    return [getattr(event, name) for name in _LATE_FIELDS]


_LATENCY, _COST = chain.HASHED_FIELDS.index("latency_ms"), chain.HASHED_FIELDS.index("cost")
_dumps = chain.compact_encoder(sort_keys=True, allow_nan=True)  # the same text as db.dumps
# Rows per INSERT statement: up to 512 (24 parameters a row stay under SQLite's 32,766
# variables), in multiples of 16 and then the rest, so a batch takes one or two statements
# out of 47 texts the driver keeps prepared (SQLite parses a 512-row statement in ~2.5 ms;
# one text per batch size would thrash its 128-statement cache).
_ROWS_PER_INSERT, _ROWS_STEP = 512, 16
_KIND = chain.HASHED_FIELDS.index("kind")
_COPY = f"COPY audit_events ({', '.join(_STORED)}) FROM STDIN"
_CP_STORED = (*chain.CHECKPOINT_FIELDS, "signature")
_STOP = object()
_WAL_CHECKPOINT = object()  # a lone writer asks the writer thread to checkpoint the WAL
INLINE_CHECKPOINT_EVERY = 100  # lone records (~9 WAL pages each) between WAL checkpoints
INLINE_WAIT = 0.002  # seconds a lone writer waits for the chain lock before it queues
INLINE_SLOW = 0.05  # seconds: a lone commit slower than this pauses lone writes ...
INLINE_PAUSE = 60.0  # ... for this long
# Event ids need uniqueness, not secrecy. os.urandom is a syscall that drops the GIL, and on
# the request path every reacquisition contends with the writer thread (measured: ~40 us).
_ids = random.Random(os.urandom(32))  # noqa: S311


@dataclass(slots=True)
class _Item:
    values: list[Any]  # HASHED_FIELDS order; seq and prev_hash are set by the writer
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[int] | None
    deadline: float = 0.0  # loop.time() when the caller stops waiting
    gave_up: bool = False  # the caller stopped waiting (it answered 503)


@dataclass
class _Head:
    seq: int = 0
    hash: str = chain.GENESIS
    checkpointed_seq: int = 0
    checkpointed_at: float = field(default_factory=time.monotonic)


class SqlAuditLog:
    def __init__(
        self,
        engine: Engine,
        *,
        keys: AuditKeys,
        checkpoint_dir: Path,
        chain_id: str = "main",
        timeout: float = 5.0,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        max_batch: int = 4000,
        inline: bool = True,
    ) -> None:
        self._engine = engine
        # Only SQLite: its commit is a local write and fsync; PostgreSQL's is a round trip
        # that may hang, which must never hold the event loop.
        self._inline = inline and engine.dialect.name == "sqlite"
        self._inline_raw: Any = None  # the inline path's own connection (busy_timeout 0)
        self._inline_since_checkpoint = 0
        self._closing = False
        self._inline_off_until = 0.0  # monotonic: lone writes pause after a slow commit
        self._chain_lock = threading.Lock()  # held by whoever is moving the chain head
        self.keys = keys
        self.chain_id = chain_id
        self._checkpoint_file = checkpoint_dir / f"{chain_id}.jsonl"
        self._checkpoint_dir = checkpoint_dir
        self._timeout = timeout
        self._every, self._interval, self._max_batch = (
            checkpoint_every, checkpoint_interval, max_batch)  # fmt: skip
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._head = _Head()
        self._healthy = True
        self._thread: threading.Thread | None = None
        self._running = False  # the writer thread is alive (cheaper to ask than is_alive())
        self._sql_cache: dict[int, str] = {}
        self._mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._copy = engine.dialect.driver == "psycopg"  # PostgreSQL through psycopg 3
        self._raw: Any = None  # the writer thread's own DBAPI connection
        self._pending: dict[asyncio.AbstractEventLoop, collections.deque[_Item]] = {}
        self._watchdogs: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> int:
        """Load the chain head, start the writer, and close calls a crash left open.

        Returns how many calls were recorded as ``call.abandoned``.
        """
        await db.run(self._load_head, error=AuditUnavailable)
        if self._inline:
            self._inline_raw = await db.run(self._inline_connection, error=AuditUnavailable)
        self._thread = threading.Thread(
            target=self._run, name=f"audit-{self.chain_id}", daemon=True
        )
        self._running = True
        self._thread.start()
        dangling = await db.run(self._dangling_calls, error=AuditUnavailable)
        for row in dangling:
            await self.append(AuditEvent(
                kind="call.abandoned", call_id=row["call_id"], agent_id=row["agent_id"],
                capability=row["capability"], capability_version=row["capability_version"],
                task_id=row["task_id"], user_id=row["user_id"], reason="outcome_unknown",
                detail={"why": "the broker stopped after call.started; the outcome is unknown"},
            ))  # fmt: skip
        return len(dangling)

    async def close(self) -> None:
        """Stop the writer after it wrote what is queued, then sign the head."""
        if self._thread is None:
            return
        # No lone write starts from here on (checked under the chain lock, which the writer
        # takes to sign its last head): nothing may land after that head.
        self._closing = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None
        raw = await asyncio.to_thread(self._take_inline_connection)  # the lock, off the loop
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.close()

    def _take_inline_connection(self) -> Any:
        with self._chain_lock:
            raw, self._inline_raw = self._inline_raw, None
        return raw

    def _inline_connection(self) -> Any:
        raw = self._engine.raw_connection()
        # Out of the pool for good: its settings must never reach another user of the engine.
        raw.detach()
        cur = raw.cursor()
        # A locked database must not hold the event loop: give up at once and queue.
        cur.execute("PRAGMA busy_timeout=0")
        # WAL checkpoints (a write and fsync of the database file) run on the writer thread,
        # asked for every INLINE_CHECKPOINT_EVERY lone records (_after_inline).
        cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()
        return raw

    def _load_head(self) -> None:
        t = db.audit_events
        with self._engine.connect() as conn:
            row = conn.execute(
                select(t.c.seq, t.c.hash).where(t.c.chain_id == self.chain_id)
                .order_by(t.c.seq.desc()).limit(1)
            ).first()  # fmt: skip
            cp = conn.execute(
                select(db.audit_checkpoints.c.seq)
                .where(db.audit_checkpoints.c.chain_id == self.chain_id)
                .order_by(db.audit_checkpoints.c.seq.desc()).limit(1)
            ).scalar()  # fmt: skip
        self._head = _Head(seq=row.seq, hash=row.hash) if row else _Head()
        self._head.checkpointed_seq = int(cp or 0)

    def _dangling_calls(self) -> list[dict[str, Any]]:
        t, f = db.audit_events, db.audit_events.alias("f")
        ended = (
            select(f.c.id)
            .where(f.c.call_id == t.c.call_id, f.c.kind.in_(("call.finished", "call.abandoned")))
            .exists()
        )
        stmt = (
            select(t.c.call_id, t.c.agent_id, t.c.capability, t.c.capability_version,
                   t.c.task_id, t.c.user_id)
            .where(and_(t.c.chain_id == self.chain_id, t.c.kind == "call.started", ~ended))
            .order_by(t.c.seq)
        )  # fmt: skip
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # -- appending --------------------------------------------------------------------------

    async def append(self, event: AuditEvent, *, alone: bool = False) -> int:
        if not self._running:
            raise AuditUnavailable("the audit writer is not running")
        values = self._prepare(event)
        if alone and self._inline_raw is not None:
            seq = self._write_inline(values)
            if seq is not None:
                return seq
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        item = _Item(values, loop, future, loop.time() + self._timeout)
        self._queue.put(item)
        self._watch(loop, item)
        return await future

    def _watch(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        """Give up on a record after ``timeout``. One watchdog per event loop walks the
        appends in order (they share one timeout, so deadlines are sorted), which costs far
        less than a timer per append."""
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = collections.deque()
        pending.append(item)
        if len(pending) == 1:
            task = loop.create_task(self._watchdog(loop, pending))
            self._watchdogs.add(task)
            task.add_done_callback(self._watchdogs.discard)

    async def _watchdog(
        self, loop: asyncio.AbstractEventLoop, pending: collections.deque[_Item]
    ) -> None:
        while pending:
            item = pending[0]
            if item.future is None or item.future.done():
                pending.popleft()
                continue
            if (delay := item.deadline - loop.time()) > 0:
                await asyncio.sleep(min(delay, 0.05))
                continue
            pending.popleft()
            item.gave_up = True
            item.future.set_exception(
                AuditUnavailable("the audit log did not confirm the record in time")
            )

    def _prepare(self, event: AuditEvent) -> list[Any]:
        """The record's values (HASHED_FIELDS order), built on the caller's thread."""
        args = _hmac_paths(event.args, event.sensitive, self.keys.hmac)
        data = _dumps({"args": args, "secrets": event.secrets, "detail": event.detail})
        event_id = f"{_ids.getrandbits(128):032x}"
        values = [
            self.chain_id, None, event_id, db.utcnow(), *_event_values(event), data, None,
            *_late_values(event),
        ]  # fmt: skip
        if values[_LATENCY] is not None:
            values[_LATENCY] = round(float(values[_LATENCY]), 3)
        if values[_COST] is not None:
            values[_COST] = float(values[_COST])
        return values

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._running = False
            if self._raw is not None:
                with contextlib.suppress(Exception):
                    self._raw.close()  # back to the pool
                self._raw = None

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._interval)
            except queue.Empty:
                self._checkpoint_if_idle()
                continue
            batch, stop, wal = self._drain(first)
            if batch:
                self._write(batch)
            if wal:
                self._wal_checkpoint()
            if stop:
                self._checkpoint_if_idle()
                return

    def _drain(self, first: Any) -> tuple[list[_Item], bool, bool]:
        """The records queued (up to max_batch), whether to stop, whether a WAL checkpoint
        was asked for."""
        items = [first]
        while len(items) < self._max_batch:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        stop = any(i is _STOP for i in items)
        wal = any(i is _WAL_CHECKPOINT for i in items)
        # A caller that already answered 503 must not find its call.started written later.
        return [i for i in items if isinstance(i, _Item) and not i.gave_up], stop, wal

    def _wal_checkpoint(self) -> None:
        """Copy the WAL into the database file, for the lone records (their connection does
        not checkpoint). Under the chain lock, so that no lone record is written meanwhile:
        a complete checkpoint lets the next commit start the WAL over (an overwrite, whose
        fsync costs half that of a growing file)."""
        with self._chain_lock:
            try:
                cur = self._connection().cursor()
                try:
                    cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    cur.close()
            except Exception as exc:  # the next write finds out what is wrong, if anything
                log.warning("WAL checkpoint failed (%s)", type(exc).__name__)

    def _write_inline(self, values: list[Any]) -> int | None:
        """Write one record on the caller's thread if the writer is idle; its seq, or None
        (nothing written: the caller queues it). Waits at most INLINE_WAIT for the chain lock
        (the writer may be finishing a WAL checkpoint: waiting for it here is ~0.25 ms
        shorter than the queue's two hand-overs), never for a database lock."""
        if not self._queue.empty() or not self._chain_lock.acquire(timeout=INLINE_WAIT):
            return None
        try:
            head, raw = self._head, self._inline_raw
            # Closing, or the writer's job (failures, signed checkpoints), or a slow disk.
            if raw is None or self._closing or not self._healthy:
                return None
            if self._checkpoint_due(head.seq + 1) or time.monotonic() < self._inline_off_until:
                return None
            row = [*values]  # the queue path gets the values untouched if this fails
            seq, prev = self._link([row])
            started = time.monotonic()
            if not self._commit_inline(raw, row, seq, prev):
                return None
            head.seq, head.hash = seq, prev
            self._after_inline(time.monotonic() - started)
            return seq
        finally:
            self._chain_lock.release()

    def _commit_inline(self, raw: Any, row: list[Any], seq: int, prev: str) -> bool:
        """Insert and commit one linked row; False if it is surely not stored."""
        try:
            cur = raw.cursor()
            try:
                self._insert(cur, [row])
            finally:
                cur.close()
        except Exception:
            with contextlib.suppress(Exception):
                raw.rollback()
            return False
        try:
            raw.commit()
        except Exception:
            # A failed COMMIT may still have stored the row (an I/O error is "may or may not
            # have committed"): queuing it again would put its seq in twice and fail the
            # writer's whole batch. Look before saying it is not there.
            with contextlib.suppress(Exception):
                raw.rollback()
            return self._stored_as(raw, seq, prev)
        return True

    def _stored_as(self, raw: Any, seq: int, record_hash: str) -> bool:
        try:
            cur = raw.cursor()
            try:
                cur.execute(
                    "SELECT hash FROM audit_events WHERE chain_id = ? AND seq = ?",
                    (self.chain_id, seq),
                )
                found = cur.fetchone()
            finally:
                cur.close()
        except Exception:
            return False  # unreadable too: the writer's path finds out and reloads its head
        return found is not None and found[0] == record_hash

    def _after_inline(self, took: float) -> None:
        """Every so many lone records, ask the writer for a WAL checkpoint; after a slow
        commit, queue records for a while (the disk may be failing, and a lone write holds
        the event loop while it lasts)."""
        self._inline_since_checkpoint += 1
        if self._inline_since_checkpoint >= INLINE_CHECKPOINT_EVERY:
            self._inline_since_checkpoint = 0
            self._queue.put(_WAL_CHECKPOINT)
        if took > INLINE_SLOW:
            self._inline_off_until = time.monotonic() + INLINE_PAUSE
            log.warning(
                "a lone audit commit took %.0f ms: queuing records for %.0f s",
                took * 1000,
                INLINE_PAUSE,
            )

    def _link(self, rows: list[list[Any]]) -> tuple[int, str]:
        """Give each row its seq, prev_hash and hash after the head; the new (seq, hash)."""
        head = self._head
        seq, prev = head.seq, head.hash
        values_hash, seq_at, prev_at = chain.values_hash, chain.SEQ, chain.PREV_HASH
        for values in rows:
            seq += 1
            values[seq_at], values[prev_at] = seq, prev
            prev = values_hash(values)
            values.append(prev)  # _STORED is HASHED_FIELDS + hash
        return seq, prev

    def _write(self, batch: list[_Item]) -> None:
        # The chain lock is released before the callers wake: a lone caller's next record
        # must find the writer idle, not still finishing this batch.
        with self._chain_lock:
            seqs, cp = self._commit(batch)
        _resolve(batch, seqs)
        if cp is not None:
            self._checkpoint_stored(cp)
        for item, seq in zip(batch, seqs, strict=True):
            if seq is not None and item.gave_up and item.values[_KIND] == "call.started":
                started = dict(zip(_STORED, item.values, strict=True))
                self._queue.put(_Item(_abandoned(started), None, None))

    def _commit(self, batch: list[_Item]) -> tuple[list[int | None], dict[str, Any] | None]:
        """Link, insert and commit the batch (with a due checkpoint); each record's seq, or
        all None if nothing of it is durable."""
        head = self._head
        rows = [item.values for item in batch]
        seq, prev = self._link(rows)
        cp = self._sign_if_due(seq, prev)
        try:
            raw = self._connection()
            cur = raw.cursor()
            try:
                self._insert(cur, rows)
                if cp is not None:  # in the batch's transaction: no commit of its own
                    cur.execute(self._checkpoint_sql(), tuple(cp[k] for k in _CP_STORED))
            finally:
                cur.close()
            raw.commit()
        except Exception as exc:  # any failure: nothing of the batch is durable
            log.error("audit write failed (%s); %d records refused", type(exc).__name__, len(batch))
            self._drop_connection()
            self._healthy = False
            self._reload_head_quietly()
            return [None] * len(batch), None
        self._healthy = True
        first = head.seq + 1
        head.seq, head.hash = seq, prev
        return list(range(first, seq + 1)), cp

    def _connection(self) -> Any:
        """The writer's own DBAPI connection, kept between batches: a SQLAlchemy transaction
        and a pool round trip per batch added ~50 us to every lone call."""
        if self._raw is None:
            self._raw = self._engine.raw_connection()
        return self._raw

    def _drop_connection(self) -> None:
        """After a failure: discard the connection (whatever state it is in); the next batch
        takes a fresh one from the pool."""
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.invalidate()

    def _insert(self, cur: Any, rows: list[list[Any]]) -> None:
        """Insert the rows (values in ``_STORED`` order) in the open transaction."""
        if self._copy:
            # COPY: psycopg re-parses (in Python) any statement with over 50 parameters on
            # every execution, which cost more than the insert itself; COPY formats rows in C.
            with cur.copy(_COPY) as copy:
                for values in rows:
                    copy.write_row(values)
            return
        start = 0
        while start < len(rows):
            size = min(len(rows) - start, _ROWS_PER_INSERT)
            if size > _ROWS_STEP:
                size -= size % _ROWS_STEP
            flat = tuple(itertools.chain.from_iterable(rows[start : start + size]))
            cur.execute(self._insert_sql(size), flat)
            start += size

    def _insert_sql(self, n: int) -> str:
        """One multi-row INSERT: one statement per chunk keeps the database driver from
        dropping and retaking the GIL once per row (each retake waits on the event loop)."""
        sql = self._sql_cache.get(n)
        if sql is None:
            one = "(" + ", ".join([self._mark] * len(_STORED)) + ")"
            rows = ", ".join([one] * n)
            # Only our column names and placeholders go into the text; values are parameters.
            sql = f"INSERT INTO audit_events ({', '.join(_STORED)}) VALUES {rows}"  # noqa: S608
            self._sql_cache[n] = sql
        return sql

    def _checkpoint_sql(self) -> str:
        marks = ", ".join([self._mark] * len(_CP_STORED))
        return f"INSERT INTO audit_checkpoints ({', '.join(_CP_STORED)}) VALUES ({marks})"  # noqa: S608

    def _reload_head_quietly(self) -> None:
        # If the database is down, the next write fails too and comes back here.
        with contextlib.suppress(SQLAlchemyError):
            self._load_head()

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_due(self, seq: int) -> bool:
        head = self._head
        due = seq - head.checkpointed_seq >= self._every
        return due or time.monotonic() - head.checkpointed_at >= self._interval

    def _sign_if_due(self, seq: int, head_hash: str) -> dict[str, Any] | None:
        """The checkpoint a batch ending at ``seq`` carries, if one is due."""
        if not self._checkpoint_due(seq):
            return None
        return self.keys.signer.checkpoint(self.chain_id, seq, head_hash, db.utcnow())

    def _checkpoint_stored(self, cp: dict[str, Any]) -> None:
        _append_line(self._checkpoint_file, cp)
        head = self._head
        head.checkpointed_seq, head.checkpointed_at = int(cp["seq"]), time.monotonic()

    def _checkpoint_if_idle(self) -> None:
        with self._chain_lock:
            if self._head.seq > self._head.checkpointed_seq:
                self.checkpoint()

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head; store it in the database and append it to the file."""
        head = self._head
        cp = self.keys.signer.checkpoint(self.chain_id, head.seq, head.hash, db.utcnow())
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(db.audit_checkpoints), [cp])
        except Exception as exc:
            log.error("audit checkpoint not stored (%s)", type(exc).__name__)
            return None
        self._checkpoint_stored(cp)
        return cp

    def hmac_all(self, value: Any) -> list[str]:
        return self.keys.hmac_all(value)

    def rotate_hmac_key(self) -> str:
        return self.keys.rotate_hmac_key()

    # -- reading ----------------------------------------------------------------------------

    async def query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        return await db.run(self._query, q)

    def _query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        t = db.audit_events
        limit = min(max(q.limit, 1), MAX_LIMIT)
        stmt = select(t).order_by(t.c.id).limit(limit + 1)
        filters = {
            t.c.agent_id: q.agent, t.c.capability: q.capability, t.c.kind: q.kind,
            t.c.decision: q.decision, t.c.call_id: q.call_id, t.c.task_id: q.task_id,
            t.c.trace_id: q.trace_id, t.c.chain_id: q.chain_id, t.c.user_id: q.user,
        }  # fmt: skip
        for column, value in filters.items():
            if value is not None:
                stmt = stmt.where(column == value)
        if q.kind is not None and q.kind not in db.HOT_KINDS:
            # Restates the partial index's condition, as the same literal text: neither planner
            # infers it from kind = x, and SQLite matches it only without bound parameters.
            stmt = stmt.where(text(db.NOT_HOT_KIND))
        if q.since:
            stmt = stmt.where(t.c.time >= q.since)
        if q.until:
            stmt = stmt.where(t.c.time < q.until)
        if q.contains:
            stmt = stmt.where(t.c.data.contains(q.contains, autoescape=True))
        if q.cursor:
            stmt = stmt.where(t.c.id > _decode_cursor(q.cursor))
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).all()
        events = [event_dict(r._mapping) for r in rows[:limit]]
        next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
        return events, next_cursor

    async def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._healthy and await db.run(db.ping, self._engine)

    async def verify(self) -> dict[str, Any]:
        return await db.run(self._verify)

    def _verify(self) -> dict[str, Any]:
        report = chain.Report()
        keys = self.public_keys()
        with self._engine.connect() as conn:
            chains = conn.execute(select(db.audit_events.c.chain_id).distinct()).scalars().all()
            for chain_id in sorted({*chains, *self._file_chains()}):
                cps = self._checkpoints(conn, chain_id)
                with contextlib.closing(_stream(conn, chain_id)) as records:
                    report.chains.append(chain.verify_chain(chain_id, records, cps, keys))
        return report.to_dict()

    def public_keys(self) -> dict[str, str]:
        """Keys trusted to sign checkpoints: ours, plus *.pem in <checkpoint dir>/trusted/."""
        keys = {self.keys.signer.key_id: self.keys.signer.public_pem}
        for pem in sorted((self._checkpoint_dir / "trusted").glob("*.pem")):
            text = pem.read_text()
            keys[chain.key_id(text)] = text
        return keys

    def _file_chains(self) -> list[str]:
        return [p.stem for p in self._checkpoint_dir.glob("*.jsonl")]

    def _checkpoints(self, conn: Any, chain_id: str) -> list[dict[str, Any]]:
        c = db.audit_checkpoints
        rows = conn.execute(select(c).where(c.c.chain_id == chain_id)).all()
        found = {json.dumps(_cp(r._mapping), sort_keys=True) for r in rows}
        path = self._checkpoint_dir / f"{chain_id}.jsonl"
        if path.exists():  # the copy outside the database is what catches a truncated table
            found |= {json.dumps(json.loads(line), sort_keys=True)
                      for line in path.read_text().splitlines() if line.strip()}  # fmt: skip
        return [json.loads(x) for x in found]

    def export(self) -> Iterator[dict[str, Any]]:
        """JSON Lines objects: a header with the public keys, every record, every checkpoint."""
        with self._engine.connect() as conn:
            yield {
                "type": "header",
                "format": "capbroker-audit/1",
                "public_keys": self.public_keys(),
            }
            chains = conn.execute(select(db.audit_events.c.chain_id).distinct()).scalars().all()
            for chain_id in sorted({*chains, *self._file_chains()}):
                for rec in _stream(conn, chain_id):
                    yield {"type": "record", **rec}
                for cp in self._checkpoints(conn, chain_id):
                    yield {"type": "checkpoint", **cp}


def _stream(conn: Any, chain_id: str) -> Generator[dict[str, Any], None, None]:
    t = db.audit_events
    stmt = select(t).where(t.c.chain_id == chain_id).order_by(t.c.seq)
    result = conn.execute(stmt.execution_options(yield_per=1000))
    try:
        for row in result:
            yield stored_record(row._mapping)
    finally:
        result.close()  # a verify that stops early must not leave a server-side cursor open


def stored_record(row: Any) -> dict[str, Any]:
    """A row exactly as hashed (``data`` as its stored text)."""
    return {k: row[k] for k in (*chain.HASHED_FIELDS, "hash")}


def _cp(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in (*chain.CHECKPOINT_FIELDS, "signature")}


def _resolve(batch: list[_Item], seqs: list[int | None]) -> None:
    """Wake the waiters: one hand-over per event loop and batch, not one per record."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list[asyncio.Future[int]], list[int | None]]]
    by_loop = {}
    for item, seq in zip(batch, seqs, strict=True):
        if item.future is not None and item.loop is not None:
            waiting = by_loop.get(item.loop)
            if waiting is None:
                waiting = by_loop[item.loop] = ([], [])
            waiting[0].append(item.future)
            waiting[1].append(seq)
    for loop, (futures, results) in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody is waiting
            loop.call_soon_threadsafe(_settle, futures, results)


def _settle(futures: list[asyncio.Future[int]], seqs: list[int | None]) -> None:
    for fut, seq in zip(futures, seqs, strict=True):
        if fut.done():
            continue  # the caller gave up (timeout) and cancelled its wait
        if seq is None:
            fut.set_exception(AuditUnavailable("the audit log cannot be written"))
        else:
            fut.set_result(seq)


def _abandoned(started: dict[str, Any]) -> list[Any]:
    """The record that closes a call whose caller gave up waiting for call.started."""
    record: dict[str, Any] = dict.fromkeys(chain.HASHED_FIELDS)
    keep = (
        "call_id", "agent_id", "capability", "capability_version", "task_id", "chain_id",
        "user_id",
    )  # fmt: skip
    record.update({k: started[k] for k in keep})
    why = "call.started was written after the caller gave up; nothing ran"
    record.update(
        kind="call.abandoned",
        reason="audit_timeout",
        event_id=uuid.uuid4().hex,
        time=db.utcnow(),
        data=_dumps({"args": None, "secrets": [], "detail": {"why": why}}),
    )
    return [record[k] for k in chain.HASHED_FIELDS]


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _hmac_paths(args: Any, paths: Sequence[str], hmac: Any) -> Any:
    """A copy of args with the values at ``paths`` (dotted) replaced by their HMAC."""
    if not paths or not isinstance(args, dict):
        return args
    out = json.loads(json.dumps(args))
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = hmac(node[last])
    return out


def _decode_cursor(cursor: str) -> int:
    if not cursor.isdigit():
        raise InvalidRequest("cursor is not one this broker issued")
    return int(cursor)


def event_dict(row: Any) -> dict[str, Any]:
    """An audit row for the API: stored fields plus ``args``/``secrets``/``detail`` unpacked."""
    data = json.loads(row["data"])
    out = {k: row[k] for k in ("id", "seq", "event_id", "chain_id", "time", *_COLUMNS)}
    out.update(
        args=data.get("args"), secrets=data.get("secrets", []), detail=data.get("detail", {})
    )
    out.update(prev_hash=row["prev_hash"], hash=row["hash"])
    return out
