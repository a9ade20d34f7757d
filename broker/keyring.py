"""The audit log's keys: the Ed25519 checkpoint signing key and the HMAC keys for sensitive values.

Both live in files outside the database (by default in the data directory, mode 0600): an
attacker who can rewrite the database must not also be able to re-sign it. HMAC keys rotate;
each HMAC'd value names its key id, so old records stay searchable and the chain, which hashes
the stored HMACs, stays verifiable whatever the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from broker.chain import Sealer, Signer, canonical, new_signing_key

HMAC_PREFIX = "hmac-sha256"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AuditKeys:
    def __init__(self, signing_key_file: Path, hmac_keys_file: Path) -> None:
        if not signing_key_file.exists():
            _write_private(signing_key_file, new_signing_key())
        self.signer = Signer(signing_key_file.read_bytes())
        self._hmac_file = hmac_keys_file
        if not hmac_keys_file.exists():
            self._save({"current": None, "keys": {}})
            self.rotate_hmac_key()
        self._load()

    def _load(self) -> None:
        data = json.loads(self._hmac_file.read_text())
        self._keys: dict[str, bytes] = {k: bytes.fromhex(v) for k, v in data["keys"].items()}
        self.current: str = data["current"]

    def _save(self, data: dict[str, Any]) -> None:
        _write_private(self._hmac_file, json.dumps(data, indent=2).encode())

    def rotate_hmac_key(self) -> str:
        """Add a new HMAC key and make it current; older keys are kept for lookups."""
        data = json.loads(self._hmac_file.read_text())
        new_id = f"hk{len(data['keys']) + 1}-{secrets.token_hex(3)}"
        data["keys"][new_id] = secrets.token_bytes(32).hex()
        data["current"] = new_id
        self._save(data)
        self._load()
        return new_id

    def hmac(self, value: Any, key_id: str | None = None) -> str:
        """``hmac-sha256:<key id>:<hex>`` of a value (strings as is, others as canonical JSON)."""
        kid = key_id or self.current
        text = value if isinstance(value, str) else canonical(value)
        digest = hmac.new(self._keys[kid], text.encode(), hashlib.sha256).hexdigest()
        return f"{HMAC_PREFIX}:{kid}:{digest}"

    def hmac_all(self, value: Any) -> list[str]:
        """The value's HMAC under every key, newest first (for searching old records)."""
        return [self.hmac(value, kid) for kid in reversed(list(self._keys))]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sealer(path: Path) -> Sealer:
    """The key that seals deferred calls' arguments at rest, made (mode 0600) on first use.

    Instances that share a database must share this file, as they share the audit keys: a
    call stored by one is run or approved by another.
    """
    if not path.exists():
        made = {"id": f"sk-{secrets.token_hex(4)}", "key": secrets.token_bytes(32).hex()}
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        _write_private(tmp, json.dumps(made).encode())
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        _fsync_dir(path.parent)  # the key's name must survive a power cut with the rows it seals
    data = json.loads(path.read_text())
    return Sealer(str(data["id"]), bytes.fromhex(data["key"]))
