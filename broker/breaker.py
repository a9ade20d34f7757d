"""Circuit breakers: one per upstream host:port, kept in the memory of this broker instance.

A circuit is **closed** while its upstream works. Each attempt at the upstream reports how it
ended (through the permit ``admit`` handed out). A *failure* is a connection that could not be
made or broke (refused, reset, dropped), a timeout, or a 5xx answer; any other answer (2xx-4xx:
the host is up and speaking HTTP) is a *success* and resets the count. Outcomes that say
nothing about the host's health (egress denied, TLS or URL errors, an oversized answer, a
cancelled call) count neither way.

``failure_threshold`` consecutive failures **open** the circuit: every call to that host is then
refused with 503 ``upstream_unavailable`` (and ``Retry-After``) before any secret is read or
anything is sent. The first call after ``cool_down`` seconds turns it **half-open**: up to
``half_open_probes`` calls go through as probes, others are still refused. A probe that
succeeds closes the circuit; a probe that fails opens it again for another cool-down.

Several broker instances each keep their own circuits (no shared store is needed: each one
learns the upstream's health from its own calls). All methods are synchronous and run on the
event loop, so no lock is needed.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.errors import BrokerError, UpstreamUnavailable
from broker.ports import Metrics, NoMetrics, UpstreamResponse

log = logging.getLogger("broker.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=1024)
def upstream_key(url: str) -> str:
    """``host:port`` of a capability's URL (a template: slots sit only in the path)."""
    parts = urlsplit(url.replace("{", "%7B").replace("}", "%7D"))
    host = (parts.hostname or "").lower()
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verdict(outcome: UpstreamResponse | BaseException) -> bool | None:
    """True when the attempt counts as a failure of the host, False for a success, None when
    the outcome says nothing about the host's health."""
    if isinstance(outcome, UpstreamResponse):
        return outcome.status >= 500
    if isinstance(outcome, BrokerError) and outcome.transient:
        return True
    return None


@dataclass
class _Circuit:
    state: str = CLOSED
    failures: int = 0  # consecutive failures while closed
    opened_at: float = 0.0
    probes: int = 0  # probe calls in flight while half-open


class Permit:
    """Leave for one attempt; settles exactly once (record or release)."""

    def __init__(self, owner: CircuitBreakers, key: str, *, probe: bool) -> None:
        self._owner, self._key, self._probe = owner, key, probe
        self._settled = False

    def record(self, outcome: UpstreamResponse | BaseException) -> None:
        self._settle(verdict(outcome))

    def release(self) -> None:
        self._settle(None)

    def _settle(self, failed: bool | None) -> None:
        if not self._settled:
            self._settled = True
            self._owner._settle(self._key, self._probe, failed)


class CircuitBreakers:
    """The CircuitBreaker port: circuits keyed by upstream host:port."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cool_down: float = 30.0,
        half_open_probes: int = 1,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or cool_down <= 0:
            raise ValueError("breaker: threshold and probes must be >= 1, cool-down > 0")
        self._threshold = failure_threshold
        self._cool_down = cool_down
        self._probes = half_open_probes
        self._metrics: Metrics = metrics or NoMetrics()
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def admit(self, url: str) -> Permit:
        key = upstream_key(url)
        circuit = self._circuit(key)
        if circuit.state == OPEN:
            left = circuit.opened_at + self._cool_down - self._clock()
            if left > 0:
                raise _refusal(key, left)
            self._move(key, circuit, HALF_OPEN)
        if circuit.state == HALF_OPEN:
            if circuit.probes >= self._probes:
                raise _refusal(key, 1)
            circuit.probes += 1
            return Permit(self, key, probe=True)
        return Permit(self, key, probe=False)

    def state(self, url: str) -> str:
        circuit = self._circuits.get(upstream_key(url))
        return circuit.state if circuit else CLOSED

    def states(self) -> dict[str, str]:
        """Every known upstream and its circuit's state (for operators and tests)."""
        return {key: c.state for key, c in self._circuits.items()}

    def _circuit(self, key: str) -> _Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = _Circuit()
            self._metrics.circuit(key, CLOSED)  # the series exists from the first call
        return circuit

    def _settle(self, key: str, probe: bool, failed: bool | None) -> None:
        circuit = self._circuits[key]
        if probe and circuit.state == HALF_OPEN:
            circuit.probes -= 1
            if failed is not None:
                self._move(key, circuit, OPEN if failed else CLOSED)
            return
        # Outcomes of calls admitted before the circuit opened say nothing new; ignore them.
        if circuit.state != CLOSED or failed is None:
            return
        if not failed:
            circuit.failures = 0
            return
        circuit.failures += 1
        if circuit.failures >= self._threshold:
            self._move(key, circuit, OPEN)

    def _move(self, key: str, circuit: _Circuit, state: str) -> None:
        circuit.state, circuit.failures, circuit.probes = state, 0, 0
        if state == OPEN:
            circuit.opened_at = self._clock()
            log.warning("circuit for upstream %s opened for %ss", key, self._cool_down)
        else:
            log.info("circuit for upstream %s is %s", key, state)
        self._metrics.circuit(key, state)


def _refusal(key: str, seconds: float) -> UpstreamUnavailable:
    wait = max(1, math.ceil(seconds))
    return UpstreamUnavailable(
        f"upstream {key} is failing; its circuit breaker is open, retry in {wait}s",
        headers={"Retry-After": str(wait)},
    )
