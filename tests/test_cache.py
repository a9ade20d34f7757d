"""The lookup cache on the invoke path: one read per key however many concurrent misses, a
busy key refreshed before it expires, and never a value older than the TTL (tokens revoked
through another instance stop working within it)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.cache import LookupCache
from broker.capabilities import Capability
from broker.db import make_engine, migrate
from broker.identity import SqlDirectory
from broker.registry import SqlCapabilityRegistry
from tests.test_invoke import echo_manifest


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def count_reads(engine: sa.Engine, table: str) -> list[str]:
    """Every SELECT this engine sends that reads ``table`` (the real statements)."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and table in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


async def _agent_with_token(directory: SqlDirectory) -> tuple[str, str]:
    await directory.create_agent("ana", "ana", {})
    return await directory.issue_token("ana")


def test_concurrent_misses_share_one_read(engine: sa.Engine) -> None:
    directory = SqlDirectory(engine, token_cache_ttl=5.0)
    reads = count_reads(engine, "tokens")

    async def scenario() -> list[Any]:
        _, token = await _agent_with_token(directory)
        reads.clear()
        return await asyncio.gather(*(directory.find_token(token) for _ in range(16)))

    found = asyncio.run(scenario())
    assert all(f is not None and f[0].id == "ana" for f in found)
    assert len(reads) == 1


def test_a_busy_key_is_refreshed_before_it_expires(engine: sa.Engine, tmp_path: Path) -> None:
    """Past three quarters of the TTL a hit starts one background read; the key is fresh
    again before it would have expired, so no caller waits for the database."""
    registry = SqlCapabilityRegistry(engine, cache_ttl=0.6)
    reads = count_reads(engine, "capabilities")

    async def scenario() -> tuple[int, int, float]:
        await registry.put(Capability.model_validate(echo_manifest("http://127.0.0.1:9")))
        reads.clear()
        assert (await registry.get("test.echo")) is not None
        first = len(reads)
        await asyncio.sleep(0.5)  # past 0.45 s: this hit refreshes in the background
        assert (await registry.get("test.echo")) is not None
        await asyncio.sleep(0.05)
        refreshed = len(reads)
        await asyncio.sleep(0.2)  # past the first read's expiry (0.6 s)
        start = time.perf_counter()
        for _ in range(50):
            assert (await registry.get("test.echo")) is not None
        return first, refreshed, time.perf_counter() - start

    first, refreshed, took = asyncio.run(scenario())
    assert first == 1 and refreshed == 2
    assert len(reads) == 2  # the 50 hits after the first expiry read nothing
    assert took < 0.05


def test_a_token_revoked_elsewhere_stops_working_within_the_ttl(engine: sa.Engine) -> None:
    """Refreshing ahead never stretches a value's life: another instance (another directory
    on the same database) revokes the token, and this one, hit every 10 ms, refuses it within
    the TTL of the revocation."""
    ttl = 0.5
    here, elsewhere = SqlDirectory(engine, token_cache_ttl=ttl), SqlDirectory(engine)

    async def scenario() -> float:
        token_id, token = await _agent_with_token(here)
        for _ in range(30):  # warm and busy: refreshes are running
            assert await here.find_token(token) is not None
            await asyncio.sleep(0.01)
        await elsewhere.revoke_token("ana", token_id)
        revoked = time.monotonic()
        while await here.find_token(token) is not None:
            assert time.monotonic() - revoked < ttl + 0.2, "a revoked token outlived the TTL"
            await asyncio.sleep(0.01)
        return time.monotonic() - revoked

    assert asyncio.run(scenario()) <= ttl + 0.2


def test_a_local_change_is_seen_at_once_even_mid_lookup(engine: sa.Engine) -> None:
    """A revoke through this instance empties the cache at once; a lookup that began before
    it is answered but not kept."""
    directory = SqlDirectory(engine, token_cache_ttl=60.0)

    async def scenario() -> tuple[Any, Any]:
        token_id, token = await _agent_with_token(directory)
        racing = asyncio.ensure_future(directory.find_token(token))
        await directory.revoke_token("ana", token_id)
        await racing
        return await directory.find_token(token), await directory.find_token(token)

    assert asyncio.run(scenario()) == (None, None)


def test_a_get_after_forget_does_not_join_a_lookup_begun_before_it() -> None:
    """Storage changes and forget() is called (as every local change does): a get that starts
    after that is not answered by the read that began before the change."""
    store = {"t": "live"}
    gate = asyncio.Event()

    async def load(key: str) -> str:
        value = store[key]  # the read happens now ...
        await gate.wait()  # ... and its answer arrives later (a busy thread pool)
        return value

    async def scenario() -> tuple[str, str]:
        cache: LookupCache[str, str] = LookupCache(load, ttl=60.0, max_size=10)
        before = asyncio.ensure_future(cache.get("t"))
        for _ in range(3):
            await asyncio.sleep(0)  # the lookup has read storage and is waiting
        store["t"] = "revoked"
        cache.forget("t")
        after = asyncio.ensure_future(cache.get("t"))
        await asyncio.sleep(0)
        gate.set()
        return await before, await after

    assert asyncio.run(scenario()) == ("live", "revoked")


def test_a_token_revoked_here_is_refused_at_once_while_an_older_lookup_is_in_flight(
    engine: sa.Engine,
) -> None:
    """A token lookup has run its SELECT (it saw the token live) and its answer is still on
    the way back when the token is revoked through this instance: a find_token that starts
    after the revoke says None, it does not join the older lookup."""
    directory = SqlDirectory(engine, token_cache_ttl=60.0)
    gate, hold = threading.Event(), threading.Event()

    def slow_answer(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        select = statement.lstrip().upper().startswith("SELECT")
        if hold.is_set() and select and "tokens" in statement:
            hold.clear()  # only the first lookup is slow
            gate.wait(5)

    sa.event.listen(engine, "after_cursor_execute", slow_answer)

    async def scenario() -> tuple[Any, Any]:
        token_id, token = await _agent_with_token(directory)
        hold.set()
        racing = asyncio.ensure_future(directory.find_token(token))
        await asyncio.sleep(0.1)  # its SELECT has run
        await directory.revoke_token("ana", token_id)
        after = asyncio.ensure_future(directory.find_token(token))
        await asyncio.sleep(0.05)
        gate.set()
        return await racing, await after

    racing, after = asyncio.run(scenario())
    assert racing is not None  # the lookup that began before the revoke saw it live
    assert after is None, "a token revoked here was accepted after the revoke"


def test_waiters_of_a_failed_lookup_each_get_their_own_error() -> None:
    """The pipeline sets its call id on the error it refuses a call with: two calls that
    shared one failed lookup must not share one exception object."""
    from broker import errors

    async def load(_key: str) -> str:
        await asyncio.sleep(0.01)
        raise errors.StorageUnavailable("the database is down")

    async def scenario() -> list[BaseException]:
        cache: LookupCache[str, str] = LookupCache(load, ttl=60.0, max_size=10)
        return list(await asyncio.gather(cache.get("t"), cache.get("t"), return_exceptions=True))

    a, b = asyncio.run(scenario())
    assert isinstance(a, errors.StorageUnavailable) and isinstance(b, errors.StorageUnavailable)
    assert a is not b and a.message == b.message == "the database is down"
