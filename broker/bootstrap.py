"""The composition root: ``build_broker(settings)`` is the only place that builds adapters."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from broker.admin import Admin
from broker.assertions import JwtAssertions, parse_issuers
from broker.audit import SqlAuditLog
from broker.breaker import CircuitBreakers
from broker.budgets import SqlBudgets, recover_reservations
from broker.capabilities import load_manifest_files, parse_manifest
from broker.config import Settings
from broker.db import dispose as db_dispose
from broker.db import make_engine, migrate
from broker.deferred import Deferred
from broker.delegations import SqlDelegationStore
from broker.errors import BrokerError
from broker.guards import LocalGuards
from broker.idempotency import SqlIdempotencyStore
from broker.identity import SqlDirectory
from broker.jobs import SqlCallStore
from broker.keyring import AuditKeys, load_sealer
from broker.metrics import MeteredAuditLog, PrometheusMetrics
from broker.onbehalf import OnBehalf
from broker.policy import CasbinPolicy, parse_policy_csv
from broker.ports import Tracer
from broker.registry import SqlCapabilityRegistry
from broker.retries import RetryPolicy
from broker.rulebook import SqlRulebook
from broker.service import Broker
from broker.telemetry import tracer_from_env
from broker.upstream import HttpUpstream
from broker.vault import VaultSecretStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger("broker.bootstrap")
BOOTSTRAP_AGENT = "admin"
BOOTSTRAP_TOKEN_ID = "tok_bootstrap"  # noqa: S105 (an id, not a secret)


def build_broker(settings: Settings, *, tracer: Tracer | None = None) -> Broker:
    """Build every adapter, migrate the schema, and wire the Broker (start-up work runs later,
    in ``Broker.start``, inside the server's event loop).

    Tracing follows the ``OTEL_*`` environment (telemetry.py) unless a ``tracer`` is given
    (tests: one exporting to memory); a given tracer stays the caller's to shut down."""
    owned = tracer_from_env() if tracer is None else None
    tracer = tracer or owned
    metrics = PrometheusMetrics()  # a registry per broker, served at GET /metrics
    engine = make_engine(settings.resolved_database_url(), busy_timeout=settings.audit_timeout)
    migrate(engine)
    vault = VaultSecretStore(
        url=settings.vault_addr,
        token=settings.vault_token.get_secret_value(),
        timeout=settings.vault_timeout,
        cache_ttl=settings.secret_cache_ttl,
        metrics=metrics,
    )
    budgets = SqlBudgets(engine, instance=settings.audit_chain_id)
    broker = Broker(
        registry=SqlCapabilityRegistry(engine),
        directory=SqlDirectory(engine),
        rulebook=SqlRulebook(engine),
        policy=CasbinPolicy(),
        secrets=vault,
        upstream=HttpUpstream(egress_allow=settings.egress_allow, tracer=tracer),
        guards=LocalGuards(),
        audit=MeteredAuditLog(_audit_log(engine, settings), metrics),
        idempotency=SqlIdempotencyStore(
            engine, owner=settings.audit_chain_id, retention=settings.idempotency_retention
        ),
        budgets=budgets,
        max_response_bytes=settings.max_response_bytes,
        tracer=tracer,
        metrics=metrics,
        breaker=CircuitBreakers(
            failure_threshold=settings.breaker_failure_threshold,
            cool_down=settings.breaker_cool_down,
            half_open_probes=settings.breaker_half_open_probes,
            metrics=metrics,
        ),
        retry=RetryPolicy(
            settings.retry_attempts, settings.retry_backoff, settings.retry_backoff_max
        ),
    )
    issuers = parse_issuers(settings.user_issuers)
    broker.on_behalf = OnBehalf(
        assertions=JwtAssertions(issuers) if issuers else None,
        delegations=SqlDelegationStore(engine),
        credentials=vault,
        policy=broker.policy,
    )
    broker.admin = Admin(broker)
    broker.deferred = Deferred(
        broker,
        SqlCallStore(engine, load_sealer(_seal_key_file(settings))),
        approval_ttl=settings.approval_ttl,
        workers=settings.job_workers,
        runner=settings.audit_chain_id,  # one per instance: it settles only its own jobs
    )
    broker.on_start.append(lambda: _start(broker, settings))
    # Holds a crash or stop left are settled before any worker runs: a requeued job reserves
    # again under the same call id, and its new hold must not be taken for the old one.
    broker.on_start.append(lambda: recover_reservations(budgets, broker.audit))
    broker.on_start.append(broker.deferred.start)  # after the policy is loaded
    broker.on_close.append(lambda: asyncio.to_thread(db_dispose, engine))
    if owned is not None:
        broker.on_close.append(lambda: asyncio.to_thread(owned.close))  # flushes batched spans
    return broker


def _seal_key_file(settings: Settings) -> Path:
    """Beside the audit HMAC keys: where an operator shares those between instances (and
    keeps them past a throwaway data dir), the sealing key is shared and kept with them."""
    keys = settings.audit_hmac_keys_file
    return (keys.parent if keys is not None else settings.data_dir) / "calls-seal-key.json"


def _audit_log(engine: Engine, settings: Settings) -> SqlAuditLog:
    data = settings.data_dir
    keys = AuditKeys(
        settings.audit_signing_key_file or data / "audit-signing-key.pem",
        settings.audit_hmac_keys_file or data / "audit-hmac-keys.json",
    )
    return SqlAuditLog(
        engine,
        keys=keys,
        checkpoint_dir=settings.audit_checkpoint_dir or data / "audit-checkpoints",
        chain_id=settings.audit_chain_id,
        timeout=settings.audit_timeout,
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_interval=settings.audit_checkpoint_interval,
        inline=settings.audit_inline,
    )


async def _start(broker: Broker, settings: Settings) -> None:
    if settings.policies_dir:
        await _apply_policy_file(broker, settings.policies_dir / "policy.csv")
    token = settings.bootstrap_admin_token
    if token is not None and token.get_secret_value():
        await _ensure_admin(broker, token.get_secret_value())
    await broker.admin.reload_policy()
    if settings.capabilities_dir:
        for file, data in load_manifest_files(settings.capabilities_dir):
            try:
                await broker.admin.apply_capability(None, parse_manifest(data))
            except BrokerError as exc:
                raise BrokerError(f"{file}: {exc.message}") from None


async def _apply_policy_file(broker: Broker, path: Path) -> None:
    if not path.exists():
        log.warning("no policy file at %s", path)
        return
    rules, grants = parse_policy_csv(path.read_text(encoding="utf-8"))
    for rule in rules:
        await broker.rulebook.add(rule)
    for grant in grants:
        await broker.directory.grant(grant.subject, grant.role)


async def _ensure_admin(broker: Broker, token: str) -> None:
    directory = broker.directory
    agent = await directory.get_agent(BOOTSTRAP_AGENT)
    if agent is None:
        await directory.create_agent(BOOTSTRAP_AGENT, BOOTSTRAP_AGENT, {})
    elif agent.disabled:
        await directory.set_disabled(BOOTSTRAP_AGENT, False)
    await directory.set_fixed_token(BOOTSTRAP_AGENT, BOOTSTRAP_TOKEN_ID, token)
    await directory.grant(f"agent:{BOOTSTRAP_AGENT}", "role:admin")
