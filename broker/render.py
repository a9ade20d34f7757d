"""Rendering: turns (capability, arguments, secrets, agent) into one OutgoingRequest.

This module owns Invariant 5 on the request side: scheme, host, port and method come only from
the manifest; arguments fill declared slots and nothing else. A path slot is exactly one
percent-encoded segment, query names are fixed, header values cannot smuggle in new lines,
and the JSON body is built structurally so argument values keep their JSON types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlsplit

from broker.capabilities import RESERVED_HEADERS, SLOT_RE, Capability, slots_in
from broker.errors import InvalidArguments, SecretUnavailable
from broker.ports import OutgoingRequest

USER_AGENT = "capbroker"
# C0 controls except tab, plus DEL: any of them can split or corrupt a header line.
_HEADER_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Characters a literal (manifest-written) path segment may keep as they are.
_LITERAL_SEGMENT_SAFE = "!$&'()*+,;=:@%-._~"
# Values that would change the depth of the path once a server normalises it.
_DOT_SEGMENTS = {"", ".", ".."}


class _Absent(Exception):
    """A template refers to an optional argument the caller did not give (omit the entry)."""


class _Slots:
    """Looks up slot expressions ('args.x', 'secrets.y', 'agent.id') for one call."""

    def __init__(self, args: Mapping[str, Any], secrets: Mapping[str, str], agent_id: str):
        self._args = args
        self._secrets = secrets
        self._agent_id = agent_id

    def value(self, slot: str) -> Any:
        source, _, name = slot.partition(".")
        if source == "args":
            if name not in self._args:
                raise _Absent(name)
            return self._args[name]
        if source == "secrets":
            if name not in self._secrets:
                # Fail closed: never send a request with a hole where a credential belongs.
                raise SecretUnavailable(f"secret {name!r} was not resolved for this call")
            return self._secrets[name]
        if source == "agent" and name == "id":
            return self._agent_id
        raise InvalidArguments(f"unknown slot {{{slot}}}")

    def text(self, slot: str) -> str:
        return as_text(self.value(slot))

    def interpolate(self, template: str) -> str:
        return SLOT_RE.sub(lambda m: self.text(m.group(1)), template)


def as_text(value: Any) -> str:
    """A value as it appears inside a string: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(
    cap: Capability, args: dict[str, Any], secrets: Mapping[str, str], agent_id: str
) -> OutgoingRequest:
    """Build the one request this call may send; raises InvalidArguments when args don't fit."""
    slots = _Slots(args, secrets, agent_id)
    url = _render_url(cap.http.url, cap.http.query, slots)
    headers = _render_headers(cap.http.headers, slots)
    body = _render_body(cap.http.json_body, slots)
    if body is not None and not _has_header(headers, "content-type"):
        headers.append(("Content-Type", "application/json"))
    if not _has_header(headers, "user-agent"):
        headers.append(("User-Agent", USER_AGENT))
    return OutgoingRequest(method=cap.http.method, url=url, headers=tuple(headers), body=body)


def referenced_secrets(cap: Capability) -> set[str]:
    """Names of the secrets the manifest's request actually uses (only these are fetched)."""
    names: set[str] = set()
    for template in _templates(cap):
        for slot in slots_in(template):
            source, _, name = slot.partition(".")
            if source == "secrets":
                names.add(name)
    return names


def _templates(cap: Capability) -> Iterator[str]:
    yield cap.http.url
    yield from cap.http.headers.values()
    yield from cap.http.query.values()
    yield from _json_strings(cap.http.json_body)


def _json_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _json_strings(key)
            yield from _json_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _json_strings(item)


# --- URL ----------------------------------------------------------------------------------


def _render_url(template: str, query: Mapping[str, str], slots: _Slots) -> str:
    # Split on the template itself: scheme and authority are copied verbatim, never rendered.
    parts = urlsplit(template)
    if any(c in parts.netloc for c in "{}"):
        raise InvalidArguments("the capability URL has a slot in its authority")
    path = "/".join(_render_segment(seg, slots) for seg in parts.path.split("/"))
    url = f"{parts.scheme}://{_ascii_netloc(parts)}{path}"
    rendered_query = _render_query(query, slots)
    return f"{url}?{rendered_query}" if rendered_query else url


