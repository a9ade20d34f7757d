"""The ``broker`` command: server entry points (serve, dev, demo) and a thin admin client.

Each command parses its input, calls one ``BrokerClient`` method (or one server function) and
prints the result. Client commands talk to a running broker through ``BROKER_URL`` and
``BROKER_TOKEN`` (or ``--url``/``--token``). A refusal from the broker is printed as
``error: <code>: <message>`` on stderr with exit status 1, never as a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, get_args

import click
import httpx

from broker import __version__
from broker.client import BrokerClient
from broker.errors import BrokerError
from broker.models import BudgetPeriod

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.service import Broker

DEFAULT_URL = "http://127.0.0.1:8080"
AUDIT_HEADERS = ("seq", "time", "kind", "agent", "capability", "decision", "reason/status")
TAIL_WIDTHS = (5, 24, 20, 14, 22, 8, 0)


# --- output helpers --------------------------------------------------------------------------


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], min_widths: Sequence[int] = ()
) -> str:
    """Left-aligned columns separated by two spaces; None prints as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    mins = [*min_widths, *[0] * len(headers)]
    widths = [max([len(h), mins[i], *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def audit_row(event: dict[str, Any]) -> list[Any]:
    outcome = event.get("reason") or event.get("status")
    if event.get("upstream_status") is not None:
        outcome = f"{outcome or ''} (upstream {event['upstream_status']})".strip()
    when = str(event.get("time") or "")
    return [
        event.get("seq"),
        when[:23] + "Z" if len(when) > 24 else when,
        event.get("kind"),
        event.get("agent_id"),
        event.get("capability"),
        event.get("decision"),
        outcome,
    ]


def audit_table(events: list[dict[str, Any]]) -> str:
    """The readable audit table (also used by ``broker demo``)."""
    return table(AUDIT_HEADERS, [audit_row(e) for e in events])


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def fail(code: str, message: str) -> NoReturn:
    click.echo(f"error: {code}: {message}", err=True)
    raise click.exceptions.Exit(1)


# --- the command group ------------------------------------------------------------------------


class BrokerGroup(click.Group):
    """Turns every BrokerError (and an unreachable broker) into one line on stderr, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokerError as exc:
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            if exc.call_id:
                click.echo(f"call_id: {exc.call_id}", err=True)
            raise click.exceptions.Exit(1) from None
        except httpx.HTTPError as exc:
            where = exc.request.url if isinstance(exc, httpx.RequestError) else "the broker"
            click.echo(f"error: unreachable: cannot talk to {where}: {exc}", err=True)
            raise click.exceptions.Exit(1) from None


@click.group(cls=BrokerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="broker")
def cli() -> None:
    """capbroker: agents call capabilities; the broker holds the credentials."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="broker")


def uses_client(fn: Callable[..., None]) -> Callable[..., None]:
    """Adds --url/--token (BROKER_URL/BROKER_TOKEN) and passes an open BrokerClient first."""

    @click.option(
        "--token",
        envvar="BROKER_TOKEN",
        show_envvar=True,
        help="Broker token (prefer the environment: argv is visible in ps).",
    )
    @click.option(
        "--url",
        envvar="BROKER_URL",
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="Base URL of the broker.",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, url: str, token: str | None, **kwargs: Any) -> None:
        with BrokerClient(url, token or None) as client:
            fn(client, *args, **kwargs)

    return wrapper


# --- server entry points ----------------------------------------------------------------------


@cli.command(short_help="Run the broker (settings from BROKER_*).")
def serve() -> None:
    """Run the broker with settings from BROKER_* environment variables."""
    from broker.api import create_app
    from broker.demo import check_manifests, configure_logging, run_server

    settings, broker = _build_from_env()
    check_manifests(settings.capabilities_dir)  # a bad manifest names its file, not a trace
    configure_logging(settings.log_level)
    app = create_app(broker, max_request_bytes=settings.max_request_bytes)
    run_server(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def _build_from_env() -> tuple[Settings, Broker]:
    from broker.bootstrap import build_broker
    from broker.config import Settings

    try:
        settings = Settings()
        return settings, build_broker(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        fail("invalid_settings", str(exc))


@cli.command(short_help="Run a local dev broker with OpenBao and the examples.")
def dev() -> None:
    """Run a local development broker: embedded OpenBao, SQLite and examples under ./.broker/."""
    from broker.demo import run_dev

    try:
        run_dev(click.echo)
    except RuntimeError as exc:  # DevVaultError, a port in use, a broker that would not start
        fail("dev_failed", str(exc))


@cli.command(short_help="Run a scripted tour of the broker and exit.")
def demo() -> None:
    """Run a scripted tour (upstream, agent, allowed and refused calls, audit) and exit."""
    from broker.demo import run_demo

    try:
        run_demo(click.echo, audit_table)
    except RuntimeError as exc:  # DemoError, DevVaultError, a server that would not start
        fail("demo_failed", str(exc))


# --- capabilities -----------------------------------------------------------------------------


@cli.group()
def capability() -> None:
    """Register, list, show and delete capabilities."""


@capability.command("apply")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A manifest file, or a directory of *.yaml/*.yml/*.json manifests.",
)
@uses_client
def capability_apply(client: BrokerClient, path: Path) -> None:
    """Register (create or update) every manifest found at PATH."""
    from broker.capabilities import load_manifest_files

    failed = 0
    for file, manifest in load_manifest_files(path):
        try:
            if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str):
                raise BrokerError(f"{file}: a manifest is a mapping with a name")
            cap = client.put_capability(manifest)
        except BrokerError as exc:
            failed += 1
            where = "" if str(file) in exc.message else f"{file}: "
            click.echo(f"error: {exc.code}: {where}{exc.message}", err=True)
            continue
        click.echo(f"{cap['name']}  version {cap['version']}  ({file})")
    if failed:
        raise click.exceptions.Exit(1)


@capability.command("list")
@click.option("--all", "all_", is_flag=True, help="Every capability (admin), not only invocable.")
@uses_client
def capability_list(client: BrokerClient, all_: bool) -> None:
    """List the capabilities the token may invoke (or all of them)."""
    caps = client.list_capabilities(all=all_)
    rows = [
        [c.get("name"), c.get("version"), c.get("effect"), c.get("approval"), c.get("description")]
        for c in caps
    ]
    click.echo(table(("name", "version", "effect", "approval", "description"), rows))


@capability.command("get")
@click.argument("name")
@uses_client
def capability_get(client: BrokerClient, name: str) -> None:
    """Show one capability (the full manifest for an admin)."""
    echo_json(client.get_capability(name))


@capability.command("delete")
@click.argument("name")
@uses_client
def capability_delete(client: BrokerClient, name: str) -> None:
    """Delete a capability."""
    client.delete_capability(name)
    click.echo(f"deleted {name}")


# --- agents -----------------------------------------------------------------------------------


def _attributes(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value")
        out[key] = value
    return out


def _show_token(data: dict[str, Any], quiet: bool) -> None:
    if quiet:
        click.echo(data["token"])
        return
    click.echo(f"token_id: {data['token_id']}")
    click.echo(f"token:    {data['token']}")
    click.echo(
        "warning: the token is shown only this once (the broker keeps only its hash); store it now",
        err=True,
    )


@cli.group()
def agent() -> None:
    """Create agents; issue and revoke tokens; disable."""


@agent.command("create")
@click.argument("name")
@click.option("--role", "roles", multiple=True, help="Grant this role (repeatable).")
@click.option(
    "--attr",
    "attributes",
    multiple=True,
    callback=_attributes,
    help="An attribute key=value (repeatable).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the token (for scripts).")
@uses_client
def agent_create(
    client: BrokerClient, name: str, roles: tuple[str, ...], attributes: dict[str, str], quiet: bool
) -> None:
    """Create an agent; prints its token once."""
    created = client.create_agent(name, list(roles), attributes)
    if not quiet:
        click.echo(f"agent:    {created['id']}")
        click.echo(f"roles:    {_cell(created.get('roles'))}")
    _show_token(created, quiet)


@agent.command("list")
@uses_client
def agent_list(client: BrokerClient) -> None:
    """List agents."""
    rows = [
        [
            a["id"],
            a.get("roles"),
            "yes" if a.get("disabled") else "no",
            sum(1 for t in a.get("tokens", []) if not t.get("revoked_at")),
            a.get("created_at"),
        ]
        for a in client.list_agents()
    ]
    click.echo(table(("id", "roles", "disabled", "live tokens", "created"), rows))


@agent.command("get")
@click.argument("agent_id")
@uses_client
def agent_get(client: BrokerClient, agent_id: str) -> None:
    """Show one agent and its tokens."""
    a = client.get_agent(agent_id)
    attrs = ", ".join(f"{k}={v}" for k, v in a.get("attributes", {}).items())
    click.echo(
        f"id:         {a['id']}\nname:       {a['name']}\nroles:      {_cell(a['roles'])}"
        f"\nattributes: {attrs or '-'}\ndisabled:   {a['disabled']}"
        f"\ncreated:    {a['created_at']}\n"
    )
    rows = [[t["id"], t.get("created_at"), t.get("revoked_at")] for t in a.get("tokens", [])]
    click.echo(table(("token", "created", "revoked"), rows))


@agent.command("token")
@click.argument("agent_id")
@click.option("-q", "--quiet", is_flag=True, help="Print only the token (for scripts).")
@uses_client
def agent_token(client: BrokerClient, agent_id: str, quiet: bool) -> None:
    """Issue a new token for an agent; prints it once."""
    _show_token(client.issue_token(agent_id), quiet)


@agent.command("revoke-token")
@click.argument("agent_id")
@click.argument("token_id")
@uses_client
def agent_revoke_token(client: BrokerClient, agent_id: str, token_id: str) -> None:
    """Revoke one token of an agent."""
    client.revoke_token(agent_id, token_id)
    click.echo(f"revoked {token_id} of {agent_id}")


@agent.command("disable")
@click.argument("agent_id")
@uses_client
def agent_disable(client: BrokerClient, agent_id: str) -> None:
    """Disable an agent (its tokens stop working)."""
    client.disable_agent(agent_id)
    click.echo(f"disabled {agent_id}; its tokens are revoked")


# --- roles ------------------------------------------------------------------------------------


@cli.group()
def role() -> None:
    """Grant, revoke and list roles."""


@role.command("grant")
@click.argument("agent_id")
@click.argument("role_name")
@uses_client
def role_grant(client: BrokerClient, agent_id: str, role_name: str) -> None:
    """Grant ROLE_NAME to an agent."""
    a = client.grant_role(agent_id, role_name)
    click.echo(f"{a['id']} now holds: {_cell(a['roles'])}")


@role.command("revoke")
@click.argument("agent_id")
@click.argument("role_name")
@uses_client
def role_revoke(client: BrokerClient, agent_id: str, role_name: str) -> None:
    """Revoke ROLE_NAME from an agent."""
    a = client.revoke_role(agent_id, role_name)
    click.echo(f"{a['id']} now holds: {_cell(a['roles'])}")


@role.command("list")
@uses_client
def role_list(client: BrokerClient) -> None:
    """List roles, their members and their rules."""
    rows = [
        [
            r["name"],
            r.get("members"),
            "; ".join(f"{p['effect']} {p['action']} {p['object']}" for p in r.get("rules", [])),
        ]
        for r in client.list_roles()
    ]
    click.echo(table(("role", "members", "rules"), rows))


# --- budgets ----------------------------------------------------------------------------------

BUDGET_HEADERS = ("scope", "subject", "limit", "period", "spent", "reserved", "period_start")


def _budget_target(agent: str | None, task: str | None) -> dict[str, str | None]:
    if (agent is None) == (task is None):
        fail("invalid_request", "give exactly one of --agent or --task")
    return {"agent": agent, "task": task}


def _print_budget(budget: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(budget)
    else:
        click.echo(table(BUDGET_HEADERS, [[budget.get(h) for h in BUDGET_HEADERS]]))


@cli.group()
def budget() -> None:
    """Spend limits per agent or task (X-Broker-Task) and UTC period; spend so far."""


@budget.command("set")
@click.option("--agent", help="Agent id.")
@click.option("--task", help="Task id (X-Broker-Task).")
@click.option("--limit", required=True, type=float, help="In the capabilities' cost unit.")
@click.option("--period", required=True, type=click.Choice(get_args(BudgetPeriod)))
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON.")
@uses_client
def budget_set(
    client: BrokerClient, agent: str | None, task: str | None, limit: float, period: str,
    as_json: bool,
) -> None:  # fmt: skip
    """Set (or replace) the budget of an agent or a task; spend so far is kept."""
    _print_budget(client.set_budget(limit, period, **_budget_target(agent, task)), as_json)


@budget.command("get")
@click.option("--agent", help="Agent id.")
@click.option("--task", help="Task id (X-Broker-Task).")
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON.")
@uses_client
def budget_get(client: BrokerClient, agent: str | None, task: str | None, as_json: bool) -> None:
    """Show a budget and what was spent and reserved in the current period."""
    _print_budget(client.get_budget(**_budget_target(agent, task)), as_json)


@budget.command("delete")
@click.option("--agent", help="Agent id.")
@click.option("--task", help="Task id (X-Broker-Task).")
@uses_client
def budget_delete(client: BrokerClient, agent: str | None, task: str | None) -> None:
    """Remove a budget (calls are no longer limited by it)."""
    client.delete_budget(**_budget_target(agent, task))
    click.echo("budget deleted")


# --- policies ---------------------------------------------------------------------------------


@cli.group()
def policy() -> None:
    """Add, list, delete and check policy rules."""


@policy.command("add")
@click.argument("subject")
@click.argument("object_")
@click.option("--action", default="invoke", show_default=True)
@click.option("--effect", type=click.Choice(["allow", "deny"]), default="allow", show_default=True)
@click.option("--condition", help="Narrow the rule, e.g. 'args.owner == \"acme\"'.")
@click.option("--allow-wildcard", is_flag=True, help="Accept an invoke allow on every capability.")
@uses_client
def policy_add(
    client: BrokerClient, subject: str, object_: str, action: str, effect: str,
    condition: str | None, allow_wildcard: bool,
) -> None:  # fmt: skip
    """Add a rule: SUBJECT (agent:ID or role:NAME) may (not) ACTION on OBJECT (a glob)."""
    rule = client.add_policy(subject, object_, action, effect, condition,
                             allow_wildcard=allow_wildcard)  # fmt: skip
    cond = f"  if {rule['condition']}" if rule.get("condition") else ""
    click.echo(
        f"{rule['id']}  {rule['subject']}  {rule['object']}  {rule['action']}  {rule['effect']}"
        f"{cond}"
    )
    for warning in rule.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


@policy.command("list")
@uses_client
def policy_list(client: BrokerClient) -> None:
    """List every rule (built-in ones included)."""
    rows = [
        [
            p["id"],
            p["subject"],
            p["object"],
            p["action"],
            p["effect"],
            p.get("condition"),
            p.get("source"),
        ]
        for p in client.list_policies()
    ]
    click.echo(table(("id", "subject", "object", "action", "effect", "condition", "source"), rows))


@policy.command("delete")
@click.argument("rule_id")
@uses_client
def policy_delete(client: BrokerClient, rule_id: str) -> None:
    """Delete a rule by id."""
    client.delete_policy(rule_id)
    click.echo(f"deleted {rule_id}")


@policy.command("check")
@click.argument("agent_id")
@click.argument("capability_name")
@click.option("--action", default="invoke", show_default=True)
@click.option(
    "--args",
    "args",
    default=None,
    callback=lambda c, p, v: v and _json_object(c, p, v),
    help="The call's arguments as a JSON object.",
)
@click.option(
    "--user", help="The agent acting for this user: checks both sides and the delegation."
)
@uses_client
def policy_check(
    client: BrokerClient, agent_id: str, capability_name: str, action: str,
    args: dict[str, Any] | None, user: str | None,
) -> None:  # fmt: skip
    """Would AGENT_ID (an agent id, or a subject like role:reader) be allowed, and why?"""
    who = {"subject": agent_id} if ":" in agent_id else {"agent": agent_id}
    d = client.check_policy(capability_name, action=action, args=args, user=user, **who)
    verdict = "allowed" if d["allowed"] else "denied"
    if d.get("denied_by"):
        verdict += f" by the {d['denied_by']} side"
    reason = f"  ({d['reason']})" if d.get("reason") else ""
    click.echo(
        f"{verdict}: {agent_id} {action} {capability_name}  rule: {d.get('rule') or '-'}{reason}"
    )
    rows = [[m["id"], m["subject"], m["object"], m["effect"], m.get("condition"),
             _met(m.get("condition_met")), "<- decided" if m.get("decided") else ""]
            for m in d.get("matched", [])]  # fmt: skip
    if rows:
        click.echo(table(("rule", "subject", "object", "effect", "condition", "met", ""), rows))


def _met(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _policy_text(path: Path) -> str:
    """policy.csv itself, or <dir>/policy.csv."""
    file = path / "policy.csv" if path.is_dir() else path
    if not file.is_file():
        fail("invalid_request", f"no policy file at {file}")
    return file.read_text(encoding="utf-8")


@policy.command("apply")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="policy.csv, or a directory holding it.",
)
@click.option("--dry-run", is_flag=True, help="Show the changes only.")
@click.option("--allow-wildcard", is_flag=True, help="Accept invoke allows on every capability.")
@uses_client
def policy_apply(client: BrokerClient, path: Path, dry_run: bool, allow_wildcard: bool) -> None:
    """Make the stored rules and role hierarchy equal to the file, showing the diff."""
    diff = client.apply_policy(_policy_text(path), dry_run=dry_run, allow_wildcard=allow_wildcard)
    for rule in diff["add"]:
        click.echo(f"+ {_rule_text(rule)}")
    for rule in diff["remove"]:
        click.echo(f"- {_rule_text(rule)}")
    for g in diff["grant"]:
        click.echo(f"+ g {g['subject']} -> {g['role']}")
    for g in diff["revoke"]:
        click.echo(f"- g {g['subject']} -> {g['role']}")
    for g in diff["ignored_agent_grants"]:
        click.echo(f"note: agent grant {g['subject']} -> {g['role']} is left to `role grant`")
    for warning in diff["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    changes = sum(len(diff[k]) for k in ("add", "remove", "grant", "revoke"))
    verb = "would change" if dry_run else "changed"
    click.echo(f"{verb} {changes} entries" if changes else "no changes: the policy matches")


def _rule_text(rule: dict[str, Any]) -> str:
    cond = f" if {rule['condition']}" if rule.get("condition") else ""
    return (f"{rule['id']}  {rule['subject']} {rule['effect']} {rule['action']} "
            f"{rule['object']}{cond}")  # fmt: skip


@policy.command("replay")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The proposed policy.csv, or a directory holding it.",
)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="How far back: 7d, 12h, 30m, or an ISO 8601 UTC time.",
)
@click.option("--until", default=None, help="ISO 8601 UTC time (exclusive).")
@uses_client
def policy_replay(client: BrokerClient, path: Path, since: str, until: str | None) -> None:
    """List the recorded calls whose decision the proposed policy would flip."""
    out = client.replay_policy(_policy_text(path), since=_since(since), until=until)
    rows = [
        [
            f["time"],
            f["agent_id"],
            f["capability"],
            f"{f['before']} -> {f['after']}",
            f["rule"],
            f["reason"],
            "yes" if f["uncertain"] else "",
        ]
        for f in out["flips"]
    ]
    click.echo(table(("time", "agent", "capability", "flip", "rule", "reason", "uncertain"),
                     rows))  # fmt: skip
    click.echo(f"{len(out['flips'])} of {out['checked']} recorded decisions would flip")


def _since(text: str) -> str:
    from datetime import UTC, datetime, timedelta

    units = {"d": "days", "h": "hours", "m": "minutes"}
    if text[:-1].isdigit() and text[-1:] in units:
        start = datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
        return start.isoformat(timespec="microseconds")[:26] + "Z"
    return text


# --- audit ------------------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Query and follow the audit log."""


def fetch_events(client: BrokerClient, limit: int, **filters: Any) -> list[dict[str, Any]]:
    """Up to ``limit`` events, following next_cursor across pages."""
    events: list[dict[str, Any]] = []
    cursor = None
    while len(events) < limit:
        page = client.audit(limit=min(limit - len(events), 1000), cursor=cursor, **filters)
        events.extend(page["events"])
        cursor = page.get("next_cursor")
        if not cursor or not page["events"]:
            break
    return events


@audit.command("query")
@click.option("--agent", help="Agent id.")
@click.option("--capability")
@click.option("--kind", help="e.g. call.finished, call.denied, admin.role.grant")
@click.option("--decision", type=click.Choice(["allow", "deny"]))
@click.option("--since", help="ISO 8601 UTC time, e.g. 2025-01-31T00:00:00Z")
@click.option("--until", help="ISO 8601 UTC time (exclusive)")
@click.option("--call-id")
@click.option("--task", help="Task id (X-Broker-Task).")
@click.option("--trace-id")
@click.option("--user", help="The user id the calls acted for.")
@click.option("--contains", help="Text in the stored arguments/detail, e.g. an HMAC from `hash`.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
@uses_client
def audit_query(client: BrokerClient, limit: int, as_json: bool, **filters: Any) -> None:
    """Query the audit log, oldest first."""
    events = fetch_events(client, limit, **filters)
    if as_json:
        echo_json(events)
    else:
        click.echo(audit_table(events))


def _after(events: list[dict[str, Any]], page: dict[str, Any], cursor: str | None) -> str | None:
    # The API hands out a cursor only while more events wait; to resume after the last event
    # seen, use that event's id (its position in the log, which is what cursors carry).
    if page.get("next_cursor"):
        return str(page["next_cursor"])
    return str(events[-1]["id"]) if events else cursor


def _latest(client: BrokerClient, lines: int) -> tuple[list[dict[str, Any]], str | None]:
    """The last ``lines`` events and the cursor after them (walks the log once)."""
    kept: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = client.audit(limit=1000, cursor=cursor)
        kept = [*kept, *page["events"]][-lines:] if lines else []
        cursor = _after(page["events"], page, cursor)
        if not page.get("next_cursor"):
            return kept, cursor


@audit.command("tail")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("-n", "--lines", default=20, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between polls with --follow.",
)
@uses_client
def audit_tail(client: BrokerClient, follow: bool, lines: int, interval: float) -> None:
    """Print the latest events; with -f, poll for new ones."""
    events, cursor = _latest(client, lines)
    click.echo(table(AUDIT_HEADERS, [audit_row(e) for e in events], TAIL_WIDTHS))
    try:
        while follow:
            time.sleep(interval)
            page = client.audit(limit=1000, cursor=cursor)
            cursor = _after(page["events"], page, cursor)
            for event in page["events"]:
                line = table(AUDIT_HEADERS, [audit_row(event)], TAIL_WIDTHS).splitlines()[1]
                click.echo(line)
    except KeyboardInterrupt:
        return


@audit.command("verify")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify an export offline (no broker needed).",
)
@click.option(
    "--public-key",
    "keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trust only this PEM public key for checkpoints (with --file; repeatable).",
)
@click.option("--token", envvar="BROKER_TOKEN", help="Broker token (without --file).")
@click.option("--url", envvar="BROKER_URL", default=DEFAULT_URL, show_default=True)
def audit_verify(path: Path | None, keys: tuple[Path, ...], url: str, token: str | None) -> None:
    """Check the hash chain and the signed checkpoints; exit 1 if anything is wrong."""
    if path is None:
        with BrokerClient(url, token or None) as client:
            _print_verify(client.verify_audit())
        return
    from broker.chain import key_id, verify_export

    trusted = {key_id(k.read_text()): k.read_text() for k in keys} if keys else None
    with path.open(encoding="utf-8") as f:
        report = verify_export(iter(f), trusted)
    if trusted is None:
        click.echo(
            "note: trusting the public key inside the file (pin one with --public-key)", err=True
        )
    _print_verify(report)


def _print_verify(report: dict[str, Any]) -> None:
    rows = [
        [
            c["chain_id"],
            "ok" if c["ok"] else "BAD",
            c["checked"],
            c["checkpoints"],
            c["first_bad_seq"],
            c["problem"],
        ]
        for c in report["chains"]
    ]
    click.echo(
        table(("chain", "result", "records", "checkpoints", "first bad seq", "problem"), rows)
    )
    if not report["ok"]:
        fail(
            "audit_tampered",
            f"the audit log does not verify (first bad seq {report['first_bad_seq']})",
        )
    click.echo(f"ok: {report['checked']} records verified")


@audit.command("export")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (default: standard output).",
)
@uses_client
def audit_export(client: BrokerClient, output: Path | None) -> None:
    """Write the audit log with its checkpoints as JSON Lines (for `verify --file`)."""
    if output is None:
        for line in client.export_audit():
            click.echo(line)
        return
    with output.open("w", encoding="utf-8") as f:
        count = sum(1 for line in client.export_audit() if f.write(line + "\n"))
    click.echo(f"wrote {count} lines to {output}")


@audit.command("hash")
@click.argument("value")
@uses_client
def audit_hash(client: BrokerClient, value: str) -> None:
    """Print VALUE's HMAC under every audit key: search for it with `query --contains`."""
    for h in client.hash_value(value):
        click.echo(h)


@audit.command("rotate-hmac-key")
@uses_client
def audit_rotate(client: BrokerClient) -> None:
    """Start HMAC'ing sensitive values with a new key (old records keep their key id)."""
    click.echo(client.rotate_hmac_key())


# --- calls ------------------------------------------------------------------------------------


def _json_object(_ctx: click.Context, _param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"message": "hi"}\'')
    return parsed


@cli.group()
def approvals() -> None:
    """Decide calls that wait for a human approval (action approvals.decide)."""


@approvals.command("list")
@click.option("--status", default="pending", show_default=True,
              help="pending | approved | denied | expired | cancelled | all")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@uses_client
def approvals_list(client: BrokerClient, status: str, as_json: bool) -> None:
    """List approvals with the arguments they are bound to."""
    items = client.list_approvals(None if status == "all" else status)
    if as_json:
        echo_json(items)
        return
    rows = [
        [a["id"], a["status"], a["agent_id"], a["capability"], json.dumps(a["args"]),
         a["expires_at"]]
        for a in items
    ]  # fmt: skip
    click.echo(table(("id", "status", "agent", "capability", "args", "expires"), rows))


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--reason", help="Recorded in the audit log with your identity.")
@uses_client
def approvals_approve(client: BrokerClient, approval_id: str, reason: str | None) -> None:
    """Approve: the stored call runs once (see `broker call get CALL_ID`)."""
    echo_json(client.approve(approval_id, reason))


@approvals.command("deny")
@click.argument("approval_id")
@click.option("--reason", help="Recorded in the audit log with your identity.")
@uses_client
def approvals_deny(client: BrokerClient, approval_id: str, reason: str | None) -> None:
    """Deny: the call ends without running; its agent sees it denied."""
    echo_json(client.deny(approval_id, reason))


@cli.group()
def call() -> None:
    """Calls that outlive their request (jobs, approval-bound calls)."""


@call.command("get")
@click.argument("call_id")
@uses_client
def call_get(client: BrokerClient, call_id: str) -> None:
    """State of the call and, once ended, its answer (as its agent or an auditor)."""
    echo_json(client.get_call(call_id))


@cli.command(short_help="Invoke a capability (as the token's agent).")
@click.argument("capability_name")
@click.option(
    "--args",
    "args",
    default="{}",
    callback=_json_object,
    show_default=True,
    help="The arguments as a JSON object.",
)
@click.option("--idempotency-key", help="Replays return the first result instead of re-running.")
@click.option("--task", help="Task id (X-Broker-Task) for budgets and the audit log.")
@click.option("--async", "respond_async", is_flag=True,
              help="Run as a durable job (Prefer: respond-async); prints the call id.")  # fmt: skip
@click.option(
    "--user-assertion",
    envvar="BROKER_USER_ASSERTION",
    help="Act for the user this JWT names (X-Broker-User-Assertion).",
)
@uses_client
def invoke(
    client: BrokerClient,
    capability_name: str,
    args: dict[str, Any],
    idempotency_key: str | None,
    task: str | None,
    respond_async: bool,
    user_assertion: str | None,
) -> None:
    """Invoke a capability as the token's agent; prints the broker's answer."""
    echo_json(
        client.invoke(
            capability_name,
            args,
            idempotency_key=idempotency_key,
            task=task,
            respond_async=respond_async,
            user_assertion=user_assertion,
        )
    )


# --- users: credentials, delegations, roles ------------------------------------------------


@cli.group()
def user() -> None:
    """Per-user credentials, delegations to agents, and user roles."""


@user.group("credential")
def user_credential() -> None:
    """Write, inspect (metadata only) and delete a user's credentials."""


@user_credential.command("set")
@click.argument("user_id")
@click.argument("name")
@click.option("--key", default="token", show_default=True, help="The field the value goes in.")
@click.option(
    "--data-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSON object of fields instead (the value is then not read from stdin).",
)
@uses_client
def user_credential_set(
    client: BrokerClient, user_id: str, name: str, key: str, data_file: Path | None
) -> None:
    """Write (or replace) credential NAME of USER_ID. The value is read from stdin (or a
    hidden prompt), never from argv; it cannot be read back through the broker."""
    if data_file is not None:
        data = json.loads(data_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            fail("invalid_request", f"{data_file} must hold a JSON object of fields")
    elif sys.stdin.isatty():
        data = {key: click.prompt(key, hide_input=True)}
    else:
        data = {key: sys.stdin.read().strip()}
    meta = client.put_user_credential(user_id, name, data)
    click.echo(f"{user_id}/{name}: version {meta['version']} ({meta['updated']})")


@user_credential.command("show")
@click.argument("user_id")
@click.argument("name")
@uses_client
def user_credential_show(client: BrokerClient, user_id: str, name: str) -> None:
    """Metadata of credential NAME of USER_ID: exists, version, updated."""
    echo_json(client.get_user_credential(user_id, name))


@user_credential.command("delete")
@click.argument("user_id")
@click.argument("name")
@uses_client
def user_credential_delete(client: BrokerClient, user_id: str, name: str) -> None:
    """Delete credential NAME of USER_ID (every version)."""
    client.delete_user_credential(user_id, name)
    click.echo(f"deleted {user_id}/{name}")


@user.command("delegate")
@click.argument("user_id")
@click.argument("agent_id")
@click.option(
    "--capability", "capabilities", multiple=True, required=True,
    help="A capability name or glob (repeat for more).",
)  # fmt: skip
@click.option("--expires", required=True, help="ISO 8601 with a zone, e.g. 2026-12-31T00:00:00Z")
@uses_client
def user_delegate(
    client: BrokerClient, user_id: str, agent_id: str, capabilities: tuple[str, ...], expires: str
) -> None:
    """Let AGENT_ID act for USER_ID on these capabilities until --expires (replaces any)."""
    d = client.delegate(user_id, agent_id, list(capabilities), expires)
    click.echo(f"{user_id} -> {agent_id}: {_cell(d['capabilities'])} until {d['expires_at']}")


@user.command("revoke")
@click.argument("user_id")
@click.argument("agent_id")
@uses_client
def user_revoke(client: BrokerClient, user_id: str, agent_id: str) -> None:
    """Revoke USER_ID's delegation to AGENT_ID (effective from the next call)."""
    client.revoke_delegation(user_id, agent_id)
    click.echo(f"revoked {user_id} -> {agent_id}")


@user.command("delegations")
@click.argument("user_id")
@uses_client
def user_delegations(client: BrokerClient, user_id: str) -> None:
    """List USER_ID's delegations."""
    rows = [
        [d["agent_id"], _cell(d["capabilities"]), d["expires_at"], "yes" if d["expired"] else ""]
        for d in client.list_delegations(user_id)
    ]
    click.echo(table(("agent", "capabilities", "expires_at", "expired"), rows))


@user.command("grant")
@click.argument("user_id")
@click.argument("role_name")
@uses_client
def user_grant(client: BrokerClient, user_id: str, role_name: str) -> None:
    """Grant ROLE_NAME to user USER_ID (policy subject user:USER_ID)."""
    out = client.grant_user_role(user_id, role_name)
    click.echo(f"user:{out['id']} now holds: {_cell(out['roles'])}")


@user.command("ungrant")
@click.argument("user_id")
@click.argument("role_name")
@uses_client
def user_ungrant(client: BrokerClient, user_id: str, role_name: str) -> None:
    """Revoke ROLE_NAME from user USER_ID."""
    out = client.revoke_user_role(user_id, role_name)
    click.echo(f"user:{out['id']} now holds: {_cell(out['roles'])}")


if __name__ == "__main__":
    main()
