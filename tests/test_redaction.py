"""Redactor: every injected secret value disappears, in the shapes upstreams echo it back in."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.redaction import MAX_DEPTH, Redactor, TooDeep, secret_forms

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


# --- the whole-structure check --------------------------------------------------------------
#
# redact() checks a structure's strings joined with a newline and walks it only on a hit. These
# tests hold it to the plain walk (_redact), which checks every string on its own.

SECRETS = [SECRET, "pässwörd ü+x", "ab"]
FRAGMENTS = sorted(
    {f for v in SECRETS for form in secret_forms(v) for f in (form, form[:3], form[3:])}
    | {"&amp;", "&#", "&#37;", "&am", "&", "%2", "%41", "%C3", "%A9", "%", "\\u00", "\\u0041"}
    | {"\\/", "\\", "+", "\0", "\n", " ", "x", "ghp_", "==", ";", "#"}
)
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
leaves = st.one_of(texts, st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False))
structures = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures, st.sampled_from([SECRETS, [SECRET, "ab"]]))  # with and without a space
def test_whole_check_redacts_exactly_what_the_walk_does(data: object, values: list[str]) -> None:
    redactor = Redactor(values)
    assert redactor.redact(data) == redactor._redact(data)
    if redactor.redact(data) != data:
        assert redactor.holds_secret(data)


def test_a_structure_with_nothing_to_redact_is_returned_as_it_is(redactor: Redactor) -> None:
    data = {"items": [{"url": "https://x.test/?a=1&b=%2F+c", "n": 1}, "&amp; \\u0041"]}
    assert redactor.redact(data) is data
    assert Redactor([]).redact(data) is data


def test_a_secret_split_across_two_strings_is_not_one() -> None:
    # The joined text is "ab\ncd": it holds the secret, no string does. The hit costs a walk,
    # which changes nothing.
    redactor = Redactor(["ab\ncd"])
    data = ["ab", "cd", {"ab": "cd"}]
    assert redactor.holds_secret(data)
    assert redactor.redact(data) == data


@pytest.mark.parametrize(
    "data",
    [
        {"hidden": "%67%68%70%5F" + quote(SECRET[4:], safe="")},  # percent-encoded throughout
        {"hidden": "".join(f"&#{ord(c)};" for c in SECRET)},  # HTML references throughout
        ["x", {"k": ["y", "".join(f"\\u{ord(c):04x}" for c in SECRET)]}],  # JSON escapes
        {f"key {SECRET}": 1},
    ],
)
def test_the_whole_check_finds_a_secret_in_any_string_or_key(
    redactor: Redactor, data: object
) -> None:
    out = redactor.redact(data)
    assert out != data and out == redactor._redact(data)
    assert SECRET not in json.dumps(out) and R in json.dumps(out)


def test_nesting_past_the_limit_is_refused_before_any_walk(redactor: Redactor) -> None:
    def nested(depth: int) -> object:
        data: object = SECRET
        for i in range(depth):
            data = [data] if i % 2 else {"k": data}
        return data

    assert SECRET not in json.dumps(redactor.redact(nested(MAX_DEPTH)))
    with pytest.raises(TooDeep):
        redactor.redact(nested(MAX_DEPTH + 1))
    with pytest.raises(TooDeep):
        Redactor([]).redact(nested(MAX_DEPTH + 1))  # no secret: still not walked


def test_no_string_decodes_differently_for_the_one_after_it() -> None:
    # "&not" ends a string and decodes to "¬" there; run straight into "in;" it would read as
    # "&notin;" ("∉") and hide the secret from a check of the strings joined without a break.
    redactor = Redactor(["pass¬"])
    assert redactor.redact(["pass&not", "in;"]) == [R, "in;"]
    assert redactor.redact({"pass&not": "in;"}) == {R: "in;"}


def _every_decoding(s: str) -> list[str]:
    """The decoding steps run in full, as they were before steps that cannot change the text
    were skipped: the oracle for _hidden_in."""
    steps = [s.replace("\0", "")]
    steps.append(html.unescape(steps[-1]))
    steps.append(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), steps[-1]))
    steps[-1] = steps[-1].replace("\\/", "/")
    steps.append(unquote(steps[-1]))
    steps.append(unquote(steps[-1].replace("+", " ")))
    return steps


VALUE_SETS = [[SECRET], ["pässwörd ü+x"], ["a b", "ab+"], ["%41", "x y"]]


def _shapes(value: str) -> list[str]:
    """A value the ways an upstream may encode it, once or twice over."""
    once = [quote(value), quote_plus(value), html.escape(value), value.replace(" ", "+")]
    return [value, *once, quote(quote_plus(value)), quote_plus(quote_plus(value))]


encoded_texts = st.sampled_from(VALUE_SETS).flatmap(
    lambda values: st.tuples(
        st.just(values),
        st.lists(
            st.sampled_from([s for v in values for s in _shapes(v)] + ["%", "+", "&", "x", " "]),
            max_size=4,
        ).map("".join),
    )
)


@settings(max_examples=800, deadline=None)
@given(st.one_of(encoded_texts, st.tuples(st.sampled_from(VALUE_SETS), texts)))
def test_skipped_decoding_steps_hide_nothing(case: tuple[list[str], str]) -> None:
    values, text = case
    redactor = Redactor(values)
    for s in (text, text + "%2541%252B", "+" + text.replace("x", "%20")):
        expected = any(v in d for d in _every_decoding(s) for v in values)
        assert redactor._hidden_in(s) == (expected and any(c in s for c in "%&\\\0+"))


@pytest.mark.parametrize(
    ("values", "text"),
    [
        (["a b"], "a+b"),
        (["a b"], "a%2Bb"),
        (["a b"], "a%252Bb"),
        (["ab"], "a%2562"),
        ([SECRET], "&amp;"),
    ],
)
def test_decodings_that_reveal_a_value(values: list[str], text: str) -> None:
    expected = any(v in d for d in _every_decoding(text) for v in values)
    assert Redactor(values)._hidden_in(text) == expected
