"""Every event the server sends, declared once (see docs/protocol.md).

Events are built with `event(type, **fields)`, which refuses unknown types
and missing fields. Schemas only: sending lives in `broadcast.py`, which puts
them on the conversation's group (`conversation.<uuid>`), so every socket of
the conversation sees them. Services publish them after the transaction that
stored their data commits."""

PROTOCOL_VERSION = 1

# type -> required fields. Optional fields may be added freely.
SERVER_EVENTS: dict[str, frozenset[str]] = {
    "ready": frozenset({"protocol", "conversation_id", "persona", "last_seq", "audio"}),
    "speech.start": frozenset({"utterance_id"}),
    "speech.end": frozenset({"utterance_id", "duration_ms"}),
    "transcript.partial": frozenset({"utterance_id", "text"}),
    "transcript.final": frozenset({"utterance_id", "seq", "text", "source"}),
    "transcript.empty": frozenset({"utterance_id"}),
    "reply.delta": frozenset({"reply_id", "text"}),
    "reply.done": frozenset({"reply_id", "seq", "text"}),
    "reply.interrupted": frozenset({"reply_id", "seq", "text"}),
    "reply.audio.start": frozenset({"reply_id", "index", "sample_rate", "format", "bytes"}),
    "error": frozenset({"code", "message"}),
    "pong": frozenset(),
}
# Internal events that travel on the channel layer only.
GROUP_ONLY_EVENTS: dict[str, frozenset[str]] = {
    # The audio itself waits in the audio store under `audio_key` (one copy,
    # whatever the number of sockets); the event stays small.
    "reply.audio": frozenset({"reply_id", "index", "sample_rate", "audio_key", "bytes"}),
    # Stop a reply wherever it runs (the one stop mechanism): the socket that
    # runs it cancels it, every socket drops its pending audio.
    "reply.stop": frozenset({"conversation_id", "issued_at"}),
    "transcript.candidate": frozenset(
        {"utterance_id", "end_byte", "text", "confidence", "provider"}
    ),
    # On a user's group: the user logged out (only that session's sockets close),
    # changed password or was deactivated (all close, with 4401).
    "session.ended": frozenset({"reason", "session_key"}),
}


def event(type_: str, **fields) -> dict:
    required = SERVER_EVENTS.get(type_, GROUP_ONLY_EVENTS.get(type_))
    if required is None:
        raise ValueError(f"undeclared event type {type_!r}")
    missing = required - fields.keys()
    if missing:
        raise ValueError(f"event {type_!r} lacks {', '.join(sorted(missing))}")
    return {"type": type_, **fields}


def group_name(conversation_id) -> str:
    return f"conversation.{conversation_id}"


def user_group_name(user_id) -> str:
    return f"user.{user_id}"
