"""The invoke endpoint's HTTP side, served as plain ASGI ahead of FastAPI's routing.

``POST /v1/capabilities/{name}/invoke`` is every agent call. FastAPI's routing, dependency
injection and response-model validation cost a noticeable share of the broker's added
latency there, so ``api.BodyLimit``, once it has read the body within the limit, hands such a
request straight to ``serve_invoke``; every other path goes on to FastAPI. The FastAPI route
of the same path stays for the OpenAPI document and answers through the same functions.

Headers parsed here: ``Authorization: Bearer``, ``Idempotency-Key``, ``X-Broker-Task``,
``traceparent``, ``Prefer: respond-async``, ``X-Broker-Approval``, ``X-Broker-User-Assertion``.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from broker.capabilities import is_name
from broker.errors import BrokerError
from broker.ports import AuditEvent
from broker.service import Broker, InvokeRequest, InvokeResult

log = logging.getLogger("broker.api")
INVOKE_PATH = re.compile(r"^/v1/capabilities/([^/]+)/invoke$")
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Answer = tuple[int, dict[str, str], Any]  # status, headers, JSON body
MAX_AUDITED_PATH = 512


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def invoke_request(name: str, headers: Mapping[str, str], body: bytes) -> InvokeRequest:
    """The InvokeRequest of one HTTP request (``headers`` with lowercase names)."""
    traceparent = headers.get("traceparent")
    return InvokeRequest(
        token=bearer(headers.get("authorization")),
        capability=name,
        body=body,
        idempotency_key=headers.get("idempotency-key"),
        task_id=headers.get("x-broker-task"),
        trace_id=trace_id(traceparent),
        traceparent=traceparent,
        respond_async=prefers_async(headers.get("prefer")),
        approval_id=headers.get("x-broker-approval"),
        user_assertion=headers.get("x-broker-user-assertion"),
    )


def answer(result: InvokeResult, *, respond_async: bool) -> Answer:
    """Status, headers and body of an invoke's result (200, or 202 when it runs later)."""
    body = result.to_dict()
    headers: dict[str, str] = {}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    if result.http_status == 202:
        headers["Location"] = f"/v1/calls/{result.call_id}"
        if respond_async and result.status == "queued":
            headers["Preference-Applied"] = "respond-async"
    return result.http_status, headers, body


async def serve_invoke(
    broker: Broker, name: str, headers: Mapping[str, str], body: bytes, send: Send
) -> None:
    """Answer one invoke over ASGI: the result, or the one error envelope."""
    req = invoke_request(name, headers, body)
    try:
        status, extra, payload = answer(await broker.invoke(req), respond_async=req.respond_async)
    except BrokerError as exc:
        if exc.status < 500:
            await audit_rejection(broker, f"/v1/capabilities/{name}/invoke", req.token, exc)
        status, extra, payload = exc.status, exc.headers, exc.to_dict()
    except Exception as exc:
        log.error("unexpected error %s at\n%s", type(exc).__name__, _frames(exc))
        err = BrokerError()
        status, extra, payload = err.status, {}, err.to_dict()
    await send_json(send, status, payload, extra)


async def send_json(send: Send, status: int, payload: Any, headers: Mapping[str, str]) -> None:
    data = dumps(payload)
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def dumps(payload: Any) -> bytes:
    """JSON bytes; orjson for speed, the standard library for what orjson refuses (integers
    past 64 bits from an upstream's JSON)."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode("utf-8", "replace")


async def audit_rejection(broker: Broker, path: str, token: str | None, exc: BrokerError) -> None:
    """Record a refusal the Broker did not see (and so could not audit) itself."""
    if exc.audited:
        return
    agent_id = None
    if token:
        try:
            agent_id = (await broker.authenticate(token)).agent_id
        except BrokerError:
            agent_id = None
    kind = "call.rejected" if path.endswith("/invoke") else "admin.rejected"
    parts = path.split("/")  # /v1/capabilities/{name}/invoke; any other path may end so too
    name = parts[3] if kind == "call.rejected" and len(parts) > 4 else ""
    capability = name if is_name(name) else None  # only a possible name fits the audit column
    event = AuditEvent(
        kind=kind,
        agent_id=agent_id,
        capability=capability,
        decision="deny",
        reason=exc.code,
        # The path is the client's: bounded, so a long one cannot bloat the audit log.
        detail={"path": path[:MAX_AUDITED_PATH], "message": exc.message},
    )
    await broker.record_refusal(event, exc)


def prefers_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (among other preferences, any case)."""
    prefs = (p.split(";")[0].strip().lower() for p in (prefer or "").split(","))
    return "respond-async" in prefs


def trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return None


def _frames(exc: BaseException) -> str:
    # The frames help whoever fixes the bug; the message is left out, it may hold a value.
    return "".join(traceback.format_tb(exc.__traceback__))
