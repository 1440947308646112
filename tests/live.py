"""Live servers for end-to-end tests: a real Daphne and a real Celery worker, each a
subprocess on this machine that uses the test database.

The fixtures that wrap these (`live_daphne`, `live_worker`) are in the root
conftest.py. Module level imports only the standard library: the subprocesses
import `install_network_guard` from here before anything else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "var" / "test-logs"
BIN = Path(sys.executable).parent  # the virtualenv running the tests

# --- Network guard ------------------------------------------------------------


class NetworkBlockedError(ConnectionRefusedError):
    """Raised by a connect() to anything but this machine while tests run."""


def _is_loopback(family: int, address: object) -> bool:
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return True
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).split("%", 1)[0]  # IPv6 scope id
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost would need DNS: not this machine
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def install_network_guard() -> None:
    """Refuse Python-level connections beyond loopback (HTTP clients, model hubs,
    LLM SDKs). libpq and other C code connect on their own; they only ever get
    loopback addresses in tests."""
    if getattr(socket.socket.connect, "parley_guard", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: object) -> None:
        if not _is_loopback(sock.family, address):
            raise NetworkBlockedError(
                f"network access beyond this machine is blocked in tests: connect to {address!r}"
            )

    def guarded_connect(self, address):
        check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        check(self, address)
        return connect_ex(self, address)

    guarded_connect.parley_guard = True  # type: ignore[attr-defined]
    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]


# Runs a console script of the virtualenv (daphne, celery) with the guard installed.
_BOOT = (
    "import runpy, sys; sys.path.insert(0, {root!r}); "
    "from tests.live import install_network_guard; install_network_guard(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _command(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _BOOT.format(root=str(ROOT)), str(BIN / script), *args]


# --- Environment ---------------------------------------------------------------


def services_mode() -> bool:
    """Postgres/Redis/Celery (`make test`'s second run) or embedded defaults."""
    return os.environ.get("PARLEY_TEST_MODE") == "services" or bool(os.environ.get("REDIS_URL"))


def subprocess_env(test_database_name: str, extra: Mapping[str, str] | None = None) -> dict:
    """The tests' own environment, pointed at the test database."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTEST_CURRENT_TEST", None)
    if env.get("DATABASE_URL"):
        url = urllib.parse.urlsplit(env["DATABASE_URL"])
        env["DATABASE_URL"] = urllib.parse.urlunsplit(url._replace(path=f"/{test_database_name}"))
    else:
        env["SQLITE_PATH"] = test_database_name
    env.update(extra or {})
    return env


# --- Processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


@dataclass
class LiveProcess:
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the whole process group (prefork children included), then SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.log_file.close()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


def _spawn(command: list[str], env: dict, log_name: str) -> LiveProcess:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / log_name
    log_file = open(log_path, "wb")  # closed by LiveProcess.stop
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return LiveProcess(process=process, log_path=log_path, log_file=log_file)


def wait_until(ready: Callable[[], bool], proc, what: str, timeout_s: float) -> None:
    """Poll `ready` until it holds; stop `proc` (a started process with .process,
    .stop() and .log_tail()) and raise if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            proc.stop()
            raise RuntimeError(
                f"{what} exited with code {proc.process.returncode} while starting; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(
        f"{what} not ready after {timeout_s:.0f}s; log {proc.log_path}:\n{proc.log_tail()}"
    )


_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    """GET without proxies: (status, headers, body); HTTP errors are returned, not raised."""
    try:
        with _no_proxy.open(url, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- Daphne -----------------------------------------------------------------------


@dataclass
class LiveDaphne(LiveProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        """An Origin header the server accepts for WebSockets."""
        return self.url


def start_daphne(env: dict, timeout_s: float = 90.0) -> LiveDaphne:
    """Start `daphne config.asgi:application` on a free port and wait for /healthz."""
    port = free_port()
    env = {
        "LOOP_GUARD_MS": "10",  # report what blocks the event loop (loop-guard: lines)
        **env,
        "WEBSOCKET_ALLOWED_ORIGINS": f"http://127.0.0.1:{port},http://localhost:{port}",
    }
    command = _command("daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application")
    proc = _spawn(command, env, f"daphne-{port}.log")
    server = LiveDaphne(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    server.port = port

    def healthy() -> bool:
        try:
            return http_get(f"{server.url}/healthz", timeout_s=2)[0] == 200
        except OSError:
            return False

    wait_until(healthy, server, f"Daphne on port {port}", timeout_s)
    return server


# --- Celery worker ----------------------------------------------------------------


@dataclass
class LiveWorker(LiveProcess):
    nodename: str = ""


def start_worker(env: dict, timeout_s: float = 90.0, role: str = "all") -> LiveWorker:
    """Start a Celery worker of a role (config.celery.worker_arguments; `all` takes
    every queue) and wait until it answers a ping (through the broker `env` names
    in CELERY_BROKER_URL, if it names another one)."""
    from config.celery import app, worker_arguments

    broker_url = env.get("CELERY_BROKER_URL") or None
    if broker_url == app.conf.broker_url:
        broker_url = None
    nodename = f"parley-test-{role}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    command = _command(
        "celery", "-A", "config", "worker", *worker_arguments(role), "-n", nodename,
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    )  # fmt: skip
    proc = _spawn(command, env, f"celery-{nodename.split('@')[0]}.log")
    worker = LiveWorker(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    worker.nodename = nodename

    def answers() -> bool:
        try:
            if broker_url is None:
                return bool(app.control.ping(destination=[nodename], timeout=1.0))
            return _ping_through(broker_url, nodename)
        except Exception:  # the broker may refuse while starting
            return False

    wait_until(answers, worker, f"Celery worker {nodename}", timeout_s)
    return worker


def _ping_through(broker_url: str, nodename: str) -> bool:
    """Ping a worker through another broker than this process's app uses. (The app's
    control.ping publishes through the app's own producer pool whatever connection it
    is given, and Celery lets CELERY_BROKER_URL from the environment override any
    broker an app is built with; so kombu's pidbox mailbox, as Celery's, directly.)"""
    from kombu import Connection
    from kombu.pidbox import Mailbox

    with Connection(broker_url, connect_timeout=2) as connection:
        mailbox = Mailbox("celery", type="fanout", accept=["json"])(connection)
        replies = mailbox._broadcast("ping", destination=[nodename], reply=True, timeout=1.0)
    return any(nodename in reply for reply in replies or [])
