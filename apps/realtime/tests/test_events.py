import pytest

from apps.realtime.consumers import ConversationConsumer
from apps.realtime.events import GROUP_ONLY_EVENTS, SERVER_EVENTS, event, group_name

# Events that services and workers send through the conversation's group; the
# consumer handles type "x.y" with method x_y (Channels' convention).
GROUP_EVENTS = [
    "transcript.partial",
    "transcript.final",
    "transcript.empty",
    "reply.delta",
    "reply.done",
    "reply.interrupted",
    "reply.audio",
    "error",
]


@pytest.mark.parametrize("type_", sorted({**SERVER_EVENTS, **GROUP_ONLY_EVENTS}))
def test_every_declared_event_builds_from_its_required_fields(type_):
    required = {**SERVER_EVENTS, **GROUP_ONLY_EVENTS}[type_]
    fields = {name: f"value of {name}" for name in required}

    assert event(type_, **fields) == {"type": type_, **fields}


@pytest.mark.parametrize("type_", ["reply.finished", "transcript", "", "Ready", "speech_start"])
def test_event_refuses_undeclared_types(type_):
    with pytest.raises(ValueError, match="undeclared event type"):
        event(type_, utterance_id="u")


@pytest.mark.parametrize(
    "type_", [t for t, required in {**SERVER_EVENTS, **GROUP_ONLY_EVENTS}.items() if required]
)
def test_event_refuses_each_missing_required_field(type_):
    required = {**SERVER_EVENTS, **GROUP_ONLY_EVENTS}[type_]
    for missing in required:
        fields = {name: 1 for name in required if name != missing}
        with pytest.raises(ValueError, match=missing):
            event(type_, **fields)


def test_event_names_all_missing_fields():
    with pytest.raises(ValueError, match="lacks seq, source, text, utterance_id"):
        event("transcript.final")


def test_a_required_field_may_be_none_and_optional_fields_are_kept():
    built = event(
        "transcript.final", utterance_id=None, seq=3, text="hi", source="text", replayed=True
    )

    assert built == {
        "type": "transcript.final",
        "utterance_id": None,
        "seq": 3,
        "text": "hi",
        "source": "text",
        "replayed": True,
    }


def test_pong_needs_nothing():
    assert event("pong") == {"type": "pong"}


def test_group_name():
    assert group_name("1b4e28ba-2fa1-11d2-883f-0016d3cca427") == (
        "conversation.1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    )


@pytest.mark.parametrize("type_", GROUP_EVENTS)
def test_the_consumer_handles_every_group_event(type_):
    assert type_ in SERVER_EVENTS or type_ in GROUP_ONLY_EVENTS
    assert callable(getattr(ConversationConsumer, type_.replace(".", "_"), None))
