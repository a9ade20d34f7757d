"""The small Protocols the core (service.py) depends on, and the plain values they exchange.

Adapters implement these: vault.py (SecretStore, CredentialStore), upstream.py (Upstream),
policy.py (PolicyEngine), identity.py (Directory), registry.py (CapabilityRegistry), rulebook.py
(Rulebook), audit.py (AuditLog), jobs.py (CallStore), idempotency.py (IdempotencyStore),
budgets.py (Budgets), telemetry.py (Tracer), metrics.py (Metrics), breaker.py
(CircuitBreaker), assertions.py (UserAssertions), delegations.py (DelegationStore). Only
bootstrap.py builds them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from broker.capabilities import Capability

# --- values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling: an authenticated agent, acting for ``user_id`` when the call carried a
    verified user assertion (never from anything else the agent sends)."""

    agent_id: str
    name: str
    roles: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    token_id: str | None = None
    user_id: str | None = None

    @property
    def subject(self) -> str:
        return f"agent:{self.agent_id}"

    def as_subject_data(self) -> dict[str, Any]:
        """What policy conditions may read about the caller (``agent.*``)."""
        return {"id": self.agent_id, "name": self.name, "attributes": dict(self.attributes)}


@dataclass(frozen=True)
class VerifiedUser:
    """The end user a verified assertion names: ``id`` is the token's subject."""

    id: str
    issuer: str
    scopes: frozenset[str] = frozenset()
    expires_at: int | None = None  # the assertion's exp (seconds since the epoch)

    @property
    def subject(self) -> str:
        return f"user:{self.id}"


@dataclass(frozen=True)
class Delegation:
    """A user lets an agent invoke, for them, the capabilities matching ``capabilities``."""

    user_id: str
    agent_id: str
    capabilities: tuple[str, ...]  # capability names or globs (github.*)
    expires_at: str | None  # db.utcnow() format; None: until revoked
    created_at: str
    created_by: str  # agent:<id> (an operator) or user:<id> (the user themself)


@dataclass(frozen=True)
class SecretValue:
    """One secret read from the store. ``value`` never leaves the broker."""

    mount: str
    path: str
    key: str
    value: str = field(repr=False)  # a logged SecretValue must not print the secret
    version: int | None = None

    def reference(self) -> dict[str, Any]:
        """What may be recorded about the secret: where and which version, never the value."""
        return {"mount": self.mount, "path": self.path, "key": self.key, "version": self.version}


@dataclass(frozen=True)
class OutgoingRequest:
    """A fully rendered upstream request."""

    method: str
    url: str
    headers: Sequence[tuple[str, str]]
    body: bytes | None = None


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes

    @property
    def content_type(self) -> str:
        for name, value in self.headers:
            if name.lower() == "content-type":
                return value
        return ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # id of the deciding rule; None when no rule matched (default deny)
    reason: str = ""


@dataclass(frozen=True)
class Rule:
    """One policy line: subject may (or may not) do action on object."""

    id: str
    subject: str  # agent:<id> | role:<name>
    object: str  # capability name or glob, e.g. github.*
    action: str  # invoke | capabilities.write | ...
    effect: str  # allow | deny
    condition: str | None = None
    source: str = "api"  # api | file | builtin


@dataclass(frozen=True)
class Grant:
    """subject (agent:<id> or role:<name>) holds role:<name>."""

    subject: str
    role: str


@dataclass(frozen=True)
class AgentRecord:
    id: str
    name: str
    roles: tuple[str, ...]
    attributes: Mapping[str, str]
    disabled: bool
    created_at: str
    tokens: tuple[dict[str, Any], ...] = ()


@dataclass
class AuditEvent:
    """One audit record as the core hands it over; audit.py adds seq, time and the chain."""

    kind: str
    call_id: str | None = None
    agent_id: str | None = None
    capability: str | None = None
    capability_version: int | None = None
    decision: str | None = None  # allow | deny
    rule: str | None = None
    reason: str | None = None  # machine code of a refusal or failure
    status: str | None = None  # succeeded | upstream_error | failed
    args: Any = None
    secrets: list[dict[str, Any]] = field(default_factory=list)
    upstream_status: int | None = None
    latency_ms: float | None = None
    cost: float | None = None
    task_id: str | None = None
    trace_id: str | None = None
    idempotency_key: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    sensitive: tuple[str, ...] = ()  # dotted arg paths stored as keyed HMACs, never as values
    user_id: str | None = None  # the verified user the call acts for


