"""render(): arguments fill declared slots only; the destination never moves (Invariant 5)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from broker.capabilities import Capability, parse_manifest
from broker.errors import InvalidArguments, SecretUnavailable
from broker.ports import OutgoingRequest
from broker.render import referenced_secrets, render

SECRET = "tok-3xAmpl3-s3cr3t"


def manifest(http: dict[str, Any], **props: Any) -> Capability:
    properties = props or {
        "owner": {"type": "string"},
        "repo": {"type": "string"},
        "q": {"type": "string"},
        "n": {"type": "integer"},
    }
    return parse_manifest(
        {
            "name": "test.cap",
            "input": {"type": "object", "required": ["owner"], "properties": properties},
            "secrets": {
                "gh": {"path": "github", "key": "token"},
                "unused": {"path": "x", "key": "y"},
            },
            "http": http,
        }
    )


def path_cap() -> Capability:
    return manifest(
        {"method": "POST", "url": "https://api.example.com:8443/repos/{args.owner}/issues"}
    )


def do(
    cap: Capability, args: dict[str, Any], secrets: dict[str, str] | None = None
) -> OutgoingRequest:
    return render(cap, args, {"gh": SECRET} if secrets is None else secrets, "agent-7")


def header(req: OutgoingRequest, name: str) -> str | None:
    values = [v for k, v in req.headers if k.lower() == name.lower()]
    assert len(values) <= 1
    return values[0] if values else None


def body(req: OutgoingRequest) -> Any:
    assert req.body is not None
    return json.loads(req.body)


# --- path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("acme", "acme"),
        ("x?y=1", "x%3Fy%3D1"),
        ("#frag", "%23frag"),
        ("a;b=c", "a%3Bb%3Dc"),
        ("spa ce", "spa%20ce"),
        ("ünïcødé😀", "%C3%BCn%C3%AFc%C3%B8d%C3%A9%F0%9F%98%80"),
        ("%252F", "%25252F"),
        ("...", "..."),
        ("a\r\nX-Admin: 1", "a%0D%0AX-Admin%3A%201"),
        ("@evil.com", "%40evil.com"),
    ],
)
def test_path_slot_is_exactly_one_encoded_segment(value: str, segment: str) -> None:
    req = do(path_cap(), {"owner": value})
    assert req.url == f"https://api.example.com:8443/repos/{segment}/issues"
    parts = urlsplit(req.url)
    assert parts.path.split("/") == ["", "repos", segment, "issues"]
    assert (parts.scheme, parts.hostname, parts.port) == ("https", "api.example.com", 8443)
    assert parts.query == "" and parts.fragment == ""


@pytest.mark.parametrize("value", ["", ".", ".."])
def test_path_slot_refuses_values_that_change_depth(value: str) -> None:
    with pytest.raises(InvalidArguments):
        do(path_cap(), {"owner": value})


def test_path_slot_missing_argument_is_refused() -> None:
    with pytest.raises(InvalidArguments):
        do(path_cap(), {})


@pytest.mark.parametrize(
    "value", ["../admin", "a/b", "%2e%2e", "%2F", "back\\slash", "%5C", "x\0", "%00", "ü/😀"]
)
def test_path_slot_refuses_what_a_server_would_decode_into_more_segments(value: str) -> None:
    # Servers and proxies commonly decode %2F (and %2e%2e) before routing.
    with pytest.raises(InvalidArguments, match="one path segment"):
        do(path_cap(), {"owner": value})


def test_path_slot_non_string_values() -> None:
    assert do(path_cap(), {"owner": 42}).url.endswith("/repos/42/issues")
    assert do(path_cap(), {"owner": True}).url.endswith("/repos/true/issues")
    for bad in (None, [1], {"a": 1}):
        with pytest.raises(InvalidArguments):
            do(path_cap(), {"owner": bad})


@pytest.mark.parametrize(
    "value",
    ["evil.com", "@evil.com", "evil.com:80", "127.0.0.1#", "x?host=evil.com"],
)
def test_destination_fixed_whatever_the_args(value: str) -> None:
    cap = manifest(
        {
            "method": "GET",
            "url": "http://api.example.com/v1/{args.owner}?q={args.q}",
            "headers": {"X-Repo": "{args.repo}"},
        }
    )
    req = do(cap, {"owner": value, "q": value, "repo": value})
    parts = urlsplit(req.url)
    assert (parts.scheme, parts.netloc, req.method) == ("http", "api.example.com", "GET")
    assert len(parts.path.split("/")) == 3
    assert parts.fragment == ""


def test_agent_id_and_secret_in_path() -> None:
    cap = manifest({"url": "https://api.example.com/agents/{agent.id}/{args.owner}"})
    assert do(cap, {"owner": "o"}).url == "https://api.example.com/agents/agent-7/o"


# --- query --------------------------------------------------------------------------------


def test_query_cannot_gain_parameters() -> None:
    cap = manifest({"url": "https://api.example.com/search?q={args.q}&limit=10"})
    req = do(cap, {"owner": "o", "q": "a&admin=1#x"})
    assert urlsplit(req.url).query == "q=a%26admin%3D1%23x&limit=10"


def test_query_declared_in_http_query_and_types() -> None:
    cap = manifest(
        {
            "url": "https://api.example.com/search",
            "query": {"q": "{args.q}", "n": "{args.n}", "who": "{agent.id}"},
        }
    )
    req = do(cap, {"owner": "o", "q": "x y/é", "n": 5})
    assert req.url == "https://api.example.com/search?q=x%20y%2F%C3%A9&n=5&who=agent-7"


def test_query_entry_with_absent_optional_arg_is_omitted() -> None:
    cap = manifest({"url": "https://api.example.com/search?q={args.q}&n={args.n}&fixed=1"})
    assert do(cap, {"owner": "o", "n": 3}).url == "https://api.example.com/search?n=3&fixed=1"
    assert do(cap, {"owner": "o"}).url == "https://api.example.com/search?fixed=1"


# --- headers ------------------------------------------------------------------------------


def header_cap() -> Capability:
    return manifest(
        {
            "url": "https://api.example.com/x",
            "headers": {"Authorization": "Bearer {secrets.gh}", "X-Repo": "repo={args.repo}"},
        }
    )


def test_headers_filled_from_args_and_secrets() -> None:
    req = do(header_cap(), {"owner": "o", "repo": "r\tx"})
    assert header(req, "Authorization") == f"Bearer {SECRET}"
    assert header(req, "X-Repo") == "repo=r\tx"  # tab is legal inside a header value
    assert header(req, "User-Agent") == "capbroker"
    assert header(req, "Content-Type") is None and req.body is None


def test_header_with_absent_optional_arg_is_omitted() -> None:
    assert header(do(header_cap(), {"owner": "o"}), "X-Repo") is None


@pytest.mark.parametrize("value", ["x\r\nX-Admin: 1", "x\nX-Admin: 1", "x\rY", "x\0", "x\x1b[31m"])
def test_header_injection_from_args_refused(value: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        do(header_cap(), {"owner": "o", "repo": value})
    assert "{args.repo}" in info.value.message


def test_header_injection_from_secret_refused_without_leaking_it() -> None:
    secret = "abc\r\nX-Admin: 1"
    with pytest.raises(InvalidArguments) as info:
        do(header_cap(), {"owner": "o"}, {"gh": secret})
    assert "abc" not in str(info.value) and "X-Admin" not in str(info.value)
    assert "{secrets.gh}" in info.value.message


def test_manifest_user_agent_kept_and_no_host_or_length() -> None:
    cap = manifest(
        {"url": "https://api.example.com/x", "headers": {"user-agent": "mine/1"}, "json": {"a": 1}}
    )
    req = do(cap, {"owner": "o"})
    names = [k.lower() for k, _ in req.headers]
    assert names.count("user-agent") == 1 and header(req, "User-Agent") == "mine/1"
    assert "host" not in names and "content-length" not in names


def test_missing_secret_fails_closed() -> None:
    with pytest.raises(SecretUnavailable):
        do(header_cap(), {"owner": "o"}, {})


# --- JSON body ----------------------------------------------------------------------------


def json_cap() -> Capability:
    props: dict[str, Any] = {k: {} for k in ("owner", "i", "f", "b", "l", "d", "z", "s", "opt")}
    return manifest(
        {
            "method": "POST",
            "url": "https://api.example.com/x",
            "json": {
                "i": "{args.i}",
                "f": "{args.f}",
                "b": "{args.b}",
                "l": "{args.l}",
                "d": "{args.d}",
                "z": "{args.z}",
                "opt": "{args.opt}",
                "mixed": "n={args.i} b={args.b} l={args.l} s={args.s}",
                "nested": {"list": ["{args.s}", "{args.opt}", 7, None, True]},
                "token": "{secrets.gh}",
                "agent": "{agent.id}",
                "fixed": 1.5,
            },
        },
        **props,
    )


def test_json_body_keeps_types_and_omits_absent() -> None:
    args = {
        "owner": "o",
        "i": 3,
        "f": 2.5,
        "b": False,
        "l": [1, "two"],
        "d": {"k": None},
        "z": None,
        "s": 'text "quoted"',
    }
    req = do(json_cap(), args)
    assert body(req) == {
        "i": 3,
        "f": 2.5,
        "b": False,
        "l": [1, "two"],
        "d": {"k": None},
        "z": None,
        "mixed": 'n=3 b=false l=[1,"two"] s=text "quoted"',
        "nested": {"list": ['text "quoted"', 7, None, True]},
        "token": SECRET,
        "agent": "agent-7",
        "fixed": 1.5,
    }
    assert header(req, "Content-Type") == "application/json"
    assert req.body is not None
    assert b": " not in req.body and b", " not in req.body  # compact encoding


def test_json_body_unicode_is_utf8() -> None:
    req = do(json_cap(), {"owner": "o", "s": "é😀"})
    assert req.body is not None and "é😀".encode() in req.body


def test_json_injection_stays_a_string() -> None:
    req = do(json_cap(), {"owner": "o", "s": '", "admin": true, "x": "'})
    data = body(req)
    assert "admin" not in data and data["nested"]["list"][0] == '", "admin": true, "x": "'


# --- secrets ------------------------------------------------------------------------------


def test_referenced_secrets() -> None:
    assert referenced_secrets(header_cap()) == {"gh"}
    assert referenced_secrets(json_cap()) == {"gh"}
    assert referenced_secrets(path_cap()) == set()
