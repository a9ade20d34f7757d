"""The Broker: every use case, on top of the ports. Entry points (api, cli, mcp) call these.

The invoke pipeline (DESIGN.md "The call pipeline") lives in ``invoke``; every refusal is
audited before it is raised. Rendering and redaction are pure functions of this core
(render.py, redaction.py); everything with I/O sits behind a port.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from broker import errors, retries
from broker.capabilities import Capability, is_name, slots_in
from broker.errors import BrokerError
from broker.onbehalf import OnBehalf
from broker.ports import (
    AuditEvent,
    AuditLog,
    AuditQuery,
    BreakerPermit,
    BudgetHold,
    Budgets,
    CapabilityRegistry,
    CircuitBreaker,
    Claim,
    Directory,
    Guards,
    IdempotencyStore,
    Metrics,
    NoMetrics,
    NoTracer,
    OutgoingRequest,
    PolicyEngine,
    Principal,
    Rulebook,
    SecretStore,
    SecretValue,
    Span,
    SpanValue,
    StoredAnswer,
    Tracer,
    Upstream,
    UpstreamResponse,
)
from broker.redaction import Redactor, TooDeep
from broker.render import render

if TYPE_CHECKING:
    from broker.admin import Admin
    from broker.deferred import Deferred

log = logging.getLogger("broker.calls")

# Failures that happen before any byte goes upstream: the call's budget hold is refunded.
NOT_SENT = (errors.SecretUnavailable, errors.EgressDenied, errors.UpstreamUnavailable)
SAFE_PATH_VALUE = re.compile(r"^[A-Za-z0-9_.@-]+$")
IDEMPOTENCY_KEY_MAX = 255
HEADER_TOKEN = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# A JSON escape of a UTF-16 surrogate (U+D800-U+DFFF), the one source of a lone surrogate in
# an upstream's decoded answer.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
REDACTOR_CACHE_SIZE = 256
# Answers up to this size are shaped on the event loop (~1 ms per 60 KB of JSON); a larger one
# in a thread, where it shares the GIL with the loop (a switch every 5 ms) instead of holding
# it: a crafted 10 MB answer of '&x' takes seconds to check, and no call should wait for that.
SHAPE_INLINE_MAX = 64 * 1024
SHAPE_THREADS = 2


@dataclass(frozen=True)
class InvokeRequest:
    token: str | None
    capability: str
    body: bytes
    idempotency_key: str | None = None
    task_id: str | None = None
    trace_id: str | None = None
    traceparent: str | None = None  # the caller's W3C header: the parent of the broker's spans
    respond_async: bool = False  # Prefer: respond-async (run as a durable job, answer 202)
    approval_id: str | None = None  # X-Broker-Approval: an approval the agent holds
    user_assertion: str | None = None  # X-Broker-User-Assertion: the user the call acts for


@dataclass(frozen=True)
class InvokeResult:
    http_status: ClassVar[int] = 200
    call_id: str
    status: str
    result: Any
    upstream_status: int | None
    replayed: bool = False  # the stored answer of an earlier call with the same Idempotency-Key

    def to_dict(self) -> dict[str, Any]:
        out = {
            "call_id": self.call_id,
            "status": self.status,
            "result": self.result,
            "upstream_status": self.upstream_status,
        }
        if self.replayed:
            out["replayed"] = True
        return out


@dataclass(frozen=True)
class Accepted(InvokeResult):
    """202: the call is stored and will run later (or never, if it is denied); deferred.py."""

    http_status: ClassVar[int] = 202
    approval_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"call_id": self.call_id, "status": self.status}
        if self.approval_id:
            out["approval_id"] = self.approval_id
        if self.replayed:
            out["replayed"] = True
        return out


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
    sent: bool = False  # the request went to the upstream: its outcome is worth keeping
    claim: Claim | None = None  # the Idempotency-Key this call holds
    key: str | None = None  # the Idempotency-Key, once it parsed
    task_id: str | None = None  # X-Broker-Task, once it parsed
    approval_rule: str | None = None  # the policy rule that makes this call wait for approval
    trace_id: str | None = None  # the trace of this call (the caller's or the broker's own)
    attempts: int = 0  # requests sent upstream (more than 1 only for idempotent capabilities)
    reached: bool = False  # an attempt may have reached the upstream (it was not refused first)
    hold: BudgetHold | None = None  # budgets held from the reservation until settled
    cost: float | None = None  # what the call was charged (None: nothing ran)
    finishing: bool = False  # its call.finished went to the audit log (it will be written)

    def event(self, kind: str, **fields: Any) -> AuditEvent:
        cap = self.cap
        # A name from the path that no capability can have stays out of the bounded column
        # (on PostgreSQL it would fail the record, and every other record of its batch).
        asked = self.request.capability if is_name(self.request.capability) else None
        return AuditEvent(
            kind=kind,
            call_id=self.call_id,
            agent_id=self.principal.agent_id if self.principal else None,
            capability=cap.name if cap else asked,
            capability_version=cap.version if cap else None,
            rule=self.rule,
            task_id=self.task_id,
            trace_id=self.trace_id or self.request.trace_id,
            idempotency_key=self.key,
            sensitive=cap.sensitive_args() if cap else (),
            user_id=self.principal.user_id if self.principal else None,
            **fields,
        )


class Broker:
    """The invoke pipeline and the shared pieces; admin use cases hang off ``self.admin``."""

    admin: Admin  # attached by bootstrap.build_broker
    deferred: Deferred  # approvals and durable jobs (deferred.py), attached by bootstrap
    on_behalf: OnBehalf  # attached by bootstrap.build_broker

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
        idempotency: IdempotencyStore,
        budgets: Budgets,
        max_response_bytes: int,
        breaker: CircuitBreaker,
        retry: retries.RetryPolicy | None = None,
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
        self.idempotency = idempotency
        self.budgets = budgets
        self.max_response_bytes = max_response_bytes
        self.breaker = breaker
        self.retry = retry or retries.RetryPolicy()
        self.tracer: Tracer = tracer or NoTracer()
        self.metrics: Metrics = metrics or NoMetrics()
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        # Compiled redaction patterns by secret values: building them was ~10% of a call's
        # CPU, and the values change only when a secret does.
        self._redactors: dict[tuple[str, ...], Redactor] = {}
        self._in_flight = 0  # invokes under way on this broker; 1: the call is alone
        # Threads start on first use; a pool of our own, so big answers never queue behind
        # (or hold up) storage work in the loop's default executor.
        self._shaper = ThreadPoolExecutor(max_workers=SHAPE_THREADS, thread_name_prefix="shape")

    async def start(self) -> None:
        abandoned = await self.audit.start()
        if abandoned:
            log.warning("%d calls were left open by a crash: recorded call.abandoned", abandoned)
        await self._resolve_dangling_keys()
        for hook in self.on_start:
            await hook()

    async def close(self) -> None:
        await self.deferred.stop()  # first: running jobs still need upstream, secrets, audit
        await self.upstream.close()
        await self.secrets.close()
        await self.audit.close()
        self._shaper.shutdown(wait=False, cancel_futures=True)
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
            self._in_flight += 1
            try:
                result = await self._invoke(call)
            except Exception as exc:
                self._account(call, span, exc)
                raise
            finally:
                self._in_flight -= 1
                self.metrics.stage("total", time.perf_counter() - started)
            self._account(call, span, result)
            return result

    async def _invoke(self, call: Call) -> InvokeResult:
        try:
            await self._admit(call)
            assert call.cap is not None and call.principal is not None
            call.claim = await self._claim(call)
            answer = call.claim.answer if call.claim is not None else None
            if answer is None:
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
        if answer is not None:
            call.claim = None  # a replay neither completes nor releases the key
            return await self._replay(call, answer)
        with slot:
            try:
                result = await self.deferred.divert(call)  # 202: for an approval, or a job
                if result is None:
                    await self._begin(call)
                    result = await self._execute(call, call.cap, call.principal)
            except BrokerError as err:
                await self._settle_key(call, err)
                raise
            await self._settle_key(call, result)
            return result

    def _account(self, call: Call, span: Span, end: InvokeResult | Exception) -> None:
        """Metrics and root-span attributes of one finished invoke: names and codes only."""
        cap = call.cap.name if call.cap else None
        decision = call.decision or "none"
        if isinstance(end, InvokeResult):
            outcome, code, status = end.status, "", 200
            if end.status == "succeeded" and call.cap is not None:
                self.metrics.spend(call.cap.name, call.cost or 0.0)
            span.set(upstream_status=end.upstream_status)
        else:
            outcome = "failed" if call.started else "refused"
            code, status = _mark(span, end)
        self.metrics.call(cap, decision, outcome, code)
        agent = call.principal.agent_id if call.principal else None
        span.set(capability=cap, agent_id=agent, decision=decision, outcome=outcome)
        span.set(http_status=status)

    def _stage(self, stage: str, *, kind: str = "internal", **attrs: SpanValue | None) -> _Stage:
        """One pipeline stage: a span (child of the invoke span) and its latency."""
        return _Stage(self, stage, kind, attrs)

    # -- steps 1-5: nothing has happened yet ----------------------------------------------

    async def _admit(self, call: Call) -> None:
        req = call.request
        # Only well-formed header values reach the audit record (and its bounded columns).
        if req.idempotency_key is not None:
            call.key = parse_idempotency_key(req.idempotency_key)
        if req.task_id is not None and not HEADER_TOKEN.match(req.task_id):
            raise errors.InvalidRequest(
                "X-Broker-Task must be 1-128 characters of [A-Za-z0-9._:/+=-]"
            )
        call.task_id = req.task_id
        if req.approval_id is not None and not HEADER_TOKEN.match(req.approval_id):
            raise errors.InvalidRequest(
                "X-Broker-Approval must be 1-128 characters of [A-Za-z0-9._:/+=-]"
            )
        with self._stage("authenticate") as span:
            call.principal = await self.authenticate(req.token)
            span.set(agent_id=call.principal.agent_id)
            # The user comes only from a verified assertion, never from a bare header.
            user = await self.on_behalf.verify(req.user_assertion)
            if user is not None:
                call.principal = replace(call.principal, user_id=user.id)
        with self._stage("decide") as span:
            # A name no capability can have is not looked up (a NUL is a storage error).
            call.cap = await self.registry.get(req.capability) if is_name(req.capability) else None
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
            # Acting for a user: the user's side and the delegation must allow it too.
            try:
                await self.on_behalf.admit(who, call.cap, call.args)
            except errors.PolicyDenied as exc:
                call.rule, call.decision = exc.details.get("rule"), "deny"
                raise
            # A policy rule can require a human approval for this call (action "approve").
            held = self.policy.decide(
                who.subject, call.cap.name, "approve", args=call.args, agent=who.as_subject_data()
            )
            call.approval_rule = held.rule if held.allowed else None

    async def _refuse(self, call: Call, exc: BrokerError) -> None:
        exc.call_id = call.call_id
        await self._settle_key(call, exc)
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
                await self.audit.append(event, alone=self._in_flight == 1)
        except errors.AuditUnavailable as exc:
            exc.call_id = call.call_id
            log.error("audit unavailable: call %s refused, nothing executed", call.call_id)
            raise

    async def _begin(self, call: Call) -> None:
        """Reserve the call's budget, then make ``call.started`` durable (refund if it cannot
        be). Every path that executes a call comes through here, right before ``_execute``."""
        await self._reserve(call)
        try:
            await self._record_or_refuse(
                call, call.event("call.started", decision="allow", args=call.args)
            )
        except Exception:
            await self._settle(call, None)  # call.started is not on record: nothing ran
            raise
        call.started = True

    async def _reserve(self, call: Call) -> None:
        """Hold the call's bounded cost against its agent's and task's budgets (402 when short)."""
        assert call.cap is not None and call.principal is not None
        amount = call.cap.limits.reservation()
        try:
            call.hold = await self.budgets.reserve(
                call.call_id, call.principal.agent_id, call.request.task_id, amount
            )
        except BrokerError as exc:
            await self._refuse(call, exc)
            raise

    async def _settle(self, call: Call, cost: float | None) -> None:
        """Settle the hold to ``cost`` (None: refund). A failure never changes the call's
        outcome: the reservation stays held and the next start settles it (budgets.py)."""
        hold, call.hold, call.cost = call.hold, None, cost
        if hold is None:
            return
        try:
            await self.budgets.settle(hold, cost)
        except BrokerError as exc:
            log.error("call %s: budget unsettled (%s); held till restart", call.call_id, exc.code)

    # -- steps 7-12: secrets, render, send, shape, record ----------------------------------

    async def _execute(self, call: Call, cap: Capability, who: Principal) -> InvokeResult:
        started = time.perf_counter()
        resolved: list[SecretValue] = []
        redactor = Redactor([])
        permit: BreakerPermit | None = None
        try:
            # An open circuit refuses the call here, before any secret is read (breaker.py).
            permit = self.breaker.admit(cap.http.url)
            with self._stage("secrets", secret_count=len(referenced_names(cap))):
                resolved = await self._resolve_secrets(cap, who)
            redactor = self._redactor(tuple(s.value for s in resolved))
            values = dict(zip(referenced_names(cap), (s.value for s in resolved), strict=True))
            request = _render_with_secrets(cap, call.args, values, who.agent_id)
            if cap.http.idempotency_header:
                # The upstream can deduplicate too: the agent's key, else this call's id.
                header = (cap.http.idempotency_header, call.key or call.call_id)
                request = replace(request, headers=(*request.headers, header))
            limit = cap.http.max_response_bytes or self.max_response_bytes
            call.sent = True
            with self._stage("upstream", kind="client", http_method=request.method) as span:
                # The upstream adds this span's traceparent to the request (upstream.py).
                response = await self._send(call, cap, request, permit, limit)
                span.set(http_status=response.status)
            cost = cap.limits.actual_cost(response.body)  # metered before the result is shaped
            result = InvokeResult(call.call_id, *(await self._shape(cap, response, redactor)))
        except Exception as exc:
            # Whatever went wrong after call.started, the record gets its end.
            err = exc if isinstance(exc, BrokerError) else BrokerError()
            if not isinstance(exc, BrokerError):
                log.error("call %s failed unexpectedly: %s", call.call_id, type(exc).__name__)
            err.call_id = call.call_id
            err.message = redactor.redact_text(err.message)
            # Refunded when the request surely never left; else the upstream may have acted.
            # A retry the breaker refuses is NOT_SENT, but an earlier attempt may have acted.
            unsent = not call.reached
            charge = None if unsent else cap.limits.reservation()
            await self._settle(call, charge)
            await self._finish(
                call,
                resolved,
                started,
                status="failed",
                reason=err.code,
                detail={"message": err.message},
                cost=call.cost,
            )
            raise err from None
        finally:
            if permit is not None:
                permit.release()  # a permit never used (e.g. a secret was missing) goes back
        await self._settle(call, cost)
        await self._finish(
            call,
            resolved,
            started,
            status=result.status,
            upstream_status=result.upstream_status,
            cost=cost,
        )
        return result

    async def _shape(
        self, cap: Capability, response: UpstreamResponse, redactor: Redactor
    ) -> tuple[str, Any, int]:
        if len(response.body) <= SHAPE_INLINE_MAX:
            return shape(cap, response, redactor)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._shaper, shape, cap, response, redactor)

    def _redactor(self, values: tuple[str, ...]) -> Redactor:
        redactor = self._redactors.get(values)
        if redactor is None:
            if len(self._redactors) >= REDACTOR_CACHE_SIZE:
                self._redactors.clear()  # rotated values do not pile up
            redactor = self._redactors[values] = Redactor(values)
        return redactor

    async def _finish(
        self, call: Call, resolved: list[SecretValue], started: float, **fields: Any
    ) -> None:
        latency = round((time.perf_counter() - started) * 1000, 3)
        fields["detail"] = {**fields.get("detail", {}), "attempts": call.attempts}
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
        # Set before the append: a cancellation (the kill switch) while it waits must not
        # write a second call.finished for this call.
        call.finishing = True
        try:
            with self._stage("audit", audit_kind=event.kind):
                await self.audit.append(event, alone=self._in_flight == 1)
        except errors.AuditUnavailable as exc:
            exc.call_id = call.call_id
            exc.message = "the call ran but its outcome could not be recorded"
            raise

    # -- idempotency keys (invariant 6) ----------------------------------------------------

    async def _claim(self, call: Call) -> Claim | None:
        key = call.key
        if key is None:
            return None
        assert call.principal is not None and call.cap is not None
        # The user is part of the fingerprint: one user's stored answer is never replayed to
        # another user of the same agent (their reuse of the key is a 422 instead).
        user = call.principal.user_id
        fp = fingerprint(call.args if user is None else {"args": call.args, "user": user})
        with self._stage("idempotency"):
            return await self.idempotency.claim(
                call.principal.agent_id, call.cap.name, key, fp, call.call_id
            )

    async def _replay(self, call: Call, answer: StoredAnswer) -> InvokeResult:
        """Answer a repeat with the first call's stored answer; nothing is executed again."""
        event = call.event(
            "call.replayed",
            decision="allow",
            args=call.args,
            detail={"replay_of": answer.call_id, "http_status": answer.http_status},
        )
        with self._stage("audit", audit_kind=event.kind):
            await self.audit.append(event)
        body = answer.body
        if "error" in body:
            stored = body["error"]
            err = errors.error_class_for(str(stored.get("code")))(
                str(stored.get("message")),
                call_id=answer.call_id,
                details={"replayed": True},
                headers={"Idempotent-Replayed": "true"},
            )
            err.audited = True
            raise err
        if answer.http_status == Accepted.http_status:  # the 202 of an approval or a job
            approval = body.get("approval_id")
            return Accepted(answer.call_id, body["status"], None, None, True, approval)
        return InvokeResult(
            answer.call_id, body["status"], body["result"], body["upstream_status"], replayed=True
        )

    async def _settle_key(self, call: Call, end: InvokeResult | BrokerError) -> None:
        """Keep the answer of a call that reached the upstream; forget the key otherwise."""
        claim, call.claim = call.claim, None
        if claim is None:
            return
        try:
            if isinstance(end, InvokeResult):
                await self.idempotency.complete(claim, end.http_status, end.to_dict())
            elif call.sent:
                body = end.to_dict()
                body["error"]["call_id"] = call.call_id
                await self.idempotency.complete(claim, end.status, body)
            else:
                await self.idempotency.release(claim)
        except BrokerError as exc:
            # The key stays in flight; the owner resolves it at its next start.
            log.error("call %s: idempotency key not settled (%s)", call.call_id, exc.code)

    async def _resolve_dangling_keys(self) -> None:
        """Keys a crash left in flight: a deferred call's keeps its 202; else released if the
        call never started, or kept with ``outcome_unknown`` (whether the upstream acted
        cannot be known)."""
        for claim in await self.idempotency.dangling():
            call_id = claim.answer.call_id if claim.answer else ""
            accepted = await self.deferred.accepted(call_id)
            if accepted is not None:  # stored to run later: its 202 was (and stays) the answer
                await self.idempotency.complete(claim, accepted.http_status, accepted.to_dict())
                continue
            found, _ = await self.audit.query(
                AuditQuery(call_id=call_id, kind="call.started", limit=1)
            )
            if not found:
                await self.idempotency.release(claim)
                continue
            err = errors.OutcomeUnknown(call_id=call_id)
            await self.idempotency.complete(claim, err.status, err.to_dict())

    async def _send(
        self,
        call: Call,
        cap: Capability,
        request: OutgoingRequest,
        permit: BreakerPermit,
        limit: int,
    ) -> UpstreamResponse:
        """Send through the breaker; only an idempotent capability is retried (retries.py)."""

        async def attempt(seconds_left: float) -> UpstreamResponse:
            call.attempts += 1
            try:
                response = await self.upstream.send(
                    request, timeout=seconds_left, max_bytes=min(limit, self.max_response_bytes)
                )
            except BaseException as exc:
                call.reached = call.reached or not isinstance(exc, NOT_SENT)
                raise
            call.reached = True
            return response

        return await retries.send(
            attempt,
            url=cap.http.url,
            deadline=cap.http.timeout,
            idempotent=cap.idempotent,
            breaker=self.breaker,
            permit=permit,
            policy=self.retry,
        )

    async def _resolve_secrets(self, cap: Capability, who: Principal) -> list[SecretValue]:
        names = referenced_names(cap)
        reads = [
            self.secrets.read(
                cap.secrets[n].mount, secret_path(cap.secrets[n].path, who), cap.secrets[n].key
            )
            for n in names
        ]
        try:
            if len(reads) == 1:  # the usual case: no task for gather() to create and collect
                return [await reads[0]]
            return list(await asyncio.gather(*reads))
        except errors.SecretUnavailable:
            # A user's credential that is not connected is for the user to fix (428).
            missing = await self.on_behalf.missing_credential(cap, who, secret_path)
            if missing is not None:
                raise missing from None
            raise


