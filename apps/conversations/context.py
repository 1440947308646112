"""The context cache: what every turn and every socket reads about a
conversation, kept in the `context` cache (Redis, shared by every process, in
services mode; this process's memory on embedded defaults), so that a turn does
not ask the database for it again (docs/database.md).

- `persona:<id>`: the persona's fields. Written through by the services that
  change a persona (apps/personas/services.py: the admin, seed_demo) once they
  commit, so the persona's next turn uses the edit, in every process. Readers
  only `add`: a reader that read the database before the edit committed cannot
  overwrite it.
- `conversation:<id>`: its user and persona, which never change.
- `history:<id>`: the conversation's newest finished turns (what a reply sends
  the LLM), with `top`, the highest seq the copy has seen, and the generation it
  was made at. Every service that stores a finished turn, once it commits,
  increments `history-gen:<id>` and, when the copy is of the generation just
  before, adds the turn to it. A copy is used only when its generation is the
  current one, so a turn stored by another process, two writers at once, or a
  copy made from a read that raced a write, all make it a miss, never a stale
  hit. A reply also checks that the copy has seen the turn before its own seq.

Every read is counted, by kind and result, in the Prometheus counter
`parley_context_cache_reads_total` (/metrics). A cache that fails (Redis down) is
left alone for CACHE_RETRY_S and the database answers: a turn never fails on it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from django.conf import settings
from django.core.cache import BaseCache, caches
from prometheus_client import Counter

from apps.personas.models import Persona

from .models import Conversation, Message

log = logging.getLogger(__name__)

CACHE_ALIAS = "context"
CACHE_RETRY_S = 5.0  # after a cache failure, the database answers alone this long
HISTORY_TURNS = 100  # the newest finished turns a history copy keeps
GENERATION_TTL_S = 86_400
VERSION = 1  # part of every key: a change of what is stored changes the keys

READS = Counter(
    "parley_context_cache_reads",
    "Persona and conversation context reads, by kind (persona, conversation, history) "
    "and result (hit, miss, error: the cache failed and the database answered).",
    ["kind", "result"],
)


class Turn(NamedTuple):
    """A finished turn as a reply sends it to the LLM."""

    seq: int
    role: str
    text: str


@dataclass(frozen=True)
class ConversationContext:
    conversation_id: UUID
    user_id: int
    persona: Persona


class CacheUnavailable(Exception):
    pass


class _Breaker:
    down_until = 0.0


@contextmanager
def _cache() -> Iterator[BaseCache]:
    """The context cache, unless it failed less than CACHE_RETRY_S ago. A failure
    inside opens the breaker and becomes CacheUnavailable."""
    if time.monotonic() < _Breaker.down_until:
        raise CacheUnavailable
    try:
        yield caches[CACHE_ALIAS]
    except CacheUnavailable:
        raise
    except Exception as exc:
        _Breaker.down_until = time.monotonic() + CACHE_RETRY_S
        log.warning("context cache unavailable for %.0f s: %r", CACHE_RETRY_S, exc)
        raise CacheUnavailable from exc


def _new_generation() -> int:
    """A generation no copy can have: the time in µs, far ahead of any earlier
    generation plus its increments (and below 2**53: django-redis's INCR answers
    through a double)."""
    return time.time_ns() // 1000


def _key(kind: str, id_: object) -> str:
    return f"v{VERSION}:{kind}:{id_}"


def _ttl() -> int:
    return settings.CONTEXT_CACHE_TTL_S


# --- Persona --------------------------------------------------------------------------


def _persona_fields(persona: Persona) -> dict[str, Any]:
    return {f.attname: getattr(persona, f.attname) for f in Persona._meta.concrete_fields}


def _persona_from(fields: dict[str, Any]) -> Persona:
    names = [f.attname for f in Persona._meta.concrete_fields]
    return Persona.from_db("default", names, [fields[name] for name in names])


def persona_of(*, persona_id: UUID) -> Persona:
    """The persona as staff last saved it."""
    key = _key("persona", persona_id)
    try:
        with _cache() as cache:
            fields = cache.get(key)
    except CacheUnavailable:
        READS.labels("persona", "error").inc()
        return Persona.objects.get(pk=persona_id)
    if fields is not None:
        READS.labels("persona", "hit").inc()
        return _persona_from(fields)
    READS.labels("persona", "miss").inc()
    persona = Persona.objects.get(pk=persona_id)
    _persona_add(persona)
    return persona


def _persona_add(persona: Persona) -> None:
    try:
        with _cache() as cache:
            cache.add(_key("persona", persona.pk), _persona_fields(persona), _ttl())
    except CacheUnavailable:
        pass


def persona_remember(*, persona: Persona) -> None:
    """Write a persona just saved (and committed) through to the cache; if that
    fails, try to drop the old copy."""
    key = _key("persona", persona.pk)
    try:
        with _cache() as cache:
            cache.set(key, _persona_fields(persona), _ttl())
    except CacheUnavailable:
        persona_forget(persona_id=persona.pk)


def persona_forget(*, persona_id: UUID) -> None:
    try:
        with _cache() as cache:
            cache.delete(_key("persona", persona_id))
    except CacheUnavailable:
        log.warning("could not drop persona %s from the context cache", persona_id)


# --- Conversation ---------------------------------------------------------------------


def conversation_context(*, conversation_id: UUID) -> ConversationContext | None:
    """The conversation's user and persona, or None when there is no such conversation."""
    key = _key("conversation", conversation_id)
    try:
        with _cache() as cache:
            cached = cache.get(key)
    except CacheUnavailable:
        READS.labels("conversation", "error").inc()
        cached = None
    else:
        READS.labels("conversation", "miss" if cached is None else "hit").inc()
    if cached is not None:
        user_id, persona_id = cached
        persona = persona_of(persona_id=persona_id)
        return ConversationContext(conversation_id, user_id, persona)
    found = (
        Conversation.objects.select_related("persona").filter(pk=conversation_id).order_by().first()
    )
    if found is None:
        return None
    conversation_remember(conversation=found)
    return ConversationContext(found.id, found.user_id, found.persona)


