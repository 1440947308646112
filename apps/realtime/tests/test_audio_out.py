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


def piece(reply_id: str, index: int, chunk: int, size: int, *, last: bool) -> dict:
    return {**audio(reply_id, index, size), "audio_key": f"{reply_id}:{index}:{chunk}",
            "chunk": chunk, "last": last}  # fmt: skip


async def test_a_parts_pieces_go_out_as_they_come_and_the_next_part_waits_for_its_last():
    blobs = {"r:0:0": bytes(2), "r:0:1": bytes(4), "r:0:2": bytes(6), "r:1:0": bytes(8)}
    sent: list = []
    out = sequencer(blobs, sent)

    # part 1 (one piece) is made before part 0 is done
    await out.push(piece("r", 1, 0, 8, last=True), greeted=True)
    await out.push(piece("r", 0, 0, 2, last=False), greeted=True)
    assert [m["chunk"] for m in sent if isinstance(m, dict)] == [0]  # part 0's first piece at once
    assert out.pending("r", 1)  # part 0 is not sent whole yet
    await out.push(piece("r", 0, 2, 6, last=True), greeted=True)
    await out.push(piece("r", 0, 0, 2, last=False), greeted=True)  # redelivered
    assert len([m for m in sent if isinstance(m, dict)]) == 1  # piece 1 is missing still
    await out.push(piece("r", 0, 1, 4, last=False), greeted=True)

    starts = [m for m in sent if isinstance(m, dict)]
    assert [(m["index"], m["chunk"], m["last"]) for m in starts] == [
        (0, 0, False), (0, 1, False), (0, 2, True), (1, 0, True)
    ]  # fmt: skip
    assert [m for m in sent if isinstance(m, int)] == [2, 4, 6, 8]
    assert "first_token_to_first_audio_ms" in starts[0]
    assert not any("first_token_to_first_audio_ms" in m for m in starts[1:])
    assert not out.pending("r", 2) and out.pending("r", 3)
    await out.push(piece("r", 1, 0, 8, last=True), greeted=True)  # redelivered late
    assert len([m for m in sent if isinstance(m, dict)]) == 4


async def test_a_stop_between_two_pieces_drops_the_rest_of_the_part():
    sent: list = []
    out = sequencer({"r:0:0": b"xx", "r:0:1": b"yy"}, sent)
    await out.push(piece("r", 0, 0, 2, last=False), greeted=True)

    out.drop_all()
    await out.push(piece("r", 0, 1, 2, last=True), greeted=True)

    assert [m["chunk"] for m in sent if isinstance(m, dict)] == [0]
