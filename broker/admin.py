"""Admin use cases: capabilities, agents, tokens, roles, policies, audit queries.

Every operation authenticates the caller and asks the same policy as calls do (an admin is an
agent holding the admin actions, normally through role ``admin``). Every change is audited as
``admin.*``; every refusal as ``admin.denied`` / ``admin.rejected``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from broker import errors
from broker.capabilities import Capability, parse_manifest
from broker.errors import BrokerError
from broker.models import BudgetIn
from broker.ports import AgentRecord, AuditEvent, AuditQuery, BudgetView, Principal, Rule
from broker.review import PolicyReview, rule_dict
from broker.service import HEADER_TOKEN, Broker
from broker.users import UserAdmin

RESERVED_AGENT_IDS = {"admin"}  # owned by BROKER_BOOTSTRAP_ADMIN_TOKEN


class Admin:
    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.policies = PolicyReview(self)
        self.users = UserAdmin(self)
        self._reload_lock = asyncio.Lock()

    # -- shared -----------------------------------------------------------------------------

    async def authorize(self, token: str | None, action: str, obj: str = "*") -> Principal:
        try:
            who = await self.b.authenticate(token)
        except BrokerError as exc:
            await self.b.record_refusal(
                AuditEvent(
                    kind="admin.rejected",
                    decision="deny",
                    reason=exc.code,
                    detail={"action": action, "object": obj},
                ),
                exc,
            )
            raise
        decision = self.b.policy.decide(who.subject, obj, action)
        if not decision.allowed:
            denied = errors.PolicyDenied(
                f"{who.subject} may not {action} on {obj}", details={"rule": decision.rule}
            )
            await self.b.record_refusal(
                AuditEvent(
                    kind="admin.denied",
                    agent_id=who.agent_id,
                    decision="deny",
                    rule=decision.rule,
                    reason=denied.code,
                    detail={"action": action, "object": obj},
                ),
                denied,
            )
            raise denied
        return who

    async def record(self, who: Principal | None, kind: str, **detail: Any) -> None:
        event = AuditEvent(
            kind=kind,
            agent_id=who.agent_id if who else None,
            decision="allow",
            capability=detail.pop("capability", None),
            capability_version=detail.pop("version", None),
            detail=detail,
        )
        await self.b.audit.append(event)

    async def reload_policy(self) -> None:
        """Re-read rules and grants and swap them in; serialised so a stale read never wins."""
        async with self._reload_lock:
            rules = await self.b.rulebook.list()
            grants = await self.b.directory.grants()
            self.b.policy.load(rules, grants)

    async def all_rules(self) -> list[Rule]:
        """Built-in rules first; a stored rule that only repeats a built-in one is not listed."""
        builtin = self.b.policy.builtin_rules()
        seen = {(r.subject, r.object, r.action, r.effect, r.condition) for r in builtin}
        stored = [
            r
            for r in await self.b.rulebook.list()
            if (r.subject, r.object, r.action, r.effect, r.condition) not in seen
        ]
        return [*builtin, *stored]

    # -- capabilities -----------------------------------------------------------------------

    async def put_capability(self, token: str | None, name: str, data: Any) -> Capability:
        who = await self.authorize(token, "capabilities.write", name)
        if isinstance(data, Mapping) and "name" not in data:
            data = {**data, "name": name}
        cap = parse_manifest(data)
        if cap.name != name:
            raise errors.InvalidManifest(f"name in the manifest ({cap.name}) differs from the path")
        return await self.apply_capability(who, cap)

    async def apply_capability(self, who: Principal | None, cap: Capability) -> Capability:
        stored = await self.b.registry.put(cap)
        await self.record(
            who, "admin.capability.put", capability=stored.name, version=stored.version
        )
        return stored

    async def get_capability(self, token: str | None, name: str) -> dict[str, Any]:
        who = await self.b.authenticate(token)
        cap = await self.b.registry.get(name)
        is_admin = self.b.policy.decide(who.subject, name, "capabilities.write").allowed
        if cap is None or not (is_admin or self._may_invoke(who, name)):
            raise errors.CapabilityNotFound(f"no capability named {name!r}")
        return cap.model_dump(mode="json", by_alias=True) if is_admin else cap.public_view()

    async def list_capabilities(
        self, token: str | None, *, all_: bool = False, user_assertion: str | None = None
    ) -> list[Any]:
        """What the caller may invoke; acting for a user, what the user may invoke too and
        has delegated to the caller (the intersection)."""
        who = await self.b.authenticate(token)
        user = await self.b.on_behalf.verify(user_assertion)
        caps = await self.b.registry.list()
        if all_:
            await self.authorize(token, "capabilities.write", "*")
            return [c.model_dump(mode="json", by_alias=True) for c in caps]
        mine = [c.name for c in caps if self._may_invoke(who, c.name)]
        if user is not None:
            mine = await self.b.on_behalf.visible(replace(who, user_id=user.id), mine)
        names = set(mine)
        return [c.public_view() for c in caps if c.name in names]

    def _may_invoke(self, who: Principal, name: str) -> bool:
        """Listed if some call could be allowed: an allow whose condition depends on the
        call's arguments counts (the call itself is decided with its arguments)."""
        d = self.b.policy.decide(who.subject, name, "invoke", agent=who.as_subject_data())
        return d.allowed or d.reason == "condition not met"

    async def delete_capability(self, token: str | None, name: str) -> None:
        who = await self.authorize(token, "capabilities.write", name)
        if not await self.b.registry.delete(name):
            raise errors.CapabilityNotFound(f"no capability named {name!r}")
        await self.record(who, "admin.capability.delete", capability=name)

    # -- agents and tokens ------------------------------------------------------------------

    async def create_agent(
        self, token: str | None, name: str, roles: Sequence[str], attributes: Mapping[str, str]
    ) -> tuple[AgentRecord, str, str]:
        who = await self.authorize(token, "agents.write")
        if roles:
            await self.authorize(token, "roles.grant")
        if name in RESERVED_AGENT_IDS:
            raise errors.Conflict(f"agent id {name!r} is reserved")
        await self.b.directory.create_agent(name, name, attributes)
        token_id, secret = await self.b.directory.issue_token(name)
        for role in roles:
            await self.b.directory.grant(f"agent:{name}", f"role:{role}")
        if roles:
            await self.reload_policy()
        await self.record(
            who, "admin.agent.create", agent=name, roles=list(roles), token_id=token_id
        )
        record = await self.b.directory.get_agent(name)
        assert record is not None
        return record, secret, token_id

    async def get_agent(self, token: str | None, agent_id: str) -> AgentRecord:
        await self.authorize(token, "agents.write")
        return await self._agent(agent_id)

    async def _agent(self, agent_id: str) -> AgentRecord:
        record = await self.b.directory.get_agent(agent_id)
        if record is None:
            raise errors.NotFound(f"no agent {agent_id!r}")
        return record

    async def list_agents(self, token: str | None) -> list[AgentRecord]:
        await self.authorize(token, "agents.write")
        return await self.b.directory.list_agents()

    async def issue_token(self, token: str | None, agent_id: str) -> tuple[str, str]:
        who = await self.authorize(token, "agents.write")
        await self._agent(agent_id)
        token_id, secret = await self.b.directory.issue_token(agent_id)
        await self.record(who, "admin.token.create", agent=agent_id, token_id=token_id)
        return token_id, secret

    async def revoke_token(self, token: str | None, agent_id: str, token_id: str) -> None:
        who = await self.authorize(token, "agents.write")
        if not await self.b.directory.revoke_token(agent_id, token_id):
            raise errors.NotFound(f"no live token {token_id!r} for agent {agent_id!r}")
        await self.record(who, "admin.token.revoke", agent=agent_id, token_id=token_id)

    async def disable_agent(self, token: str | None, agent_id: str) -> AgentRecord:
        who = await self.authorize(token, "agents.write")
        await self._agent(agent_id)
        await self.b.directory.set_disabled(agent_id, True)
        revoked = await self.b.directory.revoke_all_tokens(agent_id)
        # The kill switch: also its pending approvals and its waiting and running jobs.
        cancelled = await self.b.deferred.cancel_agent(agent_id)
        await self.record(
            who, "admin.agent.disable", agent=agent_id, tokens_revoked=revoked, **cancelled
        )
        return await self._agent(agent_id)

    # -- roles ------------------------------------------------------------------------------

    async def grant_role(self, token: str | None, agent_id: str, role: str) -> AgentRecord:
        who = await self.authorize(token, "roles.grant", f"role:{role}")
        await self._agent(agent_id)
        await self.b.directory.grant(f"agent:{agent_id}", f"role:{role}")
        await self.reload_policy()
        await self.record(who, "admin.role.grant", agent=agent_id, role=role)
        return await self._agent(agent_id)

    async def revoke_role(self, token: str | None, agent_id: str, role: str) -> AgentRecord:
        who = await self.authorize(token, "roles.grant", f"role:{role}")
        if not await self.b.directory.revoke(f"agent:{agent_id}", f"role:{role}"):
            raise errors.NotFound(f"agent {agent_id!r} does not hold role {role!r}")
        await self.reload_policy()
        await self.record(who, "admin.role.revoke", agent=agent_id, role=role)
        return await self._agent(agent_id)

    async def list_roles(self, token: str | None) -> list[dict[str, Any]]:
        await self.authorize(token, "agents.write")
        rules = await self.all_rules()
        grants = await self.b.directory.grants()
        names = {r.subject for r in rules if r.subject.startswith("role:")}
        names |= {g.role for g in grants}
        return [
            {
                "name": n.removeprefix("role:"),
                "members": sorted(g.subject for g in grants if g.role == n),
                "rules": [rule_dict(r) for r in rules if r.subject == n],
            }
            for n in sorted(names)
        ]

    # -- budgets ----------------------------------------------------------------------------

    async def put_budget(
        self, token: str | None, scope: str, subject: str, data: Any
    ) -> BudgetView:
        """Set (or replace) the budget of an agent or a task; spend so far is kept."""
        who = await self.authorize(token, "agents.write")
        budget = BudgetIn.parse(data)
        await self._budget_subject(scope, subject)
        view = await self.b.budgets.put(scope, subject, budget.limit, budget.period)
        await self.record(who, "admin.budget.put", scope=scope, subject=subject,
                          limit=budget.limit, period=budget.period)  # fmt: skip
        return view

    async def get_budget(self, token: str | None, scope: str, subject: str) -> BudgetView:
        await self.authorize(token, "audit.read")
        view = await self.b.budgets.get(scope, subject)
        if view is None:
            raise errors.NotFound(f"no budget for {scope} {subject!r}")
        return view

    async def delete_budget(self, token: str | None, scope: str, subject: str) -> None:
        who = await self.authorize(token, "agents.write")
        if not await self.b.budgets.delete(scope, subject):
            raise errors.NotFound(f"no budget for {scope} {subject!r}")
        await self.record(who, "admin.budget.delete", scope=scope, subject=subject)

    async def _budget_subject(self, scope: str, subject: str) -> None:
        if scope == "agent":
            await self._agent(subject)
        elif not HEADER_TOKEN.match(subject):
            # A task id no X-Broker-Task header could carry would never be charged.
            raise errors.Unprocessable("a task id is 1-128 characters of [A-Za-z0-9._:/+=-]")

    # -- audit ------------------------------------------------------------------------------

    async def query_audit(
        self, token: str | None, q: AuditQuery
    ) -> tuple[list[dict[str, Any]], str | None]:
        await self.authorize(token, "audit.read")
        return await self.b.audit.query(q)

    async def verify_audit(self, token: str | None) -> dict[str, Any]:
        who = await self.authorize(token, "audit.read")
        report = await self.b.audit.verify()
        await self.record(
            who,
            "admin.audit.verify",
            ok=report["ok"],
            checked=report["checked"],
            first_bad_seq=report["first_bad_seq"],
        )
        return report

    async def export_audit(self, token: str | None) -> Iterator[dict[str, Any]]:
        who = await self.authorize(token, "audit.read")
        await self.record(who, "admin.audit.export")
        return self.b.audit.export()

    async def hash_value(self, token: str | None, value: Any) -> list[str]:
        await self.authorize(token, "audit.read")
        return self.b.audit.hmac_all(value)

    async def rotate_hmac_key(self, token: str | None) -> str:
        who = await self.authorize(token, "audit.read")
        key_id = self.b.audit.rotate_hmac_key()
        await self.record(who, "admin.audit.rotate_hmac_key", key_id=key_id)
        return key_id
