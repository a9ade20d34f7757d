"""Redaction: removes the secret values injected into one call from whatever leaves the broker.

An upstream may echo a credential back in a transformed shape (a Basic auth header in base64,
a URL in percent-encoding, a JSON string with escapes), so each secret value is expanded into
the forms it is likely to take and all of them are replaced by one placeholder. As a last
line, a text is decoded the usual ways (HTML entities, JSON and percent escapes, NUL bytes
from a UTF-16 body read as UTF-8); if a secret shows up in a decoded copy, the whole text is
replaced, since no form-by-form patch can be trusted there.

A JSON answer is first checked whole: its strings (keys included) are joined with a newline,
at which every escape and HTML reference the decodings know ends, so the joined text holds a
match or a decoded secret whenever one of its strings does (a hit that spans two strings only
costs the walk). Only an answer with a hit is walked string by string (an 88 KB answer of 100
issue-like items: ~7.5 ms walked, ~1.1 ms checked whole; bench/shape.py).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus, unquote

PLACEHOLDER = "[REDACTED]"
# Below this length the inner part of an embedded base64 form is a handful of characters that
# would match ordinary text far too often; such secrets are still redacted in their other forms.
MIN_EMBEDDED_LEN = 4
# Containers nested deeper than this are not rebuilt (TooDeep): the walk that rebuilds a
# structure recurses, and an answer encoded deeper would fail orjson (255 levels) anyway.
MAX_DEPTH = 250
# Joins the strings of a structure for the whole check. No escape or reference that the
# decodings know spans a newline (html.unescape stops a name at it, a percent or \u escape
# needs hex digits), so each step decodes the text on either side of one exactly as it decodes
# that text alone; a secret found across a newline only costs the walk.
_SEPARATOR = "\n"


class TooDeep(ValueError):
    """A structure nests containers deeper than MAX_DEPTH."""


class Redactor:
    """Replaces every known form of the given secret values by a placeholder."""

    def __init__(self, values: Iterable[str], placeholder: str = PLACEHOLDER) -> None:
        self.placeholder = placeholder
        self._values = tuple(v for v in set(values) if v)
        self._spaced = any(" " in v for v in self._values)
        patterns = sorted({p for v in self._values for p in secret_forms(v)}, key=len, reverse=True)
        self._text: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None
        if patterns:
            self._text = re.compile("|".join(_pattern(p) for p in patterns))
            self._bytes = re.compile(b"|".join(_pattern(p).encode() for p in patterns))

    def redact_text(self, s: str) -> str:
        if not self._text:
            return s
        out = self._text.sub(self.placeholder, s)
        return self.placeholder if self._hidden_in(out) else out

    def _hidden_in(self, s: str) -> bool:
        """Does a secret appear once the text is decoded the ways upstreams encode things?"""
        if not any(c in s for c in "%&\\\0+"):
            return False
        try:
            decoded = _decodings(s, plus=self._spaced)
        except ValueError:
            # html.unescape refuses a numeric reference of over 4,300 digits: a text that
            # cannot be decoded cannot be shown to be clean.
            return True
        return any(v in text for text in decoded for v in self._values)

    def redact_bytes(self, b: bytes) -> bytes:
        return self._bytes.sub(self.placeholder.encode(), b) if self._bytes else b

    def contains_secret(self, s: str | bytes) -> bool:
        if isinstance(s, bytes):
            return bool(self._bytes and self._bytes.search(s))
        return bool(self._text and self._text.search(s))

    def redact(self, obj: Any) -> Any:
        """Redact strings anywhere in a JSON-like structure, dict keys included; ``obj``
        itself when nothing in it needs redacting. Raises TooDeep (nothing is walked then)."""
        joined = _joined(obj, MAX_DEPTH)
        if joined is None:
            return self._redact(obj)  # not JSON (bytes, tuples, a key that is no string)
        return self._redact(obj) if self._hit(joined) else obj

    def holds_secret(self, obj: Any) -> bool:
        """Would redact() change any string of ``obj``, however deep? Without a walk that
        recurses, so it answers for a structure too deep to redact (conservative: a secret
        across two strings counts, and so does anything that is not JSON)."""
        if not self._text:
            return False
        joined = _joined(obj, None)
        return joined is None or self._hit(joined)

    def _hit(self, text: str) -> bool:
        return self._text is not None and (
            self._text.search(text) is not None or self._hidden_in(text)
        )

    def _redact(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.redact_text(obj)
        if isinstance(obj, bytes):
            return self.redact_bytes(obj)
        if isinstance(obj, dict):
            return {self._redact(k): self._redact(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._redact(item) for item in obj]
        if isinstance(obj, tuple):
            return tuple(self._redact(item) for item in obj)
        return obj


def _joined(obj: Any, limit: int | None) -> str | None:
    """The strings of a JSON structure joined for the whole check; None when it holds
    something JSON does not. Raises TooDeep past ``limit`` levels."""
    strings = _strings(obj, limit)
    if strings is None:
        return None
    try:
        return _SEPARATOR.join(strings)
    except TypeError:  # a dict key that is not a string
        return None


def _strings(obj: Any, limit: int | None) -> list[str] | None:
    """Every string in a JSON structure, dict keys included, without recursion; None when it
    holds something JSON does not (bytes, tuples). Raises TooDeep past ``limit`` levels."""
    found: list[str] = []
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            found.append(node)
            continue
        if isinstance(node, dict):
            found.extend(node)
            values: Iterable[Any] = node.values()
        elif isinstance(node, list):
            values = node
        elif isinstance(node, (bytes, tuple)):
            return None
        else:
            continue
        if limit is not None and depth >= limit:
            raise TooDeep(f"containers nested over {limit} deep")
        for value in values:
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, (dict, list, bytes, tuple)):
                stack.append((value, depth + 1))
    return found


def secret_forms(value: str) -> set[str]:
    """The shapes a secret value may take on the wire (the raw value included)."""
    forms = {value, quote(value, safe=""), quote_plus(value), quote(value)}
    for escaped in (json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
        forms.add(escaped)
        forms.add(escaped.replace("/", "\\/"))  # PHP and others escape slashes
        forms.add(_go_escape(escaped))  # Go escapes & < > in JSON as \u0026 ...
    forms.update({html.escape(value), html.escape(value, quote=False)})
    raw = value.encode()
    forms.update(_base64_forms(raw))
    if len(value) >= MIN_EMBEDDED_LEN:
        forms.update(_embedded_base64_forms(raw))
    forms.discard("")
    return forms


def _both_alphabets(encoded: str) -> set[str]:
    return {encoded, encoded.replace("+", "-").replace("/", "_")}


def _base64_forms(raw: bytes) -> set[str]:
    padded = base64.b64encode(raw).decode()
    return _both_alphabets(padded) | _both_alphabets(padded.rstrip("="))


def _embedded_base64_forms(raw: bytes) -> set[str]:
    """The base64 characters that depend only on the secret, at each of the 3 byte alignments.

    Inside a larger blob (e.g. base64("user:" + token)) the characters at both ends of the
    secret also carry bits of its neighbours, so only the characters fully inside it are stable.
    """
    forms: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        start = -(-8 * offset // 6)  # first character with no prefix bits
        end = 8 * (offset + len(raw)) // 6  # characters after this one carry suffix bits
        forms |= _both_alphabets(encoded[start:end])
    return forms


def _go_escape(escaped: str) -> str:
    return escaped.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _pattern(form: str) -> str:
    """A regex for one form; percent escapes match in either case (%2F and %2f)."""
    out, last = [], 0
    for m in _PERCENT.finditer(form):
        out.append(re.escape(form[last : m.start()]))
        out.append(
            "%" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in m.group(1))
        )
        last = m.end()
    out.append(re.escape(form[last:]))
    return "".join(out)


def _decodings(s: str, *, plus: bool = True) -> list[str]:
    """The text after each usual decoding step, applied one after the other; a step that
    cannot change the text is not run. ``plus=False`` (no value holds a space) reads no '+' as
    a space: that can only reveal a value with a space in it."""
    steps = [s.replace("\0", "")]
    steps.append(html.unescape(steps[-1]))  # returns at once when there is no '&'
    if "\\" in steps[-1]:
        steps.append(
            _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), steps[-1]).replace("\\/", "/")
        )
    steps.append(unquote(steps[-1]))  # returns at once when there is no '%'
    last = steps[-1]
    if "%" in last or (plus and "+" in last):  # a second unquote (double encoding), '+' as ' '
        steps.append(unquote(last.replace("+", " ") if plus else last))
    return steps