@dataclass(frozen=True)
class StoredCall:
    """A call that outlives its request: an asynchronous job or a call waiting for approval.

    state: approval_pending | queued | running | succeeded | upstream_error | failed | denied
    | expired | cancelled | outcome_unknown. ``response`` is the body the agent gets (the
    invoke result, or the error envelope) once the call has ended; ``http_status`` its status.
    """

    call_id: str
    agent_id: str
    capability: str
    capability_version: int | None
    args: Any
    args_hash: str
    state: str
    task_id: str | None = None
    trace_id: str | None = None
    idempotency_key: str | None = None
    approval_id: str | None = None
    http_status: int | None = None
    response: Any = None
    runner: str | None = None
    user_id: str | None = None  # the verified user the call acts for (re-checked when it runs)
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class ApprovalRecord:
    """A human decision a call waits for, bound to agent, capability and the args' SHA-256.

    status: pending | approved | denied | expired | cancelled; ``used_at`` is set when the
    approved call starts (an approval is used at most once).
    """

    id: str
    call_id: str
    agent_id: str
    capability: str
    args_hash: str
    status: str
    created_at: str
    expires_at: str
    approver: str | None = None
    reason: str | None = None
    decided_at: str | None = None
    used_at: str | None = None


@dataclass(frozen=True)
class AuditQuery:
    agent: str | None = None
    capability: str | None = None
    kind: str | None = None
    decision: str | None = None
    since: str | None = None
    until: str | None = None
    call_id: str | None = None
    task_id: str | None = None
    trace_id: str | None = None
    chain_id: str | None = None
    contains: str | None = None  # substring of the stored args/detail (e.g. an HMAC)
    user: str | None = None  # the user id the calls acted for
    limit: int = 100
    cursor: str | None = None


@dataclass(frozen=True)
class StoredAnswer:
    """What an idempotent repeat replays: the HTTP status and JSON body of the first answer."""

    call_id: str
    http_status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """An Idempotency-Key a call holds; ``answer`` is set when the key had already been used."""

    agent_id: str
    capability: str
    key: str
    answer: StoredAnswer | None = None


@dataclass(frozen=True)
class BudgetHold:
    """What one call holds against budgets from its reservation until it is settled."""

    call_id: str
    amount: float
    budgets: tuple[str, ...] = ()  # "agent:<id>", "task:<id>"; empty when no budget applies


@dataclass(frozen=True)
class BudgetView:
    """One budget and its spend in the current period (``period_start``, UTC)."""

    scope: str  # agent | task
    subject: str  # the agent id or the task id
    limit: float
    period: str  # hour | day | week | month | total
    spent: float
    reserved: float
    period_start: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "subject": self.subject,
            "limit": self.limit,
            "period": self.period,
            "spent": self.spent,
            "reserved": self.reserved,
            "period_start": self.period_start,
        }


def stamp(moment: datetime) -> str:
    """The stored form of an instant: fixed-width ISO 8601 UTC text, the form ``db.utcnow()``
    writes (``2026-11-26T11:21:09.551000Z``), so stored times compare as text."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"


# --- ports --------------------------------------------------------------------------------


class SecretStore(Protocol):
    async def read(self, mount: str, path: str, key: str) -> SecretValue:
        """The current value; raises SecretUnavailable (never returns an empty credential)."""

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class CredentialStore(Protocol):
    """Per-user credentials: written and deleted through the broker, never read back by it
    for anyone but the upstream call (metadata only)."""

    async def put_credential(
        self, mount: str, path: str, data: Mapping[str, str]
    ) -> dict[str, Any]:
        """Write a new version; returns its metadata (``exists``, ``version``, ``updated``)."""

    async def delete_credential(self, mount: str, path: str) -> bool:
        """Remove every version; False when there was none."""

    async def credential_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        """``{"exists", "version", "updated"}`` of the current version, None when there is
        none (never written, deleted or destroyed)."""


class UserAssertions(Protocol):
    async def verify(self, assertion: str) -> VerifiedUser:
        """Check signature, issuer, audience, expiry and not-before against the configured
        issuers; raises an AssertionInvalid subclass (401) or IssuerUnavailable (503)."""


class DelegationStore(Protocol):
    async def put(self, delegation: Delegation) -> Delegation:
        """Create or replace the user's delegation to the agent."""

    async def get(self, user_id: str, agent_id: str) -> Delegation | None: ...

    async def delete(self, user_id: str, agent_id: str) -> bool: ...

    async def list(self, user_id: str) -> list[Delegation]: ...