def _ascii_netloc(parts: SplitResult) -> str:
    if parts.netloc.isascii():
        return parts.netloc
    host = (parts.hostname or "").encode("idna").decode("ascii")
    return host if parts.port is None else f"{host}:{parts.port}"


def _render_segment(segment: str, slots: _Slots) -> str:
    found = slots_in(segment)
    if not found:
        return quote(segment, safe=_LITERAL_SEGMENT_SAFE)
    if len(found) != 1 or segment != "{" + found[0] + "}":
        raise InvalidArguments("a path slot must be a whole path segment")
    name = found[0]
    try:
        value = slots.value(name)
    except _Absent:
        raise InvalidArguments(f"{{{name}}} is required (it is part of the path)") from None
    if value is None or isinstance(value, dict | list):
        raise InvalidArguments(f"{{{name}}} must be a string or number to fill a path segment")
    text = as_text(value)
    if text in _DOT_SEGMENTS:
        raise InvalidArguments(f"{{{name}}} may not be empty, '.' or '..' (it is a path segment)")
    # Many servers and proxies decode %2F before routing, so an encoded '/' or '..' from an
    # argument would still move the request; refuse what would change the path once decoded.
    # (Secrets are the operator's, and base64 tokens legitimately contain '/'.)
    decoded = unquote(text)
    if not name.startswith("secrets.") and (
        decoded in _DOT_SEGMENTS or any(c in decoded for c in "/\\\0")
    ):
        raise InvalidArguments(
            f"{{{name}}} may not be empty, '.', '..' or contain '/', '\\' or NUL "
            "(it fills one path segment)"
        )
    return quote(text, safe="")


def _render_query(query: Mapping[str, str], slots: _Slots) -> str:
    pairs = []
    for name, template in query.items():
        try:
            value = slots.interpolate(template)
        except _Absent:
            continue
        pairs.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    return "&".join(pairs)


# --- headers ------------------------------------------------------------------------------


def _render_headers(templates: Mapping[str, str], slots: _Slots) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for name, template in templates.items():
        if name.lower() in RESERVED_HEADERS:
            continue  # the HTTP client owns framing headers
        try:
            value = slots.interpolate(template)
        except _Absent:
            continue
        if _HEADER_CONTROL_RE.search(value):
            raise InvalidArguments(_control_message(name, template, slots))
        headers.append((name, value))
    return headers


def _control_message(name: str, template: str, slots: _Slots) -> str:
    # Name the offending slot, never its value: it may be a secret.
    culprits = [s for s in slots_in(template) if _HEADER_CONTROL_RE.search(slots.text(s))]
    where = ", ".join(f"{{{s}}}" for s in culprits) or "the value"
    return f"header {name!r}: {where} contains a control character (CR, LF, NUL, ...)"


def _has_header(headers: list[tuple[str, str]], name: str) -> bool:
    return any(h.lower() == name for h, _ in headers)


# --- JSON body ----------------------------------------------------------------------------


def _render_body(template: Any, slots: _Slots) -> bytes | None:
    if template is None:
        return None
    try:
        body = _render_json(template, slots)
    except _Absent:
        return None  # the whole body was one absent optional argument
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _render_json(node: Any, slots: _Slots) -> Any:
    """Render one JSON node; raises _Absent when it should be left out of its parent."""
    if isinstance(node, str):
        return _render_json_string(node, slots)
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            try:
                out[slots.interpolate(key)] = _render_json(value, slots)
            except _Absent:
                continue
        return out
    if isinstance(node, list):
        items = []
        for item in node:
            try:
                items.append(_render_json(item, slots))
            except _Absent:
                continue
        return items
    return node


def _render_json_string(template: str, slots: _Slots) -> Any:
    found = slots_in(template)
    if len(found) == 1 and template == "{" + found[0] + "}":
        return slots.value(found[0])  # whole slot: the value keeps its JSON type
    return slots.interpolate(template)
