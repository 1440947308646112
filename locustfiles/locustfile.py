"""Parley's load test: people browsing, talking and typing (locustfiles/README.md).

    locust -f locustfiles/locustfile.py --host http://127.0.0.1:8000 \\
        --users-file var/loadtest-users.json --audio-dir tests/data/audio

- `HttpBrowser`: signs in through the login form, browses the persona gallery,
  the history, the transcripts and the usage page.
- `VoiceTalker`: signs in, starts a conversation from the gallery, opens its
  socket and speaks the clips of --audio-dir at real-time pace, each followed
  by 2 s of silence, waiting for the final transcript, the reply and all its
  audio before the next. Each stage is a request of type "voice".
- `TextTyper`: the same socket with typed turns (type "text").

Protocol `error` events, unexpected closes and turns that time out are failures.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apps.pipeline.talk_client import (  # noqa: E402
    Received,
    SpokenTurn,
    TalkClient,
    spoken_turns,
    text_turn,
)
from locustfiles import common  # noqa: E402
from locustfiles.soak import SENT_KINDS, sent_record  # noqa: E402

CONNECT_TIMEOUT_S = 15.0  # opening the socket, and hello → ready
SILENCE = bytes(32_000 * 2)  # 2 s after each clip, so the endpointer ends the utterance
PHRASES = (
    "Can you explain what a prime number is?",
    "Tell me a short story about the sea.",
    "How do I take a calm breath?",
    "What is seven times eight?",
)


class ProtocolError(Exception):
    pass


# What the sockets of this process were sent, for --sent-log (`make soak` counts it).
SENT: list[dict] = []


class SocketUser(HttpUser):
    """Signs in, starts a conversation from the gallery and keeps its socket open."""

    abstract = True
    wait_time = between(1, 3)
    request_type = "ws"

    def on_start(self) -> None:
        self.talk: TalkClient | None = None
        self.conversation_id = ""
        self.closing = False

    def on_stop(self) -> None:
        self.socket_close()

    @property
    def options(self):
        return self.environment.parsed_options

    def ready(self) -> TalkClient | None:
        """The open socket, signing in, starting a conversation and connecting
        as needed; None (a failure was reported) when a step failed."""
        if self.talk is not None and not self.talk.closed.is_set():
            return self.talk
        if self.talk is not None:  # closed by the server or the network
            code = self.talk.close_code
            self.fail("socket_closed", ProtocolError(f"socket closed unexpectedly ({code})"))
            self.talk = None
        try:
            if not common.session_cookie(self.client):
                common.login(self.client, common.account_take(self.options.users_file))
            if not self.conversation_id:
                self.conversation_id = self.conversation_start()
            host = (self.host or "").rstrip("/")  # Locust refuses to start without one
            started = time.monotonic()
            talk = TalkClient(
                common.socket_url(host, self.conversation_id),
                session_cookie=common.session_cookie(self.client),
                origin=host,
                on_event=self.on_event,
                keep_audio=False,
            )
            ready = talk.connect(timeout=CONNECT_TIMEOUT_S)
        except (OSError, LookupError, PermissionError, TimeoutError) as exc:
            self.fail("connect", exc)
            return None
        if ready.get("type") != "ready":  # the error event was reported by on_event
            talk.close()
            return None
        common.stage_report(self.environment, "ws", "connect", common.elapsed_since(started))
        self.talk = talk
        return talk

    def conversation_start(self) -> str:
        """POST one of the gallery's talk forms; the redirect names the conversation."""
        gallery = self.client.get("/", name="/")
        gallery.raise_for_status()
        forms = common.TALK_FORM.findall(gallery.text)
        if not forms:
            raise LookupError("the gallery shows no persona to talk to")
        response = self.client.post(
            random.choice(forms),
            data={"csrfmiddlewaretoken": common.csrf_token(gallery.text)},
            headers={"Referer": gallery.url},
            name="/personas/[slug]/talk/",
        )
        response.raise_for_status()
        found = common.CONVERSATION_URL.search(response.url)
        if found is None:
            raise LookupError(f"starting a conversation led to {response.url}")
        return found.group(1)

    def on_event(self, item: Received) -> None:
        event = item.event
        if event["type"] == "error":
            self.fail("protocol_error", ProtocolError(common.event_summary(event)))
        elif event["type"] in SENT_KINDS and self.options.sent_log:
            SENT.append(sent_record(self.conversation_id, event))

    def fail(self, name: str, exc: BaseException) -> None:
        common.stage_report(self.environment, self.request_type, name, None, exc)

    def turn_failed(self, talk: TalkClient, exc: BaseException) -> None:
        """A turn that timed out or lost its socket; the next task starts on a fresh one."""
        if talk.closed.is_set():
            code = talk.close_code
            self.fail("socket_closed", ProtocolError(f"socket closed unexpectedly ({code})"))
        else:
            self.fail("turn", exc)
        self.socket_close()

    def socket_close(self) -> None:
        if self.talk is not None:
            talk, self.talk = self.talk, None
            talk.close()