class Upstream(Protocol):
    async def send(
        self, request: OutgoingRequest, *, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        """Send once, follow no redirect; raises EgressDenied, UpstreamTimeout, UpstreamError."""

    async def close(self) -> None: ...


class PolicyEngine(Protocol):
    def load(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> None:
        """Replace the whole policy atomically (decisions see the old or the new, never a mix)."""

    def decide(
        self,
        subject: str,
        obj: str,
        action: str,
        *,
        args: Mapping[str, Any] | None = None,
        agent: Mapping[str, Any] | None = None,
    ) -> Decision:
        """``agent`` is ``{"id", "name", "attributes"}``; rules with conditions read it."""

    def explain(
        self,
        subject: str,
        obj: str,
        action: str,
        *,
        args: Mapping[str, Any] | None = None,
        agent: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The decision and every matching rule with its condition's checks (plain data)."""

    def roles_of(self, subject: str) -> list[str]: ...

    def builtin_rules(self) -> list[Rule]:
        """Rules that hold from the first start (role admin: every admin action)."""

    def make_rule(
        self, subject: str, obj: str, action: str, effect: str, condition: str | None
    ) -> Rule:
        """A validated rule with its derived id; raises Unprocessable on a bad rule."""

    def parse(self, text: str) -> tuple[list[Rule], list[Grant]]:
        """Rules and grants of a policy file (policy.csv); raises Unprocessable."""

    def review(
        self,
        rules: Sequence[Rule],
        capabilities: Mapping[str, Collection[str]],
        *,
        allow_wildcard: bool = False,
    ) -> list[dict[str, str]]:
        """Lint: ``[{"level": "error"|"warning", "rule_id", "message"}]``."""

    def simulate(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> PolicyEngine:
        """A separate engine with these rules and grants (for replaying a proposed policy)."""


class CallSlot(Protocol):
    def __enter__(self) -> CallSlot: ...

    def __exit__(self, t: Any, e: Any, tb: Any) -> None: ...


class Guards(Protocol):
    def admit(self, agent_id: str, cap: Capability) -> CallSlot:
        """Count the call against rate and concurrency limits; raises RateLimited."""


class IdempotencyStore(Protocol):
    async def claim(self, agent_id: str, capability: str, key: str, fp: str, call_id: str) -> Claim:
        """Claim the key or return its stored answer; IdempotencyInFlight (409) while the
        first call runs, IdempotencyKeyReused (422) for other arguments."""

    async def complete(self, claim: Claim, http_status: int, body: dict[str, Any]) -> None: ...

    async def release(self, claim: Claim) -> None:
        """Forget a claim whose call was refused before anything was executed."""

    async def dangling(self) -> list[Claim]:
        """Claims this instance left in flight (after a crash); answer.call_id is the call."""


class BreakerPermit(Protocol):
    """Leave for one attempt at an upstream; the attempt's outcome is reported once."""

    def record(self, outcome: UpstreamResponse | BaseException) -> None:
        """How the attempt ended: the answer, or the exception it raised."""

    def release(self) -> None:
        """Give back a permit that was never used (no-op once an outcome is recorded)."""


class CircuitBreaker(Protocol):
    """One circuit per upstream host:port, in the memory of this broker instance."""

    def admit(self, url: str) -> BreakerPermit:
        """A permit to call the host of ``url``; raises UpstreamUnavailable while its circuit
        is open (or half-open with every probe taken)."""

    def state(self, url: str) -> str:
        """closed | open | half_open, for the host of ``url``."""


class Budgets(Protocol):
    """Spend limits per agent and per task, per period; reservations are atomic in storage."""

    async def reserve(
        self, call_id: str, agent_id: str, task_id: str | None, amount: float
    ) -> BudgetHold:
        """Hold ``amount`` against the agent's and the task's budgets, both or none; raises
        BudgetExhausted. Nothing is held when ``amount`` is 0 or no budget applies. A caller
        cancelled while the hold is being written leaves nothing held: the hold is refunded
        once it lands."""

    async def settle(self, hold: BudgetHold, cost: float | None) -> None:
        """Turn the hold into spend of ``cost``; ``None`` (nothing executed) refunds it."""

    async def put(self, scope: str, subject: str, limit: float, period: str) -> BudgetView: ...

    async def get(self, scope: str, subject: str) -> BudgetView | None: ...

    async def delete(self, scope: str, subject: str) -> bool: ...


class CapabilityRegistry(Protocol):
    async def put(self, cap: Capability) -> Capability:
        """Store (insert or replace; the version goes up on replace) and return what was stored."""

    async def get(self, name: str) -> Capability | None: ...

    async def list(self) -> list[Capability]: ...

    async def delete(self, name: str) -> bool: ...


class Rulebook(Protocol):
    async def add(self, rule: Rule) -> Rule: ...

    async def delete(self, rule_id: str) -> bool: ...

    async def list(self) -> list[Rule]: ...


class Directory(Protocol):
    """Agents, their tokens and their role grants."""

    async def create_agent(
        self, agent_id: str, name: str, attributes: Mapping[str, str]
    ) -> AgentRecord: ...

    async def get_agent(self, agent_id: str) -> AgentRecord | None: ...

    async def list_agents(self) -> list[AgentRecord]: ...

    async def set_disabled(self, agent_id: str, disabled: bool) -> bool: ...

    async def issue_token(self, agent_id: str) -> tuple[str, str]:
        """(token_id, token): a new high-entropy token; only its hash is stored."""

    async def set_fixed_token(self, agent_id: str, token_id: str, token: str) -> None:
        """Make ``token`` (chosen by the operator) the agent's token ``token_id``."""

    async def revoke_token(self, agent_id: str, token_id: str) -> bool: ...

    async def revoke_all_tokens(self, agent_id: str) -> int: ...

    async def find_token(self, token: str) -> tuple[AgentRecord, str] | None:
        """(agent, token_id) for a live token of an enabled agent, else None."""

    async def grant(self, subject: str, role: str) -> bool: ...

    async def revoke(self, subject: str, role: str) -> bool: ...

    async def grants(self) -> list[Grant]: ...


class AuditLog(Protocol):
    async def start(self) -> int:
        """Start writing; record ``call.abandoned`` for calls a crash left open (their count)."""

    async def close(self) -> None: ...

    async def append(self, event: AuditEvent, *, alone: bool = False) -> int:
        """Durably store the event and return its seq; raises AuditUnavailable. ``alone``:
        no other call is in flight, so the log may write on the caller's thread."""

    async def query(self, q: AuditQuery) -> tuple[list[dict[str, Any]], str | None]: ...

    async def ready(self) -> bool: ...

    async def verify(self) -> dict[str, Any]:
        """``{"ok", "checked", "first_bad_seq", "chains": [...]}`` over every chain."""

    def export(self) -> Iterator[dict[str, Any]]:
        """JSON Lines objects (header, records, checkpoints) for offline verification."""

    def hmac_all(self, value: Any) -> list[str]:
        """The value's HMAC under every audit key, to search records for a known value."""

    def rotate_hmac_key(self) -> str: ...


class CallStore(Protocol):
    """Durable calls and their approvals. Every state change is one atomic compare-and-set,
    so two workers or two approvers racing on the same row cannot both win."""

    async def create(self, call: StoredCall, approval: ApprovalRecord | None = None) -> None:
        """Persist a new call (and its approval) before the agent gets its 202."""

    async def get_call(self, call_id: str) -> StoredCall | None: ...

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None: ...

    async def list_approvals(self, status: str | None, limit: int) -> list[ApprovalRecord]: ...

    async def expire_due(self, now: str) -> list[ApprovalRecord]:
        """Pending approvals past ``expires_at`` become expired (their calls too); those changed."""

    async def decide(
        self, approval_id: str, approve: bool, approver: str, reason: str | None
    ) -> ApprovalRecord | None:
        """pending -> approved (call queued) or denied (call denied); None if not pending."""

    async def claim_next(self, runner: str) -> StoredCall | None:
        """Take the oldest queued call (-> running, owned by ``runner``; its approval used)."""

    async def transition(
        self,
        call_id: str,
        from_states: Sequence[str],
        to_state: str,
        *,
        http_status: int | None = None,
        response: Any = None,
    ) -> bool:
        """Move the call to ``to_state`` if it is in one of ``from_states``; whether it moved."""

    async def running(self, runner: str) -> list[StoredCall]:
        """Calls ``runner`` had started and not ended (left by a crash when it starts again)."""

    async def cancel_agent(self, agent_id: str) -> tuple[int, list[str]]:
        """Cancel the agent's pending approvals and waiting calls: (approvals, call ids)."""


# --- observability ------------------------------------------------------------------------

SpanValue = str | int | float | bool


class Span(Protocol):
    """One traced operation. Attributes: capability, agent id, decision, codes; never values."""

    @property
    def trace_id(self) -> str | None:
        """The 32-hex trace id this span belongs to (None when tracing is off)."""

    def set(self, **attrs: SpanValue | None) -> None:
        """Set attributes; None values are skipped."""

    def fail(self, code: str) -> None:
        """Mark the operation failed with a machine code (an error code, never a message)."""


class Tracer(Protocol):
    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        traceparent: str | None = None,
        **attrs: SpanValue | None,
    ) -> AbstractContextManager[Span]:
        """A span, current while the block runs, child of the current span; with ``traceparent``
        (the caller's W3C header) a child of that remote span instead (a new trace when the
        header is malformed). ``kind``: internal | server | client."""

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add the W3C ``traceparent`` of the current span (nothing when there is none)."""


class Metrics(Protocol):
    """Counters and histograms. Labels are capability names and fixed enums only."""

    def call(self, capability: str | None, decision: str, outcome: str, code: str) -> None:
        """One invoke ended. decision: allow | deny | none; outcome: succeeded |
        upstream_error | failed | refused | approval_pending | queued (answered 202; the
        deferred run counts again when it ends); code: the error code, "" when none."""

    def stage(self, stage: str, seconds: float) -> None:
        """authenticate | decide | secrets | upstream | audit | total."""

    def spend(self, capability: str, cost: float) -> None: ...

    def secret_cache(self, result: str) -> None:
        """hit | refresh (a hit that started a background read ahead of expiry) | miss |
        shared (joined a read already in flight)."""

    def audit(self, kind: str, *, ok: bool) -> None: ...

    def circuit(self, upstream: str, state: str) -> None:
        """The circuit of ``upstream`` (host:port) is now closed | open | half_open."""

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for ``GET /metrics``."""


class _NoSpan:
    trace_id: str | None = None

    def set(self, **attrs: SpanValue | None) -> None:
        return None

    def fail(self, code: str) -> None:
        return None


class NoTracer:
    """Tracing off: no spans, no headers."""

    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        traceparent: str | None = None,
        **attrs: SpanValue | None,
    ) -> AbstractContextManager[Span]:
        return nullcontext(_NoSpan())

    def inject(self, headers: MutableMapping[str, str]) -> None:
        return None


class NoMetrics:
    """Metrics off: every observation is dropped."""

    def call(self, capability: str | None, decision: str, outcome: str, code: str) -> None:
        return None

    def stage(self, stage: str, seconds: float) -> None:
        return None

    def spend(self, capability: str, cost: float) -> None:
        return None

    def secret_cache(self, result: str) -> None:
        return None

    def audit(self, kind: str, *, ok: bool) -> None:
        return None

    def circuit(self, upstream: str, state: str) -> None:
        return None

    def exposition(self) -> tuple[bytes, str]:
        return b"", "text/plain; charset=utf-8"
