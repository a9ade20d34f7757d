"""The broker against three references, under closed-loop keep-alive load. Numbers, not a test.

Starts, on loopback, each in its own process: a minimal upstream (uvicorn), OpenBao (dev, with a
counting relay in front of it), the broker (`broker serve`, SQLite, every
audit record durable before the reply), a bare pass-through proxy (a plain ASGI app on
uvicorn forwarding with aiohttp and adding the same Authorization header, no broker logic), and
a durable proxy: the bare proxy plus the two records each broker call makes durable (one before
the upstream is called, one before the answer goes back) in the broker's own audit table, on
the same disk, committed the way the broker commits them (Ledger). It is the floor under a
broker that keeps its audit durable before the reply in SQLite (WAL, synchronous=FULL): two
commits a call that nothing else in the pipeline can overlap.

Then drives, alternating the targets round by round: the upstream directly, the two proxies and
the broker, at concurrency 1 and 16, with a closed-loop load generator (each worker sends its next
request when the last answer arrived, over one keep-alive connection). It prints p50/p99 latency
and calls/s per target, the added latency over the direct call and the broker's throughput
relative to each proxy, and how many Vault requests the broker made in the steady state (and
how many of them were background refreshes no call waited for). With
--micro it also runs bench/policy.py, audit.py and shape.py (decision, audit and answer-shaping
micro-benchmarks).
Results go to a JSON file as well.

    python bench/gateway.py [--seconds 2] [--rounds 3] [--json bench-results.json] [--micro]
                            [--answer-items N] [--cost C]

The upstream answers 27 bytes unless --answer-items N makes it answer N issue-like JSON objects
(~0.9 KB each): the proxy passes an answer through, the broker decodes and redacts it. --cost C
gives the capability a cost (with no budget set), the path of most paid calls.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
SECRET = "bench-secret-value"
BODY = b'{"ok":true,"items":[1,2,3]}'


# --- the upstream and the reference servers (run in child processes) ------------------------


def upstream_app(body: bytes) -> Callable[..., Awaitable[None]]:
    """The minimal upstream: the same JSON answer, whatever the request."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await _drain(receive)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def answer_body(items: int) -> bytes:
    """27 bytes, or a JSON array of ``items`` issue-like objects (~0.9 KB each, bench/shape.py)."""
    if items <= 0:
        return BODY
    import random

    from shape import item  # beside this file, so on sys.path when it runs as a script

    rng = random.Random(1)
    return json.dumps([item(i, rng) for i in range(items)]).encode()


