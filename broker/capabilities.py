"""Capability manifests: the pydantic model, its validation, and argument checking.

A manifest describes exactly one action on one upstream. Everything that decides *where* a
call goes (scheme, host, port, method, path shape, header names, query names) is fixed here;
the agent's arguments only fill declared slots (see ``render.py``).
"""

from __future__ import annotations

import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
from jsonschema import Draft202012Validator
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.errors import InvalidArguments, InvalidManifest

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")
SLOT_RE = re.compile(r"\{([^{}]*)\}")
SLOT_SOURCES = ("args", "secrets", "agent")
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
RATE_RE = re.compile(r"^(\d+)/(second|minute|hour|day)$")
METERED_PATH_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # dotted keys, list indexes
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Headers the broker owns on the wire; a manifest may not set them.
RESERVED_HEADERS = {
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
    "traceparent", "tracestate",  # the broker propagates its own trace context
}  # fmt: skip


def parse_duration(value: str | float | int) -> float:
    """'10s', '500ms', '2m' or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = DURATION_RE.match(value.strip())
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 500ms, 2m)")
    number, unit = float(m.group(1)), m.group(2) or "s"
    return number / 1000 if unit == "ms" else number * 60 if unit == "m" else number


def is_name(value: str) -> bool:
    """Whether ``value`` can name a capability (at most 128 characters, the audit column)."""
    return len(value) <= 128 and NAME_RE.fullmatch(value) is not None


def slots_in(template: str) -> list[str]:
    """The slot expressions of a template string, e.g. ['args.owner', 'secrets.gh']."""
    return SLOT_RE.findall(template)


class SecretRef(BaseModel):
    """Where a secret lives: KV v2 ``mount``/``path``, field ``key``."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    key: str = Field(min_length=1)
    mount: str = "secret"

    @field_validator("path")
    @classmethod
    def _path_slots(cls, v: str) -> str:
        for slot in slots_in(v):
            if slot != "agent.id" and not re.match(
                r"^(agent\.attributes|user)\.[A-Za-z0-9_-]+$|^user\.id$", slot
            ):
                raise ValueError(
                    f"secret path slot {{{slot}}} is not allowed "
                    "(use {agent.id}, {agent.attributes.X} or {user.id})"
                )
        if ".." in v.split("/"):
            raise ValueError("secret path may not contain '..'")
        return v


