"""The lookup cache on the invoke path: one read per key however many concurrent misses, a
busy key refreshed before it expires, and never a value older than the TTL (tokens revoked
through another instance stop working within it)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

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
