"""Acting on behalf of users: the rules that join an agent, a verified user and a delegation.

A call that carries a verified user assertion runs only if three things hold: the agent may
invoke the capability (decided by the pipeline as always), the user (policy subject
``user:<id>``) may invoke it, and the user delegated it to this agent (a delegation whose
capability patterns match and which has not expired). The same intersection decides what an
agent acting for a user sees (``tools/list``, ``GET /v1/capabilities``) and what
``POST /v1/policies/check`` explains. A capability whose secret paths use ``{user.id}`` cannot
run without a verified user, and a per-user credential that is not connected is 428
``credential_required`` naming it, so the agent can ask the user to connect it.

Pure logic over the ports (no I/O of its own); the service and the admin use cases call it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from broker import errors
from broker.capabilities import Capability, slots_in
from broker.ports import (
    CredentialStore,
    Decision,
    Delegation,
    DelegationStore,
    PolicyEngine,
    Principal,
    UserAssertions,
    VerifiedUser,
)

CREDENTIAL_MOUNT = "secret"
SELF_SCOPE = "broker:self"  # an assertion with it lets the user manage their own delegations
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PATTERN = re.compile(r"^[a-z0-9*?_.\-\[\]]{1,200}$")  # the policy's object syntax
MAX_PATTERNS = 100


def credential_path(user_id: str, name: str) -> str:
    """Where a user's credential lives in KV v2 (mount ``secret``)."""
    return f"users/{user_id}/{name}"


def check_user_id(user_id: str) -> str:
    if not USER_ID.match(user_id) or user_id in (".", ".."):
        raise errors.InvalidRequest(
            "a user id is 1-128 characters of [A-Za-z0-9_.@-], starting with a letter or digit"
        )
    return user_id


def check_credential_name(name: str) -> str:
    if not CREDENTIAL_NAME.match(name) or name in (".", ".."):
        raise errors.InvalidRequest(
            "a credential name is 1-64 characters of [A-Za-z0-9_.-], starting with a letter "
            "or digit"
        )
    return name