class HttpSpec(BaseModel):
    """The one outgoing request: method and URL fixed, slots filled from arguments and secrets."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    timeout: float = 10.0
    max_response_bytes: int | None = Field(default=None, gt=0)
    # The header that carries the call's Idempotency-Key (or, without one, its call id) to the
    # upstream, for APIs that deduplicate on their own (Stripe's Idempotency-Key, for example).
    idempotency_header: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if not 0 < seconds <= 300:
            raise ValueError("timeout must be between 0 and 300 seconds")
        return seconds

    @model_validator(mode="after")
    def _query_out_of_url(self) -> HttpSpec:
        # A query written in the URL becomes named query slots, so rendering has one path.
        base, sep, query = self.url.partition("?")
        if sep:
            for key, value in parse_query_template(query).items():
                self.query.setdefault(key, value)
            self.url = base
        return self

    @field_validator("idempotency_header")
    @classmethod
    def _idempotency_header(cls, v: str | None) -> str | None:
        if v is not None and (not HEADER_NAME_RE.match(v) or v.lower() in RESERVED_HEADERS):
            raise ValueError(f"idempotency_header {v!r} is not a header the manifest may set")
        return v

    @model_validator(mode="after")
    def _idempotency_header_unique(self) -> HttpSpec:
        name = (self.idempotency_header or "").lower()
        if name and name in {h.lower() for h in self.headers}:
            raise ValueError(f"header {self.idempotency_header!r} is set twice")
        return self

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not HEADER_NAME_RE.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the broker, not the manifest")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} contains a control character")
        return v


class ResultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: list[str] | None = None


class MeteredCost(BaseModel):
    """A cost read from the upstream's JSON answer, e.g. an LLM API's ``usage.total_tokens``.

    ``reserve`` is held against the budgets before the call (the bound); afterwards the call is
    charged the number found at ``metered``, or ``reserve`` when the answer has no usable
    number there (no JSON, missing, negative or not a number): unknown usage is not free.
    """

    model_config = ConfigDict(extra="forbid")
    metered: str = Field(pattern=METERED_PATH_RE.pattern, max_length=200)
    reserve: float = Field(gt=0, allow_inf_nan=False)

    def actual(self, body: bytes) -> float:
        try:
            node: Any = json.loads(body)
        except (ValueError, RecursionError):
            return self.reserve
        for part in self.metered.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return self.reserve
        ok = isinstance(node, int | float) and not isinstance(node, bool)
        return float(node) if ok and 0 <= node < math.inf else self.reserve


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: str | None = None  # per agent
    global_rate: str | None = None  # all agents together
    # A fixed cost per call (a number, 0 = free) or one metered from the upstream's answer.
    cost: Annotated[float, Field(ge=0, allow_inf_nan=False)] | MeteredCost = 0
    concurrency: int | None = Field(default=None, gt=0)

    def reservation(self) -> float:
        """What a call holds against budgets before it runs."""
        return self.cost.reserve if isinstance(self.cost, MeteredCost) else self.cost

    def actual_cost(self, body: bytes) -> float:
        """What a call that reached the upstream costs, given the upstream's raw answer."""
        return self.cost.actual(body) if isinstance(self.cost, MeteredCost) else self.cost

    @field_validator("rate", "global_rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None and not RATE_RE.match(v):
            raise ValueError("rate must look like 30/minute (second, minute, hour, day)")
        return v


class Capability(BaseModel):
    """A capability manifest (see DESIGN.md for the YAML form)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    version: int = Field(default=1, ge=1)
    description: str = ""
    effect: Literal["read", "write", "destructive"] = "read"
    idempotent: bool = False
    input: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    http: HttpSpec
    result: ResultSpec = Field(default_factory=ResultSpec)
    limits: Limits = Field(default_factory=Limits)
    approval: Literal["none", "required"] = "none"
    long_running: bool = False  # always run as a durable job: invoke answers 202 at once

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_name(v):
            raise ValueError("name must be dotted lowercase words, e.g. github.issues.create")
        return v

    @field_validator("input")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(root)"
            raise ValueError(
                f"input is not a valid JSON Schema at {where}: {exc.message}"
            ) from None
        if v.get("type") != "object":
            raise ValueError("input must be a JSON Schema with type: object")
        return v

    @model_validator(mode="after")
    def _slots(self) -> Capability:
        check_slots(self)
        return self

    def validate_args(self, args: Any) -> None:
        """Check the agent's arguments against the input schema (raises InvalidArguments)."""
        if not isinstance(args, dict):
            raise InvalidArguments("args must be a JSON object")
        errors = sorted(self.args_validator.iter_errors(args), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.path) or "(root)"
            # The message names the field and the rule, never echoes a long value back.
            raise InvalidArguments(f"args {where}: {_short(first.message)}")

    def sensitive_args(self) -> tuple[str, ...]:
        """Dotted paths of arguments marked ``x-sensitive: true`` in the input schema."""
        return self.sensitive_paths

    # Built once per manifest object, not once per call (the registry caches the objects).
    # cached_property, not PrivateAttr: pydantic routes private attributes through a
    # __getattr__ that cost ~3 us a read. Nothing changes a manifest's input or http in place
    # (the registry's model_copy updates only the version), so the values cannot go stale.

    @cached_property
    def args_validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.input)

    @cached_property
    def sensitive_paths(self) -> tuple[str, ...]:
        return tuple(_sensitive_paths(self.input, ""))

    @cached_property
    def secret_names(self) -> tuple[str, ...]:
        """Sorted names of the secrets the request templates use (only these are fetched)."""
        from broker.render import referenced_secrets  # render.py imports this module

        return tuple(sorted(referenced_secrets(self)))

    def public_view(self) -> dict[str, Any]:
        """What an agent may see: no secret references, no upstream details."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "effect": self.effect,
            "idempotent": self.idempotent,
            "input": self.input,
            "approval": self.approval,
            "long_running": self.long_running,
        }


def _sensitive_paths(schema: Any, prefix: str) -> list[str]:
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    out: list[str] = []
    for name, sub in props.items() if isinstance(props, dict) else ():
        path = f"{prefix}{name}"
        if isinstance(sub, dict) and sub.get("x-sensitive") is True:
            out.append(path)
        else:
            out.extend(_sensitive_paths(sub, path + "."))
    return out


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _declared_args(cap: Capability) -> tuple[set[str], set[str]]:
    props = cap.input.get("properties", {})
    required = set(cap.input.get("required", []))
    return set(props) if isinstance(props, dict) else set(), required


def _check_slot(cap: Capability, slot: str, where: str) -> None:
    source, _, name = slot.partition(".")
    if source not in SLOT_SOURCES or not name:
        raise ValueError(f"{where}: unknown slot {{{slot}}} (use args.X, secrets.X, agent.id)")
    if source == "args" and name not in _declared_args(cap)[0]:
        raise ValueError(f"{where}: slot {{{slot}}} names no property of input")
    if source == "secrets" and name not in cap.secrets:
        raise ValueError(f"{where}: slot {{{slot}}} names no entry of secrets")
    if source == "agent" and name != "id":
        raise ValueError(f"{where}: only {{agent.id}} may be used from agent")


def check_slots(cap: Capability) -> None:
    """Refuse manifests whose slots could move the destination or name nothing."""
    from urllib.parse import urlsplit

    url = cap.http.url
    parts = urlsplit(url.replace("{", "%7B").replace("}", "%7D"))
    if parts.scheme not in ("http", "https"):
        raise ValueError("http.url must start with http:// or https://")
    if "%7B" in parts.netloc or not parts.hostname:
        raise ValueError("http.url: scheme, host and port are fixed; no slots allowed there")
    if parts.fragment or "@" in parts.netloc:
        raise ValueError("http.url may not contain a fragment or credentials")
    _, required = _declared_args(cap)
    for segment in parts.path.split("/"):
        seg = segment.replace("%7B", "{").replace("%7D", "}")
        seg_slots = slots_in(seg)
        if seg_slots and (len(seg_slots) > 1 or seg != "{" + seg_slots[0] + "}"):
            raise ValueError(f"http.url: a slot must be a whole path segment, got {seg!r}")
        for slot in seg_slots:
            _check_slot(cap, slot, "http.url")
            if slot.startswith("args.") and slot[5:] not in required:
                raise ValueError(f"http.url: path slot {{{slot}}} must be a required argument")
    for name, template in {**cap.http.headers, **cap.http.query}.items():
        for slot in slots_in(template):
            _check_slot(cap, slot, f"http header/query {name}")
    for key in _json_keys(cap.http.json_body):
        if slots_in(key):
            # A key from an argument could overwrite a fixed field ({"role": "viewer"}).
            raise ValueError(f"http.json: keys are fixed; no slot allowed in key {key!r}")
    for template in _json_strings(cap.http.json_body):
        for slot in slots_in(template):
            _check_slot(cap, slot, "http.json")


def parse_query_template(query: str) -> dict[str, str]:
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for pair in query.split("&") if query else []:
        key, _, value = pair.partition("=")
        out[unquote(key)] = unquote(value)
    return out


def _json_keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [str(k) for k in node] + [k for v in node.values() for k in _json_keys(v)]
    if isinstance(node, list):
        return [k for item in node for k in _json_keys(item)]
    return []


def _json_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [*_json_strings(k), *_json_strings(v)]]
    if isinstance(node, list):
        return [s for item in node for s in _json_strings(item)]
    return []


def parse_manifest(data: Any) -> Capability:
    """Build a Capability from YAML/JSON data; a broken manifest names the field at fault."""
    if not isinstance(data, dict):
        raise InvalidManifest("a capability manifest must be a mapping")
    try:
        return Capability.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise InvalidManifest(f"{where}: {_short(str(first['msg']))}") from None


def load_manifest_files(path: str | Path) -> list[tuple[Path, Any]]:
    """Read one YAML/JSON manifest file, or every *.yaml/*.yml/*.json file under a directory.

    A file may hold several YAML documents. Returns (file, data) pairs; parsing the data into
    a Capability is left to the caller so that errors can name the file.
    """
    import yaml

    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"no such file or directory: {root}")
    out: list[tuple[Path, Any]] = []
    for file in files:
        try:
            docs = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise InvalidManifest(f"{file}: not valid YAML: {exc}") from None
        out.extend((file, doc) for doc in docs if doc is not None)
    return out
