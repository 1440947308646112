from apps.realtime.audio_out import AUDIO_CHUNK_BYTES, AudioSequencer


def sequencer(blobs: dict[str, bytes], sent: list):
    async def send_event(message):
        sent.append(message)

    async def send_bytes(data):
        sent.append(len(data))

    async def fetch(key):
        return blobs.get(key)

    return AudioSequencer(
        send_event=send_event,
        send_bytes=send_bytes,
        fetch=fetch,
        timing=lambda reply_id: {"first_token_to_first_audio_ms": 7},
    )


def audio(reply_id: str, index: int, size: int) -> dict:
    key = f"{reply_id}:{index}"
    return {"reply_id": reply_id, "index": index, "sample_rate": 22050, "audio_key": key,
            "bytes": size}  # fmt: skip


async def test_sentences_go_out_in_order_fetched_by_key_each_once():
    blobs = {"r:0": bytes(AUDIO_CHUNK_BYTES + 10), "r:1": bytes(4), "r:2": bytes(6)}
    sent: list = []
    out = sequencer(blobs, sent)

    await out.push(audio("r", 2, 6), greeted=True)
    await out.push(audio("r", 1, 4), greeted=True)
    assert sent == []  # waiting for sentence 0
    await out.push(audio("r", 0, AUDIO_CHUNK_BYTES + 10), greeted=True)
    await out.push(audio("r", 1, 4), greeted=True)  # redelivered: sent already

    starts = [m for m in sent if isinstance(m, dict)]
    assert [m["index"] for m in starts] == [0, 1, 2]
    assert starts[0]["first_token_to_first_audio_ms"] == 7
    assert "first_token_to_first_audio_ms" not in starts[1]
    assert [m for m in sent if isinstance(m, int)] == [AUDIO_CHUNK_BYTES, 10, 4, 6]
    assert not out.pending("r", 3) and out.pending("r", 4)


async def test_a_stop_drops_known_replies_and_a_late_joiner_gets_text_only():
    sent: list = []
    out = sequencer({"a:0": b"xx", "b:0": b"yy", "c:0": b"zz"}, sent)
    out.known("a")  # streaming when the stop came
    out.drop_all()
    await out.push(audio("a", 0, 2), greeted=True)
    await out.push(audio("b", 0, 2), greeted=False)  # began before this socket's hello
    await out.push(audio("c", 0, 2), greeted=True)  # a new reply after the stop

    assert [m["reply_id"] for m in sent if isinstance(m, dict)] == ["c"]
