"""Hostile input on the socket (docs/reliability.md): hypothesis makes frames
(random binary, audio containers, odd and huge sizes, broken and hostile JSON,
invalid UTF-8, floods) and sends them over real sockets to a live Daphne, while
a second user holds a normal session on the same server.

It passes only when
- the application logs no exception (Daphne's log has no "Traceback" and no
  "Exception inside application");
- every bad frame is answered with a documented `error` code (docs/protocol.md,
  section 6: each code is sent once a second at most, so a frame counts as
  answered when its code came on its socket), or was dropped by a documented
  rate limit, or its socket was closed with a documented close code; and no
  socket gets an error its frames do not explain;
- the normal session's text turns are all answered, during and after.

Each generated example is one socket of a user whose quota is used up (speech
and text get `quota_exceeded`, so no frame starts STT or the LLM): `hello`,
the frames, perhaps a flood, perhaps a frame that closes the socket, then a
`ping` to know the server has handled all of them."""

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import websocket
from django.conf import settings
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.accounts.tests.factories import usage_set
from apps.conversations.services import conversation_start
from apps.personas.models import Persona
from apps.pipeline.talk_client import TalkClient
from apps.realtime.protocol import CLIENT_TYPES
from tests.live import LOG_DIR

from .helpers import assert_no_error

pytestmark = pytest.mark.usefixtures("transactional_db")

DOC = (Path(settings.BASE_DIR) / "docs" / "protocol.md").read_text()
DOCUMENTED_ERRORS = frozenset(re.findall(r"^\| `([a-z_]+)` \| (?:yes|no)", DOC, re.M))
DOCUMENTED_CLOSES = frozenset(int(code) for code in re.findall(r"\*\*(\d{4})\*\*", DOC))
RATE_CODES = frozenset({"too_many_frames", "too_many_messages", "rate_limited", "hello_too_often"})

EXAMPLES = 130  # about 16,000 frames in about 15 s (300: about 50,000 in 40 s)
FRAMES_MIN = 10_000
TEXT, BINARY = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY
AUDIO_MAX = settings.AUDIO_FRAME_MAX_BYTES
TEXT_MAX = settings.WS_TEXT_MAX_BYTES
CAP = settings.WS_MESSAGE_MAX_BYTES
SIGNATURES = (b"RIFF", b"OggS", b"fLaC", b"ID3\x03", b"ID3\x04", b"\x1aE\xdf\xa3")


@dataclass(frozen=True)
class Frame:
    data: bytes | str
    opcode: int
    answers: frozenset[str] = frozenset()  # a bad frame gets one of these; empty: a good one
    may: frozenset[str] = frozenset()  # codes it may also get (quota_exceeded, ...)
    closes: frozenset[int] = frozenset()  # close codes that may answer it

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep them short
        head = self.data[:60]
        return f"Frame({len(self.data)}: {head!r}…, {sorted(self.answers)}, {sorted(self.closes)})"


def frame(data, opcode=TEXT, answers=(), may=(), closes=()) -> Frame:
    return Frame(data, opcode, frozenset(answers), frozenset(may), frozenset(closes))


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def json_text(message) -> str:
    return json.dumps(message)


def sized_text(text: str, answers) -> Frame:
    """A text frame whose answer is its size's, when it is too big to be parsed."""
    size = len(text.encode())
    if size > CAP:
        return frame(text, closes={1009})
    if size > TEXT_MAX:
        return frame(text, answers={"message_too_large"})
    return frame(text, answers=answers)


