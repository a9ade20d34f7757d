"""Upstream protection: the circuit breaker per upstream host, retries of idempotent
capabilities only, and the global rate limit per capability.

End to end against a real broker, OpenBao and a recording upstream on loopback that counts what
it receives (on SQLite and PostgreSQL); the breaker's state machine also on its own, with a
clock the test moves (so no test waits on or asserts wall-clock time, except the end-to-end
recovery tests, which sleep just past a short cool-down).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.breaker import CircuitBreakers, upstream_key
from broker.devserver import DevVault
from broker.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from broker.ports import UpstreamResponse
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream

SECRET = "brk-secret-0123456789"
# Small values so tests are quick: 3 failures open a circuit, backoff in milliseconds.
FAST = {
    "breaker_failure_threshold": 3,
    "breaker_cool_down": 60.0,
    "retry_attempts": 3,
    "retry_backoff": 0.01,
    "retry_backoff_max": 0.02,
}

MakeBroker = Callable[..., RunningBroker]


@pytest.fixture
def make_broker(openbao: DevVault, database_url: str, tmp_path: Path) -> Iterator[MakeBroker]:
    started: list[RunningBroker] = []

    def make(**overrides: Any) -> RunningBroker:
        data = tmp_path / f"data{len(started)}"
        rb = start_broker(openbao, database_url, data, **{**FAST, **overrides})
        started.append(rb)
        rb.secret("tests/brk", {"token": SECRET})
        rb.admin.add_policy("role:tester", "brk.*")
        return rb

    yield make
    for rb in started:
        rb.close()


def manifest(
    name: str, url: str, *, idempotent: bool = False, timeout: str = "5s", **limits: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "idempotent": idempotent,
        "secrets": {"tok": {"path": "tests/brk", "key": "token"}},
        "http": {
            "method": "PUT" if idempotent else "POST",
            "url": url,
            "headers": {"Authorization": "Bearer {secrets.tok}"},
            "timeout": timeout,
        },
        "limits": limits,
    }


def invoke(rb: RunningBroker, token: str, name: str) -> httpx.Response:
    return rb.http(token).post(f"/v1/capabilities/{name}/invoke", json={"args": {}})


def sent(upstream: RunningUpstream, path: str = "/flaky") -> int:
    return sum(1 for r in upstream.requests if r.raw_path == path)


def finished(rb: RunningBroker, call_id: str) -> dict[str, Any]:
    (event,) = [e for e in rb.audit(kind="call.finished") if e["call_id"] == call_id]
    return event


def closed_port_url() -> str:
    """A loopback URL nobody listens on: every connect is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing"


