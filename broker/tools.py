"""Capabilities as tool definitions for LLM APIs: OpenAI function tools and Anthropic tools.

Pure functions over the public view of a capability (no server dependency, so the SDK uses
them too). Tool names in both APIs must match ``^[a-zA-Z0-9_-]{1,64}$``, so dotted capability
names are mapped (``github.issues.create`` -> ``github__issues__create``; a name that would be
longer than 64 gets a hash suffix); every listing carries the mapping back to capability names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Format = Literal["openai", "anthropic"]
FORMATS: tuple[Format, ...] = ("openai", "anthropic")
MAX_NAME = 64


def tool_name(capability: str) -> str:
    name = capability.replace(".", "__")
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(capability.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9]}_{digest}"


def clean_schema(schema: Any) -> Any:
    """The input schema without our annotations (``x-...``) and ``$schema``/``$id`` markers,
    which some tool APIs refuse."""
    if isinstance(schema, dict):
        return {
            k: clean_schema(v)
            for k, v in schema.items()
            if not k.startswith("x-") and k not in ("$schema", "$id")
        }
    if isinstance(schema, list):
        return [clean_schema(v) for v in schema]
    return schema


def to_openai(view: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool_name(view["name"]),
            "description": view.get("description") or view["name"],
            "parameters": clean_schema(view["input"]),
        },
    }


def to_anthropic(view: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": tool_name(view["name"]),
        "description": view.get("description") or view["name"],
        "input_schema": clean_schema(view["input"]),
    }


def as_tools(views: Iterable[Mapping[str, Any]], fmt: Format) -> dict[str, Any]:
    """``{"tools": [...], "names": {tool name: capability name}}``."""
    convert = to_openai if fmt == "openai" else to_anthropic
    views = list(views)
    return {
        "tools": [convert(v) for v in views],
        "names": {tool_name(v["name"]): v["name"] for v in views},
    }
