"""Tracing end to end: a real broker, OpenBao and a recording upstream, spans kept in memory.

W3C ``traceparent`` from the agent is the parent of the broker's spans; the upstream receives
the broker's upstream span as its parent; every audit record carries the trace id (the agent's,
or the broker's own); spans hold names and codes, never argument values or secrets. The last
tests export through the standard ``OTEL_*`` variables to a real OTLP/HTTP receiver on loopback.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker import telemetry
from broker.bootstrap import build_broker
from broker.demo import ServerThread
from broker.devserver import DevVault
from broker.telemetry import (
    OtelTracer,
    PassThroughTracer,
    exporters_from_env,
    make_tracer,
    tracer_from_env,
)
from tests.support import brokers
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import SECRET, echo_manifest, secret_forms

ARG = "arg-value-4b1d9e"  # an argument value that must never appear in a span
STAGES = {"broker.authenticate", "broker.decide", "broker.secrets", "broker.upstream"}
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine sets, these tests decide the OTEL_* configuration themselves."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningBroker]:
    """A running broker whose tracer exports each span to memory as it ends."""
    tracer = make_tracer([exporter], batch=False)
    # start_broker calls build_broker(settings); hand it the test's tracer (keyword-only).
    monkeypatch.setattr(brokers, "build_broker", functools.partial(build_broker, tracer=tracer))
    rb = start_broker(openbao, database_url, tmp_path / "data")
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    yield rb
    rb.close()
    tracer.close()


def new_traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def invoke(rb: RunningBroker, token: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    args = kw.pop("args", {"message": ARG, "count": 7})
    name = kw.pop("name", "test.echo")
    return rb.http(token).post(
        f"/v1/capabilities/{name}/invoke", json={"args": args}, headers=headers or {}
    )


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if hex_trace(s) == trace_id]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def everything_in(spans: list[ReadableSpan]) -> str:
    """Every name, attribute, status and event of the spans, as one text."""
    parts = []
    for s in spans:
        parts.append(s.name)
        parts.append(json.dumps(dict(s.attributes or {}), default=str))
        parts.append(str(s.status.description))
        parts.extend(json.dumps(dict(e.attributes or {}), default=str) for e in s.events)
        parts.append(json.dumps(dict(s.resource.attributes), default=str))
    return "\n".join(parts)


def assert_clean(text: str, *values: str) -> None:
    for value in values:
        for form in secret_forms(value):
            assert form not in text, f"{form!r} leaked into the spans"


# -- propagation -------------------------------------------------------------------------------


def test_upstream_receives_the_agents_trace_with_the_upstream_span_as_parent(
    traced: RunningBroker, upstream: RunningUpstream, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, _ = new_traceparent()
    r = invoke(traced, traced.agent("alice", ["tester"]), {"traceparent": header})
    assert r.status_code == 200, r.text
    received = upstream.requests[-1].header("traceparent")
    assert received is not None
    match = TRACEPARENT.match(received)
    assert match, received
    assert match.group(1) == trace_id  # the agent's trace goes on
    upstream_span = one(spans_of(exporter, trace_id), "broker.upstream")
    assert match.group(2) == hex_span(upstream_span)  # its parent is the broker's upstream span
    assert match.group(3) == "01"  # sampled, as the agent asked
    assert upstream.requests[-1].header("tracestate") is None


def test_stage_spans_form_one_tree_under_the_agents_span(
    traced: RunningBroker, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, agent_span = new_traceparent()
    r = invoke(traced, traced.agent("bob", ["tester"]), {"traceparent": header})
    assert r.status_code == 200, r.text
    spans = spans_of(exporter, trace_id)
    root = one(spans, "broker.invoke")
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == agent_span
    assert root.kind == SpanKind.SERVER
    children = [s for s in spans if s is not root]
    assert {s.name for s in children} == STAGES | {"broker.audit"}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in children)
    audits = [s for s in children if s.name == "broker.audit"]
    assert sorted(str((s.attributes or {})["broker.audit_kind"]) for s in audits) == [
        "call.finished",
        "call.started",
    ]
    # Attributes: who, what, the decision and the codes.
    attrs = dict(root.attributes or {})
    assert attrs["broker.call_id"] == r.json()["call_id"]
    assert attrs["broker.capability"] == "test.echo"
    assert attrs["broker.agent_id"] == "bob"
    assert attrs["broker.decision"] == "allow"
    assert attrs["broker.outcome"] == "succeeded"
    assert attrs["http.response.status_code"] == 200
    assert attrs["broker.upstream_status"] == 200
    assert dict(one(spans, "broker.authenticate").attributes or {}) == {"broker.agent_id": "bob"}
    decide = dict(one(spans, "broker.decide").attributes or {})
    assert decide["broker.decision"] == "allow" and decide["broker.capability"] == "test.echo"
    assert isinstance(decide["broker.rule"], str)
    assert dict(one(spans, "broker.secrets").attributes or {}) == {"broker.secret_count": 1}
    up = one(spans, "broker.upstream")
    assert up.kind == SpanKind.CLIENT
    assert dict(up.attributes or {}) == {
        "http.request.method": "POST",
        "http.response.status_code": 200,
    }
    assert all(s.status.status_code == StatusCode.UNSET for s in spans)
    # Nothing of the arguments or the credential, in any form.
    assert_clean(everything_in(spans), SECRET, ARG)


def test_audit_records_carry_the_agents_trace_id(
    traced: RunningBroker, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, _ = new_traceparent()
    r = invoke(traced, traced.agent("carol", ["tester"]), {"traceparent": header})
    events = traced.audit(call_id=r.json()["call_id"])
    assert [e["kind"] for e in events] == ["call.started", "call.finished"]
    assert {e["trace_id"] for e in events} == {trace_id}
    assert traced.audit(trace_id=trace_id) == events  # and the audit log is searchable by it


def test_without_a_traceparent_the_broker_starts_the_trace(
    traced: RunningBroker, upstream: RunningUpstream, exporter: InMemorySpanExporter
) -> None:
    r = invoke(traced, traced.agent("dave", ["tester"]))
    assert r.status_code == 200, r.text
    [root] = [s for s in exporter.get_finished_spans() if s.name == "broker.invoke"]
    assert root.parent is None
    trace_id = hex_trace(root)
    assert trace_id != "0" * 32
    events = traced.audit(call_id=r.json()["call_id"])
    assert {e["trace_id"] for e in events} == {trace_id}
    received = upstream.requests[-1].header("traceparent") or ""
    assert received.split("-")[1] == trace_id


@pytest.mark.parametrize(
    "header",
    [
        "00-{t}-0000000000000000-01",  # zero parent id
        "00-{t}-00f067aa0ba902b7",  # flags missing
        "xx-{t}-00f067aa0ba902b7-01",  # bad version
        "00-{t}-00f067aa0ba902b7-01" + "-x" * 300,  # too long
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(
    traced: RunningBroker, exporter: InMemorySpanExporter, header: str
) -> None:
    agents_trace = secrets.token_hex(16)
    r = invoke(
        traced, traced.agent("erin", ["tester"]), {"traceparent": header.format(t=agents_trace)}
    )
    assert r.status_code == 200, r.text
    [root] = [s for s in exporter.get_finished_spans() if s.name == "broker.invoke"]
    assert root.parent is None and hex_trace(root) != agents_trace
    events = traced.audit(call_id=r.json()["call_id"])
    assert {e["trace_id"] for e in events} == {hex_trace(root)}  # audit and traces agree


def test_the_manifest_cannot_set_trace_headers(
    traced: RunningBroker, upstream: RunningUpstream, exporter: InMemorySpanExporter
) -> None:
    fixed = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    pinned = echo_manifest(upstream.url, "test.pinned")
    pinned["http"]["headers"].update({"traceparent": fixed, "tracestate": "vendor=x"})
    refused = traced.http(traced.admin_token).put("/v1/capabilities/test.pinned", json=pinned)
    assert refused.status_code == 422 and "traceparent" in refused.json()["error"]["message"]
    traced.admin.put_capability(echo_manifest(upstream.url, "test.pinned"))
    header, trace_id, _ = new_traceparent()
    r = invoke(
        traced,
        traced.agent("frank", ["tester"]),
        {"traceparent": header, "tracestate": "agent=smuggled"},
        name="test.pinned",
    )
    assert r.status_code == 200, r.text
    got = upstream.requests[-1].headers
    trace_headers = [(k.lower(), v) for k, v in got if k.lower() in ("traceparent", "tracestate")]
    assert len(trace_headers) == 1 and trace_headers[0][0] == "traceparent"
    assert trace_headers[0][1].split("-")[1] == trace_id


# -- refusals and failures -----------------------------------------------------------------------


def test_a_policy_denial_is_traced_without_an_error_status(
    traced: RunningBroker, upstream: RunningUpstream, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, _ = new_traceparent()
    r = invoke(traced, traced.agent("gina"), {"traceparent": header})
    assert r.status_code == 403
    spans = spans_of(exporter, trace_id)
    assert {s.name for s in spans} == {
        "broker.invoke",
        "broker.authenticate",
        "broker.decide",
        "broker.audit",
    }
    root = one(spans, "broker.invoke")
    attrs = dict(root.attributes or {})
    assert attrs["broker.decision"] == "deny" and attrs["broker.outcome"] == "refused"
    assert attrs["error.type"] == "policy_denied" and attrs["http.response.status_code"] == 403
    assert root.status.status_code == StatusCode.UNSET  # the caller's fault, not the broker's
    assert dict(one(spans, "broker.audit").attributes or {}) == {"broker.audit_kind": "call.denied"}
    assert [e["trace_id"] for e in traced.audit(call_id=r.json()["error"]["call_id"])] == [trace_id]
    assert upstream.requests == []
    assert_clean(everything_in(spans), SECRET, ARG)


def test_an_unauthenticated_call_is_traced_and_audited_with_its_trace(
    traced: RunningBroker, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, _ = new_traceparent()
    r = invoke(traced, "cbk_forged", {"traceparent": header})
    assert r.status_code == 401
    spans = spans_of(exporter, trace_id)
    assert {s.name for s in spans} == {"broker.invoke", "broker.authenticate", "broker.audit"}
    assert dict(one(spans, "broker.authenticate").attributes or {}) == {
        "error.type": "unauthenticated"
    }
    assert [e["trace_id"] for e in traced.audit(call_id=r.json()["error"]["call_id"])] == [trace_id]
    assert_clean(everything_in(spans), "cbk_forged")


def test_a_failure_after_the_start_marks_the_failing_stage(
    traced: RunningBroker, upstream: RunningUpstream, exporter: InMemorySpanExporter
) -> None:
    manifest = echo_manifest(upstream.url, "test.nosecret")
    manifest["secrets"] = {"tok": {"path": "tests/absent", "key": "token"}}
    traced.admin.put_capability(manifest)
    header, trace_id, _ = new_traceparent()
    r = invoke(
        traced, traced.agent("hank", ["tester"]), {"traceparent": header}, name="test.nosecret"
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "secret_unavailable"
    spans = spans_of(exporter, trace_id)
    assert "broker.upstream" not in {s.name for s in spans}
    for name in ("broker.secrets", "broker.invoke"):
        span = one(spans, name)
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == "secret_unavailable"  # a code, never the message
        assert (span.attributes or {})["error.type"] == "secret_unavailable"
    assert (one(spans, "broker.invoke").attributes or {})["broker.outcome"] == "failed"
    assert all(not s.events for s in spans)  # no exception events (their texts may hold values)
    assert "tests/absent" not in everything_in(spans)
    finished = traced.audit(call_id=r.json()["error"]["call_id"], kind="call.finished")
    assert [e["trace_id"] for e in finished] == [trace_id]


# -- configuration: OTEL_* -------------------------------------------------------------------------


def test_no_exporter_configured_records_nothing_but_keeps_the_trace(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    """The default broker (OTEL_* unset): no exporter, no recording, trace ids all the same."""
    rb = running_broker
    assert isinstance(rb.broker.tracer, PassThroughTracer)  # no SDK spans at all
    rb.secret("tests/echo", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.add_policy("role:tester", "test.*")
    token = rb.agent("ivan", ["tester"])
    # No traceparent: the broker's own trace, not sampled (nothing is recorded).
    r = invoke(rb, token)
    [event] = rb.audit(call_id=r.json()["call_id"], kind="call.finished")
    own = upstream.requests[-1].header("traceparent") or ""
    assert TRACEPARENT.match(own) and own.split("-")[1] == event["trace_id"]
    assert int(own.split("-")[3], 16) & 1 == 0  # not sampled (0x02: a random trace id)
    # The agent's sampling decision goes on unchanged, either way.
    for sampled in (True, False):
        header, trace_id, agent_span = new_traceparent(sampled)
        r = invoke(rb, token, {"traceparent": header})
        sent = (upstream.requests[-1].header("traceparent") or "").split("-")
        assert sent[1] == trace_id and sent[2] != agent_span
        assert int(sent[3], 16) & 1 == sampled
        assert [e["trace_id"] for e in rb.audit(call_id=r.json()["call_id"])] == [trace_id] * 2


def test_exporters_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert exporters_from_env() == []  # nothing configured: no exporter at all
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [type(e).__name__ for e in exporters_from_env()] == ["ConsoleSpanExporter"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert exporters_from_env() == []  # an explicit "none" wins over an endpoint
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    assert [type(e).__name__ for e in exporters_from_env()] == ["OTLPSpanExporter"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert exporters_from_env() == []
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="http/protobuf"):
        exporters_from_env()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        exporters_from_env()


def test_the_sdk_is_used_only_when_something_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(tracer_from_env(), PassThroughTracer)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracer = tracer_from_env()
    assert isinstance(tracer, OtelTracer)
    tracer.close()


def test_service_name_defaults_to_capbroker_and_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def service_name() -> object:
        tracer = make_tracer([InMemorySpanExporter()])
        try:
            return tracer.provider.resource.attributes["service.name"]
        finally:
            tracer.close()

    assert service_name() == telemetry.SERVICE
    monkeypatch.setenv("OTEL_SERVICE_NAME", "broker-eu-1")
    assert service_name() == "broker-eu-1"


def test_pass_through_keeps_the_callers_trace_and_nests() -> None:
    tracer = PassThroughTracer()
    header, trace_id, agent_span = new_traceparent()
    seen: dict[str, str] = {}
    with tracer.span("broker.invoke", traceparent=header) as root:
        assert root.trace_id == trace_id
        with tracer.span("broker.upstream") as child:
            assert child.trace_id == trace_id
            tracer.inject(seen)
    sent = TRACEPARENT.match(seen["traceparent"])
    assert sent and sent.group(1) == trace_id and sent.group(2) != agent_span
    assert sent.group(3) == "01"
    after: dict[str, str] = {}
    tracer.inject(after)
    assert after == {}  # nothing current once the spans ended
    with tracer.span("broker.invoke", traceparent="00-" + "0" * 32 + "-" + "1" * 16 + "-01") as r:
        assert r.trace_id is not None and r.trace_id != "0" * 32  # invalid parent: new trace


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: records each export request, answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["path"], headers, body))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def test_otlp_export_configured_by_otel_variables(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = OtlpReceiver()
    with ServerThread(receiver) as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=k1")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "capbroker-test")
        rb = start_broker(openbao, database_url, tmp_path / "data")
        try:
            rb.secret("tests/echo", {"token": SECRET})
            rb.admin.put_capability(echo_manifest(upstream.url))
            rb.admin.add_policy("role:tester", "test.*")
            header, trace_id, _ = new_traceparent()
            r = invoke(rb, rb.agent("judy", ["tester"]), {"traceparent": header})
            assert r.status_code == 200, r.text
        finally:
            rb.close()  # shuts the tracer down: the batch is flushed to the collector
    assert receiver.requests, "nothing was exported"
    names: set[str] = set()
    for path, headers, body in receiver.requests:
        assert path == "/v1/traces"
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-collector-key"] == "k1"
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "capbroker-test"
            for scope_spans in resource_spans.scope_spans:
                names |= {s.name for s in scope_spans.spans if s.trace_id.hex() == trace_id}
        assert_clean(body.decode("latin-1"), SECRET, ARG)
    assert names == STAGES | {"broker.invoke", "broker.audit"}
