"""The cache in front of a storage lookup on the invoke path (tokens, capability manifests).

A looked-up value is reused for ``ttl`` seconds from the moment it was read, never longer, so
another instance's change (a revoked token, a replaced manifest) is seen within the TTL. Two
things keep the database off the request path of a busy key:

- concurrent misses of one key share one lookup (a cache that expired under 16 concurrent
  calls used to send 16 reads to the thread pool at once, every TTL);
- a hit in the last quarter of its life starts one background lookup, so the key is fresh
  again before it expires and callers keep hitting.

A local change calls ``forget``: the entry goes and the generation moves on, so a lookup that
began before the change is returned to the callers that were already waiting for it, but is
neither stored nor joined by a caller that comes after the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = logging.getLogger("broker.cache")
REFRESH_AT = 0.75  # of the TTL: a hit past this point starts a refresh


class LookupCache(Generic[K, V]):
    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl: float,
        max_size: int,
        keep: Callable[[V], bool] = lambda _value: True,
    ) -> None:
        self._load, self._ttl, self._max, self._keep = load, ttl, max_size, keep
        self._entries: dict[K, tuple[V, float, float]] = {}  # value, refresh at, expires at
        self._loading: dict[K, asyncio.Task[V]] = {}
        self._generation = 0

    async def get(self, key: K) -> V:
        hit = self._entries.get(key)
        if hit is not None:
            value, refresh_at, expires_at = hit
            now = time.monotonic()
            if now < expires_at:
                if now >= refresh_at and key not in self._loading:
                    self._start(key).add_done_callback(_quiet)
                return value
        if self._ttl <= 0:
            return await self._load(key)
        task = self._loading.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = self._start(key)
        # Shielded: a caller that goes away (a cancelled request) does not cancel the others'.
        try:
            return await asyncio.shield(task)
        except Exception as exc:
            # One failed lookup, several waiters: each gets an error of its own (callers set
            # their call id on it).
            raise copy.copy(exc).with_traceback(None) from None

    def forget(self, key: K | None = None) -> None:
        """Drop one entry (or all): the next get reads storage again."""
        self._generation += 1
        # A get after the change must not join a lookup that began before it either.
        if key is None:
            self._entries.clear()
            self._loading.clear()
        else:
            self._entries.pop(key, None)
            self._loading.pop(key, None)

    def _start(self, key: K) -> asyncio.Task[V]:
        task = asyncio.get_running_loop().create_task(self._fetch(key, self._generation))
        self._loading[key] = task
        return task

    async def _fetch(self, key: K, generation: int) -> V:
        read_at = time.monotonic()
        try:
            value = await self._load(key)
        except BaseException:
            hit = self._entries.get(key)
            if hit is not None:  # no second refresh before it expires: a failing store
                self._entries[key] = (hit[0], hit[2], hit[2])  # must not get one per hit
            raise
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]
        if not self._keep(value):
            self._entries.pop(key, None)  # e.g. a token found revoked by a refresh
        elif generation == self._generation:
            if len(self._entries) >= self._max and key not in self._entries:
                self._entries.clear()  # keys from clients: never an unbounded dict
            refresh_at = read_at + self._ttl * REFRESH_AT
            self._entries[key] = (value, refresh_at, read_at + self._ttl)
        return value


def _quiet(task: asyncio.Task[object]) -> None:
    """A background refresh that failed: the entry keeps its expiry; the next miss retries."""
    with contextlib.suppress(asyncio.CancelledError):
        if (exc := task.exception()) is not None:
            log.warning("background refresh failed (%s)", type(exc).__name__)