def circuit_gauge(rb: RunningBroker, upstream: str) -> float | None:
    text = httpx.get(f"{rb.url}/metrics", trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "broker_upstream_circuit_state" and (
                sample.labels["upstream"] == upstream
            ):
                return float(sample.value)
    return None


# -- the circuit breaker, end to end -----------------------------------------------------------


def test_breaker_opens_after_failures_and_refuses_without_contacting_the_upstream(
    make_broker: MakeBroker, upstream: RunningUpstream, second_upstream: RunningUpstream
) -> None:
    rb = make_broker()
    upstream.app.fail_next(1000)
    rb.admin.put_capability(manifest("brk.flaky", f"{upstream.url}/flaky"))
    rb.admin.put_capability(manifest("brk.same.host", f"{upstream.url}/json"))
    rb.admin.put_capability(manifest("brk.other.host", f"{second_upstream.url}/json"))
    token = rb.agent("ada", ["tester"])

    for _ in range(3):
        r = invoke(rb, token, "brk.flaky")
        assert r.status_code == 200 and r.json()["upstream_status"] == 503, r.text
    assert sent(upstream) == 3

    r = invoke(rb, token, "brk.flaky")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert sent(upstream) == 3  # refused without contacting the upstream
    # The breaker is per host:port: another capability on that host is refused too ...
    same = invoke(rb, token, "brk.same.host")
    assert same.status_code == 503 and same.json()["error"]["code"] == "upstream_unavailable"
    assert len(upstream.requests) == 3
    # ... and one on another host is not.
    assert invoke(rb, token, "brk.other.host").status_code == 200

    record = finished(rb, error["call_id"])
    assert record["status"] == "failed" and record["reason"] == "upstream_unavailable"
    assert record["detail"]["attempts"] == 0
    assert record["secrets"] == []  # no secret was read for the refused call
    key = upstream_key(upstream.url)
    assert rb.broker.breaker.state(upstream.url) == "open"
    assert circuit_gauge(rb, key) == 2
    assert circuit_gauge(rb, upstream_key(second_upstream.url)) == 0


def test_connection_failures_open_the_breaker(make_broker: MakeBroker) -> None:
    rb = make_broker()
    url = closed_port_url()
    rb.admin.put_capability(manifest("brk.nowhere", url))
    token = rb.agent("ben", ["tester"])
    codes = [invoke(rb, token, "brk.nowhere").json()["error"]["code"] for _ in range(4)]
    assert codes == ["upstream_error"] * 3 + ["upstream_unavailable"]
    reasons = [e["reason"] for e in rb.audit(kind="call.finished")]
    assert sorted(reasons) == sorted(["upstream_error"] * 3 + ["upstream_unavailable"])


def test_a_successful_probe_after_the_cool_down_closes_the_circuit(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_cool_down=0.5)
    upstream.app.fail_next(3)
    rb.admin.put_capability(manifest("brk.flaky", f"{upstream.url}/flaky"))
    token = rb.agent("cy", ["tester"])
    for _ in range(3):
        assert invoke(rb, token, "brk.flaky").json()["upstream_status"] == 503
    assert rb.broker.breaker.state(upstream.url) == "open"

    time.sleep(0.6)  # past the cool-down: the next call is a probe
    r = invoke(rb, token, "brk.flaky")
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert sent(upstream) == 4
    assert rb.broker.breaker.state(upstream.url) == "closed"
    assert circuit_gauge(rb, upstream_key(upstream.url)) == 0
    assert [invoke(rb, token, "brk.flaky").status_code for _ in range(3)] == [200] * 3
    assert sent(upstream) == 7


def test_a_failing_probe_opens_the_circuit_again(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_cool_down=0.5)
    upstream.app.fail_next(1000, status=500)
    rb.admin.put_capability(manifest("brk.flaky", f"{upstream.url}/flaky"))
    token = rb.agent("dee", ["tester"])
    for _ in range(3):
        assert invoke(rb, token, "brk.flaky").json()["upstream_status"] == 500
    time.sleep(0.6)
    r = invoke(rb, token, "brk.flaky")  # the probe goes through and fails
    assert r.json()["upstream_status"] == 500
    assert sent(upstream) == 4
    assert rb.broker.breaker.state(upstream.url) == "open"
    assert circuit_gauge(rb, upstream_key(upstream.url)) == 2


def test_a_probe_that_never_reaches_the_upstream_frees_its_slot(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    """A probe that never reaches the upstream (its secret is missing) does not decide the
    circuit, and gives its probe slot back."""
    rb = make_broker(breaker_cool_down=0.5)
    upstream.app.fail_next(3)
    good = manifest("brk.flaky", f"{upstream.url}/flaky")
    broken = manifest("brk.nosecret", f"{upstream.url}/flaky")
    broken["secrets"]["tok"]["path"] = "tests/brk-missing"
    rb.admin.put_capability(good)
    rb.admin.put_capability(broken)
    token = rb.agent("eve", ["tester"])
    for _ in range(3):
        invoke(rb, token, "brk.flaky")
    time.sleep(0.6)
    r = invoke(rb, token, "brk.nosecret")
    assert r.json()["error"]["code"] == "secret_unavailable"
    assert rb.broker.breaker.state(upstream.url) == "half_open"
    r = invoke(rb, token, "brk.flaky")  # the probe slot is free again
    assert r.json()["status"] == "succeeded"
    assert rb.broker.breaker.state(upstream.url) == "closed"


# -- retries: idempotent capabilities only ---------------------------------------------------


def test_a_non_idempotent_capability_is_sent_exactly_once(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_failure_threshold=100)
    upstream.app.fail_next(1000)
    rb.admin.put_capability(manifest("brk.send", f"{upstream.url}/flaky"))
    rb.admin.put_capability(manifest("brk.send.nowhere", closed_port_url()))
    token = rb.agent("fay", ["tester"])
    r = invoke(rb, token, "brk.send")
    assert r.json()["upstream_status"] == 503 and r.json()["status"] == "upstream_error"
    assert sent(upstream) == 1
    assert finished(rb, r.json()["call_id"])["detail"]["attempts"] == 1
    # Not even a refused connection is tried again.
    r = invoke(rb, token, "brk.send.nowhere")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert finished(rb, r.json()["error"]["call_id"])["detail"]["attempts"] == 1


def test_an_idempotent_capability_is_retried_until_the_upstream_recovers(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_failure_threshold=100)
    rb.admin.put_capability(manifest("brk.read", f"{upstream.url}/flaky", idempotent=True))
    token = rb.agent("gus", ["tester"])
    upstream.app.fail_next(2, status=502)
    r = invoke(rb, token, "brk.read")
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert sent(upstream) == 3
    record = finished(rb, r.json()["call_id"])
    assert record["status"] == "succeeded" and record["detail"]["attempts"] == 3

    upstream.app.fail_next(1000, status=503)  # never recovers: bounded attempts, last answer
    r = invoke(rb, token, "brk.read")
    assert r.json()["status"] == "upstream_error" and r.json()["upstream_status"] == 503
    assert sent(upstream) == 6
    assert finished(rb, r.json()["call_id"])["detail"]["attempts"] == 3


def test_idempotent_retries_only_where_another_try_can_help(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_failure_threshold=100)
    rb.admin.put_capability(manifest("brk.read", f"{upstream.url}/flaky", idempotent=True))
    rb.admin.put_capability(manifest("brk.read.nowhere", closed_port_url(), idempotent=True))
    slow = manifest("brk.read.slow", f"{upstream.url}/slow-drip", idempotent=True, timeout="0.5s")
    rb.admin.put_capability(slow)
    token = rb.agent("hal", ["tester"])

    upstream.app.fail_next(1000, status=500)  # the upstream's verdict: not retried
    r = invoke(rb, token, "brk.read")
    assert r.json()["upstream_status"] == 500 and sent(upstream) == 1

    r = invoke(rb, token, "brk.read.nowhere")  # connection refused: retried
    assert r.json()["error"]["code"] == "upstream_error"
    assert finished(rb, r.json()["error"]["call_id"])["detail"]["attempts"] == 3

    r = invoke(rb, token, "brk.read.slow")  # the timeout used the whole deadline: no retry
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert sent(upstream, "/slow-drip") == 1
    assert finished(rb, r.json()["error"]["call_id"])["detail"]["attempts"] == 1


def test_retries_stop_when_the_circuit_opens(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker(breaker_failure_threshold=2, retry_attempts=5)
    rb.admin.put_capability(manifest("brk.read", f"{upstream.url}/flaky", idempotent=True))
    token = rb.agent("ivy", ["tester"])
    upstream.app.fail_next(1000, status=503)
    r = invoke(rb, token, "brk.read")
    assert r.json()["upstream_status"] == 503  # the last real answer stands
    assert sent(upstream) == 2
    assert finished(rb, r.json()["call_id"])["detail"]["attempts"] == 2
    assert invoke(rb, token, "brk.read").json()["error"]["code"] == "upstream_unavailable"
    assert sent(upstream) == 2


# -- the global rate limit ---------------------------------------------------------------------


def test_global_rate_limit_counts_all_agents_together(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker()
    rb.admin.put_capability(manifest("brk.shared", f"{upstream.url}/json", global_rate="2/minute"))
    ann, bo = rb.agent("ann", ["tester"]), rb.agent("bo", ["tester"])
    assert invoke(rb, ann, "brk.shared").status_code == 200
    assert invoke(rb, bo, "brk.shared").status_code == 200
    for token in (ann, bo):
        r = invoke(rb, token, "brk.shared")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert "all agents" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert sent(upstream, "/json") == 2
    rejected = rb.audit(kind="call.rejected")
    assert sorted(e["agent_id"] for e in rejected) == ["ann", "bo"]
    assert [e["reason"] for e in rejected] == ["rate_limited", "rate_limited"]


def test_a_call_refused_by_one_window_is_not_counted_in_the_other(
    make_broker: MakeBroker, upstream: RunningUpstream
) -> None:
    rb = make_broker()
    cap = manifest("brk.both", f"{upstream.url}/json", rate="1/minute", global_rate="1/minute")
    rb.admin.put_capability(cap)
    ann, bo = rb.agent("ann", ["tester"]), rb.agent("bo", ["tester"])
    assert invoke(rb, ann, "brk.both").status_code == 200
    assert "all agents" in invoke(rb, bo, "brk.both").json()["error"]["message"]
    assert "per agent" in invoke(rb, ann, "brk.both").json()["error"]["message"]
    assert sent(upstream, "/json") == 1


# -- the state machine on its own (a clock the test moves) ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


URL = "https://api.example.test/v1/{args.id}"
OK = UpstreamResponse(200, (), b"")
NOT_FOUND = UpstreamResponse(404, (), b"")
DOWN = UpstreamResponse(503, (), b"")


def breakers(clock: Clock, probes: int = 1) -> CircuitBreakers:
    return CircuitBreakers(failure_threshold=3, cool_down=10, half_open_probes=probes, clock=clock)


def fail(b: CircuitBreakers, times: int, outcome: Any = DOWN) -> None:
    for _ in range(times):
        b.admit(URL).record(outcome)


def test_upstream_key_is_host_and_port() -> None:
    assert upstream_key(URL) == "api.example.test:443"
    assert upstream_key("http://API.example.test/x") == "api.example.test:80"
    assert upstream_key("http://127.0.0.1:8080/{args.a}/b") == "127.0.0.1:8080"
    assert upstream_key("http://[::1]:9/x") == "[::1]:9"


def test_only_consecutive_failures_open_the_circuit() -> None:
    b = breakers(Clock())
    fail(b, 2)
    b.admit(URL).record(NOT_FOUND)  # the host answered: a success, the count starts again
    fail(b, 2, UpstreamError("bad TLS"))  # not transient: says nothing, counts neither way
    fail(b, 2)
    assert b.state(URL) == "closed"
    fail(b, 1, UpstreamTimeout())
    assert b.state(URL) == "open"
    with pytest.raises(UpstreamUnavailable) as info:
        b.admit(URL)
    assert info.value.headers["Retry-After"] == "10"
    assert b.state("https://api.example.test/other") == "open"  # same host:port
    assert b.state("https://api.example.test:8443/") == "closed"


def test_half_open_lets_a_limited_number_of_probes_through() -> None:
    clock = Clock()
    b = breakers(clock, probes=2)
    fail(b, 3)
    clock.now += 9.5
    with pytest.raises(UpstreamUnavailable):
        b.admit(URL)
    clock.now += 0.5
    first, second = b.admit(URL), b.admit(URL)
    assert b.state(URL) == "half_open"
    with pytest.raises(UpstreamUnavailable):
        b.admit(URL)  # both probe slots are taken
    second.release()  # never used: the slot goes back, the circuit stays half-open
    third = b.admit(URL)
    first.record(OK)
    assert b.state(URL) == "closed"
    third.record(DOWN)  # a later failure counts like any other while closed
    assert b.state(URL) == "closed"


def test_a_failed_probe_reopens_for_a_new_cool_down() -> None:
    clock = Clock()
    b = breakers(clock)
    fail(b, 3)
    clock.now += 10
    probe = b.admit(URL)
    transient = UpstreamError("reset")
    transient.transient = True
    probe.record(transient)
    assert b.state(URL) == "open"
    clock.now += 9
    with pytest.raises(UpstreamUnavailable):
        b.admit(URL)
    clock.now += 1
    b.admit(URL).record(OK)
    assert b.state(URL) == "closed"


def test_late_outcomes_of_calls_admitted_before_the_circuit_opened_are_ignored() -> None:
    clock = Clock()
    b = breakers(clock)
    early = b.admit(URL)
    fail(b, 3)
    early.record(OK)  # admitted while closed, ends while open: changes nothing
    assert b.state(URL) == "open"
    early.record(DOWN)  # a permit settles once
    clock.now += 10
    b.admit(URL).record(OK)
    assert b.state(URL) == "closed"