def conversation_remember(*, conversation: Conversation) -> None:
    """Cache a conversation's user and persona (they never change), and its persona."""
    try:
        with _cache() as cache:
            cache.add(
                _key("conversation", conversation.id),
                (conversation.user_id, conversation.persona_id),
                _ttl(),
            )
    except CacheUnavailable:
        return
    _persona_add(conversation.persona)


def conversation_forget(*, conversation_id: UUID) -> None:
    """A deleted conversation: drop what the cache knows of it."""
    try:
        with _cache() as cache:
            cache.delete_many(
                [_key("conversation", conversation_id), _key("history", conversation_id)]
            )
    except CacheUnavailable:
        log.warning("could not drop conversation %s from the context cache", conversation_id)


# --- History --------------------------------------------------------------------------


def history_turns(*, conversation_id: UUID, through_seq: int = 0) -> list[Turn]:
    """The conversation's newest finished, non-empty turns (at most HISTORY_TURNS),
    oldest first: the cached copy when it is of the current generation, no older
    than CONTEXT_CACHE_TTL_S, and has seen every seq up to `through_seq`; else
    from the database (and cached)."""
    keys = [_key("history-gen", conversation_id), _key("history", conversation_id)]
    try:
        with _cache() as cache:
            found = cache.get_many(keys)
            generation, copy = found.get(keys[0]), found.get(keys[1])
            if (
                generation is not None
                and copy is not None
                and copy["generation"] == generation
                and copy["top"] >= through_seq
                and time.time() - copy["born"] < _ttl()
            ):
                READS.labels("history", "hit").inc()
                return [Turn(*turn) for turn in copy["turns"]]
            if generation is None:  # a first copy, or its generation expired
                cache.add(keys[0], _new_generation(), GENERATION_TTL_S)
                generation = cache.get_many(keys[:1]).get(keys[0])
    except CacheUnavailable:
        READS.labels("history", "error").inc()
        return _history_read(conversation_id)[1]
    READS.labels("history", "miss").inc()
    # The generation was read before the database: a turn stored from now on
    # increments it, so this copy cannot hide that turn.
    top, turns = _history_read(conversation_id)
    if generation is not None:
        stored = [tuple(turn) for turn in turns]
        copy = {"generation": generation, "born": time.time(), "top": top, "turns": stored}
        try:
            with _cache() as cache:
                cache.set(keys[1], copy, _ttl())
        except CacheUnavailable:
            pass
    return turns


