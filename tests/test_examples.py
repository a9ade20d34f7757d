"""The shipped examples: every manifest in capabilities/ and the default policies/policy.csv."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest

from broker.capabilities import Capability, load_manifest_files, parse_manifest
from broker.policy import parse_policy_csv
from broker.render import render

ROOT = Path(__file__).resolve().parent.parent
CAPABILITIES = ROOT / "capabilities"
POLICY_FILE = ROOT / "policies" / "policy.csv"

EXPECTED = {
    "github.issues.create", "slack.chat.post", "llm.chat.complete", "http.get",
    "demo.echo", "demo.weather", "demo.status",
}  # fmt: skip

# Arguments each example accepts: rendering them proves the slots line up with the schema.
SAMPLE_ARGS: dict[str, dict[str, Any]] = {
    "github.issues.create": {"owner": "acme", "repo": "web", "title": "It broke"},
    "slack.chat.post": {"channel": "#general", "text": "hello"},
    "llm.chat.complete": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    "http.get": {"name": "Berlin"},
    "demo.echo": {"message": "hi"},
    "demo.weather": {"city": "Paris"},
    "demo.status": {},
}


def _examples() -> list[tuple[Path, object]]:
    return load_manifest_files(CAPABILITIES)


def _capabilities() -> dict[str, Capability]:
    return {cap.name: cap for cap in (parse_manifest(data) for _, data in _examples())}


@pytest.mark.parametrize("file", sorted(CAPABILITIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses_and_is_named_after_its_file(file: Path) -> None:
    [(_, data)] = load_manifest_files(file)
    cap = parse_manifest(data)
    assert file.name == f"{cap.name}.yaml"
    assert cap.description


def test_the_expected_examples_are_shipped() -> None:
    assert set(_capabilities()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_arguments_validate_and_render(name: str) -> None:
    cap = _capabilities()[name]
    cap.validate_args(SAMPLE_ARGS[name])
    request = render(cap, SAMPLE_ARGS[name], {k: "placeholder-value" for k in cap.secrets}, "a1")
    assert request.method == cap.http.method


def test_demo_capabilities_target_the_dev_upstream_only() -> None:
    for name, cap in _capabilities().items():
        if name.startswith("demo."):
            assert cap.http.url.startswith("http://127.0.0.1:8099/")


def test_third_party_examples_use_https_and_a_secret_header() -> None:
    for name in ("github.issues.create", "slack.chat.post", "llm.chat.complete"):
        cap = _capabilities()[name]
        assert cap.http.url.startswith("https://")
        assert cap.http.headers["Authorization"].startswith("Bearer {secrets.")


def test_llm_model_is_restricted_to_an_enum() -> None:
    cap = _capabilities()["llm.chat.complete"]
    assert cap.input["properties"]["model"]["enum"]


def test_policy_csv_parses() -> None:
    rules, grants = parse_policy_csv(POLICY_FILE.read_text(encoding="utf-8"))
    assert rules
    assert any(g.subject == "role:writer" and g.role == "role:reader" for g in grants)


def test_every_invoke_rule_of_policy_csv_matches_an_example() -> None:
    rules, _ = parse_policy_csv(POLICY_FILE.read_text(encoding="utf-8"))
    for rule in (r for r in rules if r.action == "invoke"):
        assert any(fnmatchcase(name, rule.object) for name in EXPECTED), rule


def test_reader_may_invoke_only_read_examples() -> None:
    rules, _ = parse_policy_csv(POLICY_FILE.read_text(encoding="utf-8"))
    caps = _capabilities()
    reader = [r for r in rules if r.subject == "role:reader" and r.action == "invoke"]
    assert reader
    for rule in reader:
        for name, cap in caps.items():
            if fnmatchcase(name, rule.object):
                assert cap.effect == "read", name