class _Stage:
    """The context manager of Broker._stage: a class, since a call runs six of them and a
    generator-based one cost several microseconds each."""

    __slots__ = ("_attrs", "_broker", "_cm", "_kind", "_name", "_span", "_started")

    def __init__(
        self, broker: Broker, name: str, kind: str, attrs: dict[str, SpanValue | None]
    ) -> None:
        self._broker, self._name, self._kind, self._attrs = broker, name, kind, attrs
        self._cm: AbstractContextManager[Span] | None = None
        self._span: Span | None = None
        self._started = 0.0

    def __enter__(self) -> Span:
        self._started = time.perf_counter()
        self._cm = self._broker.tracer.span(f"broker.{self._name}", kind=self._kind)
        self._span = self._cm.__enter__()
        if self._attrs:
            try:
                self._span.set(**self._attrs)
            except BaseException as exc:  # the span is entered: leave it as the block would
                self.__exit__(type(exc), exc, exc.__traceback__)
                raise
        return self._span

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if isinstance(e, Exception) and self._span is not None:
                _mark(self._span, e)
            assert self._cm is not None
            self._cm.__exit__(t, e, tb)
        finally:
            self._broker.metrics.stage(self._name, time.perf_counter() - self._started)


def _mark(span: Span, exc: Exception) -> tuple[str, int]:
    """Put the error code on the span, failed when the broker is at fault; (code, status)."""
    err = exc if isinstance(exc, BrokerError) else BrokerError()
    span.set(error_code=err.code)
    if err.status >= 500:
        span.fail(err.code)
    return err.code, err.status


