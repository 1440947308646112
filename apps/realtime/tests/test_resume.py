from apps.realtime.resume import ResumeGate


async def test_live_events_wait_for_the_replay_and_each_turn_is_sent_once():
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    gate = ResumeGate(send=send)
    # given live events that arrive while the replay is read
    await gate.forward({"type": "reply.delta", "text": "Hi"})
    await gate.forward({"type": "reply.done", "seq": 3})

    # when the replay holds turn 3 too
    await gate.open([{"type": "transcript.final", "seq": 2}, {"type": "reply.done", "seq": 3}])
    await gate.forward({"type": "reply.done", "seq": 3})  # a late duplicate

    assert [(m["type"], m.get("seq")) for m in sent] == [
        ("transcript.final", 2),
        ("reply.done", 3),
        ("reply.delta", None),
    ]


async def test_a_socket_that_never_says_hello_holds_a_bounded_number(settings):
    settings.WS_HELD_EVENTS_MAX = 3
    gate = ResumeGate(send=None)
    for n in range(10):
        await gate.forward({"type": "reply.delta", "text": str(n)})
    assert len(gate.held) == 3
