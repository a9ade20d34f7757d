"""Policy administration: rules, explain, policy files applied with a diff, and replay.

``apply`` makes the stored policy equal to a policy file: every rule (whatever its source) and
every role-to-role grant (the role hierarchy). Grants of roles to agents stay with
``broker role grant``: a file that forgot an agent must not silently disarm or empower it.
``replay`` decides the calls recorded in the audit log again under a proposed policy and lists
the decisions that would flip, before anything is applied.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.onbehalf import check_user_id
from broker.ports import AgentRecord, AuditQuery, Grant, PolicyEngine, Principal, Rule

if TYPE_CHECKING:
    from broker.admin import Admin

REPLAY_KINDS = ("call.started", "call.denied")  # the calls the policy decided
MAX_REPLAY = 100_000


class PolicyReview:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.b = admin.b

    async def rules(self, token: str | None) -> list[dict[str, Any]]:
        await self.admin.authorize(token, "policies.write")
        return [rule_dict(r) for r in await self.admin.all_rules()]

    async def add(
        self, token: str | None, data: Mapping[str, Any], *, allow_wildcard: bool = False
    ) -> dict[str, Any]:
        who = await self.admin.authorize(token, "policies.write")
        rule = self.b.policy.make_rule(
            data["subject"], data["object"], data["action"], data["effect"], data.get("condition")
        )
        warnings = await self._lint([rule], allow_wildcard)
        await self.b.rulebook.add(rule)
        await self.admin.reload_policy()
        await self.admin.record(who, "admin.policy.add", rule=rule_dict(rule))
        return {**rule_dict(rule), "warnings": warnings}

    async def delete(self, token: str | None, rule_id: str) -> None:
        who = await self.admin.authorize(token, "policies.write")
        if not await self.b.rulebook.delete(rule_id):
            raise errors.NotFound(f"no policy rule {rule_id!r} (built-in rules cannot be deleted)")
        await self.admin.reload_policy()
        await self.admin.record(who, "admin.policy.delete", rule_id=rule_id)

    async def _lint(self, rules: Sequence[Rule], allow_wildcard: bool) -> list[str]:
        """Refuse rules that would surprise (errors); return the warnings."""
        caps = await self.capability_args()
        issues = self.b.policy.review(rules, caps, allow_wildcard=allow_wildcard)
        bad = [f"{i['rule_id']}: {i['message']}" for i in issues if i["level"] == "error"]
        if bad:
            raise errors.Unprocessable("policy refused: " + "; ".join(bad))
        return [f"{i['rule_id']}: {i['message']}" for i in issues]

    async def capability_args(self) -> dict[str, Collection[str]]:
        caps = await self.b.registry.list()
        return {c.name: set(c.input.get("properties", {})) for c in caps}

    # -- explain ----------------------------------------------------------------------------

    async def check(
        self,
        token: str | None,
        *,
        subject: str | None,
        agent: str | None,
        obj: str,
        action: str,
        args: Mapping[str, Any] | None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Explain a decision; with ``agent`` and ``user``, the call of that agent acting for
        that user: both sides and the delegation, and ``denied_by`` naming the side that
        refused (agent, user or delegation)."""
        await self.admin.authorize(token, "policies.write")
        if (subject is None) == (agent is None):
            raise errors.InvalidRequest("give exactly one of subject or agent")
        if user is not None and (agent is None or action != "invoke"):
            raise errors.InvalidRequest("user needs agent and the invoke action")
        caller = None
        if agent is not None:
            record = await self.b.directory.get_agent(agent)
            caller = _agent_data(record) if record else {"id": agent, "attributes": {}}
        who = subject or f"agent:{agent}"
        explained = self.b.policy.explain(who, obj, action, args=args, agent=caller)
        if user is None:
            return explained
        data: dict[str, Any] = caller or {}
        acting = Principal(
            str(agent), str(data.get("name", agent)), attributes=dict(data.get("attributes", {})),
            user_id=check_user_id(user),
        )  # fmt: skip
        return await self.b.on_behalf.explain(explained, acting, obj, args)

    # -- policy as code ---------------------------------------------------------------------

    async def apply(
        self, token: str | None, text: str, *, dry_run: bool, allow_wildcard: bool = False
    ) -> dict[str, Any]:
        who = await self.admin.authorize(token, "policies.write")
        rules, grants = self.b.policy.parse(text)
        warnings = await self._lint(rules, allow_wildcard)
        diff = await self._diff(rules, grants)
        if not dry_run and any(diff[k] for k in ("add", "remove", "grant", "revoke")):
            await self._apply(diff, rules)
            await self.admin.reload_policy()
            await self.admin.record(who, "admin.policy.apply", **_summary(diff))
        return {**diff, "dry_run": dry_run, "warnings": warnings}

    async def _diff(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> dict[str, Any]:
        stored = {r.id: r for r in await self.b.rulebook.list()}
        wanted = {r.id: r for r in rules}
        have = {(g.subject, g.role) for g in await self.b.directory.grants() if _hierarchy(g)}
        want = {(g.subject, _role(g.role)) for g in grants if _hierarchy(g)}
        agent_grants = [g for g in grants if not _hierarchy(g)]
        return {
            "add": [rule_dict(wanted[i]) for i in sorted(wanted.keys() - stored.keys())],
            "remove": [rule_dict(stored[i]) for i in sorted(stored.keys() - wanted.keys())],
            "grant": [{"subject": s, "role": r} for s, r in sorted(want - have)],
            "revoke": [{"subject": s, "role": r} for s, r in sorted(have - want)],
            "ignored_agent_grants": [{"subject": g.subject, "role": g.role} for g in agent_grants],
        }

    async def _apply(self, diff: Mapping[str, Any], rules: Sequence[Rule]) -> None:
        by_id = {r.id: r for r in rules}
        for rule in diff["add"]:
            await self.b.rulebook.add(by_id[rule["id"]])
        for rule in diff["remove"]:
            await self.b.rulebook.delete(rule["id"])
        for g in diff["grant"]:
            await self.b.directory.grant(g["subject"], g["role"])
        for g in diff["revoke"]:
            await self.b.directory.revoke(g["subject"], g["role"])

    # -- replay -----------------------------------------------------------------------------

    async def replay(
        self, token: str | None, text: str, *, since: str | None, until: str | None
    ) -> dict[str, Any]:
        """Decide the recorded calls again under the proposed policy; list what would flip."""
        who = await self.admin.authorize(token, "policies.write")
        await self.admin.authorize(token, "audit.read")
        rules, grants = self.b.policy.parse(text)
        current = await self.b.directory.grants()
        engine = self.b.policy.simulate(
            rules, [*grants, *(g for g in current if not _hierarchy(g))]
        )
        checked, flips = await self._replay(engine, since, until)
        await self.admin.record(who, "admin.policy.replay", checked=checked, flips=len(flips))
        return {"checked": checked, "flips": flips}

    async def _replay(
        self, engine: PolicyEngine, since: str | None, until: str | None
    ) -> tuple[int, list[dict[str, Any]]]:
        agents: dict[str, dict[str, Any]] = {}
        checked, flips = 0, []
        for kind in REPLAY_KINDS:
            async for event in self._events(kind, since, until):
                checked += 1
                flip = await self._flip(engine, event, agents)
                if flip is not None:
                    flips.append(flip)
        flips.sort(key=lambda f: f["time"])
        return checked, flips

    async def _events(self, kind: str, since: str | None, until: str | None) -> Any:
        cursor = None
        for _ in range(MAX_REPLAY // 1000):
            q = AuditQuery(kind=kind, since=since, until=until, limit=1000, cursor=cursor)
            events, cursor = await self.b.audit.query(q)
            for event in events:
                yield event
            if cursor is None:
                return

    async def _flip(
        self, engine: PolicyEngine, event: Mapping[str, Any], agents: dict[str, dict[str, Any]]
    ) -> dict[str, Any] | None:
        if event.get("reason") == "delegation_required":
            return None  # the policy allowed it; no policy can flip a missing delegation
        agent_id = event["agent_id"]
        if agent_id not in agents:
            record = await self.b.directory.get_agent(agent_id)
            agents[agent_id] = _agent_data(record) if record else {"id": agent_id}
        args = event.get("args") or {}
        after = engine.decide(f"agent:{agent_id}", event["capability"], "invoke",
                              args=args, agent=agents[agent_id])  # fmt: skip
        user_id = event.get("user_id")
        if after.allowed and user_id:
            # A call for a user needed the user's side as well (onbehalf.py).
            after = engine.decide(f"user:{user_id}", event["capability"], "invoke",
                                  args=args, agent=agents[agent_id])  # fmt: skip
        before = event["decision"] == "allow"
        if after.allowed == before:
            return None
        return {
            "call_id": event["call_id"], "time": event["time"], "agent_id": agent_id,
            "user_id": user_id, "capability": event["capability"],
            "before": "allow" if before else "deny", "after": "allow" if after.allowed else "deny",
            "rule": after.rule, "reason": after.reason,
            "uncertain": _has_hmac(args),  # conditions on HMAC'd arguments cannot be replayed
        }  # fmt: skip


def _agent_data(record: AgentRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "attributes": dict(record.attributes)}


def _hierarchy(g: Grant) -> bool:
    return g.subject.startswith("role:")


def _role(role: str) -> str:
    return role if role.startswith("role:") else f"role:{role}"


def _has_hmac(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith("hmac-sha256:")
    if isinstance(value, dict):
        return any(_has_hmac(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_hmac(v) for v in value)
    return False


def _summary(diff: Mapping[str, Any]) -> dict[str, Any]:
    return {k: [r.get("id", r) for r in diff[k]] for k in ("add", "remove", "grant", "revoke")}


def rule_dict(rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "subject": rule.subject,
        "object": rule.object,
        "action": rule.action,
        "effect": rule.effect,
        "condition": rule.condition,
        "source": rule.source,
    }
