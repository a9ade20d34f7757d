"""Manifest validation: broken manifests are refused with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from broker.capabilities import parse_duration, parse_manifest
from broker.errors import InvalidArguments, InvalidManifest


def manifest(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "github.issues.create",
        "input": {
            "type": "object",
            "required": ["owner", "repo"],
            "properties": {
                "owner": {"type": "string"},
                "repo": {"type": "string"},
                "title": {"type": "string"},
            },
        },
        "secrets": {"gh": {"path": "github", "key": "token"}},
        "http": {
            "method": "post",
            "url": "https://api.github.com/repos/{args.owner}/{args.repo}/issues",
            "headers": {"Authorization": "Bearer {secrets.gh}"},
            "json": {"title": "{args.title}"},
            "timeout": "10s",
        },
    }
    base.update(over)
    return base


def test_a_good_manifest_parses() -> None:
    cap = parse_manifest(manifest())
    assert cap.http.method == "POST" and cap.http.timeout == 10.0
    assert cap.version == 1 and cap.effect == "read"
    view = cap.public_view()
    assert (
        "secrets" not in view
        and "http" not in view
        and view["input"]["required"] == ["owner", "repo"]
    )


def test_query_in_the_url_becomes_declared_query() -> None:
    m = manifest()
    m["http"]["url"] = "https://api.example.com/search?q={args.title}&sort=new"
    cap = parse_manifest(m)
    assert cap.http.url == "https://api.example.com/search"
    assert cap.http.query == {"q": "{args.title}", "sort": "new"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "GitHub Issues"}, "name"),
        ({"name": "a..b"}, "name"),
        (
            {"input": {"type": "object", "properties": {"a": {"type": "strin"}}}},
            "properties/a/type",
        ),
        ({"input": {"type": "array"}}, "type: object"),
        ({"input": {"type": "object", "required": "owner"}}, "required"),
        ({"effect": "delete"}, "effect"),
        ({"approval": "maybe"}, "approval"),
        ({"surprise": 1}, "surprise"),
        ({"limits": {"rate": "lots"}}, "rate"),
        ({"limits": {"global_rate": "9/fortnight"}}, "global_rate"),
        ({"secrets": {"gh": {"path": "../root", "key": "k"}}}, "'..'"),
        ({"secrets": {"gh": {"path": "a/{args.owner}", "key": "k"}}}, "secret path slot"),
    ],
)
def test_broken_manifests_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(manifest(**change))
    assert field in info.value.message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://{args.owner}.example.com/x", "host"),
        ("https://api.example.com:{args.owner}/x", "host"),
        ("ftp://api.example.com/x", "http"),
        ("https://user:pw@api.example.com/x", "credentials"),
        ("https://api.example.com/x#frag", "fragment"),
        ("https://api.example.com/a-{args.owner}", "whole path segment"),
        ("https://api.example.com/{args.title}", "required"),
        ("https://api.example.com/{args.nope}", "no property"),
        ("https://api.example.com/{secrets.nope}", "no entry of secrets"),
        ("https://api.example.com/{env.HOME}", "unknown slot"),
    ],
)
def test_the_destination_cannot_depend_on_arguments(url: str, why: str) -> None:
    m = manifest()
    m["http"]["url"] = url
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(m)
    assert why in info.value.message


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Transfer-Encoding", "bad header"])
def test_manifest_may_not_set_wire_headers(name: str) -> None:
    m = manifest()
    m["http"]["headers"] = {name: "x"}
    with pytest.raises(InvalidManifest):
        parse_manifest(m)


def test_arguments_are_checked_against_the_schema() -> None:
    cap = parse_manifest(manifest())
    cap.validate_args({"owner": "acme", "repo": "r"})
    with pytest.raises(InvalidArguments, match="owner"):
        cap.validate_args({"owner": 5, "repo": "r"})
    with pytest.raises(InvalidArguments, match="required"):
        cap.validate_args({"owner": "acme"})
    with pytest.raises(InvalidArguments):
        cap.validate_args(["not", "an", "object"])


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("500ms", 0.5), ("2m", 120), (3, 3)])
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_timeout_is_bounded() -> None:
    m = manifest()
    m["http"]["timeout"] = "1h"
    with pytest.raises(InvalidManifest, match="timeout"):
        parse_manifest(m)
