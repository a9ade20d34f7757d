"""Settings: the one configuration object, read from ``BROKER_*`` environment variables.

Built in an entry point (``broker serve``, ``broker dev``, tests) and passed down; never
built at import time.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path(".broker")
    database_url: str | None = None  # default: sqlite file broker.db in data_dir

    vault_addr: str = "http://127.0.0.1:8200"
    vault_token: SecretStr = SecretStr("")
    vault_timeout: float = Field(default=5.0, gt=0)
    secret_cache_ttl: float = Field(default=30.0, ge=0)

    bootstrap_admin_token: SecretStr | None = None
    egress_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    capabilities_dir: Path | None = None
    policies_dir: Path | None = None
    user_issuers: Annotated[list[dict[str, Any]], NoDecode] = Field(default_factory=list)

    max_request_bytes: int = Field(default=1_048_576, gt=0)
    max_response_bytes: int = Field(default=10_485_760, gt=0)
    audit_timeout: float = Field(default=5.0, gt=0)
    audit_chain_id: str = Field(
        default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]{1,64}$"
    )
    audit_signing_key_file: Path | None = None  # default: <data_dir>/audit-signing-key.pem
    audit_hmac_keys_file: Path | None = None  # default: <data_dir>/audit-hmac-keys.json
    audit_checkpoint_dir: Path | None = None  # default: <data_dir>/audit-checkpoints
    audit_checkpoint_every: int = Field(default=1000, gt=0)  # records
    audit_checkpoint_interval: float = Field(default=10.0, gt=0)  # seconds
    # SQLite: a call alone in flight writes its own audit records (audit.py); off where an
    # fsync may hang (a network file system), so that only the writer thread ever waits on one.
    audit_inline: bool = True
    idempotency_retention: float = Field(default=86400.0, gt=0)  # seconds a key is remembered
    approval_ttl: float = Field(default=3600.0, gt=0)  # seconds before a pending approval expires
    # Circuit breaker per upstream host:port (breaker.py) and retries of idempotent capabilities
    # (retries.py).
    breaker_failure_threshold: int = Field(default=5, ge=1)  # consecutive failures that open it
    breaker_cool_down: float = Field(default=30.0, gt=0)  # seconds open before probes go through
    breaker_half_open_probes: int = Field(default=1, ge=1)  # probe calls at once when half-open
    retry_attempts: int = Field(default=3, ge=1)  # attempts in all for idempotent capabilities
    retry_backoff: float = Field(default=0.2, ge=0)  # seconds before the 2nd attempt, then doubled
    retry_backoff_max: float = Field(default=2.0, ge=0)
    # Asynchronous calls run at once per instance; 0: this instance queues jobs but runs none.
    job_workers: int = Field(default=4, ge=0)
    log_level: str = "info"

    @field_validator("egress_allow", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> list[str]:
        items = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v or [])
        items = [s for s in items if s]
        for cidr in items:
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError on a typo
        return items

    @field_validator("user_issuers", mode="before")
    @classmethod
    def _issuers(cls, v: Any) -> list[dict[str, Any]]:
        parsed = json.loads(v) if isinstance(v, str) and v.strip() else (v or [])
        if not isinstance(parsed, list) or not all(isinstance(i, dict) for i in parsed):
            raise ValueError("BROKER_USER_ISSUERS must be a JSON list of objects")
        return parsed

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'broker.db').resolve()}"
