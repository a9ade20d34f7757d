"""Tracing with OpenTelemetry: the only module that imports opentelemetry.

``OtelTracer`` implements the ``Tracer`` port (ports.py) over one SDK ``TracerProvider`` per
broker (never the global one, so several brokers in one process keep their spans apart).
``tracer_from_env()`` configures it from the standard ``OTEL_*`` variables:

- An exporter is installed only when one is asked for: ``OTEL_TRACES_EXPORTER`` (``otlp``,
  ``console``, ``none``; comma-separated), or, when that is unset, an OTLP endpoint
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). OTLP goes over
  HTTP/protobuf; headers, timeout, compression and certificates are the exporter's own
  ``OTEL_EXPORTER_OTLP_*`` variables, batching the ``OTEL_BSP_*`` ones, the sampler
  ``OTEL_TRACES_SAMPLER``, and the resource ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``
  (``service.name`` defaults to ``capbroker``).
- Without an exporter (or with ``OTEL_SDK_DISABLED=true``) no SDK span exists at all:
  ``PassThroughTracer`` only keeps W3C ids (a few microseconds per call), so every call still
  gets a trace id for its audit record and the upstream a ``traceparent``, and a caller's
  sampling decision is passed on untouched.

From the caller only ``traceparent`` is taken (not ``tracestate``): what reaches the upstream is
the 128-bit trace id, the broker's own span id and the sampled flag, nothing else the agent wrote.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker.ports import Span, SpanValue

SERVICE = "capbroker"
SCOPE = "broker"
TRACEPARENT = "traceparent"
MAX_TRACEPARENT = 512  # W3C: longer values are ignored (a new trace starts)
SAMPLED, RANDOM = 0x01, 0x02  # W3C trace flags; other bits are reserved and sent as zero

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
# Port attribute names -> OpenTelemetry attribute keys; anything else becomes ``broker.<name>``.
_KEYS = {
    "http_method": "http.request.method",
    "http_status": "http.response.status_code",
    "error_code": "error.type",
}


def attribute_key(name: str) -> str:
    return _KEYS.get(name, f"broker.{name}")


class _OtelSpan:
    """The port's Span over an OpenTelemetry span."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @property
    def trace_id(self) -> str | None:
        ctx = self._span.get_span_context()
        return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None

    def set(self, **attrs: SpanValue | None) -> None:
        for name, value in attrs.items():
            if value is not None:
                self._span.set_attribute(attribute_key(name), value)

    def fail(self, code: str) -> None:
        self._span.set_attribute("error.type", code)
        self._span.set_status(Status(StatusCode.ERROR, code))