def referenced_names(cap: Capability) -> tuple[str, ...]:
    return cap.secret_names


def secret_path(template: str, who: Principal) -> str:
    """Fill {agent.id} / {agent.attributes.X} / {user.id}; each value must be one safe path
    segment. {user.id} is the verified user's id (None without one: fail closed)."""

    def value(slot: str) -> str:
        if slot == "agent.id":
            v: str | None = who.agent_id
        elif slot.startswith("agent.attributes."):
            v = who.attributes.get(slot.removeprefix("agent.attributes."))
        elif slot == "user.id":
            v = who.user_id
        else:
            v = None  # no other {user.*} slot is defined: fail closed
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


def parse_idempotency_key(raw: str) -> str:
    """The key: 1-255 visible ASCII characters, bare or as a structured-field string.

    The IETF draft sends the key as an sf-string (``"8e03..."``); clients such as Stripe's send
    it bare. Both are accepted and mean the same key; anything else is malformed (400).
    """
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise errors.InvalidIdempotencyKey(
            f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters"
        )
    if '"' in value or "\\" in value:
        raise errors.InvalidIdempotencyKey("Idempotency-Key must not contain quotes or backslashes")
    return value


def fingerprint(args: Any) -> str:
    """SHA-256 of the canonical JSON of the arguments: key order and spacing do not matter."""
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shape(cap: Capability, response: UpstreamResponse, redactor: Redactor) -> tuple[str, Any, int]:
    """(status, result, upstream_status): declared fields only, every secret redacted."""
    text = _clean(response.body.decode(_charset(response.content_type), errors="replace"))
    body: Any = _decode(response.content_type, text)
    status = "succeeded" if 200 <= response.status < 300 else "upstream_error"
    if cap.result.fields is None:
        return status, _redacted(redactor, body, text), response.status
    # Only declared fields reach the agent, whatever the status or the body's shape.
    if not isinstance(body, dict):
        return status, None, response.status
    picked = {f: _redacted(redactor, _pick(body, f), None) for f in cap.result.fields}
    return status, {redactor.redact_text(f): v for f, v in picked.items()}, response.status


