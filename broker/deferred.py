"""Deferred calls: approvals, durable jobs, and what the kill switch cancels.

Part of the core, beside service.py: ``Broker._invoke`` asks ``Deferred.divert`` whether an
admitted call (authenticated, validated, allowed by policy, within its limits) runs now or
later. Later means one of:

- **approval**: the capability says ``approval: required``. The call is stored
  (``approval_pending``) with an approval bound to the agent, the capability and the SHA-256
  of its canonical arguments, and the agent gets 202. An admin approves or denies it
  (``approvals.decide``); approval queues the stored call, denial or expiry ends it.
- **job**: the agent sent ``Prefer: respond-async`` or the capability is ``long_running``.
  The call is stored ``queued`` before the 202 is sent.

Queued calls are run by a pool of ``job_workers`` asyncio tasks through the same steps as a
synchronous invoke (``call.started`` durable first, secrets, upstream, redaction,
``call.finished``), after checking again that the agent is enabled, the capability unchanged
and the policy still allows it. ``GET /v1/calls/{id}`` shows the state and, once ended, the
body a synchronous invoke would have answered. At start, calls this instance was running when
it died are run again if the capability is idempotent or the call had not started yet, else
ended ``outcome_unknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from broker import errors
from broker.capabilities import Capability
from broker.errors import BrokerError
from broker.ports import (
    ApprovalRecord,
    AuditEvent,
    AuditQuery,
    CallStore,
    Principal,
    StoredCall,
    stamp,
)
from broker.service import Accepted, Broker, Call, InvokeRequest, InvokeResult, fingerprint

log = logging.getLogger("broker.deferred")

ENDED = ("succeeded", "upstream_error", "failed", "denied", "expired", "cancelled",
         "outcome_unknown")  # fmt: skip
# What an ended call without a stored body answers (it never ran).
_NOT_RUN: dict[str, type[BrokerError]] = {
    "denied": errors.ApprovalDenied,
    "expired": errors.ApprovalExpired,
    "cancelled": errors.CallCancelled,
}
_REFUSED_APPROVAL: dict[str, type[BrokerError]] = {
    "pending": errors.ApprovalExpired,  # still pending yet not decidable: past its expiry
    "approved": errors.ApprovalUsed,
    "denied": errors.ApprovalDenied,
    "cancelled": errors.ApprovalDenied,
    "expired": errors.ApprovalExpired,
}


class Deferred:
    """Approvals and jobs over a CallStore; ``start``/``stop`` own the worker pool."""

    def __init__(
        self,
        broker: Broker,
        store: CallStore,
        *,
        approval_ttl: float,
        workers: int,
        runner: str,
        poll_interval: float = 1.0,
        sweep_interval: float = 5.0,
        stop_grace: float = 5.0,
    ) -> None:
        self.b, self.store = broker, store
        self.approval_ttl, self.workers, self.runner = approval_ttl, workers, runner
        self.poll_interval, self.sweep_interval = poll_interval, sweep_interval
        self.stop_grace = stop_grace
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._jobs: dict[str, tuple[str, asyncio.Task[None]]] = {}  # call id -> (agent, task)
        self._killed: set[str] = set()  # jobs cancelled by the kill switch

    # -- the pipeline's question: now or later? ----------------------------------------------

    async def divert(self, call: Call) -> InvokeResult | None:
        """None: run now. Else the call is stored (or refused) and this is its 202 answer."""
        assert call.cap is not None and call.principal is not None
        req = call.request
        try:
            if req.approval_id is not None:
                return await self._presented(call, req.approval_id)
            if call.cap.approval == "required" or call.approval_rule is not None:
                return await self._hold(call)
            if req.respond_async or call.cap.long_running:
                return await self._enqueue(call)
        except BrokerError as exc:
            if not exc.audited:
                await self.b._refuse(call, exc)
            raise
        return None

    async def _hold(self, call: Call) -> Accepted:
        assert call.principal is not None and call.cap is not None
        approval_id = "apr_" + uuid.uuid4().hex
        expires = stamp(datetime.now(UTC) + timedelta(seconds=self.approval_ttl))
        await self.b._record_or_refuse(call, call.event(
            "approval.requested", decision="allow", args=call.args,
            detail={"approval_id": approval_id, "expires_at": expires,
                    "required_by": call.approval_rule or "capability"},
        ))  # fmt: skip
        approval = ApprovalRecord(
            id=approval_id, call_id=call.call_id, agent_id=call.principal.agent_id,
            capability=call.cap.name, args_hash=fingerprint(call.args), status="pending",
            created_at=stamp(datetime.now(UTC)), expires_at=expires,
        )  # fmt: skip
        await self.store.create(_stored(call, "approval_pending", approval_id), approval)
        return Accepted(call.call_id, "approval_pending", None, None, approval_id=approval_id)

    async def _enqueue(self, call: Call) -> Accepted:
        event = call.event("call.queued", decision="allow", args=call.args)
        await self.b._record_or_refuse(call, event)
        await self.store.create(_stored(call, "queued"))
        self._wake.set()
        return Accepted(call.call_id, "queued", None, None)

    async def _presented(self, call: Call, approval_id: str) -> Accepted:
        """The agent names an approval it holds: only the same agent, capability and
        arguments match, and only while it is pending (it runs once, when approved)."""
        assert call.principal is not None and call.cap is not None
        await self.expire_due()
        found = await self.store.get_approval(approval_id)
        if found is None:
            raise errors.ApprovalNotFound(f"no approval {approval_id!r}")
        held = await self.store.get_call(found.call_id)
        if (found.agent_id, found.capability, found.args_hash) != (
            call.principal.agent_id,
            call.cap.name,
            fingerprint(call.args),
        ) or (held is not None and held.user_id != call.principal.user_id):
            raise errors.ApprovalMismatch(
                f"approval {approval_id} was given for another agent, user, capability or arguments"
            )
        if found.status != "pending":
            raise _REFUSED_APPROVAL[found.status](f"approval {approval_id} is {found.status}")
        return Accepted(found.call_id, "approval_pending", None, None, approval_id=found.id)

    async def accepted(self, call_id: str) -> Accepted | None:
        """The 202 a stored call was answered with; None if no call of that id is stored."""
        stored = await self.store.get_call(call_id)
        if stored is None:
            return None
        status = "approval_pending" if stored.approval_id else "queued"
        return Accepted(call_id, status, None, None, approval_id=stored.approval_id)

    # -- approvals: list and decide ----------------------------------------------------------

    async def expire_due(self) -> None:
        """Pending approvals past their time become expired (= denied), each audited."""
        for a in await self.store.expire_due(stamp(datetime.now(UTC))):
            await self.b.audit.append(AuditEvent(
                kind="approval.expired", call_id=a.call_id, agent_id=a.agent_id,
                capability=a.capability, decision="deny", reason=errors.ApprovalExpired.code,
                detail={"approval_id": a.id, "expires_at": a.expires_at},
            ))  # fmt: skip

    async def list_approvals(self, token: str | None, status: str | None) -> list[dict[str, Any]]:
        await self.b.admin.authorize(token, "approvals.decide")
        await self.expire_due()
        out = []
        for a in await self.store.list_approvals(status, 500):
            call = await self.store.get_call(a.call_id)
            cap = await self.b.registry.get(a.capability)
            # Which values are sensitive is known only from the manifest the call was made
            # for; a deleted or replaced one cannot say (and the call can no longer run).
            args = None
            if call is not None and cap is not None and cap.version == call.capability_version:
                args = _masked(call.args, cap)
            out.append({**approval_view(a), "args": args})
        return out

    async def decide(
        self, token: str | None, approval_id: str, approve: bool, reason: str | None
    ) -> dict[str, Any]:
        who = await self.b.admin.authorize(token, "approvals.decide")
        await self.expire_due()
        decided = await self.store.decide(approval_id, approve, who.agent_id, reason)
        if decided is None:
            await self._refuse_decision(who, approval_id, approve)
        await self.b.audit.append(AuditEvent(
            kind=f"approval.{decided.status}", call_id=decided.call_id,
            agent_id=decided.agent_id, capability=decided.capability,
            decision="allow" if approve else "deny",
            reason=None if approve else errors.ApprovalDenied.code,
            detail={"approval_id": decided.id, "approver": who.agent_id, "reason": reason},
        ))  # fmt: skip
        if approve:
            self._wake.set()
        return approval_view(decided)

    async def _refuse_decision(self, who: Principal, approval_id: str, approve: bool) -> NoReturn:
        found = await self.store.get_approval(approval_id)
        err: BrokerError = (
            errors.ApprovalNotFound(f"no approval {approval_id!r}")
            if found is None
            else _REFUSED_APPROVAL[found.status](f"approval {approval_id} is {found.status}")
        )
        await self.b.record_refusal(AuditEvent(
            kind="approval.refused", call_id=found.call_id if found else None,
            agent_id=who.agent_id, capability=found.capability if found else None,
            decision="deny", reason=err.code,
            detail={"approval_id": approval_id, "action": "approve" if approve else "deny"},
        ), err)  # fmt: skip
        err.call_id = found.call_id if found else None
        raise err

    # -- calls: what became of one -----------------------------------------------------------

    async def get_call(self, token: str | None, call_id: str) -> dict[str, Any]:
        """The agent that made the call, or an admin with ``audit.read``, may read it."""
        who = await self.b.authenticate(token)
        await self.expire_due()
        stored = await self.store.get_call(call_id)
        if stored is None or (
            stored.agent_id != who.agent_id
            and not self.b.policy.decide(who.subject, "*", "audit.read").allowed
        ):
            raise errors.CallNotFound(f"no call {call_id!r} of yours")
        view = call_view(stored)
        if stored.approval_id:
            approval = await self.store.get_approval(stored.approval_id)
            view["approval"] = approval_view(approval) if approval else None
        return view

    # -- the worker pool ---------------------------------------------------------------------

    async def start(self) -> None:
        """Settle what a crash left running, then start the workers."""
        self._wake = asyncio.Event()  # of this event loop (an app may be started again)
        await self.recover()
        self._workers = [
            asyncio.create_task(self._work(), name=f"job-worker-{n}") for n in range(self.workers)
        ]
        self._workers.append(asyncio.create_task(self._sweep(), name="approval-expiry"))

    async def stop(self) -> None:
        """Stop taking jobs; running ones get ``stop_grace`` seconds, then are cancelled (left
        ``running``: the next start settles them like a crash would)."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        jobs = [task for _, task in self._jobs.values()]
        if jobs:
            _, late = await asyncio.wait(jobs, timeout=self.stop_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def recover(self) -> None:
        for job in await self.store.running(self.runner):
            cap = await self.b.registry.get(job.capability)
            # Without call.started on record nothing was sent (invariant 1): run it again.
            started, _ = await self.b.audit.query(
                AuditQuery(call_id=job.call_id, kind="call.started", limit=1)
            )
            if not started or (cap is not None and cap.idempotent):
                await self.store.transition(job.call_id, ("running",), "queued")
                reason = "requeued"
            else:
                err = errors.OutcomeUnknown(call_id=job.call_id)
                await self._end(job.call_id, "outcome_unknown", err.status, err.to_dict())
                reason = err.code
            await self.b.audit.append(AuditEvent(
                kind="call.interrupted", call_id=job.call_id, agent_id=job.agent_id,
                capability=job.capability, capability_version=job.capability_version,
                task_id=job.task_id, reason=reason,
                detail={"why": "the broker stopped while the call was running"},
            ))  # fmt: skip
            log.warning("job %s was interrupted by a restart: %s", job.call_id, reason)

    async def _sweep(self) -> None:
        """Expire approvals on time (reads expire them too), so the audit shows it promptly."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.expire_due()
            except BrokerError as exc:
                log.error("cannot expire approvals: %s", exc.code)

    async def _work(self) -> None:
        while True:
            try:
                job = await self.store.claim_next(self.runner)
            except BrokerError as exc:
                log.error("job worker cannot read the queue: %s", exc.code)
                job = None
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                continue
            task = asyncio.create_task(self._run(job), name=f"job-{job.call_id}")
            self._jobs[job.call_id] = (job.agent_id, task)
            task.add_done_callback(functools.partial(self._forget, job.call_id))
            # wait() neither raises the job's cancellation here nor cancels the job when the
            # worker itself is cancelled (stop gives running jobs their grace).
            await asyncio.wait({task})

    def _forget(self, call_id: str, _task: asyncio.Task[None]) -> None:
        self._jobs.pop(call_id, None)

    async def _run(self, job: StoredCall) -> None:
        request = InvokeRequest(
            token=None, capability=job.capability, body=b"", task_id=job.task_id,
            idempotency_key=job.idempotency_key, trace_id=job.trace_id,
        )  # fmt: skip
        # The task and the key go on every record of the job, as on a synchronous call's.
        call = Call(call_id=job.call_id, request=request, args=job.args, trace_id=job.trace_id,
                    task_id=job.task_id, key=job.idempotency_key)  # fmt: skip
        started = time.perf_counter()
        try:
            await self._attempt(call, job)
        except asyncio.CancelledError:
            if job.call_id in self._killed:  # the kill switch, not a shutdown
                await self._cancelled(call, started)
            raise
        finally:
            self._killed.discard(job.call_id)

    async def _attempt(self, call: Call, job: StoredCall) -> None:
        """The pipeline's steps 6-12 for a stored call, its outcome stored for GET."""
        try:
            await self._readmit(call, job)
            assert call.cap is not None and call.principal is not None
            await self.b._begin(call)  # budget reserved, call.started durable
            result = await self.b._execute(call, call.cap, call.principal)
        except BrokerError as exc:
            if not call.started and not exc.audited:
                await self.b._refuse(call, exc)
            outcome = "failed" if call.started else "refused"
            self.b.metrics.call(job.capability, call.decision or "none", outcome, exc.code)
            await self._end(job.call_id, "failed", exc.status, exc.to_dict())
        else:
            self.b.metrics.call(job.capability, "allow", result.status, "")
            await self._end(job.call_id, result.status, 200, result.to_dict())

    async def _readmit(self, call: Call, job: StoredCall) -> None:
        """What may have changed since the call was accepted is checked again."""
        if job.args is None:  # sealed with a key this broker does not have, or changed
            raise errors.StorageUnavailable("the call's stored arguments cannot be opened")
        # The arguments run are the ones accepted (and approved): an unsealed row, or one whose
        # fingerprint was changed with it, does not pass for another call's.
        expected = {job.args_hash}
        if job.approval_id is not None:
            approval = await self.store.get_approval(job.approval_id)
            expected.add(approval.args_hash if approval is not None else "")
        if expected != {fingerprint(job.args)}:
            raise errors.StorageUnavailable("the call's stored arguments were changed")
        agent = await self.b.directory.get_agent(job.agent_id)
        if agent is None or agent.disabled:
            raise errors.Unauthenticated(f"agent {job.agent_id} is disabled")
        roles = tuple(r.removeprefix("role:") for r in self.b.policy.roles_of(f"agent:{agent.id}"))
        who = Principal(agent.id, agent.name, roles, dict(agent.attributes))
        if job.user_id is not None:
            # The assertion was verified when the call was accepted; the user's permission
            # and the delegation are checked again now, as for an immediate call.
            who = replace(who, user_id=job.user_id)
        call.principal = who
        call.cap = await self.b.registry.get(job.capability)
        if call.cap is None:
            raise errors.CapabilityNotFound(f"capability {job.capability!r} was deleted")
        if call.cap.version != job.capability_version:
            raise errors.CapabilityChanged(
                f"{job.capability} is now version {call.cap.version}, "
                f"the call was accepted for version {job.capability_version}"
            )
        decision = self.b.policy.decide(
            who.subject, call.cap.name, "invoke", args=call.args, agent=who.as_subject_data()
        )
        call.rule, call.decision = decision.rule, "allow" if decision.allowed else "deny"
        if not decision.allowed:
            raise errors.PolicyDenied(
                f"{who.subject} may no longer invoke {call.cap.name}",
                details={"rule": decision.rule},
            )
        if who.user_id is not None:
            await self.b.on_behalf.admit(who, call.cap, call.args)

    async def _end(self, call_id: str, state: str, status: int, body: dict[str, Any]) -> None:
        if not await self.store.transition(
            call_id, ("running",), state, http_status=status, response=body
        ):
            log.warning("job %s ended %s but was no longer running", call_id, state)

    async def _cancelled(self, call: Call, started: float) -> None:
        err = errors.CallCancelled("the agent was disabled while the call ran")
        err.call_id = call.call_id
        if call.cap is not None:  # a budget hold: charged if the request may have left
            await self.b._settle(call, call.cap.limits.reservation() if call.sent else None)
        if call.started and not call.finishing:  # call.started is on record: it gets one end
            await self.b._finish(call, [], started, status="cancelled", reason="agent_disabled",
                                 detail={"message": err.message})  # fmt: skip
        await self._end(call.call_id, "cancelled", err.status, err.to_dict())

    # -- the kill switch ---------------------------------------------------------------------

    async def cancel_agent(self, agent_id: str) -> dict[str, Any]:
        """Cancel the agent's pending approvals, waiting calls and the jobs running here."""
        approvals, waiting = await self.store.cancel_agent(agent_id)
        running = {cid: task for cid, (agent, task) in self._jobs.items() if agent == agent_id}
        for cid, task in running.items():
            self._killed.add(cid)
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        return {
            "approvals_cancelled": approvals,
            "calls_cancelled": sorted(waiting),
            "jobs_cancelled": sorted(running),
        }


def _stored(call: Call, state: str, approval_id: str | None = None) -> StoredCall:
    assert call.principal is not None and call.cap is not None
    req = call.request
    return StoredCall(
        call_id=call.call_id, agent_id=call.principal.agent_id, capability=call.cap.name,
        capability_version=call.cap.version, args=call.args, args_hash=fingerprint(call.args),
        state=state, task_id=req.task_id, trace_id=call.trace_id or req.trace_id,
        idempotency_key=call.key, approval_id=approval_id,  # the parsed key, not the header
        user_id=call.principal.user_id,
    )  # fmt: skip


def _masked(args: Any, cap: Capability | None) -> Any:
    """Arguments for the approver; values marked ``x-sensitive`` stay hidden."""
    if cap is None or not isinstance(args, dict):
        return args
    out = json.loads(json.dumps(args))
    for path in cap.sensitive_args():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = "[SENSITIVE]"
    return out


def approval_view(a: ApprovalRecord) -> dict[str, Any]:
    return {
        "id": a.id, "call_id": a.call_id, "agent_id": a.agent_id, "capability": a.capability,
        "args_hash": a.args_hash, "status": a.status, "approver": a.approver,
        "reason": a.reason, "created_at": a.created_at, "expires_at": a.expires_at,
        "decided_at": a.decided_at, "used_at": a.used_at,
    }  # fmt: skip


def call_view(c: StoredCall) -> dict[str, Any]:
    response = c.response
    http_status = c.http_status
    if response is None and c.state in _NOT_RUN:
        err = _NOT_RUN[c.state](call_id=c.call_id)
        response, http_status = err.to_dict(), err.status
    return {
        "call_id": c.call_id, "state": c.state, "agent_id": c.agent_id,
        "capability": c.capability, "capability_version": c.capability_version,
        "approval_id": c.approval_id, "task_id": c.task_id, "created_at": c.created_at,
        "updated_at": c.updated_at, "ended": c.state in ENDED, "http_status": http_status,
        "response": response,
    }  # fmt: skip
