"""Sending through the circuit breaker, with retries for idempotent capabilities only.

The only module that imports tenacity. A capability declared ``idempotent: true`` is tried
again, with exponential backoff and jitter, when an attempt failed in a way another try may
fix: a connection that could not be made or broke, a timeout, or a 502/503/504 answer. Nothing
else is retried (a 500 or 4xx answer is the upstream's verdict on this request). A capability
that is not declared idempotent is sent exactly once, whatever happens: the broker cannot know
whether a failed attempt acted.

Bounds: at most ``RetryPolicy.attempts`` attempts, all within the capability's one deadline
(each attempt gets the time that is left, and no attempt starts with less than
``MIN_ATTEMPT_SECONDS`` left); every attempt is admitted by and reported to the breaker, and
retrying stops as soon as the circuit is no longer closed. When retrying stops, the last
attempt's answer or error is the call's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from broker.errors import BrokerError
from broker.ports import BreakerPermit, CircuitBreaker, UpstreamResponse

RETRY_STATUSES = frozenset({502, 503, 504})
MIN_ATTEMPT_SECONDS = 0.1  # an attempt with less time than this left would only time out

# One attempt: given the seconds left of the deadline, send and return the answer.
Attempt = Callable[[float], Awaitable[UpstreamResponse]]


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent capabilities are retried (settings: BROKER_RETRY_*)."""

    attempts: int = 3  # attempts in all, the first included; 1 turns retries off
    backoff: float = 0.2  # seconds before the 2nd attempt; doubles each time, plus jitter
    backoff_max: float = 2.0


async def send(
    attempt: Attempt,
    *,
    url: str,
    deadline: float,
    idempotent: bool,
    breaker: CircuitBreaker,
    permit: BreakerPermit,
    policy: RetryPolicy,
) -> UpstreamResponse:
    """The answer of the last attempt (or its error, raised). ``permit`` admits the first
    attempt (the caller took it before reading secrets); later ones ask ``breaker`` again."""
    end = time.monotonic() + deadline
    permits = [permit]

    async def once() -> UpstreamResponse:
        current = permits.pop() if permits else breaker.admit(url)
        try:
            response = await attempt(max(end - time.monotonic(), 0.0))
        except BaseException as exc:
            current.record(exc)
            raise
        current.record(response)
        return response

    if not idempotent or policy.attempts <= 1:
        return await once()  # never retried: a second attempt could act twice
    retrying = AsyncRetrying(
        stop=stop_any(
            stop_after_attempt(policy.attempts),
            stop_before_delay(max(deadline - MIN_ATTEMPT_SECONDS, 0.0)),
            _CircuitNotClosed(breaker, url),
        ),
        wait=wait_exponential(multiplier=policy.backoff, max=policy.backoff_max)
        + wait_random(0, policy.backoff),
        retry=retry_if_exception(_transient) | retry_if_result(_retry_status),
        retry_error_callback=_last_outcome,
    )
    response: UpstreamResponse = await retrying(once)
    return response


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, BrokerError) and exc.transient


def _retry_status(response: UpstreamResponse) -> bool:
    return response.status in RETRY_STATUSES


def _last_outcome(state: RetryCallState) -> UpstreamResponse:
    """When retrying stops, the last attempt stands: its answer, or its error raised."""
    assert state.outcome is not None
    response: UpstreamResponse = state.outcome.result()
    return response


class _CircuitNotClosed(stop_base):
    """Stop once the breaker has opened (this call's failures may have opened it)."""

    def __init__(self, breaker: CircuitBreaker, url: str) -> None:
        self._breaker, self._url = breaker, url

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._breaker.state(self._url) != "closed"
