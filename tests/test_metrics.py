"""Prometheus metrics end to end: ``GET /metrics`` scraped over HTTP from a real broker.

Counters follow allowed, denied, refused and failed calls; stage histograms fill; the secret
cache is counted; budget spend and audit records add up; and no secret, argument value, agent
id or caller-chosen name ever shows up in the exposition.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.devserver import DevVault
from broker.metrics import PrometheusMetrics
from broker.ports import Metrics, SecretValue
from broker.vault import VaultSecretStore
from tests.support.brokers import RunningBroker, start_broker
from tests.support.openbao import MOUNT, PutSecret
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import SECRET, break_audit_table, echo_manifest, secret_forms

ARG = "arg-value-77c0de"  # an argument value that must never reach a label
STAGES = ("authenticate", "decide", "secrets", "upstream", "audit", "total")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def setup(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    rb = running_broker
    rb.secret("tests/echo", {"token": SECRET})
    manifest = echo_manifest(upstream.url)
    manifest["limits"] = {"cost": 2.5}
    rb.admin.put_capability(manifest)
    rb.admin.add_policy("role:tester", "test.*")
    return rb


def invoke(rb: RunningBroker, token: str | None, name: str = "test.echo") -> Any:
    return rb.http(token).post(
        f"/v1/capabilities/{name}/invoke", json={"args": {"message": ARG, "count": 918273645}}
    )


def scrape(rb: RunningBroker) -> tuple[str, Samples]:
    r = rb.http().get("/metrics")  # no token: operators scrape without one
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def calls(samples: Samples, capability: str, decision: str, outcome: str, code: str = "") -> float:
    return value(
        samples,
        "broker_calls_total",
        capability=capability,
        decision=decision,
        outcome=outcome,
        code=code,
    )


def stage_count(samples: Samples, stage: str) -> float:
    return value(samples, "broker_stage_duration_seconds_count", stage=stage)


def test_metrics_endpoint_is_unauthenticated_and_starts_with_every_stage(
    running_broker: RunningBroker,
) -> None:
    text, samples = scrape(running_broker)
    assert running_broker.http("not-a-token").get("/metrics").status_code == 200
    for stage in STAGES:  # known series exist from the start, at zero
        assert (("broker_stage_duration_seconds_count", frozenset({("stage", stage)}))) in samples
    for result in ("hit", "refresh", "miss", "shared"):
        assert ("broker_secret_cache_lookups_total", frozenset({("result", result)})) in samples
    assert "# TYPE broker_calls_total counter" in text


def test_counters_follow_allowed_denied_refused_and_failed_calls(
    setup: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = setup
    tester = rb.agent("alice", ["tester"])
    outsider = rb.agent("bob")
    missing = echo_manifest(upstream.url, "test.nosecret")
    missing["secrets"] = {"tok": {"path": "tests/absent", "key": "token"}}
    rb.admin.put_capability(missing)
    limited = echo_manifest(upstream.url, "test.limited")
    limited["limits"] = {"rate": "1/minute", "cost": 100}
    rb.admin.put_capability(limited)

    assert [invoke(rb, tester).status_code for _ in range(2)] == [200, 200]
    assert invoke(rb, outsider).status_code == 403
    assert invoke(rb, "cbk_forged").status_code == 401
    assert invoke(rb, tester, "test.made-up-by-the-caller").status_code == 404
    assert invoke(rb, tester, "test.nosecret").status_code == 503
    assert [invoke(rb, tester, "test.limited").status_code for _ in range(2)] == [200, 429]

    text, samples = scrape(rb)
    assert calls(samples, "test.echo", "allow", "succeeded") == 2
    assert calls(samples, "test.echo", "deny", "refused", "policy_denied") == 1
    assert calls(samples, "(none)", "none", "refused", "unauthenticated") == 1
    assert calls(samples, "(none)", "none", "refused", "capability_not_found") == 1
    assert calls(samples, "test.nosecret", "allow", "failed", "secret_unavailable") == 1
    assert calls(samples, "test.limited", "allow", "succeeded") == 1
    assert calls(samples, "test.limited", "allow", "refused", "rate_limited") == 1
    total = sum(v for (n, _), v in samples.items() if n == "broker_calls_total")
    assert total == 8

    # Every invoke is timed; each stage counts the calls that reached it.
    assert stage_count(samples, "total") == 8
    assert stage_count(samples, "authenticate") == 8
    assert stage_count(samples, "decide") == 7  # not the forged token
    assert stage_count(samples, "secrets") == 4  # 2 echo, 1 nosecret, 1 limited
    assert stage_count(samples, "upstream") == 3
    # audit: 4 started + 3 finished + 1 failed-finished + 4 refusals (deny, 401, 404, 429)
    assert stage_count(samples, "audit") == 4 + 3 + 1 + 4
    for stage in STAGES:
        assert value(samples, "broker_stage_duration_seconds_sum", stage=stage) > 0
        assert value(samples, "broker_stage_duration_seconds_bucket", stage=stage, le="+Inf") == (
            stage_count(samples, stage)
        )

    # Budget spend: the manifest's cost, on success only.
    assert value(samples, "broker_budget_spend_total", capability="test.echo") == 5.0
    assert value(samples, "broker_budget_spend_total", capability="test.limited") == 100
    assert ("broker_budget_spend_total", frozenset({("capability", "test.nosecret")})) not in (
        samples
    )

    # Audit records by kind, whoever wrote them (admin writes count too).
    assert value(samples, "broker_audit_records_total", kind="call.started") == 4
    assert value(samples, "broker_audit_records_total", kind="call.finished") == 4
    assert value(samples, "broker_audit_records_total", kind="call.denied") == 1
    assert value(samples, "broker_audit_records_total", kind="call.rejected") == 3
    assert value(samples, "broker_audit_records_total", kind="admin.capability.put") == 3
    assert not [k for k in samples if k[0] == "broker_audit_failures_total"]

    # Nothing the caller chose, no secret, no argument, no agent id, no token.
    assert "made-up-by-the-caller" not in text
    for leak in (SECRET, ARG, "918273645", "tests/absent", "alice", "bob", tester, rb.admin_token):
        for form in secret_forms(leak):
            assert form not in text, f"{form!r} appeared in /metrics"


def test_secret_cache_hits_and_misses_are_counted(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    rb = start_broker(openbao, database_url, tmp_path / "data", secret_cache_ttl=60)
    try:
        rb.secret("tests/echo", {"token": SECRET})
        rb.admin.put_capability(echo_manifest(upstream.url))
        rb.admin.add_policy("role:tester", "test.*")
        token = rb.agent("carol", ["tester"])
        assert [invoke(rb, token).status_code for _ in range(3)] == [200, 200, 200]
        text, samples = scrape(rb)
        assert value(samples, "broker_secret_cache_lookups_total", result="miss") == 1
        assert value(samples, "broker_secret_cache_lookups_total", result="hit") == 2
        for form in secret_forms(SECRET):
            assert form not in text
    finally:
        rb.close()


def test_concurrent_reads_of_one_secret_count_as_shared(
    openbao: DevVault, put_secret: PutSecret
) -> None:
    path, _ = put_secret({"token": SECRET})
    metrics = PrometheusMetrics()
    store = VaultSecretStore(url=openbao.addr, token=openbao.root_token, metrics=metrics)

    async def run() -> list[SecretValue]:
        try:
            first = await asyncio.gather(*(store.read(MOUNT, path, "token") for _ in range(3)))
            return [*first, await store.read(MOUNT, path, "token")]
        finally:
            await store.close()

    assert [s.value for s in asyncio.run(run())] == [SECRET] * 4
    text = metrics.exposition()[0].decode()
    samples = {
        s.labels.get("result"): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "broker_secret_cache_lookups_total"
    }
    assert samples == {"miss": 1.0, "shared": 2.0, "hit": 1.0, "refresh": 0.0}
    assert SECRET not in text and path not in text


def test_audit_failures_are_counted(setup: RunningBroker, upstream: RunningUpstream) -> None:
    token = setup.agent("dave", ["tester"])
    break_audit_table(setup)
    r = invoke(setup, token)
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
    _, samples = scrape(setup)
    assert value(samples, "broker_audit_failures_total", kind="call.started") == 1
    assert calls(samples, "test.echo", "allow", "refused", "audit_unavailable") == 1
    assert stage_count(samples, "upstream") == 0
    assert upstream.requests == []


def test_each_broker_has_its_own_registry() -> None:
    one, two = PrometheusMetrics(), PrometheusMetrics()
    one.call("test.echo", "allow", "succeeded", "")
    assert b'broker_calls_total{capability="test.echo"' in one.exposition()[0]
    assert b"broker_calls_total{" not in two.exposition()[0]


def test_labels_stay_bounded_whatever_the_core_passes() -> None:
    metrics: Metrics = PrometheusMetrics()
    metrics.call("Not A Name/../x", "maybe", "weird", "Some message with a value")
    metrics.stage("made-up", 0.1)
    metrics.secret_cache("sometimes")
    metrics.audit("kind with spaces", ok=True)
    metrics.spend("x" * 500, 1)
    text = metrics.exposition()[0].decode()
    for raw in ("Not A Name", "maybe", "weird", "Some message", "made-up", "sometimes", "spaces"):
        assert raw not in text
    assert "x" * 129 not in text
    assert 'capability="other",code="other",decision="other",outcome="other"' in text


def test_stage_histogram_buckets_are_cumulative_and_land_where_prometheus_puts_them() -> None:
    """The stage histogram is kept as plain counts: the exposition must still be a valid
    Prometheus histogram, each value in the first bucket whose bound is >= it."""
    m = PrometheusMetrics()
    for seconds in (0.0005, 0.0007, 0.001, 0.3, 99.0, -1.0):  # a clock step back counts as 0
        m.stage("decide", seconds)
    m.stage("not-a-stage", 0.002)
    body, _ = m.exposition()
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name != "broker_stage_duration_seconds" or family.type == "histogram"
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value

    def bucket(stage: str, le: str) -> float:
        return value(samples, "broker_stage_duration_seconds_bucket", stage=stage, le=le)

    bounds = ("0.0005", "0.001", "0.0025", "0.25", "0.5", "60.0")
    assert [bucket("decide", le) for le in bounds] == [2, 4, 4, 4, 5, 5]
    assert bucket("decide", "+Inf") == stage_count(samples, "decide") == 6
    assert value(samples, "broker_stage_duration_seconds_sum", stage="decide") == pytest.approx(
        99.3022
    )
    assert bucket("other", "0.0025") == 1 and bucket("other", "0.001") == 0
    assert stage_count(samples, "total") == 0  # known stages exist at zero
