"""Many sockets streaming speech at once through one real Daphne, with the
loop guard on (tests/live.py turns it on in every live server): nothing may
block the event loop, no socket may fail, and every utterance's final
arrives exactly once."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from apps.conversations.models import TranscriptSegment
from apps.personas.tests.factories import PersonaFactory
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener

SOCKETS = 50
CLIP = "deepspeech_LDC93S1.wav"  # about 3 s of speech
SILENCE_1S = bytes(32_000)


def test_fifty_sockets_stream_speech_with_nothing_blocking_the_loop(
    transactional_db, live_env, live_worker
):
    # given a Daphne of this test's own (no drafts: the load stays on the web tier)
    server = live.start_daphne({**live_env, "STT_PARTIAL_EVERY_MS": "600000"})
    clients: list = []
    try:
        PersonaFactory(slug="loadtest", llm_kind="echo", tts_kind="espeak")
        open_socket = socket_opener(server, clients)
        sockets = [open_socket("loadtest") for _ in range(SOCKETS)]
        log_from = server.log_size()
        pcm = pcm_of(CLIP) + SILENCE_1S * 2

        # when every socket streams the clip at real-time pace, all at once
        with ThreadPoolExecutor(SOCKETS) as pool:
            list(pool.map(lambda client: client.stream(pcm), sockets))
        for client in sockets:
            client.wait_for(lambda e: e["type"] in ("transcript.final", "transcript.empty"),
                            timeout=180)  # fmt: skip
            client.wait_for(lambda e: e["type"] == "reply.done" and e["seq"] > 1, timeout=120)

        # then nothing blocked the loop, no socket failed, and each utterance
        # was finalised exactly once (on the socket and in the database)
        guard = [line for line in server.log_since(log_from).splitlines() if "loop-guard:" in line]
        assert guard == []
        for client in sockets:
            assert client.close_code is None and not client.closed.is_set()
            assert client.events("error") == []
            started = [e["utterance_id"] for e in client.events("speech.start")]
            finals = Counter(e["utterance_id"] for e in client.events("transcript.final"))
            assert started and all(finals[u] == 1 for u in started), (started, finals)
            stored = TranscriptSegment.objects.filter(conversation=client.conversation)
            assert sorted(s.utterance_id for s in stored) == sorted(started)
    finally:
        for client in clients:
            client.close()
        server.stop()