def proxy_app(upstream: str) -> Callable[..., Awaitable[None]]:
    """The bare pass-through proxy: forward with aiohttp (keep-alive pool), add the credential."""
    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, state)
            return
        await _drain(receive)
        session = state.get("session") or state.setdefault("session", aiohttp.ClientSession())
        async with session.get(upstream, headers={"Authorization": f"Bearer {SECRET}"}) as resp:
            body = await resp.read()
            status = resp.status
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Ledger:
    """The floor under the broker's audit: two durable records a call, nothing else.

    Rows go into the broker's own audit table (its migrations, so the same indexes) in a
    SQLite file with WAL and synchronous=FULL, as the broker's do, with a hash chain. Like the
    broker, a lone call commits its record itself on the event loop's thread and concurrent
    ones are group-committed by one writer thread, in one multi-row INSERT. Every
    CHECKPOINT_EVERY records the writer checkpoints the WAL after it has answered its batch, so
    no call ever waits for a checkpoint (the broker's calls can: its writer's connection keeps
    SQLite's autocheckpoint), which keeps this a floor.
    """

    CHECKPOINT_EVERY = 100
    _COLUMNS = (
        "chain_id, seq, event_id, call_id, time, kind, agent_id, capability, data, prev_hash, hash"
    )

    def __init__(self, path: Path) -> None:
        import sqlalchemy as sa

        from broker import db

        engine = sa.create_engine(f"sqlite:///{path}")
        db.migrate(engine)
        engine.dispose()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[tuple[Any, ...], asyncio.Future[None]] | str]
        self._queue = queue.SimpleQueue()
        self._seq, self._head, self._checkpointed = 0, "0" * 64, 0
        self.in_flight = 0
        self._thread = threading.Thread(target=self._writer, daemon=True)
        self._thread.start()

    async def write(self, kind: str, call_id: str) -> None:
        data = json.dumps({"args": {}, "secrets": [], "detail": {"kind": kind}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        row = (call_id, now, kind, "agent", "bench.echo", data)
        if self.in_flight == 1 and self._lock.acquire(blocking=False):
            try:
                self._commit([row])
            finally:
                self._lock.release()
            if self._seq - self._checkpointed >= self.CHECKPOINT_EVERY:
                self._queue.put("checkpoint")  # by the writer, off this call's path
            return
        future = asyncio.get_running_loop().create_future()
        self._queue.put((row, future))
        await future

    def close(self) -> None:
        self._queue.put("stop")
        self._thread.join(10)
        self._db.close()

    def _writer(self) -> None:
        while True:
            got = [self._queue.get()]
            while not self._queue.empty():
                got.append(self._queue.get())
            items = [item for item in got if not isinstance(item, str)]
            if items:
                self._answer(items)
            if self._seq - self._checkpointed >= self.CHECKPOINT_EVERY:
                with self._lock:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self._checkpointed = self._seq
            if "stop" in got:
                return

    def _answer(self, items: list[tuple[tuple[Any, ...], asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            with self._lock:
                self._commit([row for row, _ in items])
        except Exception as exc:  # every waiting call fails with it, none hangs
            error = exc
        for _, future in items:
            future.get_loop().call_soon_threadsafe(_settle, future, error)

    def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        seq, head, stored = self._seq, self._head, []
        for row in rows:
            seq += 1
            prev, head = head, hashlib.sha256(repr((row, head)).encode()).hexdigest()
            stored.append(("bench", seq, secrets.token_hex(16), *row, prev, head))
        marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(stored))
        self._db.execute("BEGIN")
        try:
            self._db.execute(
                f"INSERT INTO audit_events ({self._COLUMNS}) VALUES {marks}",
                [value for row in stored for value in row],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._seq, self._head = seq, head  # the chain moves on only once the rows are stored


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the call went away meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def durable_proxy_app(upstream: str, ledger: Ledger) -> Callable[..., Awaitable[None]]:
    """The bare proxy plus the two records the broker must make durable: one before the
    upstream is called, one before the answer goes back."""
    forward = proxy_app(upstream)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await forward(scope, receive, send)
            return
        call_id = secrets.token_hex(10)
        ledger.in_flight += 1
        try:
            await ledger.write("call.started", call_id)

            async def finish_then_send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    await ledger.write("call.finished", call_id)
                await send(message)

            await forward(scope, receive, finish_then_send)
        finally:
            ledger.in_flight -= 1

    return app


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _lifespan(receive: Any, send: Any, state: dict[str, Any] | None = None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if state and "session" in state:
                await state["session"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(kind: str, port: int, upstream: str) -> None:
    import uvicorn

    if kind == "upstream":
        app = upstream_app(answer_body(int(os.environ.get("BENCH_ANSWER_ITEMS", "0"))))
    elif kind == "durable":
        app = durable_proxy_app(upstream, Ledger(Path(os.environ["BENCH_LEDGER"])))
    else:
        app = proxy_app(upstream)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    from broker.devserver import free_port as pick

    return pick()


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class VaultCounter:
    """A loopback TCP relay in front of OpenBao that counts the KV reads of the bench secret.

    OpenBao refuses to enable an audit device through its API, so the count is taken on the
    wire: every request line for the secret's path that passes through the relay.
    """

    def __init__(self, vault_addr: str) -> None:
        self.target = vault_addr.removeprefix("http://").rsplit(":", 1)
        self.reads = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VaultCounter:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", self.port), self._loop
        )
        server.result(10)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            while data := await src.read(65536):
                if count:
                    self.reads += data.count(b" /v1/secret/data/bench ")
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True
        )


# --- the load generator ---------------------------------------------------------------------


class Target:
    def __init__(self, name: str, method: str, url: str, headers: dict[str, str], body: bytes):
        self.name, self.method, self.url, self.headers, self.body = name, method, url, headers, body
        self.pid: int | None = None  # the serving process, for --profile


async def drive(target: Target, concurrency: int, seconds: float) -> tuple[list[float], int]:
    """Closed loop: each worker sends its next request when its last answer arrived."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                start = time.perf_counter()
                async with session.request(
                    target.method, target.url, headers=target.headers, data=target.body or None
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def profile(
    options: argparse.Namespace, target: Target, concurrency: int
) -> subprocess.Popen[bytes] | None:
    """py-spy on the broker during its run at the highest concurrency (--profile FILE)."""
    if not options.profile or target.name != "broker" or concurrency != max(options.concurrency):
        return None
    # py-spy installed in the venv is beside its python, which need not be on PATH.
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "-p", str(target.pid), "-d", str(max(1, int(options.seconds)))]
    # --gil: at c=16 the GIL is what the broker runs out of, so sample only the thread holding it
    # (idle threads and fsync waits would otherwise fill the profile).
    command += ["--gil", "-f", "raw", "-r", "250", "-o", options.profile]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process (all its threads) so far; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(broker_url: str, metric: str, label: str) -> dict[str, float]:
    """One metric's samples by one label's value, from the broker's /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{broker_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(metric + "{"):
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[value] = float(line.rsplit(" ", 1)[1])
    return out


def cache_lookups(broker_url: str) -> dict[str, float]:
    """The broker's secret cache counters (hit, refresh, miss, shared)."""
    return scrape(broker_url, "broker_secret_cache_lookups_total", "result")


def stage_totals(broker_url: str) -> dict[str, tuple[float, float]]:
    """Per pipeline stage: (seconds, observations) so far, from the broker's histograms."""
    seconds = scrape(broker_url, "broker_stage_duration_seconds_sum", "stage")
    counts = scrape(broker_url, "broker_stage_duration_seconds_count", "stage")
    return {stage: (seconds[stage], counts.get(stage, 0.0)) for stage in seconds}


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


# --- the run --------------------------------------------------------------------------------


def start_broker(
    tmp: Path, vault_addr: str, vault_token: str, upstream: str, cost: float = 0
) -> tuple[Any, str]:
    from broker.client import BrokerClient

    port, admin = free_port(), "adm_" + secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "BROKER_PORT": str(port),
        "BROKER_DATA_DIR": str(tmp / "broker"),
        "BROKER_VAULT_ADDR": vault_addr,
        "BROKER_VAULT_TOKEN": vault_token,
        "BROKER_BOOTSTRAP_ADMIN_TOKEN": admin,
        "BROKER_EGRESS_ALLOW": "127.0.0.1/32",
        "BROKER_LOG_LEVEL": "warning",
    }
    proc = spawn(["-m", "broker.cli", "serve"], env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/healthz")
    with BrokerClient(url, admin) as client:
        client.put_capability(
            {
                "name": "bench.echo",
                "secrets": {"t": {"path": "bench", "key": "token"}},
                "http": {
                    "method": "GET",
                    "url": upstream,
                    "headers": {"Authorization": "Bearer {secrets.t}"},
                },
                "limits": {"cost": cost},
            }
        )
        client.add_policy("role:bench", "bench.*")
        token = client.create_agent("bench", ["bench"])["token"]
    return proc, f"{url}|{token}"


def run(options: argparse.Namespace) -> dict[str, Any]:
    from broker.demo import write_secrets
    from broker.devserver import DevVault

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp_name, DevVault() as vault:
        tmp = Path(tmp_name)
        try:
            up_port, proxy_port, durable_port = free_port(), free_port(), free_port()
            upstream = f"http://127.0.0.1:{up_port}/"
            answer = {**os.environ, "BENCH_ANSWER_ITEMS": str(options.answer_items)}
            procs.append(spawn([__file__, "--serve", "upstream", str(up_port), upstream], answer))
            procs.append(spawn([__file__, "--serve", "proxy", str(proxy_port), upstream]))
            ledger = {**os.environ, "BENCH_LEDGER": str(tmp / "ledger.db")}  # the broker's disk
            procs.append(
                spawn([__file__, "--serve", "durable", str(durable_port), upstream], ledger)
            )
            wait_ready(upstream)
            wait_ready(f"http://127.0.0.1:{proxy_port}/")
            wait_ready(f"http://127.0.0.1:{durable_port}/")
            write_secrets(vault.addr, vault.root_token, {"bench": {"token": SECRET}})
            counter = VaultCounter(vault.addr).start()
            proc, where = start_broker(
                tmp, counter.addr, vault.root_token, upstream, cost=options.cost
            )
            procs.append(proc)
            broker_url, token = where.split("|")
            invoke = b'{"args":{}}'
            json_headers = {"Content-Type": "application/json"}
            targets = [
                Target("direct", "GET", upstream, {}, b""),
                Target("proxy", "POST", f"http://127.0.0.1:{proxy_port}/", json_headers, invoke),
                Target(
                    "durable", "POST", f"http://127.0.0.1:{durable_port}/", json_headers, invoke
                ),
                Target(
                    "broker",
                    "POST",
                    f"{broker_url}/v1/capabilities/bench.echo/invoke",
                    {**json_headers, "Authorization": f"Bearer {token}"},
                    invoke,
                ),
            ]
            for target, process in zip(targets, [*procs[:3], proc], strict=True):
                target.pid = process.pid
            return asyncio.run(measure(targets, options, counter))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(15)


async def measure(
    targets: list[Target], options: argparse.Namespace, counter: VaultCounter
) -> dict[str, Any]:
    samples: dict[tuple[str, int], list[float]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], float] = {}  # CPU seconds of the serving process
    stages: dict[int, dict[str, list[float]]] = {}  # broker: per concurrency, stage -> [s, n]
    errors: dict[str, int] = {t.name: 0 for t in targets}
    for t in targets:  # warm up: connections, caches, the broker's first secret read
        await drive(t, 4, 0.5)
    reads_before = counter.reads
    broker_url = targets[-1].url.split("/v1/")[0]
    lookups_before = cache_lookups(broker_url)
    for _ in range(options.rounds):
        for concurrency in options.concurrency:
            for t in targets:
                profiler = profile(options, t, concurrency)
                before = cpu_seconds(t.pid)
                marks = stage_totals(broker_url) if t.name == "broker" else {}
                lat, err = await drive(t, concurrency, options.seconds)
                if marks:
                    add_stages(stages.setdefault(concurrency, {}), marks, stage_totals(broker_url))
                cpu[t.name, concurrency] = cpu.get((t.name, concurrency), 0.0) + (
                    cpu_seconds(t.pid) - before
                )
                if profiler is not None:
                    profiler.wait(30)
                    options.profile = None  # one profile per run
                samples.setdefault((t.name, concurrency), []).extend(lat)
                rates.setdefault((t.name, concurrency), []).append(len(lat) / options.seconds)
                errors[t.name] += err
    lookups = cache_lookups(broker_url)
    delta = {k: lookups.get(k, 0) - lookups_before.get(k, 0) for k in ("miss", "shared", "refresh")}
    rows = []
    for (name, concurrency), lat in samples.items():
        rows.append(
            {
                "target": name,
                "concurrency": concurrency,
                "calls": len(lat),
                "p50_ms": round(statistics.median(lat), 3),
                "p99_ms": round(percentile(lat, 99), 3),
                "calls_per_s": round(statistics.median(rates[(name, concurrency)]), 1),
                # the serving process's CPU per call (the direct target's: the upstream's)
                "cpu_us_per_call": round(cpu[name, concurrency] / max(1, len(lat)) * 1e6, 1),
            }
        )
    return {
        "rows": rows,
        "errors": errors,
        # On the wire, every Vault read: the refresh-ahead reads in the background included.
        "vault_reads_steady_state": counter.reads - reads_before,
        # Of those, the reads the broker started ahead of expiry, which no call waited for.
        "vault_background_refreshes": int(delta["refresh"]),
        # Calls that waited for Vault (a cache miss, or joined a read in flight): must be 0.
        "calls_waiting_for_vault": int(delta["miss"] + delta["shared"]),
        "vault_reads_warm_up": reads_before,  # at least 1: shows the counter sees the reads
        "summary": summarise(rows, options.concurrency),
        # mean wall time per call in each pipeline stage (audit: per record, two a call)
        "broker_stage_ms": {
            c: {k: round(v[0] / v[1] * 1000, 3) for k, v in by.items() if v[1]}
            for c, by in stages.items()
        },
    }


def add_stages(
    into: dict[str, list[float]],
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
) -> None:
    for stage, (seconds, count) in after.items():
        was = before.get(stage, (0.0, 0.0))
        acc = into.setdefault(stage, [0.0, 0.0])
        acc[0] += seconds - was[0]
        acc[1] += count - was[1]


def summarise(rows: list[dict[str, Any]], levels: list[int]) -> dict[str, float]:
    at = {(r["target"], r["concurrency"]): r for r in rows}
    low = min(levels)

    def added(target: str, key: str) -> float:
        return round(at[target, low][key] - at["direct", low][key], 3)

    out = {
        f"added_p50_ms_c{low}": added("broker", "p50_ms"),
        f"added_p99_ms_c{low}": added("broker", "p99_ms"),
        f"proxy_added_p50_ms_c{low}": added("proxy", "p50_ms"),
        f"durable_added_p50_ms_c{low}": added("durable", "p50_ms"),
    }
    for level in levels:
        broker = at["broker", level]["calls_per_s"]
        for ref in ("proxy", "durable"):
            ratio = broker / at[ref, level]["calls_per_s"]
            out[f"broker_over_{ref}_throughput_c{level}"] = round(ratio, 3)
    return out


def micro() -> dict[str, Any]:
    """The decision, audit and answer-shaping micro-benchmarks (their last line is JSON)."""
    out: dict[str, Any] = {}
    runs = (("policy", ["--decisions", "5000", "--repeats", "3"]), ("audit", []), ("shape", []))
    for name, args in runs:
        done = subprocess.run(
            [sys.executable, str(HERE / f"{name}.py"), *args],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'target':8} {'conc':>5} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}"
        f" {'cpu us/call':>11}"
    )
    for r in sorted(result["rows"], key=lambda r: (r["concurrency"], r["target"])):
        print(
            f"{r['target']:8} {r['concurrency']:5} {r['calls']:7} {r['p50_ms']:8.3f}"
            f" {r['p99_ms']:8.3f} {r['calls_per_s']:9.1f} {r['cpu_us_per_call']:11.1f}"
        )
    for key, value in result["summary"].items():
        print(f"{key:38} {value:8.3f}")
    vault = ("vault_reads_warm_up", "vault_reads_steady_state", "vault_background_refreshes")
    for key in (*vault, "calls_waiting_for_vault"):
        print(f"{key:38} {result[key]:8}")
    print(f"{'errors':38} {result['errors']}")
    print(f"{'upstream answer bytes':38} {result['answer_bytes']:8}")
    for level, by in result["broker_stage_ms"].items():
        print(f"broker stages at c={level} (ms):", ", ".join(f"{k} {v}" for k, v in by.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="per target, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--json", default="bench-results.json")
    micro_help = "also run bench/policy.py, audit.py, shape.py"
    parser.add_argument("--micro", action="store_true", help=micro_help)
    parser.add_argument("--profile", help="py-spy the broker at the top concurrency into FILE")
    parser.add_argument(
        "--answer-items",
        type=int,
        default=0,
        help="the upstream answers N issue-like JSON objects (~0.9 KB each) instead of 27 bytes",
    )
    parser.add_argument(
        "--cost",
        type=float,
        default=0,
        help="the capability's limits.cost (no budget is set: the path of a paid call without one)",
    )
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "UPSTREAM"))
    options = parser.parse_args()
    if options.serve:
        kind, port, upstream = options.serve
        serve(kind, int(port), upstream)
        return
    options.concurrency = [int(c) for c in options.concurrency.split(",")]
    result = run(options)
    result["answer_bytes"] = len(answer_body(options.answer_items))
    if options.micro:
        result["micro"] = micro()
    print_table(result)
    Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {options.json}")


if __name__ == "__main__":
    main()
