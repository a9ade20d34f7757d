"""The audit hash chain and its signed checkpoints: encoding, hashing, signing, verifying.

Pure functions over plain dicts, shared by the broker (``audit.py``) and the offline
verifier (``broker audit verify --file``). The only module that imports ``cryptography``, so
it also holds ``Sealer`` (AES-GCM for deferred calls' arguments at rest).

Canonical encoding (stable across versions and across SQLite/PostgreSQL): the values of the
record's fields in ``HASHED_FIELDS`` order, as a JSON array with no whitespace, UTF-8, no
ASCII escaping (``null`` for an absent value); ``data`` is hashed as the exact text that is
stored. New fields are only ever appended to ``HASHED_FIELDS``; a field appended after the
first 21 (``user_id``) is left out of the array while it and every field after it are null, so
records written before it existed keep their hashes (and setting it on such a record, or
clearing it, changes the hash). Then

    hash = sha256(prev_hash_hex + "\\n" + canonical_json).hexdigest()

with ``prev_hash`` of the first record of a chain equal to ``GENESIS``. ``seq`` counts from 1
per ``chain_id`` without gaps.

A checkpoint signs a chain head with Ed25519: the signed message is the canonical JSON of
``{"chain_id", "seq", "hash", "time", "key_id"}``. Checkpoints are kept in the database and
in a file outside it, so truncating the table or rewriting and re-hashing it is detected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

GENESIS = "0" * 64
HASHED_FIELDS = (
    "chain_id", "seq", "event_id", "time", "kind", "call_id", "agent_id", "capability",
    "capability_version", "decision", "rule", "reason", "status", "upstream_status",
    "latency_ms", "cost", "task_id", "trace_id", "idempotency_key", "data", "prev_hash",
    "user_id",
)  # fmt: skip
BASE_FIELDS = 21  # always hashed; later fields only when set (see the module docstring)
CHECKPOINT_FIELDS = ("chain_id", "seq", "hash", "time", "key_id")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compact_encoder(*, sort_keys: bool, allow_nan: bool) -> Callable[[Any], str]:
    """``json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, ...).encode``, built once.

    ``JSONEncoder.encode`` builds a new C encoder (and a closure) on every call; the audit
    writer encodes two values per record, so it keeps one C encoder instead (~30% faster).
    Same text byte for byte: it is the encoder ``encode`` would build. Values are plain JSON
    from requests and our own dicts, so the circular-reference check is left out.
    """
    py = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys, allow_nan=allow_nan
    )
    make = getattr(json.encoder, "c_make_encoder", None)  # the _json accelerator
    if make is None:
        return py.encode
    c_encode = make(
        None, py.default, json.encoder.encode_basestring, None, ":", ",", sort_keys, False,
        allow_nan,
    )  # fmt: skip

    def encode(value: Any) -> str:
        return "".join(c_encode(value, 0))

    return encode


_encode = compact_encoder(sort_keys=False, allow_nan=False)


SEQ, PREV_HASH = HASHED_FIELDS.index("seq"), HASHED_FIELDS.index("prev_hash")


def record_hash(record: Mapping[str, Any]) -> str:
    return values_hash([record.get(k) for k in HASHED_FIELDS])


def values_hash(values: Sequence[Any]) -> str:
    """The hash of a record given as its values in ``HASHED_FIELDS`` order."""
    n = len(values)
    while n > BASE_FIELDS and values[n - 1] is None:
        n -= 1
    body = _encode(values if n == len(values) else values[:n])
    return hashlib.sha256(f"{values[PREV_HASH]}\n{body}".encode()).hexdigest()


# -- keys and signatures -----------------------------------------------------------------------


def new_signing_key() -> bytes:
    """A fresh Ed25519 private key as PEM (PKCS8, unencrypted)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