def parse_expiry(value: str) -> str:
    """An ISO 8601 instant with a zone, in the future, as the database's UTC text."""
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise errors.InvalidRequest(
            "expires_at must be an ISO 8601 time, e.g. 2026-12-31T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise errors.InvalidRequest("expires_at must name its time zone (e.g. a trailing Z)")
    when = when.astimezone(UTC)
    if when <= datetime.now(UTC):
        raise errors.InvalidRequest("expires_at is in the past")
    return utc_text(when)


def utc_text(when: datetime | None = None) -> str:
    """The database's timestamp text (db.utcnow's format) of ``when`` (default: now)."""
    return (when or datetime.now(UTC)).isoformat(timespec="microseconds")[:26] + "Z"


def check_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    if not patterns or len(patterns) > MAX_PATTERNS:
        raise errors.InvalidRequest(f"capabilities must list 1-{MAX_PATTERNS} names or globs")
    for p in patterns:
        if not isinstance(p, str) or not PATTERN.match(p):
            raise errors.InvalidRequest(
                f"capability pattern {str(p)[:200]!r} is not a name or glob"
            )
    return tuple(dict.fromkeys(patterns))


def delegation_problem(delegation: Delegation | None, capability: str) -> str | None:
    """Why the delegation does not cover the capability now, or None when it does."""
    if delegation is None:
        return "has not delegated anything to this agent"
    if _expired(delegation):
        return f"delegated to this agent until {delegation.expires_at} (expired)"
    if not any(fnmatch.fnmatchcase(capability, p) for p in delegation.capabilities):
        return f"has not delegated {capability} to this agent"
    return None


def _expired(delegation: Delegation) -> bool:
    if delegation.expires_at is None:
        return False
    when = datetime.fromisoformat(delegation.expires_at)
    return when.astimezone(UTC) <= datetime.now(UTC)


def needs_user(cap: Capability) -> bool:
    """Some secret of the capability lives at a per-user path."""
    return any(s.startswith("user.") for ref in cap.secrets.values() for s in slots_in(ref.path))


def credential_name(template: str) -> str:
    """The name a user connects: the path after ``users/{user.id}/``, else the whole path."""
    prefix = "users/{user.id}/"
    return template.removeprefix(prefix) if template.startswith(prefix) else template


def delegation_dict(d: Delegation) -> dict[str, Any]:
    return {
        "user_id": d.user_id,
        "agent_id": d.agent_id,
        "capabilities": list(d.capabilities),
        "expires_at": d.expires_at,
        "created_at": d.created_at,
        "created_by": d.created_by,
        "expired": _expired(d),
    }


class OnBehalf:
    """The on-behalf-of checks, over the assertion verifier, delegations, policy and Vault."""

    def __init__(
        self,
        *,
        assertions: UserAssertions | None,
        delegations: DelegationStore,
        credentials: CredentialStore,
        policy: PolicyEngine,
    ) -> None:
        self.assertions = assertions
        self.delegations = delegations
        self.credentials = credentials
        self.policy = policy

    async def verify(self, assertion: str | None) -> VerifiedUser | None:
        """The verified user, None without an assertion; 401 when it does not verify."""
        if assertion is None:
            return None
        if self.assertions is None:
            raise errors.AssertionIssuerUnknown(
                "this broker trusts no user-assertion issuer (BROKER_USER_ISSUERS is empty)"
            )
        return await self.assertions.verify(assertion.strip())

    async def admit(self, who: Principal, cap: Capability, args: Mapping[str, Any]) -> None:
        """After the agent's own allow: the user's side and the delegation (or a refusal)."""
        if who.user_id is None:
            if needs_user(cap):
                raise errors.AssertionRequired(
                    f"{cap.name} uses a per-user credential: send the user's assertion in "
                    "X-Broker-User-Assertion"
                )
            return
        decision = self.decide_user(who, cap.name, args)
        if not decision.allowed:
            why = decision.reason or "no rule allows it"
            raise errors.PolicyDenied(
                f"user:{who.user_id} may not invoke {cap.name}: {why}",
                details={"rule": decision.rule, "denied_by": "user"},
            )
        delegation = await self.delegations.get(who.user_id, who.agent_id)
        problem = delegation_problem(delegation, cap.name)
        if problem is not None:
            raise errors.DelegationRequired(
                f"user {who.user_id} {problem}", details={"denied_by": "delegation"}
            )

    def decide_user(self, who: Principal, capability: str, args: Mapping[str, Any]) -> Decision:
        return self.policy.decide(
            f"user:{who.user_id}", capability, "invoke", args=args, agent=who.as_subject_data()
        )

    async def visible(self, who: Principal, names: Iterable[str]) -> list[str]:
        """Of the names the agent may invoke, those the user may too and has delegated."""
        if who.user_id is None:
            return list(names)
        delegation = await self.delegations.get(who.user_id, who.agent_id)
        out = []
        for name in names:
            d = self.decide_user(who, name, {})
            may = d.allowed or d.reason == "condition not met"
            if may and delegation_problem(delegation, name) is None:
                out.append(name)
        return out

    async def missing_credential(
        self, cap: Capability, who: Principal, fill: Callable[[str, Principal], str]
    ) -> errors.CredentialRequired | None:
        """A 428 naming the first per-user credential of the call that is not connected."""
        if who.user_id is None:
            return None
        for name in sorted(cap.secrets):
            ref = cap.secrets[name]
            if not any(s.startswith("user.") for s in slots_in(ref.path)):
                continue
            path = fill(ref.path, who)
            if await self.credentials.credential_metadata(ref.mount, path) is None:
                credential = credential_name(ref.path)
                return errors.CredentialRequired(
                    f"user {who.user_id} has not connected the credential {credential!r} "
                    f"that {cap.name} needs",
                    details={"credential": credential, "user_id": who.user_id},
                )
        return None

    async def explain(
        self,
        agent_explain: Mapping[str, Any],
        who: Principal,
        capability: str,
        args: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The agent's explanation joined with the user's side and the delegation."""
        assert who.user_id is not None
        user = self.policy.explain(
            f"user:{who.user_id}", capability, "invoke", args=args, agent=who.as_subject_data()
        )
        delegation = await self.delegations.get(who.user_id, who.agent_id)
        problem = delegation_problem(delegation, capability)
        denied_by = None
        if not agent_explain["allowed"]:
            denied_by = "agent"
        elif not user["allowed"]:
            denied_by = "user"
        elif problem is not None:
            denied_by = "delegation"
        return {
            **agent_explain,
            "allowed": denied_by is None,
            "denied_by": denied_by,
            "user": user,
            "delegation": {
                "covers": problem is None,
                "problem": problem,
                "record": delegation_dict(delegation) if delegation else None,
            },
        }
