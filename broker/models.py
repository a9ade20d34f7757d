"""Wire models shared by the API, the SDK and the CLI (pydantic; no server dependencies)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    condition: str | None = None


class PolicyRule(BaseModel):
    id: str
    subject: str
    object: str
    action: str
    effect: str
    condition: str | None = None
    source: str = "api"


class PolicyList(BaseModel):
    policies: list[PolicyRule]


class PolicyCheckIn(_Strict):
    subject: str | None = Field(default=None, description="agent:<id> or role:<name>")
    agent: str | None = Field(default=None, description="an agent id (instead of subject)")
    object: str = Field(description="a capability name")
    action: str = "invoke"
    args: dict[str, Any] | None = None


class PolicyCheckOut(BaseModel):
    allowed: bool
    rule: str | None
    reason: str = ""


class CapabilitySummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: int
    description: str
    input: dict[str, Any]


class CapabilityList(BaseModel):
    capabilities: list[dict[str, Any]]


class InvokeIn(_Strict):
    args: dict[str, Any] = Field(default_factory=dict)


class InvokeOut(BaseModel):
    call_id: str
    status: str
    result: Any = None
    upstream_status: int | None = None


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


class ErrorBody(BaseModel):
    code: str
    message: str
    call_id: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


RoleInfo.model_rebuild()
