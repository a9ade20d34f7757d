"""The Python SDK over the HTTP API (httpx): ``BrokerClient`` and ``AsyncBrokerClient``.

Error codes map back to the classes of errors.py (``except broker.PolicyDenied``). Importing
this module pulls in no server dependency (no FastAPI, SQLAlchemy, hvac, casbin).

    with BrokerClient(url, token) as broker:
        tools = broker.tools("openai")                       # for an LLM's tool list
        out = broker.invoke("github.issues.create", {...}, idempotency_key=new_idempotency_key())
        task = broker.for_task("ticket-4711")                 # budgets and audit by task
        task.invoke("slack.chat.post", {...})
        broker.invoke("github.issues.create", {...}, user_assertion=jwt)  # acting for a user
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from broker.errors import BrokerError, error_class_for
from broker.tools import Format

DEFAULT_URL = "http://127.0.0.1:8080"


def new_idempotency_key() -> str:
    """A fresh key: reuse it when retrying the same call, so it runs at most once."""
    return uuid.uuid4().hex


def _settings(url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    base = url or os.environ.get("BROKER_URL") or DEFAULT_URL
    token = token if token is not None else os.environ.get("BROKER_TOKEN")
    return base, ({"Authorization": f"Bearer {token}"} if token else {})


def _call_headers(
    idempotency_key: str | None = None,
    task: str | None = None,
    user_assertion: str | None = None,
    *,
    respond_async: bool = False,
    approval_id: str | None = None,
) -> dict[str, str]:
    headers = {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if task:
        headers["X-Broker-Task"] = task
    if respond_async:
        headers["Prefer"] = "respond-async"
    if approval_id:
        headers["X-Broker-Approval"] = approval_id
    if user_assertion:
        headers["X-Broker-User-Assertion"] = user_assertion
    return headers


def _decision(reason: str | None) -> dict[str, Any]:
    return {"json": {"reason": reason}} if reason is not None else {}


def _budget_path(agent: str | None, task: str | None) -> str:
    """The budget resource of exactly one agent or one task."""
    if (agent is None) == (task is None):
        raise ValueError("name exactly one of agent= or task=")
    if agent is not None:
        return f"/v1/agents/{quote(agent, safe='')}/budget"
    return f"/v1/tasks/{quote(str(task), safe='')}/budget"


def _answer(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_from(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


class BrokerClient:
    """A synchronous client. ``url``/``token`` default to BROKER_URL / BROKER_TOKEN."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base, headers = _settings(url, token)
        self._http = httpx.Client(
            base_url=base,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _answer(self._http.request(method, path, **kwargs))

    def for_task(self, task: str) -> TaskView:
        """Calls made through the view carry ``X-Broker-Task: task``."""
        return TaskView(self, task)

    def tools(self, fmt: Format, *, user_assertion: str | None = None) -> dict[str, Any]:
        """``{"tools": [...], "names": {tool name: capability}}`` in OpenAI or Anthropic form
        (acting for a user: only what the user may use too and has delegated)."""
        out: dict[str, Any] = self.request(
            "GET", "/v1/capabilities", params={"format": fmt},
            headers=_call_headers(user_assertion=user_assertion),
        )  # fmt: skip
        return out

    # -- calls -----------------------------------------------------------------------------

    def invoke(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        task: str | None = None,
        respond_async: bool = False,
        approval_id: str | None = None,
        user_assertion: str | None = None,
    ) -> dict[str, Any]:
        """The result; or, answered 202, ``{"call_id", "status": "queued"|"approval_pending"}``
        (``respond_async``: run as a durable job; see ``get_call``/``wait_call``). With
        ``user_assertion`` (the user's JWT) the call acts for that user."""
        headers = _call_headers(
            idempotency_key,
            task,
            user_assertion,
            respond_async=respond_async,
            approval_id=approval_id,
        )
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/capabilities/{capability}/invoke",
            json={"args": args or {}},
            headers=headers,
        )
        return result

    def get_call(self, call_id: str) -> dict[str, Any]:
        """State of a durable or approval-bound call; ``response`` once it ``ended``."""
        out: dict[str, Any] = self.request("GET", f"/v1/calls/{call_id}")
        return out

    def wait_call(
        self, call_id: str, *, timeout: float = 60.0, interval: float = 0.2
    ) -> dict[str, Any]:
        """Poll ``get_call`` until the call has ended (TimeoutError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not (out := self.get_call(call_id))["ended"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {call_id} is still {out['state']}")
            time.sleep(interval)
        return out

    def list_approvals(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        out: list[dict[str, Any]] = self.request("GET", "/v1/approvals", params=params)["approvals"]
        return out

    def approve(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        """Approve: the stored call runs once (its result by ``get_call``)."""
        out: dict[str, Any] = self.request(
            "POST", f"/v1/approvals/{approval_id}/approve", **_decision(reason)
        )
        return out

    def deny(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.request(
            "POST", f"/v1/approvals/{approval_id}/deny", **_decision(reason)
        )
        return out

    def list_capabilities(
        self, *, all: bool = False, user_assertion: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"all": "true"} if all else {}
        headers = _call_headers(user_assertion=user_assertion)
        answer = self.request("GET", "/v1/capabilities", params=params, headers=headers)
        caps: list[dict[str, Any]] = answer["capabilities"]
        return caps

    # -- admin -----------------------------------------------------------------------------

    def put_capability(self, manifest: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.request(
            "PUT", f"/v1/capabilities/{manifest['name']}", json=manifest
        )
        return out

    def get_capability(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/v1/capabilities/{name}")
        return out

    def delete_capability(self, name: str) -> None:
        self.request("DELETE", f"/v1/capabilities/{name}")

    def create_agent(
        self, name: str, roles: list[str] | None = None, attributes: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body = {"name": name, "roles": roles or [], "attributes": attributes or {}}
        out: dict[str, Any] = self.request("POST", "/v1/agents", json=body)
        return out

    def list_agents(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.request("GET", "/v1/agents")["agents"]
        return agents

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/v1/agents/{agent_id}")
        return out

    def issue_token(self, agent_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("POST", f"/v1/agents/{agent_id}/tokens")
        return out

    def revoke_token(self, agent_id: str, token_id: str) -> None:
        self.request("DELETE", f"/v1/agents/{agent_id}/tokens/{token_id}")

    def disable_agent(self, agent_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("POST", f"/v1/agents/{agent_id}/disable")
        return out

    def grant_role(self, agent_id: str, role: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("PUT", f"/v1/agents/{agent_id}/roles/{role}")
        return out

    def revoke_role(self, agent_id: str, role: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("DELETE", f"/v1/agents/{agent_id}/roles/{role}")
        return out

    def list_roles(self) -> list[dict[str, Any]]:
        roles: list[dict[str, Any]] = self.request("GET", "/v1/roles")["roles"]
        return roles

    def list_policies(self) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = self.request("GET", "/v1/policies")["policies"]
        return rules

    def add_policy(
        self,
        subject: str,
        object: str,
        action: str = "invoke",
        effect: str = "allow",
        condition: str | None = None,
        *,
        allow_wildcard: bool = False,
    ) -> dict[str, Any]:
        body = {
            "subject": subject,
            "object": object,
            "action": action,
            "effect": effect,
            "condition": condition,
            "allow_wildcard": allow_wildcard,
        }
        out: dict[str, Any] = self.request("POST", "/v1/policies", json=body)
        return out

    def apply_policy(
        self, policy: str, *, dry_run: bool = False, allow_wildcard: bool = False
    ) -> dict[str, Any]:
        body = {"policy": policy, "dry_run": dry_run, "allow_wildcard": allow_wildcard}
        out: dict[str, Any] = self.request("POST", "/v1/policies/apply", json=body)
        return out

    def replay_policy(
        self, policy: str, *, since: str | None = None, until: str | None = None
    ) -> dict[str, Any]:
        body = {"policy": policy, "since": since, "until": until}
        out: dict[str, Any] = self.request("POST", "/v1/policies/replay", json=body)
        return out

    def delete_policy(self, rule_id: str) -> None:
        self.request("DELETE", f"/v1/policies/{rule_id}")

    def check_policy(
        self,
        object: str,
        *,
        agent: str | None = None,
        subject: str | None = None,
        action: str = "invoke",
        args: dict[str, Any] | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Explain a decision; with ``agent`` and ``user``: that agent acting for that user
        (``denied_by`` names the side that refused: agent, user or delegation)."""
        body = {
            "object": object,
            "action": action,
            "agent": agent,
            "subject": subject,
            "args": args,
            "user": user,
        }
        out: dict[str, Any] = self.request("POST", "/v1/policies/check", json=body)
        return out

    def verify_audit(self) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", "/v1/audit/verify")
        return out

    def set_budget(
        self, limit: float, period: str, *, agent: str | None = None, task: str | None = None
    ) -> dict[str, Any]:
        """Set the budget of one agent or one task; returns it with its current spend."""
        body = {"limit": limit, "period": period}
        out: dict[str, Any] = self.request("PUT", _budget_path(agent, task), json=body)
        return out

    def get_budget(self, *, agent: str | None = None, task: str | None = None) -> dict[str, Any]:
        """``{"scope", "subject", "limit", "period", "spent", "reserved", "period_start"}``."""
        out: dict[str, Any] = self.request("GET", _budget_path(agent, task))
        return out

    def delete_budget(self, *, agent: str | None = None, task: str | None = None) -> None:
        self.request("DELETE", _budget_path(agent, task))

    def export_audit(self) -> Iterator[str]:
        """The export's lines (JSON objects as text), streamed."""
        with self._http.stream("GET", "/v1/audit/export") as response:
            if response.status_code >= 400:
                response.read()
                raise _error_from(response)
            yield from (line for line in response.iter_lines() if line)

    def hash_value(self, value: Any) -> list[str]:
        hashes: list[str] = self.request("POST", "/v1/audit/hash", json={"value": value})["hashes"]
        return hashes

    def rotate_hmac_key(self) -> str:
        return str(self.request("POST", "/v1/audit/hmac-keys/rotate")["key_id"])

    def audit(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        out: dict[str, Any] = self.request("GET", "/v1/audit", params=params)
        return out

    # -- users: credentials (never readable back), delegations, roles -----------------------

    def put_user_credential(
        self, user_id: str, name: str, data: dict[str, str], *, user_assertion: str | None = None
    ) -> dict[str, Any]:
        """Write (or replace) a user's credential; metadata comes back, never the value."""
        out: dict[str, Any] = self.request(
            "PUT", f"/v1/users/{user_id}/credentials/{name}", json={"data": data},
            headers=_call_headers(user_assertion=user_assertion),
        )  # fmt: skip
        return out

    def get_user_credential(
        self, user_id: str, name: str, *, user_assertion: str | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = self.request(
            "GET", f"/v1/users/{user_id}/credentials/{name}",
            headers=_call_headers(user_assertion=user_assertion),
        )  # fmt: skip
        return out

    def delete_user_credential(
        self, user_id: str, name: str, *, user_assertion: str | None = None
    ) -> None:
        self.request("DELETE", f"/v1/users/{user_id}/credentials/{name}",
                     headers=_call_headers(user_assertion=user_assertion))  # fmt: skip

    def delegate(
        self,
        user_id: str,
        agent_id: str,
        capabilities: list[str],
        expires_at: str,
        *,
        user_assertion: str | None = None,
    ) -> dict[str, Any]:
        """Let the agent act for the user on these capabilities (names or globs) until then."""
        body = {"capabilities": capabilities, "expires_at": expires_at}
        out: dict[str, Any] = self.request(
            "PUT", f"/v1/users/{user_id}/delegations/{agent_id}", json=body,
            headers=_call_headers(user_assertion=user_assertion),
        )  # fmt: skip
        return out

    def list_delegations(
        self, user_id: str, *, user_assertion: str | None = None
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.request(
            "GET", f"/v1/users/{user_id}/delegations",
            headers=_call_headers(user_assertion=user_assertion),
        )["delegations"]  # fmt: skip
        return found

    def revoke_delegation(
        self, user_id: str, agent_id: str, *, user_assertion: str | None = None
    ) -> None:
        self.request("DELETE", f"/v1/users/{user_id}/delegations/{agent_id}",
                     headers=_call_headers(user_assertion=user_assertion))  # fmt: skip

    def grant_user_role(self, user_id: str, role: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("PUT", f"/v1/users/{user_id}/roles/{role}")
        return out

    def revoke_user_role(self, user_id: str, role: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("DELETE", f"/v1/users/{user_id}/roles/{role}")
        return out


class TaskView:
    """A client bound to one task (``X-Broker-Task``)."""

    def __init__(self, client: BrokerClient, task: str) -> None:
        self.client, self.task = client, task

    def invoke(
        self, capability: str, args: dict[str, Any] | None = None, *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        return self.client.invoke(capability, args, idempotency_key=idempotency_key,
                                  task=self.task)  # fmt: skip


class AsyncBrokerClient:
    """The asynchronous client for agents: invoke, list capabilities, tool definitions."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base, headers = _settings(url, token)
        self._http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout,
                                       transport=transport, follow_redirects=False,
                                       trust_env=False)  # fmt: skip

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _answer(await self._http.request(method, path, **kwargs))

    async def invoke(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        task: str | None = None,
        respond_async: bool = False,
        approval_id: str | None = None,
        user_assertion: str | None = None,
    ) -> dict[str, Any]:
        """Invoke; see ``BrokerClient.invoke``."""
        headers = _call_headers(
            idempotency_key,
            task,
            user_assertion,
            respond_async=respond_async,
            approval_id=approval_id,
        )
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/capabilities/{capability}/invoke", json={"args": args or {}},
            headers=headers,
        )  # fmt: skip
        return result

    async def get_call(self, call_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", f"/v1/calls/{call_id}")
        return out

    async def wait_call(
        self, call_id: str, *, timeout: float = 60.0, interval: float = 0.2
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not (out := await self.get_call(call_id))["ended"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {call_id} is still {out['state']}")
            await asyncio.sleep(interval)
        return out

    async def list_capabilities(self, *, user_assertion: str | None = None) -> list[dict[str, Any]]:
        headers = _call_headers(user_assertion=user_assertion)
        answer = await self.request("GET", "/v1/capabilities", headers=headers)
        caps: list[dict[str, Any]] = answer["capabilities"]
        return caps

    async def tools(self, fmt: Format, *, user_assertion: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = await self.request(
            "GET", "/v1/capabilities", params={"format": fmt},
            headers=_call_headers(user_assertion=user_assertion),
        )  # fmt: skip
        return out

    async def set_budget(
        self, limit: float, period: str, *, agent: str | None = None, task: str | None = None
    ) -> dict[str, Any]:
        body = {"limit": limit, "period": period}
        out: dict[str, Any] = await self.request("PUT", _budget_path(agent, task), json=body)
        return out

    async def get_budget(
        self, *, agent: str | None = None, task: str | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", _budget_path(agent, task))
        return out

    async def delete_budget(self, *, agent: str | None = None, task: str | None = None) -> None:
        await self.request("DELETE", _budget_path(agent, task))


def _error_from(response: httpx.Response) -> BrokerError:
    try:
        body = response.json()["error"]
        cls = error_class_for(str(body.get("code", "")))
        exc = cls(
            str(body.get("message", "")),
            call_id=body.get("call_id"),
            details={k: v for k, v in body.items() if k not in ("code", "message", "call_id")},
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        exc = BrokerError(f"HTTP {response.status_code}: {response.text[:200]}")
    exc.http_status = response.status_code
    return exc
