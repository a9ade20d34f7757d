"""The SDK against a running broker (sync and async), and the tool formats for LLM APIs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import broker
from broker.tools import tool_name
from tests.support.brokers import RunningBroker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import echo_manifest

TOOL_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
OBJECT_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"const": "object"}},
}
# The shapes the two APIs require of a tool definition (their documented request schemas).
OPENAI_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "parameters"],
            "additionalProperties": False,
            "properties": {
                "name": TOOL_NAME,
                "description": {"type": "string"},
                "parameters": OBJECT_SCHEMA,
                "strict": {"type": "boolean"},
            },
        },
    },
}
ANTHROPIC_TOOL = {
    "type": "object",
    "required": ["name", "input_schema"],
    "additionalProperties": False,
    "properties": {
        "name": TOOL_NAME,
        "description": {"type": "string"},
        "input_schema": OBJECT_SCHEMA,
    },
}


@pytest.fixture
def rb(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    running_broker.secret("tests/echo", {"token": "sdk-test-credential"})
    m = echo_manifest(upstream.url, "test.sdk.echo")
    m["input"]["properties"]["message"]["x-sensitive"] = True
    running_broker.admin.put_capability(m)
    running_broker.admin.put_capability(echo_manifest(upstream.url, "other.echo"))
    running_broker.admin.add_policy("role:tester", "test.*")
    return running_broker


@pytest.mark.parametrize(("fmt", "shape"), [("openai", OPENAI_TOOL), ("anthropic", ANTHROPIC_TOOL)])
def test_tool_formats_are_valid_and_filtered(rb: RunningBroker, fmt: str, shape: Any) -> None:
    client = rb.sdk(rb.agent(f"t-{fmt}", ["tester"]))
    out = client.tools(fmt)  # type: ignore[arg-type]
    assert out["names"] == {"test__sdk__echo": "test.sdk.echo"}  # only what it may invoke
    [tool] = out["tools"]
    Draft202012Validator(shape).validate(tool)
    params = tool["function"]["parameters"] if fmt == "openai" else tool["input_schema"]
    Draft202012Validator.check_schema(params)
    assert "x-sensitive" not in str(params)
    assert params["required"] == ["message"]


def test_long_tool_names_stay_valid_and_distinct() -> None:
    a, b = "a" * 60 + ".x.one", "a" * 60 + ".x.two"
    assert len(tool_name(a)) <= 64 and tool_name(a) != tool_name(b)
    assert tool_name("github.issues.create") == "github__issues__create"


def test_sync_client_invokes_and_maps_errors(rb: RunningBroker) -> None:
    client = rb.sdk(rb.agent("sid", ["tester"]))
    key = broker.new_idempotency_key()
    out = client.for_task("ticket-1").invoke(
        "test.sdk.echo", {"message": "hi"}, idempotency_key=key
    )
    assert out["status"] == "succeeded"
    [event] = rb.audit(call_id=out["call_id"], kind="call.finished")
    assert event["task_id"] == "ticket-1" and event["idempotency_key"] == key
    with pytest.raises(broker.PolicyDenied) as denied:
        client.invoke("other.echo", {"message": "hi"})
    assert denied.value.call_id and denied.value.http_status == 403
    with pytest.raises(broker.InvalidArguments):
        client.invoke("test.sdk.echo", {"message": 5})
    with pytest.raises(broker.CapabilityNotFound):
        client.invoke("test.nope")
    with pytest.raises(broker.Unauthenticated):
        rb.sdk("cbk_not-a-token").list_capabilities()
    assert [c["name"] for c in client.list_capabilities()] == ["test.sdk.echo"]


def test_async_client(rb: RunningBroker) -> None:
    token = rb.agent("ada", ["tester"])

    async def run() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], str]:
        async with broker.AsyncBrokerClient(rb.url, token) as client:
            ok = await client.invoke("test.sdk.echo", {"message": "async"}, task="t-2")
            caps = await client.list_capabilities()
            tools = await client.tools("anthropic")
            try:
                await client.invoke("other.echo", {"message": "x"})
            except broker.PolicyDenied as exc:
                return ok, caps, tools, exc.code
        raise AssertionError("the denied call was not refused")

    ok, caps, tools, code = asyncio.run(run())
    assert ok["status"] == "succeeded" and ok["result"]["json"] == {"message": "async"}
    assert [c["name"] for c in caps] == ["test.sdk.echo"]
    assert tools["tools"][0]["name"] == "test__sdk__echo"
    assert code == "policy_denied"
