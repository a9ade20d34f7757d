"""User administration: per-user credentials, delegations and the roles of users.

Who may change a user's things: an operator (a broker token whose agent holds ``users.write``,
role grants need ``roles.grant``), or the user themself presenting their own assertion with
the ``broker:self`` scope (an assertion an agent was handed for calls should not carry it).
Credentials go to Vault/OpenBao at ``users/<id>/<name>`` (mount ``secret``) and are never read
back through the broker: only metadata (exists, version, updated). Every change is audited as
``admin.user.*`` with the user in the record's ``user_id``; values never are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.models import ROLE_PATTERN
from broker.onbehalf import (
    CREDENTIAL_MOUNT,
    SELF_SCOPE,
    check_credential_name,
    check_patterns,
    check_user_id,
    credential_path,
    delegation_dict,
    parse_expiry,
    utc_text,
)
from broker.ports import AuditEvent, Delegation

if TYPE_CHECKING:
    from broker.admin import Admin

MAX_CREDENTIAL_FIELDS = 32
MAX_CREDENTIAL_VALUE = 16_384


class UserAdmin:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.b = admin.b

    async def authorize(
        self, token: str | None, assertion: str | None, user_id: str, action: str = "users.write"
    ) -> tuple[str | None, str]:
        """(operator agent id or None, actor subject) of whoever may manage this user."""
        check_user_id(user_id)
        if token:
            who = await self.admin.authorize(token, action, f"user:{user_id}")
            return who.agent_id, who.subject
        user = await self.b.on_behalf.verify(assertion)
        if user is None:
            raise errors.Unauthenticated(
                "a broker token, or the user's own assertion (X-Broker-User-Assertion), is needed"
            )
        if user.id != user_id or SELF_SCOPE not in user.scopes or action != "users.write":
            raise errors.Forbidden(
                f"user:{user.id} may manage only their own credentials and delegations, "
                f"with an assertion carrying the {SELF_SCOPE!r} scope"
            )
        return None, user.subject

    async def _record(
        self, agent_id: str | None, actor: str, user_id: str, kind: str, **detail: Any
    ) -> None:
        event = AuditEvent(
            kind=kind,
            agent_id=agent_id,
            user_id=user_id,
            decision="allow",
            detail={"by": actor, **detail},
        )
        await self.b.audit.append(event)

    # -- credentials ------------------------------------------------------------------------

    async def put_credential(
        self,
        token: str | None,
        assertion: str | None,
        user_id: str,
        name: str,
        data: Mapping[str, Any],
    ) -> dict[str, Any]:
        agent_id, actor = await self.authorize(token, assertion, user_id)
        check_credential_name(name)
        values = _credential_data(data)
        path = credential_path(user_id, name)
        meta = await self.b.on_behalf.credentials.put_credential(CREDENTIAL_MOUNT, path, values)
        await self._record(
            agent_id, actor, user_id, "admin.user.credential.put", credential=name,
            path=path, version=meta.get("version"), keys=sorted(values),
        )  # fmt: skip
        return _credential_out(user_id, name, meta)

    async def get_credential(
        self, token: str | None, assertion: str | None, user_id: str, name: str
    ) -> dict[str, Any]:
        """Metadata only: the value is never read back through the broker."""
        await self.authorize(token, assertion, user_id)
        check_credential_name(name)
        path = credential_path(user_id, name)
        meta = await self.b.on_behalf.credentials.credential_metadata(CREDENTIAL_MOUNT, path)
        return _credential_out(user_id, name, meta)

    async def delete_credential(
        self, token: str | None, assertion: str | None, user_id: str, name: str
    ) -> None:
        agent_id, actor = await self.authorize(token, assertion, user_id)
        check_credential_name(name)
        path = credential_path(user_id, name)
        if not await self.b.on_behalf.credentials.delete_credential(CREDENTIAL_MOUNT, path):
            raise errors.NotFound(f"user {user_id} has no credential {name!r}")
        await self._record(
            agent_id, actor, user_id, "admin.user.credential.delete", credential=name, path=path
        )

    # -- delegations ------------------------------------------------------------------------

    async def put_delegation(
        self,
        token: str | None,
        assertion: str | None,
        user_id: str,
        agent_id: str,
        capabilities: Sequence[str],
        expires_at: str,
    ) -> dict[str, Any]:
        operator, actor = await self.authorize(token, assertion, user_id)
        patterns = check_patterns(capabilities)
        expiry = parse_expiry(expires_at)
        if await self.b.directory.get_agent(agent_id) is None:
            raise errors.NotFound(f"no agent {agent_id!r}")
        stored = await self.b.on_behalf.delegations.put(
            Delegation(
                user_id=user_id, agent_id=agent_id, capabilities=patterns, expires_at=expiry,
                created_at=utc_text(), created_by=actor,
            )
        )  # fmt: skip
        await self._record(
            operator, actor, user_id, "admin.user.delegate", agent=agent_id,
            capabilities=list(patterns), expires_at=expiry,
        )  # fmt: skip
        return delegation_dict(stored)

    async def list_delegations(
        self, token: str | None, assertion: str | None, user_id: str
    ) -> list[dict[str, Any]]:
        await self.authorize(token, assertion, user_id)
        return [delegation_dict(d) for d in await self.b.on_behalf.delegations.list(user_id)]

    async def delete_delegation(
        self, token: str | None, assertion: str | None, user_id: str, agent_id: str
    ) -> None:
        operator, actor = await self.authorize(token, assertion, user_id)
        if not await self.b.on_behalf.delegations.delete(user_id, agent_id):
            raise errors.NotFound(f"user {user_id} has no delegation to agent {agent_id!r}")
        await self._record(operator, actor, user_id, "admin.user.revoke", agent=agent_id)

    # -- roles (operators only) ---------------------------------------------------------------

    async def grant_role(self, token: str | None, user_id: str, role: str) -> dict[str, Any]:
        operator, actor = await self.authorize(token, None, user_id, "roles.grant")
        if not re.match(ROLE_PATTERN, role):
            raise errors.InvalidRequest(f"role {role[:64]!r} must match {ROLE_PATTERN}")
        await self.b.directory.grant(f"user:{user_id}", f"role:{role}")
        await self.admin.reload_policy()
        await self._record(operator, actor, user_id, "admin.user.role.grant", role=role)
        return self.roles_out(user_id)

    async def revoke_role(self, token: str | None, user_id: str, role: str) -> dict[str, Any]:
        operator, actor = await self.authorize(token, None, user_id, "roles.grant")
        if not await self.b.directory.revoke(f"user:{user_id}", f"role:{role}"):
            raise errors.NotFound(f"user {user_id} does not hold role {role!r}")
        await self.admin.reload_policy()
        await self._record(operator, actor, user_id, "admin.user.role.revoke", role=role)
        return self.roles_out(user_id)

    def roles_out(self, user_id: str) -> dict[str, Any]:
        roles = self.b.policy.roles_of(f"user:{user_id}")
        return {"id": user_id, "roles": [r.removeprefix("role:") for r in roles]}


def _credential_data(data: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(data, Mapping) or not data or len(data) > MAX_CREDENTIAL_FIELDS:
        raise errors.InvalidRequest(
            f'the body must be {{"data": {{...}}}} with 1-{MAX_CREDENTIAL_FIELDS} fields'
        )
    for key, value in data.items():
        if not isinstance(key, str) or not key or not isinstance(value, str) or not value:
            raise errors.InvalidRequest("credential fields map names to non-empty strings")
        if len(value) > MAX_CREDENTIAL_VALUE:
            raise errors.InvalidRequest(
                f"a credential value is at most {MAX_CREDENTIAL_VALUE} characters"
            )
    return dict(data)


def _credential_out(user_id: str, name: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    meta = meta or {}
    return {
        "user_id": user_id,
        "name": name,
        "exists": bool(meta.get("exists")),
        "version": meta.get("version"),
        "updated": meta.get("updated"),
    }
