"""Prometheus metrics: the only module that imports prometheus_client.

``PrometheusMetrics`` implements the ``Metrics`` port (ports.py) on a ``CollectorRegistry`` of
its own (one per broker: several brokers in one process never share or clash), rendered by
``GET /metrics`` in the text exposition format. ``MeteredAuditLog`` wraps the audit log port to
count every record written or refused, whoever wrote it (pipeline, admin, API).

Labels are bounded: capability names (registered ones only; ``(none)`` when the call never
reached a capability), upstream host:port (of registered manifests, for the circuit breaker
gauge), fixed enums, error codes and audit kinds (both fixed in the code). No
agent id (agents are created at will, one series each would be unbounded), no argument value,
no secret, no path.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from broker.ports import AuditEvent, AuditLog, AuditQuery, Metrics

STAGES = ("authenticate", "decide", "secrets", "upstream", "audit", "total")
DECISIONS = ("allow", "deny", "none")
OUTCOMES = ("succeeded", "upstream_error", "failed", "refused", "approval_pending", "queued")
CACHE_RESULTS = ("hit", "refresh", "miss", "shared")
CHILD_CACHE_SIZE = 4096
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
NO_CAPABILITY = "(none)"
OTHER = "other"
# Seconds: a token check takes well under a millisecond, an upstream up to the manifest's timeout.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_CAPABILITY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")  # capabilities.NAME_RE, length-capped
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KIND = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_UPSTREAM = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,300}$")  # host:port of a registered manifest


def _enum(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def _match(value: str, pattern: re.Pattern[str], default: str = OTHER) -> str:
    return value if pattern.match(value) else default


class PrometheusMetrics:
    """The Metrics port on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._calls = Counter(
            "broker_calls",
            "Capability invocations by capability, policy decision, outcome and error code.",
            ["capability", "decision", "outcome", "code"],
            registry=r,
        )
        self._stages = _StageTimes()
        r.register(self._stages)
        self._cache = Counter(
            "broker_secret_cache_lookups",
            "Secret reads by cache result: hit, refresh (a hit that started a background read"
            " from Vault ahead of expiry), miss (the call waited for a read from Vault), shared"
            " (the call joined a read in flight).",
            ["result"],
            registry=r,
        )
        self._spend = Counter(
            "broker_budget_spend",
            "Cost (fixed or metered, limits.cost) of succeeded calls, per capability.",
            ["capability"],
            registry=r,
        )
        self._audit_written = Counter(
            "broker_audit_records",
            "Audit records durably written, by kind.",
            ["kind"],
            registry=r,
        )
        self._audit_failed = Counter(
            "broker_audit_failures",
            "Audit records that could not be written, by kind.",
            ["kind"],
            registry=r,
        )
        self._circuits = Gauge(
            "broker_upstream_circuit_state",
            "Circuit breaker per upstream host:port: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
        )
        # Known series exist from the start, so rates and absent-series alerts work at once.
        # labels() costs a lock and a tuple hash per use; a call uses ~10: children are kept.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._cache_of = {result: self._cache.labels(result) for result in CACHE_RESULTS}

    def call(self, capability: str | None, decision: str, outcome: str, code: str) -> None:
        key = ("call", capability, decision, outcome, code)
        child = self._children.get(key)
        if child is None:
            child = self._keep(key, self._calls.labels(
                _match(capability, _CAPABILITY) if capability else NO_CAPABILITY,
                _enum(decision, DECISIONS),
                _enum(outcome, OUTCOMES),
                _match(code, _CODE) if code else "",
            ))  # fmt: skip
        child.inc()

    def stage(self, stage: str, seconds: float) -> None:
        self._stages.observe(stage, seconds)

    def spend(self, capability: str, cost: float) -> None:
        if cost > 0:
            self._spend.labels(_match(capability, _CAPABILITY)).inc(cost)

    def secret_cache(self, result: str) -> None:
        child = self._cache_of.get(result)
        (child or self._cache.labels(OTHER)).inc()

    def audit(self, kind: str, *, ok: bool) -> None:
        key = ("audit", kind, ok)
        child = self._children.get(key)
        if child is None:
            counter = self._audit_written if ok else self._audit_failed
            child = self._keep(key, counter.labels(_match(kind, _KIND)))
        child.inc()

    def _keep(self, key: tuple[Any, ...], child: Any) -> Any:
        if len(self._children) >= CHILD_CACHE_SIZE:
            self._children.clear()  # label values from clients: never an unbounded dict
        self._children[key] = child
        return child

    def circuit(self, upstream: str, state: str) -> None:
        self._circuits.labels(_match(upstream, _UPSTREAM)).set(CIRCUIT_STATES.get(state, 0))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StageTimes(Collector):
    """broker_stage_duration_seconds, kept as plain counts and exposed at scrape time.

    prometheus_client's Histogram takes a lock per bucket and per sum on every observe; a call
    observes seven stages, which cost more than its policy decision. Stages are observed on
    the event loop's thread only (every pipeline stage runs there), so plain integers do.
    """

    def __init__(self) -> None:
        names = (*STAGES, OTHER)
        self._counts = {name: [0] * (len(BUCKETS) + 1) for name in names}  # last: +Inf
        self._sums = dict.fromkeys(names, 0.0)

    def observe(self, stage: str, seconds: float) -> None:
        if stage not in self._sums:
            stage = OTHER
        seconds = max(seconds, 0.0)
        self._counts[stage][bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sums[stage] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "broker_stage_duration_seconds",
            "Time spent per pipeline stage (total: the whole invoke).",
            labels=["stage"],
        )
        for stage, counts in self._counts.items():
            if stage == OTHER and not any(counts):
                continue  # like a labelled Histogram: the series appears once observed
            cumulative, buckets = 0, []
            for bound, count in zip((*map(_le, BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric([stage], buckets, self._sums[stage])
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class MeteredAuditLog:
    """The AuditLog port, counting each append as written or failed (by kind)."""

    def __init__(self, inner: AuditLog, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def append(self, event: AuditEvent, *, alone: bool = False) -> int:
        try:
            seq = await self.inner.append(event, alone=alone)
        except Exception:
            self._metrics.audit(event.kind, ok=False)
            raise
        self._metrics.audit(event.kind, ok=True)
        return seq

    async def start(self) -> int:
        return await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        return await self.inner.query(q)

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def verify(self) -> dict[str, Any]:
        return await self.inner.verify()

    def export(self) -> Iterator[dict[str, Any]]:
        return self.inner.export()

    def hmac_all(self, value: Any) -> list[str]:
        return self.inner.hmac_all(value)

    def rotate_hmac_key(self) -> str:
        return self.inner.rotate_hmac_key()
