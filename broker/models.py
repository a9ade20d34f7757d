"""Wire models shared by the API, the SDK and the CLI (pydantic; no server dependencies)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import Unprocessable

AGENT_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
ROLE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentCreate(_Strict):
    name: str = Field(pattern=AGENT_ID_PATTERN, description="unique; also the agent's id")
    roles: list[str] = Field(default_factory=list)
    attributes: dict[str, str] = Field(default_factory=dict)


class TokenInfo(BaseModel):
    id: str
    created_at: str
    revoked_at: str | None = None


class Agent(BaseModel):
    id: str
    name: str
    roles: list[str]
    attributes: dict[str, str]
    disabled: bool
    created_at: str
    tokens: list[TokenInfo] = Field(default_factory=list)


class AgentCreated(BaseModel):
    id: str
    name: str
    token: str = Field(description="shown once; the broker stores only its hash")
    token_id: str
    roles: list[str] = Field(default_factory=list)


class TokenCreated(BaseModel):
    agent_id: str
    token: str
    token_id: str


class AgentList(BaseModel):
    agents: list[Agent]


class RoleInfo(BaseModel):
    name: str
    members: list[str]
    rules: list[PolicyRule]


class RoleList(BaseModel):
    roles: list[RoleInfo]


class PolicyIn(_Strict):
    subject: str
    object: str
    action: str = "invoke"
    effect: Literal["allow", "deny"] = "allow"
    condition: str | None = Field(default=None, description='e.g. args.owner == "acme"')
    allow_wildcard: bool = Field(
        default=False, description="accept an invoke allow on every capability (*)"
    )


class PolicyRule(BaseModel):
    id: str
    subject: str
    object: str
    action: str
    effect: str
    condition: str | None = None
    source: str = "api"
    warnings: list[str] = Field(default_factory=list)


class PolicyList(BaseModel):
    policies: list[PolicyRule]


class PolicyCheckIn(_Strict):
    subject: str | None = Field(default=None, description="agent:<id> or role:<name>")
    agent: str | None = Field(default=None, description="an agent id (instead of subject)")
    user: str | None = Field(
        default=None, description="with agent: that agent acting for this user"
    )
    object: str = Field(description="a capability name")
    action: str = "invoke"
    args: dict[str, Any] | None = None


class PolicyCheckOut(BaseModel):
    allowed: bool
    rule: str | None
    reason: str = ""
    subject: str | None = None
    roles: list[str] = Field(default_factory=list)
    matched: list[dict[str, Any]] = Field(
        default_factory=list, description="every matching rule, its condition's checks"
    )
    denied_by: str | None = Field(
        default=None, description="acting for a user: agent | user | delegation (None: allowed)"
    )
    user: dict[str, Any] | None = Field(default=None, description="the user's side, explained")
    delegation: dict[str, Any] | None = None


class PolicyApplyIn(_Strict):
    policy: str = Field(description="the text of a policy.csv")
    dry_run: bool = False
    allow_wildcard: bool = False


class PolicyDiff(BaseModel):
    add: list[dict[str, Any]]
    remove: list[dict[str, Any]]
    grant: list[dict[str, Any]]
    revoke: list[dict[str, Any]]
    ignored_agent_grants: list[dict[str, Any]] = Field(default_factory=list)
    dry_run: bool
    warnings: list[str] = Field(default_factory=list)


class PolicyReplayIn(_Strict):
    policy: str = Field(description="the text of the proposed policy.csv")
    since: str | None = None
    until: str | None = None


class PolicyReplay(BaseModel):
    checked: int
    flips: list[dict[str, Any]]


class InvokeIn(_Strict):
    args: dict[str, Any] = Field(default_factory=dict)


class InvokeOut(BaseModel):
    call_id: str
    status: str
    result: Any = None
    upstream_status: int | None = None
    replayed: bool = False  # the stored answer of an earlier call with this Idempotency-Key


class InvokeAccepted(BaseModel):
    """202: stored to run later (``queued``) or after a human decision (``approval_pending``)."""

    call_id: str
    status: Literal["queued", "approval_pending"]
    approval_id: str | None = None


ApprovalStatus = Literal["pending", "approved", "denied", "expired", "cancelled"]


class ApprovalDecideIn(_Strict):
    reason: str | None = Field(default=None, max_length=2000)


class Approval(BaseModel):
    id: str
    call_id: str
    agent_id: str
    capability: str
    args_hash: str
    status: ApprovalStatus
    approver: str | None = None
    reason: str | None = None
    created_at: str
    expires_at: str
    decided_at: str | None = None
    used_at: str | None = None
    args: Any = None  # in listings: the arguments to decide on (x-sensitive values hidden)


class ApprovalList(BaseModel):
    approvals: list[Approval]


class CallState(BaseModel):
    call_id: str
    state: str
    agent_id: str
    capability: str
    capability_version: int | None = None
    approval_id: str | None = None
    task_id: str | None = None
    created_at: str
    updated_at: str
    ended: bool
    http_status: int | None = None
    response: Any = None  # once ended: the invoke body, or the error envelope
    approval: Approval | None = None


class AuditPage(BaseModel):
    events: list[dict[str, Any]]
    next_cursor: str | None = None


class AuditVerify(BaseModel):
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    chains: list[dict[str, Any]] = Field(default_factory=list)


class HashIn(_Strict):
    value: Any


class CredentialIn(_Strict):
    data: dict[str, str] = Field(description="the credential's fields; never readable back")


class Credential(BaseModel):
    """A per-user credential's metadata (the value is never returned)."""

    user_id: str
    name: str
    exists: bool
    version: int | None = None
    updated: str | None = None


class DelegationIn(_Strict):
    capabilities: list[str] = Field(description="capability names or globs the agent may use")
    expires_at: str = Field(description="ISO 8601 with a zone, e.g. 2026-12-31T00:00:00Z")


class DelegationOut(BaseModel):
    user_id: str
    agent_id: str
    capabilities: list[str]
    expires_at: str | None
    created_at: str
    created_by: str
    expired: bool = False


class DelegationList(BaseModel):
    delegations: list[DelegationOut]


class UserRoles(BaseModel):
    id: str
    roles: list[str]


BudgetPeriod = Literal["hour", "day", "week", "month", "total"]  # UTC boundaries; weeks on Monday


class BudgetIn(_Strict):
    limit: float = Field(ge=0, allow_inf_nan=False, description="in the capabilities' cost unit")
    period: BudgetPeriod = Field(description="the spend resets at each UTC period boundary")

    @classmethod
    def parse(cls, data: Any) -> BudgetIn:
        """The budget in ``data``, or 422 naming the field at fault."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(body)"
            raise Unprocessable(f"budget {where}: {first['msg']}") from None


class BudgetOut(BaseModel):
    scope: Literal["agent", "task"]
    subject: str = Field(description="the agent id or the task id")
    limit: float
    period: BudgetPeriod
    spent: float = Field(description="settled cost in the current period")
    reserved: float = Field(description="held by calls in flight")
    period_start: str = Field(description="start of the current period (UTC)")


class ErrorBody(BaseModel):
    code: str
    message: str
    call_id: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


RoleInfo.model_rebuild()
