"""Redactor: every injected secret value disappears, in the shapes upstreams echo it back in."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest

from broker.redaction import Redactor

SECRET = "ghp_S3cr3t/T0ken+with=odd&chars?"
R = "[REDACTED]"


@pytest.fixture
def redactor() -> Redactor:
    return Redactor([SECRET, "other-secret-value"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def test_raw(redactor: Redactor) -> None:
    assert redactor.redact_text(f"token={SECRET}; again {SECRET}") == f"token={R}; again {R}"
    assert redactor.redact_text("x other-secret-value y") == f"x {R} y"


@pytest.mark.parametrize(
    "form",
    [
        b64(SECRET.encode()),
        b64(SECRET.encode()).rstrip("="),
        urlsafe(SECRET.encode()),
        urlsafe(SECRET.encode()).rstrip("="),
    ],
)
def test_base64_forms(redactor: Redactor, form: str) -> None:
    out = redactor.redact_text(f"seen: {form} end")
    assert out == f"seen: {R} end"


@pytest.mark.parametrize("secret", [SECRET, "abcd", "pässwörd-ü", "x" * 31])
@pytest.mark.parametrize("prefix_len", range(6))
@pytest.mark.parametrize("encode", [b64, urlsafe])
def test_embedded_in_basic_auth_blob_all_alignments(
    secret: str, prefix_len: int, encode: Callable[[bytes], str]
) -> None:
    redactor = Redactor([secret])
    user = "u" * prefix_len
    blob = encode(f"{user}:{secret}".encode())
    header = f"Authorization: Basic {blob}"
    out = redactor.redact_text(header)
    assert R in out
    assert redactor.contains_secret(header)
    # What is left of the blob can only be the user part plus a few boundary characters.
    leftover = out.replace(R, "").removeprefix("Authorization: Basic ")
    assert len(leftover) <= len(encode(f"{user}:".encode())) + 4
    # The blob with a trailing suffix too (secret in the middle of the encoded data).
    middle = encode(f"{user}:{secret}:tail-data".encode())
    assert R in redactor.redact_text(middle)


@pytest.mark.parametrize("form", [quote(SECRET, safe=""), quote_plus(SECRET), quote(SECRET)])
def test_url_encoded_forms(redactor: Redactor, form: str) -> None:
    assert form != SECRET
    assert redactor.redact_text(f"https://x.test/cb?t={form}&y=1") == f"https://x.test/cb?t={R}&y=1"


def test_json_escaped_form() -> None:
    secret = 'quote"back\\slash/ctl\ttab-é'
    redactor = Redactor([secret])
    for ensure_ascii in (True, False):
        text = json.dumps({"echo": secret}, ensure_ascii=ensure_ascii)
        assert secret not in text
        assert redactor.redact_text(text) == json.dumps({"echo": R})


def test_nested_structures_including_keys(redactor: Redactor) -> None:
    data = {
        SECRET: [f"a {SECRET}", {"k": b64(SECRET.encode())}, 3, None, True],
        "plain": ("tuple", SECRET),
        "bytes": SECRET.encode(),
    }
    assert redactor.redact(data) == {
        R: [f"a {R}", {"k": R}, 3, None, True],
        "plain": ("tuple", R),
        "bytes": R.encode(),
    }


def test_bytes(redactor: Redactor) -> None:
    raw = b"\x00\xffbinary " + SECRET.encode() + b" and " + b64(SECRET.encode()).encode()
    assert redactor.redact_bytes(raw) == b"\x00\xffbinary " + R.encode() + b" and " + R.encode()
    assert redactor.contains_secret(raw)
    assert not redactor.contains_secret(b"nothing here")


def test_non_secret_text_unchanged(redactor: Redactor) -> None:
    text = 'The quick brown fox {"ghp_": 1} dGVzdA== https://example.com/?a=b%20c'
    assert redactor.redact_text(text) == text
    assert not redactor.contains_secret(text)
    assert redactor.redact({"a": [text, 1]}) == {"a": [text, 1]}


def test_longest_form_wins() -> None:
    # The padded base64 form must be redacted whole, not leave its '=' behind.
    redactor = Redactor(["abcde"])
    assert redactor.redact_text(b64(b"abcde")) == R


def test_short_and_empty_secrets() -> None:
    redactor = Redactor(["", "ab"])
    assert redactor.redact_text("ab cd") == f"{R} cd"
    assert redactor.redact_text("") == ""
    assert Redactor([]).redact_text("anything") == "anything"
    assert not Redactor([]).contains_secret("anything")


def test_custom_placeholder() -> None:
    assert Redactor([SECRET], placeholder="***").redact_text(SECRET) == "***"
