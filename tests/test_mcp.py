"""The MCP front door at /mcp, driven by the official MCP client over real HTTP.

Real broker (uvicorn thread), real OpenBao and a real recording upstream. Every MCP test runs
twice: ``auto`` (the client probes ``server/discover`` and speaks the per-request 2026-07-28
protocol) and ``legacy`` (the ``initialize`` handshake era), which take different server paths.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any
from urllib.parse import quote, quote_plus

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent, Tool
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

from tests.support.brokers import RunningBroker
from tests.support.upstreams import RunningUpstream

SECRET = "mcp-7Hq/Z+w=&k?Lr9"  # characters that url-encode and base64 in telling ways

INPUT: dict[str, Any] = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {
        "message": {"type": "string", "maxLength": 100},
        "count": {"type": "integer"},
    },
}


def echo_manifest(url: str, name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "input": INPUT,
        "secrets": {"tok": {"path": "tests/mcp", "key": "token"}},
        "http": {
            "method": "POST",
            "url": f"{url}/echo",
            "headers": {"Authorization": "Bearer {secrets.tok}"},
            "json": {"message": "{args.message}", "count": "{args.count}"},
            "timeout": "5s",
        },
    }


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def setup(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    rb = running_broker
    rb.secret("tests/mcp", {"token": SECRET})
    rb.admin.put_capability(echo_manifest(upstream.url, "test.echo", "Echo for testers."))
    rb.admin.put_capability(echo_manifest(upstream.url, "ops.echo", "Echo for operators."))
    rb.admin.add_policy("role:tester", "test.*")
    rb.admin.add_policy("role:ops", "ops.*")
    return rb


# -- the official MCP client, one connection per helper call ------------------------------------


async def _with_client(
    rb: RunningBroker, token: str, mode: str, action: Any, headers: dict[str, str] | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with httpx2.AsyncClient(headers=headers, timeout=30, trust_env=False) as http:
        transport = streamable_http_client(f"{rb.url}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            # Each mode really takes its own server path.
            modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
            assert modern == (mode == "auto"), client.protocol_version
            return await action(client)


def list_tools(rb: RunningBroker, token: str, mode: str) -> list[Tool]:
    async def action(client: Client) -> list[Tool]:
        return (await client.list_tools()).tools

    tools: list[Tool] = asyncio.run(_with_client(rb, token, mode, action))
    return tools


def call_tool(
    rb: RunningBroker,
    token: str,
    mode: str,
    name: str,
    args: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> CallToolResult:
    async def action(client: Client) -> CallToolResult:
        return await client.call_tool(name, args)

    result: CallToolResult = asyncio.run(_with_client(rb, token, mode, action, headers))
    return result


def text_of(result: CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


def secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(secret, safe=""),
        quote_plus(secret),
    ]


# -- tools/list --------------------------------------------------------------------------------


def test_each_agent_sees_exactly_the_capabilities_it_may_invoke(
    setup: RunningBroker, mode: str
) -> None:
    alice = setup.agent("alice", ["tester"])
    bob = setup.agent("bob", ["ops"])
    nobody = setup.agent("nobody")

    alice_tools = list_tools(setup, alice, mode)
    bob_tools = list_tools(setup, bob, mode)
    assert [t.name for t in alice_tools] == ["test.echo"]
    assert [t.name for t in bob_tools] == ["ops.echo"]
    assert list_tools(setup, nobody, mode) == []

    [tool] = alice_tools
    assert tool.input_schema == INPUT
    assert tool.description == "Echo for testers."
    assert tool.annotations is not None and tool.annotations.read_only_hint is True
    assert bob_tools[0].input_schema == INPUT
    # The same view as the HTTP API's listing for that agent.
    listed = [(c["name"], c["input"]) for c in setup.sdk(alice).list_capabilities()]
    assert listed == [(t.name, t.input_schema) for t in alice_tools]


def test_a_revoked_role_disappears_from_the_next_listing(setup: RunningBroker, mode: str) -> None:
    token = setup.agent("carol", ["tester", "ops"])
    assert sorted(t.name for t in list_tools(setup, token, mode)) == ["ops.echo", "test.echo"]
    setup.admin.revoke_role("carol", "ops")
    assert [t.name for t in list_tools(setup, token, mode)] == ["test.echo"]
    setup.admin.grant_role("carol", "ops")
    assert sorted(t.name for t in list_tools(setup, token, mode)) == ["ops.echo", "test.echo"]


# -- tools/call --------------------------------------------------------------------------------


def test_a_call_runs_the_whole_pipeline(
    setup: RunningBroker, upstream: RunningUpstream, mode: str
) -> None:
    token = setup.agent("dave", ["tester"])
    task = {"X-Broker-Task": "task-7"}  # a client may tag its calls with a task, as over HTTP
    result = call_tool(setup, token, mode, "test.echo", {"message": "hi", "count": 3}, task)

    assert result.is_error is False, text_of(result)
    body = json.loads(text_of(result))
    assert set(body) == {"call_id", "status", "result", "upstream_status"}
    assert body["status"] == "succeeded" and body["upstream_status"] == 200
    assert body["call_id"].startswith("call_")
    assert result.structured_content == body
    # The upstream got the credential and the arguments with their JSON types ...
    [seen] = upstream.requests
    assert seen.header("authorization") == f"Bearer {SECRET}"
    assert json.loads(seen.body) == {"message": "hi", "count": 3}
    # ... and the agent got the echo with the credential redacted.
    assert body["result"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert body["result"]["json"] == {"message": "hi", "count": 3}
    everything = json.dumps(result.model_dump(mode="json"))
    for form in secret_forms(SECRET):
        assert form not in everything
    # Audited like an HTTP invoke: started, then finished, for this call and this agent.
    events = setup.audit(call_id=body["call_id"])
    assert [e["kind"] for e in events] == ["call.started", "call.finished"]
    assert {(e["agent_id"], e["capability"], e["task_id"]) for e in events} == {
        ("dave", "test.echo", "task-7")
    }


def test_a_denied_call_is_a_tool_error_and_audited(
    setup: RunningBroker, upstream: RunningUpstream, mode: str
) -> None:
    token = setup.agent("erin", ["tester"])
    result = call_tool(setup, token, mode, "ops.echo", {"message": "hi"})

    assert result.is_error is True
    text = text_of(result)
    assert text.startswith("policy_denied: ")
    envelope = result.structured_content
    assert isinstance(envelope, dict)
    error = envelope["error"]
    assert error["code"] == "policy_denied"
    assert error["call_id"].startswith("call_") and error["call_id"] in text
    [event] = setup.audit(call_id=error["call_id"])
    assert event["kind"] == "call.denied" and event["decision"] == "deny"
    assert event["agent_id"] == "erin" and event["capability"] == "ops.echo"
    assert upstream.requests == []


def test_invalid_arguments_are_a_tool_error_and_nothing_is_sent(
    setup: RunningBroker, upstream: RunningUpstream, mode: str
) -> None:
    token = setup.agent("frank", ["tester"])
    for args in ({"message": "x" * 101}, {"message": "hi", "extra": 1}, {"count": 1}):
        result = call_tool(setup, token, mode, "test.echo", args)
        assert result.is_error is True
        assert text_of(result).startswith("invalid_arguments: ")
        envelope = result.structured_content
        assert isinstance(envelope, dict)
        [event] = setup.audit(call_id=envelope["error"]["call_id"])
        assert event["kind"] == "call.rejected" and event["reason"] == "invalid_arguments"
    assert upstream.requests == []


def test_an_unknown_tool_is_a_tool_error(setup: RunningBroker, mode: str) -> None:
    token = setup.agent("grace", ["tester"])
    result = call_tool(setup, token, mode, "test.nope", {})
    assert result.is_error is True
    assert text_of(result).startswith("capability_not_found: ")


# -- authentication ----------------------------------------------------------------------------

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic dXNlcjpwdw=="])
def test_no_or_a_wrong_token_is_401(setup: RunningBroker, authorization: str | None) -> None:
    headers = dict(MCP_HEADERS)
    if authorization:
        headers["Authorization"] = authorization
    r = setup.http().post("/mcp", json=INITIALIZE, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert setup.http().get("/mcp").status_code == 401
    refused = [e for e in setup.audit(kind="admin.rejected") if e["reason"] == "unauthenticated"]
    assert refused, "the refusal is audited"


def test_a_valid_token_gets_through_with_plain_http(setup: RunningBroker) -> None:
    token = setup.agent("heidi", ["tester"])
    r = setup.http(token).post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["serverInfo"]["name"] == "capbroker"
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    r = setup.http(token).post(
        "/mcp", json=listing, headers={**MCP_HEADERS, "MCP-Protocol-Version": "2025-06-18"}
    )
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["result"]["tools"]] == ["test.echo"]
    assert r.json()["result"]["tools"][0]["inputSchema"] == INPUT


def test_a_revoked_token_is_refused_by_the_official_client(setup: RunningBroker, mode: str) -> None:
    created = setup.admin.create_agent("ivan", ["tester"], {})
    assert [t.name for t in list_tools(setup, created["token"], mode)] == ["test.echo"]
    setup.admin.revoke_token("ivan", created["token_id"])
    with pytest.raises(Exception) as caught:
        list_tools(setup, created["token"], mode)
    # The SDK reports the HTTP 401 as an MCPError (inside its task groups' exception groups).
    assert any(isinstance(e, MCPError) for e in leaves(caught.value)), caught.value


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
