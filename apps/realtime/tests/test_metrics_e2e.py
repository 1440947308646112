"""The metrics move by the right amounts: one voice turn through a real socket
on a real Daphne (and, in services mode, a real Celery worker, scraped on its
own exporter), read as Prometheus reads them (the exposition format, parsed),
before and after. An interrupted turn is counted apart and never enters the
latency histograms. Anonymous scrapes are refused."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.conversations.models import Message
from apps.pipeline.talk_client import FRAME_BYTES, TalkClient
from tests.audio import pcm_of
from tests.live import free_port, http_get, metrics_get

from .helpers import SILENCE_2S, speak, wait_until

Sample = tuple[str, tuple[tuple[str, str], ...]]
CLIP = "deepspeech_LDC93S1.wav"  # one short sentence
LONG_TEXT = " ".join(["tell me a long story about the sea and the stars"] * 12)


def scrape(url: str) -> dict[Sample, float]:
    """Every sample of a /metrics page: {(name, sorted labels): value}."""
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(metrics_get(f"{url}/metrics")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


class Stack:
    """The web process and, in services mode, the worker: scraped together."""

    def __init__(self, daphne, worker) -> None:
        self.web_url = daphne.url
        self.worker_url = worker.metrics_url if worker is not None else None

    def scrape(self) -> tuple[dict[Sample, float], dict[Sample, float]]:
        worker = scrape(self.worker_url) if self.worker_url else {}
        return scrape(self.web_url), worker


@pytest.fixture
def stack(voice_server, live_worker) -> Stack:
    return Stack(voice_server, live_worker)


def both(web: dict, worker: dict, name: str, **labels: str) -> float:
    """Pipeline figures are counted where the work ran: a worker, or (embedded) Daphne."""
    return total(web, name, **labels) + total(worker, name, **labels)


def test_one_voice_turn_moves_web_and_worker_metrics_by_the_right_amounts(talker, stack):
    # given a socket not yet open, and the metrics before
    client = talker("ada", connect=False)
    web0, worker0 = stack.scrape()

    # when it opens, speaks one sentence and hears the reply out
    ready = client.connect()
    assert ready["type"] == "ready", ready
    web_open, _ = stack.scrape()
    pcm = pcm_of(CLIP) + SILENCE_2S
    events = speak(client, pcm_of(CLIP))
    client.close()
    finals = [e for e in events if e["type"] == "transcript.final"]
    done = [e for e in events if e["type"] == "reply.done"]
    assert len(finals) == 1 and len(done) == 1, [e["type"] for e in events]
    reply = Message.objects.get(pk=done[0]["reply_id"])
    engines = ready["engines"]
    wait_until(lambda: reply.__class__.objects.get(pk=reply.pk).first_token_to_first_audio_ms)
    reply.refresh_from_db()

    web, worker = stack.scrape()

    def delta(name: str, **labels: str) -> float:
        return both(web, worker, name, **labels) - both(web0, worker0, name, **labels)

    # then the socket figures (web process)
    assert delta("parley_sockets_opened_total", result="accepted") == 1
    assert total(web_open, "parley_sockets_open") == total(web0, "parley_sockets_open") + 1
    assert total(web, "parley_sockets_open") == total(web0, "parley_sockets_open")
    frames = -(-len(pcm) // FRAME_BYTES)
    assert delta("parley_socket_frames_received_total", kind="audio") == frames
    assert delta("parley_socket_received_bytes_total", kind="audio") == len(pcm)
    assert delta("parley_socket_frames_received_total", kind="control") == 1  # hello
    assert delta("parley_socket_closes_total") == 1
    assert delta("parley_socket_protocol_errors_total") == 0
    assert total(web, "parley_event_loop_lag_seconds_count") > 0
    assert total(web, "parley_process_info", role="web") == 1

    # each stage observed once, under its engine kind
    stages = {
        "speech_end_to_final": engines["stt"],
        "final_to_first_token": engines["llm"],
        "first_token_to_first_audio": engines["tts"],
    }
    for stage, engine in stages.items():
        assert delta("parley_stage_seconds_count", stage=stage, engine=engine) == 1, stage
        assert delta("parley_stage_seconds_count", stage=stage) == 1, stage
    stored_ms = reply.final_to_first_token_ms
    assert delta("parley_stage_seconds_sum", stage="final_to_first_token") == pytest.approx(
        stored_ms / 1000
    )
    assert delta("parley_replies_total", engine=engines["llm"], outcome="complete") == 1
    assert delta("parley_replies_total", outcome="interrupted") == 0
    assert delta("parley_llm_tokens_total", direction="in") == reply.prompt_tokens > 0
    assert delta("parley_llm_tokens_total", direction="out") == reply.completion_tokens > 0

    # the work's figures: STT and TTS (on the worker in services mode)
    pipeline = worker if stack.worker_url else web
    pipeline0 = worker0 if stack.worker_url else web0
    assert total(pipeline, "parley_stt_audio_seconds_total") > total(
        pipeline0, "parley_stt_audio_seconds_total"
    )
    assert total(pipeline, "parley_stt_batch_size_count") > total(
        pipeline0, "parley_stt_batch_size_count"
    )
    spoken_s = sum(
        e["bytes"] / 2 / e["sample_rate"]
        for e in events
        if e["type"] == "reply.audio.start" and e["reply_id"] == str(reply.id)
    )
    tts = "parley_tts_audio_seconds_total"
    produced = total(pipeline, tts, engine=engines["tts"]) - total(
        pipeline0, tts, engine=engines["tts"]
    )
    assert produced == pytest.approx(spoken_s, rel=1e-6) and produced > 0
    assert delta("parley_provider_errors_total") == 0

    if stack.worker_url:  # the worker ran the turn's tasks, and holds none now
        ran = "parley_task_seconds_count"
        for queue in ("stt", "tts"):
            assert total(worker, ran, queue=queue, outcome="ok") > total(
                worker0, ran, queue=queue, outcome="ok"
            ), queue
        assert total(worker, "parley_task_seconds_count", outcome="error") == total(
            worker0, "parley_task_seconds_count", outcome="error"
        )
        assert total(worker, "parley_worker_tasks_in_flight") == 0
        assert total(worker, "parley_worker_threads") > 0
        roles = [dict(ls)["role"] for (n, ls) in worker if n == "parley_process_info"]
        assert len(roles) == 1 and roles[0].startswith("worker"), roles


def test_an_interrupted_turn_is_counted_apart_and_never_timed(talker, stack):
    # given a reply streaming
    client = talker("ada")
    engine = client.ready["engines"]["llm"]
    after = len(client.received)
    web0, worker0 = stack.scrape()
    client.send_json({"type": "text", "text": LONG_TEXT})
    client.wait_for(lambda e: e["type"] == "reply.delta", after=after)

    # when the user stops it
    client.send_json({"type": "interrupt"})
    client.wait_for(lambda e: e["type"] == "reply.interrupted", after=after)
    client.wait_quiet(quiet=1.5)
    web, worker = stack.scrape()

    def delta(name: str, **labels: str) -> float:
        return both(web, worker, name, **labels) - both(web0, worker0, name, **labels)

    # then it is counted as interrupted, and the latency histograms did not move
    assert delta("parley_replies_total", engine=engine, outcome="interrupted") == 1
    assert delta("parley_replies_total", outcome="complete") == 0
    for stage in ("final_to_first_token", "first_token_to_first_audio"):
        assert delta("parley_stage_seconds_count", stage=stage) == 0, stage
        assert delta("parley_stage_seconds_sum", stage=stage) == 0, stage


def test_a_socket_streams_while_frames_arrive_and_errors_and_refusals_are_counted(talker, stack):
    # given a socket that says hello but no audio yet, and a stranger without a session
    client = talker("ada")
    web0, _ = stack.scrape()
    assert total(web0, "parley_sockets_streaming") == 0

    # when it streams audio, then stops
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(client.stream, SILENCE_2S * 2)
        seen = wait_until(
            lambda: total(stack.scrape()[0], "parley_sockets_streaming") or None, timeout=10
        )
        streaming.result(timeout=30)
    # then it counted as streaming while frames came, and not a second after
    assert seen == 1
    wait_until(lambda: total(stack.scrape()[0], "parley_sockets_streaming") == 0, timeout=5)

    # when a frame comes before hello, and a socket without a session is refused
    early = talker("ada", connect=False)
    early.connect(hello=False)
    early.send_bytes(bytes(3200))
    early.wait_for(lambda e: e["type"] == "error")
    anonymous = TalkClient(client.url)
    anonymous.connect(hello=False)
    anonymous.closed.wait(10)
    assert anonymous.close_code == 4401
    web, _ = stack.scrape()

    # then
    def delta(name: str, **labels: str) -> float:
        return total(web, name, **labels) - total(web0, name, **labels)

    assert delta("parley_socket_protocol_errors_total", code="hello_required") == 1
    assert delta("parley_sockets_opened_total", result="4401") == 1
    assert delta("parley_socket_closes_total") >= 1  # the refused one (4401)
    assert delta("parley_sockets_opened_total", result="accepted") == 1  # `early`


def test_anonymous_scrapes_are_refused_on_web_and_worker(voice_server, live_worker):
    urls = [voice_server.url] + ([live_worker.metrics_url] if live_worker is not None else [])
    for url in urls:
        # anonymous, or with the wrong token: refused
        status, headers, body = http_get(f"{url}/metrics")
        assert status == 401, (url, status, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert b"parley_" not in body
        wrong = {"Authorization": "Bearer not-the-token"}
        assert http_get(f"{url}/metrics", headers=wrong)[0] == 401
        # the token's bearer reads them
        assert "parley_process_info" in metrics_get(f"{url}/metrics")


def test_the_worker_exporter_answers_its_probes(live_worker, services_mode):
    if services_mode:  # the live worker's own exporter
        url = live_worker.metrics_url
    else:  # no worker process: an exporter in this process, whose consumer never starts
        from apps.observability.exporter import exporter_start

        server = exporter_start(free_port(), "127.0.0.1")
        assert server is not None
        url = f"http://127.0.0.1:{server.server_address[1]}"

    status, _, body = http_get(f"{url}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    status, _, body = http_get(f"{url}/readyz")
    checks = json.loads(body)
    if services_mode:
        assert (status, checks) == (
            200,
            {
                "status": "ok",
                "broker": "ok",
                "consumer": "ok",
                "stt_engine": "ok",
                "tts_engine": "ok",
            },
        )
        assert total(scrape(url), "parley_ready") == 1
    else:
        assert status == 503 and checks["consumer"] == "starting", checks
    # anonymous: refused (this test process has no METRICS_TOKEN: disabled, 403)
    assert http_get(f"{url}/metrics")[0] == (401 if services_mode else 403)
    assert http_get(f"{url}/nothing")[0] == 404
