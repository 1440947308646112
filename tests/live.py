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


METRICS_TOKEN = "test-metrics-token"


def subprocess_env(test_database_name: str, extra: Mapping[str, str] | None = None) -> dict:
    """The tests' own environment, pointed at the test database."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("METRICS_TOKEN", METRICS_TOKEN)  # live servers' /metrics (metrics_get)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("LIVE_SWEEP_S", None)  # the test process's own 0 (conftest.py): servers sweep
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


def metrics_get(url: str, token: str = METRICS_TOKEN) -> str:
    """A live server's /metrics (`url` ends in /metrics), as the bearer of `token`."""
    status, _, body = http_get(url, headers={"Authorization": f"Bearer {token}"})
    if status != 200:
        raise RuntimeError(f"{url} answered {status}: {body[:200]!r}")
    return body.decode()


def answers(url: str) -> bool:
    """`url` answers 200 now (a server's health or readiness probe)."""
    try:
        return http_get(url, timeout_s=2)[0] == 200
    except OSError:
        return False


def http_get(
    url: str, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None
) -> tuple[int, dict, bytes]:
    """GET without proxies: (status, headers, body); HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with _no_proxy.open(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- Servers of a test's own (fault tests stop and start them) ------------------------


def start_redis(port: int, persist_dir: Path | None = None) -> subprocess.Popen:
    """A Redis server of the caller's own on 127.0.0.1:`port` (nothing saved, or, with
    `persist_dir`, every write in its append-only file there, as a production Redis
    keeps its queues across a restart); stop it by pid."""
    persistence = ["--appendonly", "no"]
    if persist_dir is not None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(persist_dir)]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"our Redis did not start on port {port}")


def start_pgbouncer(port: int, run_dir: Path) -> subprocess.Popen:
    """A PgBouncer of the caller's own on 127.0.0.1:`port`, in front of this machine's
    Postgres (5432), configured as deploy/pgbouncer/pgbouncer.ini (transaction pooling,
    every database name passed through). It runs in the foreground, as postgres when
    we are root (PgBouncer refuses root); stop it by pid. Its log: `run_dir`/pgbouncer.log."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    template = (ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
    values = {"@RUN_DIR@": str(run_dir), "@PORT@": str(port), "@DEFAULT_POOL_SIZE@": "5",
              "@RESERVE_POOL_SIZE@": "0", "@RESERVE_POOL_TIMEOUT@": "5",
              "@MAX_DB_CONNECTIONS@": "10", "@MAX_CLIENT_CONN@": "100"}  # fmt: skip
    for placeholder, value in values.items():
        template = template.replace(placeholder, value)
    (run_dir / "pgbouncer.ini").write_text(template)
    (run_dir / "userlist.txt").write_text('"postgres" ""\n')
    command = ["pgbouncer", str(run_dir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        shutil.chown(run_dir, "postgres")
        for name in ("pgbouncer.ini", "userlist.txt"):
            shutil.chown(run_dir / name, "postgres")
        command[1:1] = ["-u", "postgres"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"our PgBouncer exited; log:\n{log_tail(run_dir / 'pgbouncer.log')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"our PgBouncer did not listen on port {port}")


def stop_by_pid(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a server this test started (SIGTERM, then SIGKILL), and reap it."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


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
        "PARLEY_ROLE": "web",
        **env,
        "WEBSOCKET_ALLOWED_ORIGINS": f"http://127.0.0.1:{port},http://localhost:{port}",
    }
    command = _command("daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application")
    proc = _spawn(command, env, f"daphne-{port}.log")
    server = LiveDaphne(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    server.port = port
    wait_until(lambda: answers(f"{server.url}/healthz"), server, f"Daphne on port {port}",
               timeout_s)  # fmt: skip
    return server


# --- The offline reply model ------------------------------------------------------


@dataclass
class LiveLLM(LiveProcess):
    port: int = 0

    @property
    def base_url(self) -> str:
        """What LLM_LOCAL_URL (or an openai client's base_url) is set to."""
        return f"http://127.0.0.1:{self.port}/v1"


def start_llm(env: dict, *args: str, timeout_s: float = 60.0) -> LiveLLM:
    """Start `manage.py serve_llm` (the offline model's OpenAI-compatible endpoint) on
    a free port and wait for its /healthz."""
    port = free_port()
    command = _command(str(ROOT / "manage.py"), "serve_llm", "--port", str(port), *args)
    proc = _spawn(command, env, f"serve-llm-{port}.log")
    server = LiveLLM(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    server.port = port
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), server,
               f"serve_llm on port {port}", timeout_s)  # fmt: skip
    return server


# --- Celery worker ----------------------------------------------------------------


@dataclass
class LiveWorker(LiveProcess):
    nodename: str = ""
    metrics_port: int = 0  # its exporter: /metrics, /healthz, /readyz

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


def start_worker(
    env: dict, timeout_s: float = 90.0, role: str = "all", app_module: str = "config"
) -> LiveWorker:
    """Start a Celery worker of a role (config.celery.worker_arguments; `all` takes
    every queue) of the Celery app in `app_module` (`celery -A`), and wait until it
    answers a ping (through the broker `env` names in CELERY_BROKER_URL, if it names
    another one)."""
    from config.celery import app, worker_arguments

    broker_url = env.get("CELERY_BROKER_URL") or None
    if broker_url == app.conf.broker_url:
        broker_url = None
    nodename = f"parley-test-{role}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    metrics_port = int(env.get("WORKER_METRICS_PORT") or 0) or free_port()
    env = {**env, "WORKER_METRICS_PORT": str(metrics_port), "WORKER_METRICS_HOST": "127.0.0.1"}
    command = _command(
        "celery", "-A", app_module, "worker", *worker_arguments(role), "-n", nodename,
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    )  # fmt: skip
    env = {**env, "PARLEY_ROLE": f"worker-{role}"}
    proc = _spawn(command, env, f"celery-{nodename.split('@')[0]}.log")
    worker = LiveWorker(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    worker.nodename = nodename
    worker.metrics_port = metrics_port

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