class VoiceTalker(SocketUser):
    request_type = "voice"

    def on_start(self) -> None:
        super().on_start()
        self.clips = common.clips(self.options.audio_dir)
        self.next_clip = random.randrange(len(self.clips))

    @task
    def speak(self) -> None:
        talk = self.ready()
        if talk is None:
            return
        name, pcm = self.clips[self.next_clip % len(self.clips)]
        self.next_clip += 1
        after = len(talk.received)
        try:
            talk.stream(pcm + SILENCE)
            turns = talk.wait_until(
                lambda received: spoken_turns(received, after), timeout=self.options.turn_timeout
            )
        except (OSError, TimeoutError) as exc:
            self.turn_failed(talk, type(exc)(f"{name}: {exc}"))
            return
        for turn in turns:
            self.turn_report(turn)

    def turn_report(self, turn: SpokenTurn) -> None:
        report = common.stage_report
        env = self.environment
        report(env, "voice", "speech_end_to_final", turn.final_t - turn.speech_end_t)
        reply = turn.reply
        if reply is None:
            report(env, "voice", "transcript_empty", turn.final_t - turn.speech_end_t)
            return
        assert reply.complete_t is not None and reply.done_t is not None
        if reply.status == "interrupted" or reply.audio_cut:  # apart, never in the latencies
            report(env, "voice", "turn_interrupted", reply.done_t - turn.speech_end_t)
            return
        if reply.status != "complete":
            self.fail("turn", ProtocolError(f"reply {reply.status}"))
            return
        if reply.first_token_t is not None:
            report(env, "voice", "final_to_first_token", reply.first_token_t - turn.final_t)
            if reply.first_audio_t is not None:
                report(
                    env,
                    "voice",
                    "first_token_to_first_audio",
                    reply.first_audio_t - reply.first_token_t,
                )
        report(env, "voice", "turn", reply.complete_t - turn.speech_end_t)


class TextTyper(SocketUser):
    request_type = "text"

    @task
    def type_turn(self) -> None:
        talk = self.ready()
        if talk is None:
            return
        try:
            turn = text_turn(talk, random.choice(PHRASES), timeout=self.options.turn_timeout)
        except (OSError, TimeoutError) as exc:
            self.turn_failed(talk, exc)
            return
        reply = turn.reply
        assert reply.complete_t is not None
        if reply.status != "complete":
            self.fail("turn", ProtocolError(f"reply {reply.status}"))
            return
        report, env = common.stage_report, self.environment
        report(env, "text", "text_to_final", turn.final_t - turn.sent_t)
        if reply.first_token_t is not None:
            report(env, "text", "final_to_first_token", reply.first_token_t - turn.final_t)
        report(env, "text", "turn", reply.complete_t - turn.sent_t)


class HttpBrowser(HttpUser):
    """Signs in through the login form and reads pages."""

    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.account = common.account_take(self.environment.parsed_options.users_file)
        self.seen = [self.account.conversation_id]

    def page(self, path: str, name: str) -> str:
        if not common.session_cookie(self.client):
            try:
                common.login(self.client, self.account)
            except (OSError, LookupError, PermissionError):
                return ""  # reported as the login request's failure
        with self.client.get(path, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif "/accounts/login/" in response.url:
                response.failure("signed out: the page redirected to the login form")
            return response.text or ""

    @task(2)
    def gallery(self) -> None:
        self.page("/", "/")

    @task(2)
    def history(self) -> None:
        html = self.page("/conversations/", "/conversations/")
        self.seen = common.CONVERSATION_LINK.findall(html)[:20] or self.seen

    @task(3)
    def transcript(self) -> None:
        conversation = random.choice(self.seen)
        self.page(f"/conversations/{conversation}/transcript/", "/conversations/[id]/transcript/")

    @task(1)
    def usage(self) -> None:
        self.page("/accounts/usage/", "/accounts/usage/")


KINDS = {"http": HttpBrowser, "voice": VoiceTalker, "text": TextTyper}


@events.quitting.add_listener
def _sent_write(environment, **_kwargs) -> None:
    folder = environment.parsed_options.sent_log
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in SENT)
        (Path(folder) / f"sent-{os.getpid()}.jsonl").write_text(lines)


@events.init.add_listener
def _check_and_weigh(environment, **_kwargs) -> None:
    """Read the options' inputs before any user starts, and weigh the kinds by --mix."""
    try:
        weights = common.options_check(environment)
    except common.LoadtestConfigError as exc:
        sys.exit(f"locust: {exc}")
    for kind, user_class in KINDS.items():
        user_class.weight = weights[kind]
    environment.user_classes[:] = [c for c in environment.user_classes if c.weight > 0]
