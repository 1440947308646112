"""What the Locust users share: their command-line options, the accounts from
`manage.py loadtest_seed`, the clips, signing in through the real login form,
and reporting a measured stage to Locust as a request of its own.

Stage timings are reported as requests of their own type ("voice", "text",
"ws"), so Locust's tables, CSV and HTML show their counts, failures and
percentiles next to the HTTP pages'.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment

ROOT = Path(__file__).resolve().parent.parent
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".webm")
USER_KINDS = ("http", "voice", "text")
DEFAULT_MIX = "http=2,voice=1,text=1"
CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
TALK_FORM = re.compile(r'action="(/personas/[\w-]+/talk/)"')
CONVERSATION_LINK = re.compile(r'href="/conversations/([0-9a-f-]{36})/')
CONVERSATION_URL = re.compile(r"/conversations/([0-9a-f-]{36})/")


class LoadtestConfigError(ValueError):
    """A bad option or input file; the run stops before any user starts."""


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("Parley")
    group.add_argument(
        "--users-file",
        default=os.environ.get("LOADTEST_USERS_FILE", str(ROOT / "var" / "loadtest-users.json")),
        help="accounts written by `manage.py loadtest_seed` (env LOADTEST_USERS_FILE)",
    )
    group.add_argument(
        "--audio-dir",
        default=os.environ.get("LOADTEST_AUDIO_DIR", str(ROOT / "tests" / "data" / "audio")),
        help="clips the voice users speak, in name order (env LOADTEST_AUDIO_DIR)",
    )
    group.add_argument(
        "--mix",
        default=os.environ.get("LOADTEST_MIX", DEFAULT_MIX),
        help=f"weights of the user kinds, e.g. {DEFAULT_MIX} (env LOADTEST_MIX)",
    )
    group.add_argument(
        "--sent-log",
        default=os.environ.get("LOADTEST_SENT_LOG", ""),
        help="a folder: each Locust process writes there the finals, replies and ended"
        " utterances its sockets were sent (`make soak` counts them against Postgres)",
    )
    group.add_argument(
        "--turn-timeout",
        type=float,
        default=float(os.environ.get("LOADTEST_TURN_TIMEOUT_S", "60")),
        help="seconds a turn may take before it counts as failed (env LOADTEST_TURN_TIMEOUT_S)",
    )


def mix_parse(text: str) -> dict[str, int]:
    """`http=2,voice=1,text=1` → weights; kinds left out weigh 0."""
    weights = dict.fromkeys(USER_KINDS, 0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in weights or not value.strip().isdigit():
            raise LoadtestConfigError(
                f"bad --mix item {item!r}: expected kind=weight with kind one of "
                f"{', '.join(USER_KINDS)} and a whole number, as in {DEFAULT_MIX}"
            )
        weights[kind] = int(value)
    if not any(weights.values()):
        raise LoadtestConfigError(f"--mix {text!r} gives every user kind weight 0")
    return weights


@dataclass(frozen=True)
class Account:
    username: str
    password: str
    conversation_id: str


@cache
def accounts(path: str) -> list[Account]:
    try:
        rows = json.loads(Path(path).read_text())["users"]
        found = [Account(r["username"], r["password"], r["conversation_id"]) for r in rows]
    except FileNotFoundError:
        raise LoadtestConfigError(
            f"no users file at {path}: run `manage.py loadtest_seed --users N --out {path}` "
            "against the target's database first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadtestConfigError(
            f"{path} is not a users file of `manage.py loadtest_seed`: {exc!r}"
        ) from None
    if not found:
        raise LoadtestConfigError(f"{path} lists no users")
    return found


_next_account = itertools.count(os.getpid() % 1000)  # processes start at different rows


def account_take(path: str) -> Account:
    """The next account, round robin (several Locust users may share one)."""
    rows = accounts(path)
    return rows[next(_next_account) % len(rows)]


@cache
def clips(folder: str) -> tuple[tuple[str, bytes], ...]:
    """(name, 16 kHz mono PCM16) of every audio file in `folder`, by name."""
    from apps.pipeline.audio import decode_to_pcm16

    path = Path(folder)
    if not path.is_dir():
        raise LoadtestConfigError(f"--audio-dir {folder}: no such folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise LoadtestConfigError(
            f"--audio-dir {folder} holds no audio ({', '.join(AUDIO_SUFFIXES)})"
        )
    try:
        return tuple((p.name, decode_to_pcm16(p)) for p in files)
    except ValueError as exc:
        raise LoadtestConfigError(f"--audio-dir {folder}: {exc}") from None


def options_check(environment: Environment) -> dict[str, int]:
    """Read every input once, before users spawn; the weights of --mix."""
    options = environment.parsed_options
    if options is None:  # a library run without a command line
        return mix_parse(DEFAULT_MIX)
    weights = mix_parse(options.mix)
    accounts(options.users_file)
    if weights["voice"]:
        clips(options.audio_dir)
    if options.turn_timeout <= 0:
        raise LoadtestConfigError(f"--turn-timeout must be positive, not {options.turn_timeout}")
    return weights


def csrf_token(html: str) -> str:
    found = CSRF_FIELD.search(html)
    if not found:
        raise LookupError("no csrfmiddlewaretoken in the page")
    return found.group(1)


def login(client, account: Account) -> None:
    """Sign in through the real login form: GET it (CSRF cookie and token), POST it."""
    page = client.get("/accounts/login/", name="/accounts/login/")
    page.raise_for_status()
    with client.post(
        "/accounts/login/",
        data={
            "username": account.username,
            "password": account.password,
            "csrfmiddlewaretoken": csrf_token(page.text),
        },
        headers={"Referer": page.url},
        name="/accounts/login/ (POST)",
        catch_response=True,
    ) as response:
        if "sessionid" not in client.cookies:
            response.failure(f"login as {account.username} refused (status {response.status_code})")
            raise PermissionError(f"login as {account.username} refused")
        response.success()


def stage_report(
    environment: Environment,
    request_type: str,
    name: str,
    seconds: float | None,
    exception: BaseException | None = None,
) -> None:
    """One measured stage (or a failure of it) as a Locust request."""
    environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=0 if seconds is None else seconds * 1000,
        response_length=0,
        exception=exception,
        context={},
    )


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


def socket_url(host: str, conversation_id: str) -> str:
    base = re.sub(r"^http", "ws", host.rstrip("/"))
    return f"{base}/ws/conversations/{conversation_id}/"


def session_cookie(client) -> str:
    return client.cookies.get("sessionid", "")


def event_summary(event: dict[str, Any]) -> str:
    return f"{event.get('code', '?')}: {event.get('message', '')}"[:200]