def _redacted(redactor: Redactor, value: Any, text: str | None) -> Any:
    """``value`` redacted. JSON nested too deep to rebuild never fails the call (the upstream
    has acted): with a secret anywhere in it, none of it is returned; else it comes back as
    its text, redacted as text (which also finds a secret that spans JSON syntax), or, for a
    declared field, as null."""
    try:
        return redactor.redact(value)
    except TooDeep:
        if redactor.holds_secret(value):
            return redactor.placeholder
        return redactor.redact_text(text) if text is not None else None


def _decode(content_type: str, text: str) -> Any:
    if "json" in content_type.lower() or text[:1] in ("{", "["):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return text
        # The text was decoded with replacement, so a lone surrogate can only come from a JSON
        # escape; only then is the parsed value walked to replace it.
        if _SURROGATE_ESCAPE.search(text) is None:
            return value
        try:
            return _clean(value)
        except RecursionError:
            return text
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
    """``call_`` + 32 hex digits: the time in milliseconds (12), then 80 random bits (20).

    Ids that grow with time are appended at the end of the audit log's call_id index; random
    ones land on a random index page each, which costs the audit writer a page write per
    record and about half its insert speed once the index outgrows the cache.
    """
    return f"call_{time.time_ns() // 1_000_000:012x}{_random_hex20()}"


_ID_KEY: list[bytes] = []  # a random key, made on first use (no work at import)
_ID_COUNTER = itertools.count()


def _random_hex20() -> str:
    """80 unpredictable bits: a keyed BLAKE2b of a counter. os.urandom per id was a getrandom
    system call that cost ~12 us each on this VM."""
    if not _ID_KEY:
        _ID_KEY.append(os.urandom(32))
        # A forked child must not repeat its parent's ids: it makes a key of its own.
        os.register_at_fork(after_in_child=_ID_KEY.clear)
    block = next(_ID_COUNTER).to_bytes(8, "big")
    return hashlib.blake2b(block, key=_ID_KEY[0], digest_size=10).hexdigest()