class Signer:
    def __init__(self, private_pem: bytes) -> None:
        key = serialization.load_pem_private_key(private_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the audit signing key must be an Ed25519 key")
        self._key = key
        self.public_pem = public_pem(key.public_key())
        self.key_id = key_id(self.public_pem)

    def checkpoint(self, chain_id: str, seq: int, head: str, time: str) -> dict[str, Any]:
        cp = {"chain_id": chain_id, "seq": seq, "hash": head, "time": time, "key_id": self.key_id}
        signature = self._key.sign(canonical(cp).encode())
        return {**cp, "signature": base64.b64encode(signature).decode()}


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def key_id(public_key_pem: str) -> str:
    """A short, stable name for a public key (its SHA-256, first 16 hex digits)."""
    return "ed25519:" + hashlib.sha256(public_key_pem.strip().encode()).hexdigest()[:16]


def signature_ok(checkpoint: Mapping[str, Any], public_keys: Mapping[str, str]) -> bool:
    pem = public_keys.get(str(checkpoint.get("key_id")))
    if pem is None:
        return False
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        return False
    message = canonical({k: checkpoint.get(k) for k in CHECKPOINT_FIELDS}).encode()
    try:
        key.verify(base64.b64decode(str(checkpoint.get("signature", ""))), message)
        return True
    except (InvalidSignature, ValueError):
        return False


# -- verification ------------------------------------------------------------------------------


@dataclass
class ChainReport:
    chain_id: str
    checked: int = 0
    first_bad_seq: int | None = None
    problem: str | None = None
    checkpoints: int = 0
    head_seq: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None and self.problem is None

    def fail(self, seq: int | None, problem: str) -> None:
        if self.problem is None:
            self.first_bad_seq, self.problem = seq, problem


@dataclass
class Report:
    chains: list[ChainReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)

    @property
    def checked(self) -> int:
        return sum(c.checked for c in self.chains)

    @property
    def first_bad_seq(self) -> int | None:
        return next((c.first_bad_seq for c in self.chains if not c.ok), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "chains": [
                {"chain_id": c.chain_id, "ok": c.ok, "checked": c.checked, "head_seq": c.head_seq,
                 "checkpoints": c.checkpoints, "first_bad_seq": c.first_bad_seq,
                 "problem": c.problem}
                for c in self.chains
            ],
        }  # fmt: skip


def verify_chain(
    chain_id: str,
    records: Iterable[Mapping[str, Any]],
    checkpoints: Sequence[Mapping[str, Any]],
    public_keys: Mapping[str, str],
) -> ChainReport:
    """Check one chain (records in seq order) against itself and its signed checkpoints.

    The first bad seq is the first record whose seq, link or hash is wrong. A log that was
    rewritten and re-hashed is consistent with itself; then the first bad seq is the first
    record after the last checkpoint that still matches (the rewrite lies somewhere between
    it and the first checkpoint that does not). A tail cut below a checkpoint names the
    first missing seq.
    """
    report = ChainReport(chain_id)
    heads: dict[int, str] = {}
    expected, prev = 1, GENESIS
    for rec in records:
        seq = int(rec["seq"])
        if seq != expected:
            report.fail(expected, f"record {expected} is missing or out of order (found {seq})")
            break
        if rec.get("prev_hash") != prev:
            report.fail(seq, f"record {seq} does not link to record {seq - 1}")
            break
        if record_hash(rec) != rec.get("hash"):
            report.fail(seq, f"record {seq} does not match its hash (edited)")
            break
        heads[seq], prev, expected = str(rec["hash"]), str(rec["hash"]), expected + 1
        report.checked += 1
    report.head_seq = expected - 1
    _check_checkpoints(report, heads, checkpoints, public_keys)
    return report


def _check_checkpoints(
    report: ChainReport,
    heads: Mapping[int, str],
    checkpoints: Sequence[Mapping[str, Any]],
    public_keys: Mapping[str, str],
) -> None:
    last_good = 0
    for cp in sorted(checkpoints, key=lambda c: int(c["seq"])):
        seq = int(cp["seq"])
        if not signature_ok(cp, public_keys):
            report.fail(seq, f"checkpoint at {seq} has no valid signature")
            return
        report.checkpoints += 1
        if report.problem is not None:
            continue  # the records already failed before this point
        if seq > report.head_seq:
            report.fail(
                report.head_seq + 1,
                f"records after {report.head_seq} are missing (a checkpoint signs {seq})",
            )
            return
        if heads.get(seq) != cp["hash"]:
            report.fail(
                last_good + 1,
                f"records {last_good + 1}..{seq} differ from the checkpoint at {seq} (rewritten)",
            )
            return
        last_good = seq


def verify_export(lines: Iterator[str], public_keys: dict[str, str] | None) -> dict[str, Any]:
    """Verify a ``broker audit export`` file offline. Trust ``public_keys`` if given, else the
    file's own header (which proves integrity only against someone without the key)."""
    header: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    checkpoints: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if not line.strip():
            continue
        obj = json.loads(line)
        kind = obj.pop("type", None)
        if kind == "header":
            header = obj
        elif kind == "record":
            records.setdefault(obj["chain_id"], []).append(obj)
        elif kind == "checkpoint":
            checkpoints.setdefault(obj["chain_id"], []).append(obj)
    keys = public_keys if public_keys is not None else header.get("public_keys", {})
    report = Report()
    for chain_id in sorted({*records, *checkpoints}):
        recs = sorted(records.get(chain_id, []), key=lambda r: int(r["seq"]))
        report.chains.append(verify_chain(chain_id, recs, checkpoints.get(chain_id, []), keys))
    return report.to_dict()


# --- sealing values kept at rest ---------------------------------------------------------------

SEALED = "sealed:v1:"


class Sealer:
    """AES-256-GCM for what the broker keeps at rest outside the audit log: a deferred call's
    arguments (they may hold ``x-sensitive`` values, which the audit log only ever HMACs).

    A sealed value is ``sealed:v1:<key id>:<base64url(nonce + ciphertext + tag)>``; ``aad``
    binds it to its row, so a value copied onto another row does not open.
    """

    def __init__(self, key_id: str, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key is 32 bytes")
        self.key_id = key_id
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, plaintext, aad)
        return f"{SEALED}{self.key_id}:{base64.urlsafe_b64encode(blob).decode()}"

    def open(self, sealed: str, aad: bytes) -> bytes:
        """The plaintext; ValueError for anything not sealed by this key for this ``aad``."""
        if not sealed.startswith(SEALED):
            raise ValueError("not a sealed value")
        key_id, _, body = sealed.removeprefix(SEALED).partition(":")
        if key_id != self.key_id:
            raise ValueError(f"sealed with another key ({key_id[:32]!r})")
        try:
            blob = base64.urlsafe_b64decode(body)
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except (ValueError, InvalidTag):
            raise ValueError("the sealed value does not open (changed, or another row's)") from None