def _history_read(conversation_id: UUID) -> tuple[int, list[Turn]]:
    """The highest seq stored, and the finished, non-empty turns among the newest
    HISTORY_TURNS, oldest first (one query)."""
    newest = list(
        Message.objects.filter(conversation_id=conversation_id)
        .order_by("-seq")
        .values_list("seq", "role", "text", "status")[:HISTORY_TURNS]
    )
    top = newest[0][0] if newest else 0
    turns = [
        Turn(seq, role, text)
        for seq, role, text, status in reversed(newest)
        if text and status != Message.Status.STREAMING
    ]
    return top, turns


def history_prime(*, conversation_id: UUID, turns: list[Turn]) -> None:
    """The copy of a conversation just created (with these turns): nothing else
    can have written to it, so its first turn need not read the database."""
    keys = [_key("history-gen", conversation_id), _key("history", conversation_id)]
    generation = _new_generation()
    copy = {
        "generation": generation,
        "born": time.time(),
        "top": max([0, *(turn.seq for turn in turns)]),
        "turns": [tuple(turn) for turn in turns],
    }
    try:
        with _cache() as cache:
            if cache.add(keys[0], generation, GENERATION_TTL_S):
                cache.set(keys[1], copy, _ttl())
    except CacheUnavailable:
        pass


def turn_stored(*, message: Message) -> None:
    """A turn was stored or finished and committed: a new generation of the
    conversation's history, and the cached copy brought up to it when it was
    of the generation before. Call after commit, before telling the sockets."""
    conversation_id = message.conversation_id
    keys = [_key("history-gen", conversation_id), _key("history", conversation_id)]
    try:
        with _cache() as cache:
            try:
                generation = cache.incr(keys[0])
            except ValueError:  # no generation (new, expired, evicted): one no copy has
                cache.add(keys[0], _new_generation(), GENERATION_TTL_S)
                return
            copy = cache.get_many(keys[1:]).get(keys[1])
            if copy is None or copy["generation"] != generation - 1:
                return  # no copy, or one another writer is behind: the next read makes one
            turns = [tuple(turn) for turn in copy["turns"] if turn[0] != message.seq]
            if message.text and message.status != Message.Status.STREAMING:
                turns.append((message.seq, str(message.role), message.text))
                turns.sort()
            copy = {
                **copy,
                "generation": generation,
                "top": max(copy["top"], message.seq),
                "turns": turns[-HISTORY_TURNS:],
            }
            cache.set(keys[1], copy, _ttl())
    except CacheUnavailable:
        history_forget(conversation_id=conversation_id)


def history_forget(*, conversation_id: UUID) -> None:
    """A turn changed outside the services above (the admin): the next read
    makes a new copy. Safe against a concurrent reader, as a new generation."""
    key = _key("history-gen", conversation_id)
    try:
        with _cache() as cache:
            try:
                cache.incr(key)
            except ValueError:
                pass
            else:
                return
    except CacheUnavailable:
        pass
    try:
        with _cache() as cache:
            cache.delete_many([key, _key("history", conversation_id)])
    except CacheUnavailable:
        log.warning("could not drop conversation %s's history from the cache", conversation_id)