seeds = st.integers(0, 2**32 - 1)
even = st.integers(1, AUDIO_MAX // 2).map(lambda n: 2 * n)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip

# --- binary frames ---------------------------------------------------------------------

binary_frames = st.one_of(
    st.builds(
        lambda n, seed: frame(noise(2 * n + 1, seed), BINARY, answers={"bad_audio_frame"}),
        st.integers(0, AUDIO_MAX // 2), seeds,
    ),
    st.just(frame(b"", BINARY, answers={"bad_audio_frame"})),
    st.builds(
        lambda n, seed: frame(noise(2 * n, seed), BINARY, answers={"audio_frame_too_large"}),
        st.integers(AUDIO_MAX // 2 + 1, CAP // 2), seeds,
    ),
    st.builds(
        lambda sig, n, seed: frame(
            sig + noise(n - len(sig), seed), BINARY, answers={"wrong_audio_format"}
        ),
        st.sampled_from(SIGNATURES), st.integers(4, AUDIO_MAX // 2).map(lambda n: 2 * n), seeds,
    ),
    # PCM-like noise: loud enough to open an utterance, which the quota refuses
    st.builds(
        lambda n, seed: frame(b"\x00\x01" + noise(n - 2, seed), BINARY, may={"quota_exceeded"}),
        even, seeds,
    ),
    st.builds(lambda n: frame(bytes(n), BINARY), even),  # silence
)  # fmt: skip

# --- text frames -----------------------------------------------------------------------

bad_hello_fields = st.sampled_from(
    [-1, 1.5, True, False, "3", [1], {"seq": 1}, 2**31, 10**100]
)  # fmt: skip
text_frames = st.one_of(
    st.builds(
        lambda text: frame(text, answers={"bad_json", "bad_message", "unknown_type"}),
        st.text(max_size=300),
    ),
    st.builds(
        lambda n, at: frame(
            ('{"type": "ping", "t": 1}' + "\x00" * n)[at:] or "\x00",
            answers={"bad_json", "unknown_type", "bad_message"},
        ),
        st.integers(1, 50), st.integers(0, 3),
    ),
    st.builds(
        lambda value: frame(json_text(value), answers={"bad_message"}),
        json_values.filter(lambda v: not isinstance(v, dict))
        | st.dictionaries(st.text(max_size=8), json_values, max_size=4).filter(
            lambda d: not isinstance(d.get("type"), str)
        ),
    ),
    st.builds(
        lambda kind, extra: frame(json_text({**extra, "type": kind}), answers={"unknown_type"}),
        st.text(max_size=40).filter(lambda t: t not in CLIENT_TYPES),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ),
    st.builds(  # deep nesting, closed or not
        lambda depth, closed: sized_text(
            '{"type": "ping", "t": ' + "[" * depth + ("]" * depth + "}" if closed else ""),
            {"bad_json", "bad_message"},
        ),
        st.integers(17, (CAP - 30) // 2), st.booleans(),
    ),
    st.builds(  # huge numbers
        lambda digits, sign: sized_text(
            '{"type": "ping", "t": ' + sign + "9" * digits + "}", {"bad_json"}
        ),
        st.integers(4301, CAP - 30), st.sampled_from(["", "-"]),
    ),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e400"]).map(
        lambda number: frame('{"type": "ping", "t": ' + number + "}", answers={"bad_json"})
    ),
    st.builds(  # wrong types
        lambda value: frame(
            json_text({"type": "hello", "resume_from": value}),
            answers={"bad_message", "hello_too_often"},
        ),
        bad_hello_fields,
    ),
    st.sampled_from([42, None, [], {}, "", "   ", ["a"], True]).map(
        lambda value: frame(json_text({"type": "text", "text": value}), answers={"bad_message"})
    ),
    st.sampled_from(["a\x00b", "\x00", "half \ud800", "\udfff end"]).map(
        lambda text: frame(json_text({"type": "text", "text": text}), answers={"bad_message"})
    ),
    st.integers(settings.TEXT_MESSAGE_MAX_CHARS + 1, settings.TEXT_MESSAGE_MAX_CHARS + 3000).map(
        lambda n: frame(json_text({"type": "text", "text": "x" * n}), answers={"text_too_long"})
    ),
    st.integers(TEXT_MAX + 1, CAP).map(  # too big for a text, not for a message
        lambda n: frame(("x" * n), answers={"message_too_large"})
    ),
    # good ones
    json_values.map(lambda t: frame(json_text({"type": "ping", "t": t}))),
    st.sampled_from(["audio.end", "interrupt"]).map(lambda kind: frame(json_text({"type": kind}))),
    st.text(min_size=1, max_size=200).filter(str.strip).map(
        lambda text: frame(json_text({"type": "text", "text": text}), may={"quota_exceeded"})
    ),
    st.integers(0, 50).map(
        lambda seq: frame(json_text({"type": "hello", "resume_from": seq}), may={"hello_too_often"})
    ),
)  # fmt: skip

# --- the end of an example: floods, and frames that close the socket ---------------------------

floods = st.builds(
    lambda kind, count: [kind] * count,
    st.sampled_from(
        [
            frame(b"\x00\x00", BINARY),  # 2-byte frames: counted as messages
            frame(bytes(3200), BINARY),  # 100 ms frames, far faster than real time
            frame(json_text({"type": "ping"})),
            frame(json_text({"type": "interrupt"})),
            frame("{not json", answers={"bad_json"}),
            frame(b"\x01", BINARY, answers={"bad_audio_frame"}),
        ]
    ),
    st.integers(100, 1500),
)
closers = st.one_of(
    st.builds(
        lambda n, seed, opcode: frame(
            noise(n, seed) if opcode == BINARY else "y" * n, opcode, closes={1009}
        ),
        st.integers(CAP + 1, 1024 * 1024 + 16), seeds, st.sampled_from([TEXT, BINARY]),
    ),
    st.builds(
        lambda head, seed: frame(head + b"\xff" + noise(20, seed), TEXT, closes={1007}),
        st.sampled_from([b"", b'{"type": "ping", "t": "', b'{"type": "text", "text": "hi ']),
        seeds,
    ),
    st.sampled_from([2, "1", 0, None, [1]]).map(
        lambda protocol: frame(
            json_text({"type": "hello", "protocol": protocol}),
            answers={"unsupported_protocol", "hello_too_often"}, closes={4400},
        )
    ),
)  # fmt: skip
examples = st.tuples(
    st.lists(st.one_of(binary_frames, text_frames), min_size=1, max_size=40),
    st.none() | floods,
    st.none() | closers,
    st.integers(0, 3).map(bool),  # a quarter of the sockets send no hello first
)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Figures:
    examples: int = 0
    frames: int = 0  # generated frames that were sent
    bad_frames: int = 0
    unsent: int = 0  # generated, not sent: the server had closed the socket
    errors: Counter = field(default_factory=Counter)  # error events received, by code
    closes: Counter = field(default_factory=Counter)  # sockets closed by the server, by code
    normal_turns: int = 0


def handled(client: TalkClient, after: int, *, greeted: bool) -> None:
    """Until the server has handled everything sent so far (one message at a time, in
    order): a ping's pong, or the socket's close. A ping that comes while the text
    bucket is empty is dropped, so one is sent every half second until one is answered."""
    for _ in range(0 if greeted else 10):  # before hello, a ping gets hello_required
        if any(r.event["type"] == "ready" for r in client.received[after:]):
            break
        try:
            client.send_json({"type": "hello", "resume_from": 1})
            client.wait_for(lambda e: e["type"] == "ready", after=after, timeout=1.1)
        except TimeoutError:  # (an OSError: first) hello_too_often: once a second
            if client.closed.is_set():
                return
        except (OSError, websocket.WebSocketException):
            break  # closed by the server
    markers: set[str] = set()
    for _ in range(60):
        markers.add(marker := f"end-{random.random()}")
        try:
            client.send_json({"type": "ping", "t": marker})
            client.wait_for(
                lambda e: e["type"] == "pong" and str(e["t"]) in markers, after=after, timeout=0.5
            )
            return
        except TimeoutError:  # (an OSError: first)
            if client.closed.is_set():
                return
        except (OSError, websocket.WebSocketException):
            break  # closed by the server
    assert client.closed.wait(10), "neither a pong nor a close"


def fuzz_socket(
    url: str, cookie: str, frames: list[Frame], *, greet: bool, flooded: bool, figures: Figures
) -> None:
    """One socket: hello (or not), the frames, a ping to know all were handled; then
    check what came back against what was sent."""
    client = TalkClient(url, session_cookie=cookie, keep_audio=False)
    ready = client.connect(resume_from=1, hello=greet)
    assert not greet or ready["type"] == "ready", ready
    after = len(client.received)
    if not greet:  # what is not a hello (nor refused before its type is known) gets this
        extra = frozenset({"hello_required"})
        frames = [replace(item, answers=item.answers | extra if item.answers else item.answers,
                          may=item.may | extra) for item in frames]  # fmt: skip
    sent: list[Frame] = []
    try:
        for item in frames:
            if client.closed.is_set():
                break
            try:
                client.ws.send(item.data, item.opcode)
            except (OSError, websocket.WebSocketException):
                break  # the server closed it: its close code answers the rest
            sent.append(item)
        if sent and sent[-1].closes and not sent[-1].answers:
            client.closed.wait(10)  # no more frames: sent after its close, one could reset it
        elif not client.closed.is_set():
            handled(client, after, greeted=greet)
        closed = client.closed.is_set()
        close = client.close_code if closed else None
    finally:
        client.close()
    assert not closed or close is not None, "the server dropped the connection without a code"

    events = [r.event for r in client.received[after:]]
    errors = [e for e in events if e["type"] == "error"]
    codes = {e["code"] for e in errors}
    figures.examples += 1
    figures.frames += len(sent)
    figures.unsent += len(frames) - len(sent)
    figures.bad_frames += sum(bool(item.answers or item.closes) for item in sent)
    figures.errors.update(e["code"] for e in errors)
    if close is not None:
        figures.closes[close] += 1

    # every error and close is documented
    assert codes <= DOCUMENTED_ERRORS, codes - DOCUMENTED_ERRORS
    assert close is None or close in DOCUMENTED_CLOSES, close
    # every error is explained by a frame of this socket, and so is the close
    allowed = set().union(*(item.answers | item.may for item in sent)) | RATE_CODES
    closes = set().union(*(item.closes for item in sent))
    if flooded:
        allowed.add("flood")
        closes.add(4429)
    assert codes <= allowed, (codes - allowed, sent)
    fatal = {e["code"] for e in errors if e.get("fatal")}
    assert fatal <= {"flood", "unsupported_protocol"}, fatal
    assert close is None or close in closes, (close, sent)
    # every bad frame is answered: its code came, or it was rate-limited, or the socket closed
    limited = bool(codes & RATE_CODES)
    for item in sent:
        if item.answers and not item.answers & codes:
            assert limited or close is not None, (item, codes)
        if item.closes and not item.answers:
            assert close is not None, (item, codes)


def normal_session(
    client: TalkClient, stop: threading.Event, turns: list[int], failures: list[str]
) -> None:
    """A user with a normal session: a text turn every 2 s until told to stop."""
    n = 0
    while not stop.is_set():
        n += 1
        after = len(client.received)
        try:
            client.send_json({"type": "text", "text": f"normal turn {n}"})
            done = client.wait_for(lambda e: e["type"] == "reply.done", after=after, timeout=60)
            assert f"normal turn {n}" in done.event["text"], done.event
            turns.append(n)
        except Exception as exc:  # noqa: BLE001 — reported by the test
            failures.append(repr(exc))
            return
        stop.wait(2)


def test_hostile_frames_get_documented_answers_and_hurt_no_one(talker, voice_server):
    # given a user with a normal session, and a user who has used up their quota
    normal = talker("ada")
    hostile = User.objects.create_user("hostile", password="pw-123456!")
    User.objects.filter(pk=hostile.pk).update(tokens_quota=10)
    usage_set(hostile, tokens=11)
    conversation = conversation_start(user=hostile, persona=Persona.objects.get(slug="ada"))
    url = f"{voice_server.ws_url}/ws/conversations/{conversation.id}/"
    cookie = session_key_create(user=hostile)
    offset = voice_server.log_size()
    figures = Figures()
    stop = threading.Event()
    turns: list[int] = []
    failures: list[str] = []
    during = threading.Thread(target=normal_session, args=(normal, stop, turns, failures))
    during.start()

    # when hypothesis sends its examples
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking against a live server: the example is printed
        suppress_health_check=list(HealthCheck),
    )
    @given(examples)
    def one_socket(example):
        frames, flood, closer, greet = example
        frames = frames + (flood or []) + ([closer] if closer else [])
        fuzz_socket(url, cookie, frames, greet=greet, flooded=flood is not None, figures=figures)

    started = time.monotonic()
    try:
        one_socket()
    finally:
        stop.set()
        during.join(70)
    seconds = time.monotonic() - started

    # then the normal session was served all along, and still is
    assert failures == [] and len(turns) >= 3, (failures, turns)
    after = len(normal.received)
    normal.send_json({"type": "text", "text": "after the fuzz"})
    done = normal.wait_for(lambda e: e["type"] == "reply.done", after=after, timeout=60)
    assert "after the fuzz" in done.event["text"]
    assert_no_error(normal)
    figures.normal_turns = len(turns) + 1
    # and the server logged no exception
    time.sleep(1.5)  # Daphne logs an application's exception within a second of its end
    log = voice_server.log_since(offset)
    assert "Traceback" not in log and "Exception inside application" not in log, log[-4000:]
    assert figures.frames >= FRAMES_MIN, figures
    report = {
        "seconds": round(seconds, 1),
        "sockets": figures.examples,
        "frames_sent": figures.frames,
        "bad_frames_sent": figures.bad_frames,
        "frames_not_sent_after_a_close": figures.unsent,
        "error_events": sum(figures.errors.values()),
        "errors_by_code": dict(figures.errors.most_common()),
        "closes_by_code": {str(k): v for k, v in figures.closes.most_common()},
        "normal_turns_answered": figures.normal_turns,
        "exceptions_logged": 0,
        "loop_guard_lines": log.count("loop-guard:"),
    }
    (LOG_DIR / "fuzz-figures.json").write_text(json.dumps(report, indent=2))
    print("fuzz figures:", json.dumps(report))
