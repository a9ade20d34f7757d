"""Guards that bound calls before they run: rate limits and concurrency caps.

Rate limits are a moving window per agent and capability (the manifest's ``limits.rate``) and
one per capability for all agents together (``limits.global_rate``), kept in process memory
with the ``limits`` library. A call must fit both windows and is counted in both only when it
does. A shared store (Redis) for several broker instances can replace the storage without
touching callers. Concurrency caps
(``limits.concurrency``) count calls in flight per capability and refuse, rather than queue,
past the cap.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from types import TracebackType

from limits import parse, storage, strategies

from broker.capabilities import Capability
from broker.errors import RateLimited


class Slot:
    """One call in flight; leaving it frees the place."""

    def __init__(self, counts: dict[str, int], name: str | None) -> None:
        self._counts, self._name = counts, name

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._name is not None:
            self._counts[self._name] -= 1
            self._name = None


class LocalGuards:
    """In-process guards (one broker instance)."""

    def __init__(self) -> None:
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        # A store of its own: its keys (capability names) never meet the per-agent keys.
        self._global = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._in_flight: dict[str, int] = defaultdict(int)

    def admit(self, agent_id: str, cap: Capability) -> Slot:
        """Count the call against its limits; raises RateLimited (with Retry-After)."""
        windows = [
            (limiter, parse(rate), ids, f"{rate} {scope}")
            for limiter, rate, ids, scope in (
                (self._limiter, cap.limits.rate, (agent_id, cap.name), "per agent"),
                (self._global, cap.limits.global_rate, (cap.name,), "for all agents together"),
            )
            if rate
        ]
        for limiter, item, ids, allowance in windows:
            if not limiter.test(item, *ids):
                reset = limiter.get_window_stats(item, *ids).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise RateLimited(
                    f"{cap.name} allows {allowance}; retry in {wait}s",
                    headers={"Retry-After": str(wait)},
                )
        for limiter, item, ids, _ in windows:
            limiter.hit(item, *ids)
        cap_limit = cap.limits.concurrency
        if cap_limit is None:
            return Slot(self._in_flight, None)
        if self._in_flight[cap.name] >= cap_limit:
            raise RateLimited(
                f"{cap.name} already has {cap_limit} calls in flight",
                headers={"Retry-After": "1"},
            )
        self._in_flight[cap.name] += 1
        return Slot(self._in_flight, cap.name)
