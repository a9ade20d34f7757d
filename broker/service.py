"""The Broker: every use case, on top of the ports. Entry points (api, cli, mcp) call these.

The invoke pipeline (DESIGN.md "The call pipeline") lives in ``invoke``; every refusal is
audited before it is raised. Rendering and redaction are pure functions of this core
(render.py, redaction.py); everything with I/O sits behind a port.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.capabilities import Capability, slots_in
from broker.errors import BrokerError
from broker.ports import (
    AuditEvent,
    AuditLog,
    CapabilityRegistry,
    Directory,
    Guards,
    Metrics,
    NoMetrics,
    NoTracer,
    PolicyEngine,
    Principal,
    Rulebook,
    SecretStore,
    SecretValue,
    Span,
    SpanValue,
    Tracer,
    Upstream,
    UpstreamResponse,
)
from broker.redaction import Redactor
from broker.render import referenced_secrets, render

if TYPE_CHECKING:
    from broker.admin import Admin

log = logging.getLogger("broker.calls")

SAFE_PATH_VALUE = re.compile(r"^[A-Za-z0-9_.@-]+$")
HEADER_TOKEN = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@dataclass(frozen=True)
class InvokeRequest:
    token: str | None
    capability: str
    body: bytes
    idempotency_key: str | None = None
    task_id: str | None = None
    trace_id: str | None = None
    traceparent: str | None = None  # the caller's W3C header: the parent of the broker's spans


@dataclass(frozen=True)
class InvokeResult:
    call_id: str
    status: str
    result: Any
    upstream_status: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "status": self.status,
            "result": self.result,
            "upstream_status": self.upstream_status,
        }


@dataclass
class Call:
    """What is known about one invoke as it moves through the pipeline."""

    call_id: str
    request: InvokeRequest
    principal: Principal | None = None
    cap: Capability | None = None
    args: Any = None
    rule: str | None = None
    decision: str | None = None  # allow | deny once the policy has spoken
    started: bool = False  # call.started is on record
    trace_id: str | None = None  # the trace of this call (the caller's or the broker's own)

    def event(self, kind: str, **fields: Any) -> AuditEvent:
        cap = self.cap
        return AuditEvent(
            kind=kind,
            call_id=self.call_id,
            agent_id=self.principal.agent_id if self.principal else None,
            capability=cap.name if cap else self.request.capability,
            capability_version=cap.version if cap else None,
            rule=self.rule,
            task_id=self.request.task_id,
            trace_id=self.trace_id or self.request.trace_id,
            idempotency_key=self.request.idempotency_key,
            sensitive=cap.sensitive_args() if cap else (),
            **fields,
        )


class Broker:
    """The invoke pipeline and the shared pieces; admin use cases hang off ``self.admin``."""

    admin: Admin  # attached by bootstrap.build_broker

    def __init__(
        self,
        *,
        registry: CapabilityRegistry,
        directory: Directory,
        rulebook: Rulebook,
        policy: PolicyEngine,
        secrets: SecretStore,
        upstream: Upstream,
        guards: Guards,
        audit: AuditLog,
        max_response_bytes: int,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.directory = directory
        self.rulebook = rulebook
        self.policy = policy
        self.secrets = secrets
        self.upstream = upstream
        self.guards = guards
        self.audit = audit
        self.max_response_bytes = max_response_bytes
        self.tracer: Tracer = tracer or NoTracer()
        self.metrics: Metrics = metrics or NoMetrics()
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        abandoned = await self.audit.start()
        if abandoned:
            log.warning("%d calls were left open by a crash: recorded call.abandoned", abandoned)
        for hook in self.on_start:
            await hook()

    async def close(self) -> None:
        await self.upstream.close()
        await self.secrets.close()
        await self.audit.close()
        for hook in self.on_close:
            await hook()

    async def ready(self) -> dict[str, bool]:
        db_ok, vault_ok = await asyncio.gather(self.audit.ready(), self.secrets.ready())
        return {"database": db_ok, "vault": vault_ok}

    async def authenticate(self, token: str | None) -> Principal:
        """Only tokens this broker issued are accepted (invariant 4)."""
        if not token:
            raise errors.Unauthenticated("missing bearer token")
        found = await self.directory.find_token(token)
        if found is None:
            raise errors.Unauthenticated("unknown, revoked or disabled token")
        agent, token_id = found
        roles = tuple(r.removeprefix("role:") for r in self.policy.roles_of(f"agent:{agent.id}"))
        return Principal(agent.id, agent.name, roles, dict(agent.attributes), token_id)

    async def invoke(self, req: InvokeRequest) -> InvokeResult:
        call = Call(call_id=new_call_id(), request=req)
        started = time.perf_counter()
        with self.tracer.span(
            "broker.invoke", kind="server", traceparent=req.traceparent, call_id=call.call_id
        ) as span:
            # The audit record carries the trace: the caller's, else this broker's new one.
            call.trace_id = span.trace_id or req.trace_id
            try:
                result = await self._invoke(call)
            except Exception as exc:
                self._account(call, span, exc)
                raise
            finally:
                self.metrics.stage("total", time.perf_counter() - started)
            self._account(call, span, result)
            return result

    async def _invoke(self, call: Call) -> InvokeResult:
        try:
            await self._admit(call)
            assert call.cap is not None and call.principal is not None
            slot = self.guards.admit(call.principal.agent_id, call.cap)
        except Exception as exc:
            # Nothing has run yet; whatever stopped the call, it is refused and audited.
            err = exc if isinstance(exc, BrokerError) else BrokerError()
            if not isinstance(exc, BrokerError):
                log.error(
                    "call %s: unexpected %s while admitting", call.call_id, type(exc).__name__
                )
            await self._refuse(call, err)
            raise err from None
        with slot:
            await self._record_or_refuse(
                call, call.event("call.started", decision="allow", args=call.args)
            )
            call.started = True
            return await self._execute(call, call.cap, call.principal)

    def _account(self, call: Call, span: Span, end: InvokeResult | Exception) -> None:
        """Metrics and root-span attributes of one finished invoke: names and codes only."""
        cap = call.cap.name if call.cap else None
        decision = call.decision or "none"
        if isinstance(end, InvokeResult):
            outcome, code, status = end.status, "", 200
            if end.status == "succeeded" and call.cap is not None:
                self.metrics.spend(call.cap.name, call.cap.limits.cost)
            span.set(upstream_status=end.upstream_status)
        else:
            outcome = "failed" if call.started else "refused"
            code, status = _mark(span, end)
        self.metrics.call(cap, decision, outcome, code)
        agent = call.principal.agent_id if call.principal else None
        span.set(capability=cap, agent_id=agent, decision=decision, outcome=outcome)
        span.set(http_status=status)

    @contextmanager
    def _stage(
        self, stage: str, *, kind: str = "internal", **attrs: SpanValue | None
    ) -> Iterator[Span]:
        """One pipeline stage: a span (child of the invoke span) and its latency."""
        started = time.perf_counter()
        try:
            with self.tracer.span(f"broker.{stage}", kind=kind) as span:
                span.set(**attrs)
                try:
                    yield span
                except Exception as exc:
                    _mark(span, exc)
                    raise
        finally:
            self.metrics.stage(stage, time.perf_counter() - started)

    # -- steps 1-5: nothing has happened yet ----------------------------------------------

    async def _admit(self, call: Call) -> None:
        req = call.request
        _check_header_values(req)
        with self._stage("authenticate") as span:
            call.principal = await self.authenticate(req.token)
            span.set(agent_id=call.principal.agent_id)
        with self._stage("decide") as span:
            call.cap = await self.registry.get(req.capability)
            if call.cap is None:
                raise errors.CapabilityNotFound(f"no capability named {req.capability!r}")
            span.set(capability=call.cap.name, capability_version=call.cap.version)
            call.args = _parse_args(req.body)
            call.cap.validate_args(call.args)
            # A dry render with stand-in secrets refuses argument tricks before anything runs.
            stand_ins = {name: "x" for name in call.cap.secrets}
            render(call.cap, call.args, stand_ins, call.principal.agent_id)
            who = call.principal
            decision = self.policy.decide(
                who.subject, call.cap.name, "invoke", args=call.args, agent=who.as_subject_data()
            )
            call.rule = decision.rule
            call.decision = "allow" if decision.allowed else "deny"
            span.set(decision=call.decision, rule=decision.rule)
            if not decision.allowed:
                why = decision.reason or "no rule allows it"
                raise errors.PolicyDenied(
                    f"{call.principal.subject} may not invoke {call.cap.name}: {why}",
                    details={"rule": decision.rule},
                )

    async def _refuse(self, call: Call, exc: BrokerError) -> None:
        exc.call_id = call.call_id
        kind = "call.denied" if isinstance(exc, errors.PolicyDenied) else "call.rejected"
        event = call.event(
            kind, decision="deny", reason=exc.code, args=call.args, detail={"message": exc.message}
        )
        with self._stage("audit", audit_kind=kind):
            await self.record_refusal(event, exc)

    async def record_refusal(self, event: AuditEvent, exc: BrokerError) -> None:
        """Audit a refusal. The refusal stands even if the record cannot be written."""
        try:
            await self.audit.append(event)
            exc.audited = True
        except errors.AuditUnavailable:
            log.error("audit unavailable while recording refusal %s (%s)", exc.code, event.call_id)
        log.info(
            "refused call=%s agent=%s capability=%s code=%s",
            event.call_id,
            event.agent_id,
            event.capability,
            exc.code,
        )

    async def _record_or_refuse(self, call: Call, event: AuditEvent) -> None:
        try:
            with self._stage("audit", audit_kind=event.kind):
                await self.audit.append(event)
        except errors.AuditUnavailable as exc:
            exc.call_id = call.call_id
            log.error("audit unavailable: call %s refused, nothing executed", call.call_id)
            raise

    # -- steps 7-12: secrets, render, send, shape, record ----------------------------------

    async def _execute(self, call: Call, cap: Capability, who: Principal) -> InvokeResult:
        started = time.perf_counter()
        resolved: list[SecretValue] = []
        redactor = Redactor([])
        try:
            with self._stage("secrets", secret_count=len(referenced_names(cap))):
                resolved = await self._resolve_secrets(cap, who)
            redactor = Redactor([s.value for s in resolved])
            values = dict(zip(referenced_names(cap), (s.value for s in resolved), strict=True))
            request = _render_with_secrets(cap, call.args, values, who.agent_id)
            limit = cap.http.max_response_bytes or self.max_response_bytes
            with self._stage("upstream", kind="client", http_method=request.method) as span:
                # The upstream adds this span's traceparent to the request (upstream.py).
                response = await self.upstream.send(
                    request, timeout=cap.http.timeout, max_bytes=min(limit, self.max_response_bytes)
                )
                span.set(http_status=response.status)
            result = InvokeResult(call.call_id, *shape(cap, response, redactor))
        except Exception as exc:
            # Whatever went wrong after call.started, the record gets its end.
            err = exc if isinstance(exc, BrokerError) else BrokerError()
            if not isinstance(exc, BrokerError):
                log.error("call %s failed unexpectedly: %s", call.call_id, type(exc).__name__)
            err.call_id = call.call_id
            err.message = redactor.redact_text(err.message)
            await self._finish(
                call,
                resolved,
                started,
                status="failed",
                reason=err.code,
                detail={"message": err.message},
            )
            raise err from None
        await self._finish(
            call,
            resolved,
            started,
            status=result.status,
            upstream_status=result.upstream_status,
            cost=cap.limits.cost,
        )
        return result

    async def _finish(
        self, call: Call, resolved: list[SecretValue], started: float, **fields: Any
    ) -> None:
        latency = round((time.perf_counter() - started) * 1000, 3)
        event = call.event(
            "call.finished",
            decision="allow",
            latency_ms=latency,
            secrets=[s.reference() for s in resolved],
            **fields,
        )
        log.info(
            "call=%s agent=%s capability=%s status=%s upstream=%s latency_ms=%s",
            call.call_id,
            event.agent_id,
            event.capability,
            fields.get("status"),
            fields.get("upstream_status"),
            latency,
        )
        try:
            with self._stage("audit", audit_kind=event.kind):
                await self.audit.append(event)
        except errors.AuditUnavailable as exc:
            exc.call_id = call.call_id
            exc.message = "the call ran but its outcome could not be recorded"
            raise

    async def _resolve_secrets(self, cap: Capability, who: Principal) -> list[SecretValue]:
        names = referenced_names(cap)
        reads = [
            self.secrets.read(
                cap.secrets[n].mount, secret_path(cap.secrets[n].path, who), cap.secrets[n].key
            )
            for n in names
        ]
        return list(await asyncio.gather(*reads))


def _mark(span: Span, exc: Exception) -> tuple[str, int]:
    """Put the error code on the span, failed when the broker is at fault; (code, status)."""
    err = exc if isinstance(exc, BrokerError) else BrokerError()
    span.set(error_code=err.code)
    if err.status >= 500:
        span.fail(err.code)
    return err.code, err.status


def referenced_names(cap: Capability) -> list[str]:
    return sorted(referenced_secrets(cap))


def secret_path(template: str, who: Principal) -> str:
    """Fill {agent.id} / {agent.attributes.X}; each value must be one safe path segment."""

    def value(slot: str) -> str:
        if slot == "agent.id":
            v: str | None = who.agent_id
        elif slot.startswith("agent.attributes."):
            v = who.attributes.get(slot.removeprefix("agent.attributes."))
        else:
            v = None  # {user.*} needs a verified user (a later feature): fail closed
        if v is None or not SAFE_PATH_VALUE.match(v) or v in (".", ".."):
            raise errors.SecretUnavailable(
                f"secret path slot {{{slot}}} has no usable value for this agent"
            )
        return v

    out = template
    for slot in slots_in(template):
        out = out.replace("{" + slot + "}", value(slot))
    return out


def _render_with_secrets(
    cap: Capability, args: Any, values: Mapping[str, str], agent_id: str
) -> Any:
    try:
        return render(cap, args, values, agent_id)
    except errors.InvalidArguments:
        # Arguments passed the dry render, so the secret value itself is unusable here.
        raise errors.SecretUnavailable("a secret value cannot be used in this request") from None


def _parse_args(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        payload = json.loads(body)
        # Lone surrogates parse but cannot be encoded again (not upstream, not in the audit).
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        raise errors.InvalidRequest("the body is not valid JSON in UTF-8") from None
    except RecursionError:
        raise errors.InvalidRequest("the body is nested too deeply") from None
    if not isinstance(payload, dict) or set(payload) - {"args"}:
        raise errors.InvalidRequest('the body must be {"args": {...}}')
    args = payload.get("args", {})
    if not isinstance(args, dict):
        raise errors.InvalidArguments("args must be a JSON object")
    return args


def _check_header_values(req: InvokeRequest) -> None:
    for name, value in (("Idempotency-Key", req.idempotency_key), ("X-Broker-Task", req.task_id)):
        if value is not None and not HEADER_TOKEN.match(value):
            raise errors.InvalidRequest(f"{name} must be 1-128 characters of [A-Za-z0-9._:/+=-]")


def shape(cap: Capability, response: UpstreamResponse, redactor: Redactor) -> tuple[str, Any, int]:
    """(status, result, upstream_status): declared fields only, every secret redacted."""
    body: Any = _decode(response)
    if cap.result.fields is not None:
        # Only declared fields reach the agent, whatever the status or the body's shape.
        body = {f: _pick(body, f) for f in cap.result.fields} if isinstance(body, dict) else None
    status = "succeeded" if 200 <= response.status < 300 else "upstream_error"
    return status, redactor.redact(body), response.status


def _decode(response: UpstreamResponse) -> Any:
    text = _clean(response.body.decode(_charset(response.content_type), errors="replace"))
    if "json" in response.content_type.lower() or text[:1] in ("{", "["):
        try:
            return _clean(json.loads(text))
        except (ValueError, RecursionError):
            pass
    return text


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip('"')).name
            except LookupError:
                break
    return "utf-8"


def _clean(value: Any) -> Any:
    """Replace lone surrogates (from JSON escapes) so the answer can always be encoded."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _pick(body: Mapping[str, Any], path: str) -> Any:
    node: Any = body
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def new_call_id() -> str:
    """``call_`` + 32 hex digits: the time in milliseconds (12), then the last 20 hex digits of
    a random UUID (74 random bits).

    Ids that grow with time are appended at the end of the audit log's call_id index; random
    ones land on a random index page each, which costs the audit writer a page write per
    record and about half its insert speed once the index outgrows the cache.
    """
    return f"call_{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[-20:]}"