class OtelTracer:
    """Tracer port over a TracerProvider this broker owns (``close`` shuts it down)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()

    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        traceparent: str | None = None,
        **attrs: SpanValue | None,
    ) -> AbstractContextManager[Span]:
        return self._span(name, kind, traceparent, attrs)

    @contextmanager
    def _span(
        self, name: str, kind: str, traceparent: str | None, attrs: dict[str, SpanValue | None]
    ) -> Iterator[Span]:
        parent = None
        if traceparent is not None:
            # A remote parent replaces the current context; a malformed header gives a new trace.
            carrier = {TRACEPARENT: traceparent} if len(traceparent) <= MAX_TRACEPARENT else {}
            parent = self._propagator.extract(carrier)
        # Exceptions are not recorded: their messages may quote argument values. The core
        # marks failures with machine codes (Span.fail) instead.
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=_KINDS.get(kind, SpanKind.INTERNAL),
            attributes={attribute_key(k): v for k, v in attrs.items() if v is not None},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _OtelSpan(span)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        if TRACEPARENT in carrier:  # tracestate is never sent on
            headers[TRACEPARENT] = carrier[TRACEPARENT]

    def close(self) -> None:
        """Flush what is batched and stop the exporters (blocking: call it off the loop)."""
        self.provider.shutdown()


# --- no exporter: ids and propagation only ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ids:
    trace_id: int
    span_id: int
    flags: int


_CURRENT: ContextVar[_Ids | None] = ContextVar("broker_trace_ids", default=None)


class _PassThroughSpan:
    """A span that is only ids: current while its block runs, records nothing."""

    __slots__ = ("_ids", "_token")

    def __init__(self, ids: _Ids) -> None:
        self._ids = ids
        self._token: Token[_Ids | None] | None = None

    @property
    def trace_id(self) -> str | None:
        # Formatted on demand: a call makes seven spans and reads the id of one.
        return trace.format_trace_id(self._ids.trace_id)

    def __enter__(self) -> Span:
        self._token = _CURRENT.set(self._ids)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None

    def set(self, **attrs: SpanValue | None) -> None:
        return None

    def fail(self, code: str) -> None:
        return None


class _UnrecordedSpan:
    """An internal span of the pass-through tracer: nothing is recorded and nothing is passed
    on from inside it (only the upstream request carries a traceparent, from its client span,
    a sibling of the internal ones), so it need not even become current."""

    __slots__ = ()

    @property
    def trace_id(self) -> str | None:
        ids = _CURRENT.get()
        return None if ids is None else trace.format_trace_id(ids.trace_id)

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def set(self, **attrs: SpanValue | None) -> None:
        return None

    def fail(self, code: str) -> None:
        return None


_UNRECORDED = _UnrecordedSpan()


class PassThroughTracer:
    """Tracer port when nothing is exported: W3C trace context is kept and passed on (the
    caller's trace id and sampled flag, a fresh span id per span), no span is recorded."""

    def __init__(self) -> None:
        self._propagator = TraceContextTextMapPropagator()

    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        traceparent: str | None = None,
        **attrs: SpanValue | None,
    ) -> AbstractContextManager[Span]:
        if kind == "internal" and traceparent is None:
            return _UNRECORDED  # a stage span: ~3 us each, five a call, for nothing
        parent = self._remote(traceparent) if traceparent is not None else _CURRENT.get()
        if parent is None:  # a new trace, not sampled (nothing here records it)
            return _PassThroughSpan(_Ids(_random_id(128), _random_id(64), RANDOM))
        return _PassThroughSpan(_Ids(parent.trace_id, _random_id(64), parent.flags))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        ids = _CURRENT.get()
        if ids is not None:
            headers[TRACEPARENT] = (
                f"00-{trace.format_trace_id(ids.trace_id)}-"
                f"{trace.format_span_id(ids.span_id)}-{ids.flags:02x}"
            )

    def close(self) -> None:
        return None

    def _remote(self, traceparent: str) -> _Ids | None:
        if len(traceparent) > MAX_TRACEPARENT:
            return None
        carrier = {TRACEPARENT: traceparent}
        ctx = trace.get_current_span(self._propagator.extract(carrier)).get_span_context()
        if not ctx.is_valid:
            return None
        return _Ids(ctx.trace_id, ctx.span_id, int(ctx.trace_flags) & (SAMPLED | RANDOM))


def _random_id(bits: int) -> int:
    # Like the SDK's RandomIdGenerator: ids are identifiers, not secrets; never zero (invalid).
    value = 0
    while value == 0:
        value = random.getrandbits(bits)
    return value


# --- building ---------------------------------------------------------------------------------


def make_tracer(
    exporters: Sequence[SpanExporter], *, batch: bool = True, resource: Resource | None = None
) -> OtelTracer:
    """An SDK tracer exporting to ``exporters``; the sampler follows ``OTEL_TRACES_SAMPLER``
    (default: parent-based, always on). ``batch=False`` exports each span as it ends (tests);
    batching follows the ``OTEL_BSP_*`` variables."""
    provider = TracerProvider(resource=resource or _resource(), shutdown_on_exit=False)
    for exporter in exporters:
        processor: SpanProcessor = (
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
    return OtelTracer(provider)


def tracer_from_env() -> OtelTracer | PassThroughTracer:
    """The tracer the ``OTEL_*`` environment asks for (see the module docstring)."""
    exporters = exporters_from_env()
    return make_tracer(exporters) if exporters else PassThroughTracer()


def exporters_from_env() -> list[SpanExporter]:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in names.split(",")):
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter(service_name=SERVICE))
        elif name not in ("none", ""):
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    return exporters


def _otlp_exporter() -> SpanExporter:
    env = os.environ
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol.strip().lower() != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use http/protobuf")
    # Imported here: the exporter pulls in protobuf and requests, needed only when exporting.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, TLS: its own OTEL_* variables


def _resource() -> Resource:
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    return resource
