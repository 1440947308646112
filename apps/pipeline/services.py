"""The voice pipeline's workflows: transcribe a window, speak a sentence
(both run on workers), and stream a reply (runs on the web process's loop)."""

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings

from apps.accounts.ledger import TOKENS_USED, quota_adjust, quota_reserve, today
from apps.conversations.context import conversation_context
from apps.conversations.models import Conversation, Message, TranscriptSegment
from apps.conversations.selectors import history_for_reply
from apps.conversations.services import (
    reply_begin,
    reply_finish,
    reply_speech_add,
    transcript_finalize,
)
from apps.observability import metrics
from apps.realtime.broadcast import apublish, publish
from apps.realtime.events import event

from .audio import pcm16_seconds
from .audio_store import REPLY_AUDIO_TTL_SECONDS, audio_store, reply_audio_key, utterance_key
from .batching import Skipped, batcher
from .dispatch import enqueue
from .providers.base import (
    ChatMessage,
    ProviderError,
    ReplyRequest,
    ReplyUsage,
    SpeechChunk,
    Transcript,
    approx_tokens,
    prompt_text,
    usage_or_estimate,
)
from .providers.registry import llm_get, tts_get
from .sentences import SentenceSplitter
from .tasks import synthesize_sentence_task
from .values import CandidateTranscript, PersonaEngines, SentenceToSpeak, UtteranceWindow

log = logging.getLogger(__name__)
BYTES_PER_MS = 32


def _skip_audio_key(reply_id: str) -> str:
    return f"tts-cancel:{reply_id}"


def final_requested_key(utterance_id: str) -> str:
    """Raised when an utterance ends: its queued drafts are stale, workers skip them."""
    return f"stt-final:{utterance_id}"


# --- Speech-to-text (worker) ---------------------------------------------------


def transcribe_window(*, window: UtteranceWindow) -> None:
    """Transcribe an utterance's audio up to `window.end_byte`, for one of three purposes:
    - "partial": a draft while the user speaks, pushed to the speaking socket;
    - "candidate": at a pause, the likely final, handed to the socket, which
      stores it as the final if the pause turns into the end of the utterance;
    - "final": stored, then pushed. Safe to run twice."""
    conversation_id, utterance_id = window.conversation_id, window.utterance_id
    key = utterance_key(conversation_id, utterance_id)
    if window.purpose == "partial" and draft_is_stale(utterance_id):
        return  # the final is on its way; a partial now would only delay it
    if (
        window.purpose == "final"
        and TranscriptSegment.objects.filter(
            conversation_id=conversation_id, utterance_id=utterance_id
        ).exists()
    ):
        return
    provider = window.stt_kind or settings.STT_KIND
    result, audio_bytes = _transcribe(provider, key, window)
    if window.purpose == "partial":
        text = result.text if result else ""
        publish(conversation_id, event("transcript.partial", utterance_id=utterance_id, text=text))
    elif window.purpose == "candidate":
        publish(
            conversation_id,
            event(
                "transcript.candidate",
                utterance_id=utterance_id,
                end_byte=window.end_byte,
                text=result.text if result else "",
                confidence=result.confidence if result else None,
                provider=provider,
                failed=result is None,
            ),
        )
    else:
        transcript_finalize(
            conversation_id=UUID(conversation_id),
            utterance_id=utterance_id,
            text=result.text if result else "",
            confidence=result.confidence if result else None,
            start_ms=window.start_ms,
            end_ms=window.start_ms + audio_bytes // BYTES_PER_MS,
            speech_end_at=window.speech_end_at,
            provider=provider,
        )
        audio_store().delete(key)


def transcribe_window_abandon(*, window: UtteranceWindow) -> None:
    """The window will not be transcribed (its task was dead-lettered or failed for
    good, apps/pipeline/redelivery.py): as for a failed transcription, the client
    hears `stt_unavailable`; a candidate comes back failed (the socket asks for
    the final afresh), and a final ends as `transcript.empty` unless it was stored."""
    conversation_id, utterance_id = window.conversation_id, window.utterance_id
    if window.purpose == "partial":
        return
    if window.purpose == "candidate":
        publish(
            conversation_id,
            event("transcript.candidate", utterance_id=utterance_id, end_byte=window.end_byte,
                  text="", confidence=None, provider=window.stt_kind or settings.STT_KIND,
                  failed=True),
        )  # fmt: skip
        return
    try:
        stored = TranscriptSegment.objects.filter(
            conversation_id=conversation_id, utterance_id=utterance_id
        ).exists()
    except Exception:  # the database is what failed: the final is not stored
        stored = False
    if stored:
        return
    publish(
        conversation_id,
        event("error", code="stt_unavailable",
              message="Speech recognition failed for that utterance."),
    )  # fmt: skip
    publish(conversation_id, event("transcript.empty", utterance_id=utterance_id))


def draft_is_stale(utterance_id: str) -> bool:
    """The utterance ended and its final is on its way: a draft now only delays it."""
    return audio_store().flag_get(final_requested_key(utterance_id))


def _transcribe(provider: str, key: str, window: UtteranceWindow) -> tuple[Transcript | None, int]:
    """The window's transcript from this process's batcher, and how many bytes of
    audio it had; None when it failed (the client is told). A dropped draft is
    an empty one."""
    audio_bytes = 0

    def read() -> bytes:
        nonlocal audio_bytes
        pcm = audio_store().read(key, 0, window.end_byte)
        audio_bytes = len(pcm)
        return pcm

    conversation_id = window.conversation_id
    try:
        transcript = batcher().transcribe(
            kind=provider,
            read=read,
            draft=window.purpose == "partial",
            utterance_id=window.utterance_id,
            purpose=window.purpose,
        )
        return transcript, audio_bytes
    except Skipped:
        return Transcript(""), audio_bytes
    except ProviderError as exc:
        log.warning("speech-to-text failed (%s): %s", exc.code, exc.detail)
        metrics.provider_error(stage="stt", engine=provider, code=exc.code)
        publish(conversation_id, event("error", code=exc.code, message=exc.message))
    except Exception:
        log.exception("speech-to-text failed")
        metrics.provider_error(stage="stt", engine=provider, code="stt_unavailable")
        publish(
            conversation_id,
            event(
                "error",
                code="stt_unavailable",
                message="Speech recognition failed for that utterance.",
            ),
        )
    return None, audio_bytes


async def utterance_finalize_from_candidate(
    *,
    conversation_id,
    utterance_id: str,
    candidate: CandidateTranscript,
    start_ms: int,
    end_ms: int,
    speech_end_at: float,
) -> str | None:
    """The pause's transcript was the utterance's end: store it as the final
    (no second model run), and free the audio. The stored message's id, or
    None when there was nothing to store (no speech)."""
    message = await database_sync_to_async(transcript_finalize)(
        conversation_id=conversation_id,
        utterance_id=utterance_id,
        text=candidate.text,
        confidence=candidate.confidence,
        start_ms=start_ms,
        end_ms=end_ms,
        speech_end_at=speech_end_at,
        provider=candidate.provider,
    )
    await audio_store().adelete(utterance_key(str(conversation_id), utterance_id))
    return None if message is None else str(message.id)


# --- Text-to-speech (worker) -----------------------------------------------------


def synthesize_sentence(*, sentence: SentenceToSpeak) -> None:
    """Speak one part of a reply (a sentence, or the first clause). Each piece of
    its audio goes, as soon as the engine has made it (Piper: one per sentence it
    finds in the part), to the audio store, and a small `reply.audio` event
    (`index`, `chunk`, `last`) to the sockets, which fetch it and send the pieces
    in order. A stopped reply is skipped, also between pieces; a failure ends the
    part with an empty last piece, so later parts still play in order. Safe to run
    twice: a socket sends each piece once (the part's speech seconds and cost, added
    to the reply once all its audio is out, would be counted twice)."""
    conversation_id, reply_id = sentence.conversation_id, sentence.reply_id
    engine = sentence.tts_kind or settings.TTS_KIND
    spoken = _part_spoken_key(reply_id, sentence.index)
    if audio_store().flag_get(spoken):
        return  # a redelivery of a part that was spoken and counted
    spoken_s = 0.0
    for chunk, (piece, failed) in enumerate(_speech_pieces(sentence, engine)):
        key = f"{reply_audio_key(reply_id, sentence.index)}:{chunk}"
        if piece.pcm:
            spoken_s += pcm16_seconds(piece.pcm, piece.sample_rate)
            metrics.tts_synthesized(
                engine=engine, pcm_bytes=len(piece.pcm), sample_rate=piece.sample_rate
            )
            audio_store().put(key, piece.pcm, REPLY_AUDIO_TTL_SECONDS)
        publish(
            conversation_id,
            event(
                "reply.audio",
                reply_id=reply_id,
                index=sentence.index,
                chunk=chunk,
                last=piece.last,
                sample_rate=piece.sample_rate,
                audio_key=key,
                bytes=len(piece.pcm),
                engine=engine,
                error=failed,
            ),
        )
    if spoken_s:
        # after the audio is out: one UPDATE of the reply per part with speech
        reply_speech_add(reply_id=reply_id, tts_kind=engine, audio_seconds=spoken_s)
    audio_store().flag_set(spoken, REPLY_AUDIO_TTL_SECONDS)


def _part_spoken_key(reply_id: str, index: int) -> str:
    """Set once a part's audio is out and counted: a redelivered task skips it."""
    return f"tts-spoken:{reply_id}:{index}"


def synthesize_sentence_abandon(*, sentence: SentenceToSpeak) -> None:
    """The part will not be spoken (its task was dead-lettered or failed for good):
    as for a failed synthesis, `tts_unavailable`, and the part ends with an empty
    last piece, so the later parts still play."""
    conversation_id = sentence.conversation_id
    failed = event("error", code="tts_unavailable", message="Speech synthesis failed.")
    publish(conversation_id, failed)
    publish(
        conversation_id,
        event("reply.audio", reply_id=sentence.reply_id, index=sentence.index, chunk=0,
              last=True, sample_rate=16_000, audio_key="", bytes=0,
              engine=sentence.tts_kind or settings.TTS_KIND, error="tts_unavailable"),
    )  # fmt: skip


def _speech_pieces(sentence: SentenceToSpeak, engine: str) -> Iterator[tuple[SpeechChunk, str]]:
    """The part's audio pieces as the engine makes them, each with the error code
    that cut it short (""); the last one, and only it, has `last=True`."""
    sample_rate, failed = 16_000, ""
    skip_key = _skip_audio_key(sentence.reply_id)
    if audio_store().flag_get(skip_key):
        yield SpeechChunk(pcm=b"", sample_rate=sample_rate, last=True), ""
        return
    try:
        stream = tts_get(engine).synthesize_stream(sentence.text, voice=sentence.voice)
        for piece in stream:
            sample_rate = piece.sample_rate
            yield piece, ""
            if piece.last:
                return
            if audio_store().flag_get(skip_key):
                break  # stopped between two pieces
    except ProviderError as exc:
        failed = exc.code
        log.warning("text-to-speech failed (%s): %s", exc.code, exc.detail)
        metrics.provider_error(stage="tts", engine=engine, code=failed)
        publish(sentence.conversation_id, event("error", code=exc.code, message=exc.message))
    except Exception:
        log.exception("text-to-speech failed")
        failed = "tts_unavailable"
        metrics.provider_error(stage="tts", engine=engine, code=failed)
        publish(
            sentence.conversation_id,
            event("error", code=failed, message="Speech synthesis failed."),
        )
    yield SpeechChunk(pcm=b"", sample_rate=sample_rate, last=True), failed


async def reply_claim(*, user_message_id) -> bool:
    """One reply per user turn, whichever socket of the conversation asks first."""
    return await audio_store().aflag_add(f"reply-for:{user_message_id}", 3600)


async def reply_stop(*, conversation_id, issued_at: float | None = None) -> None:
    """Stop whatever reply of the conversation runs now, wherever it runs: the
    one stop mechanism. The process that runs it cancels it (which stores what
    was said, marked interrupted); every socket drops that reply's pending audio."""
    issued_at = time.time() if issued_at is None else issued_at
    stop = event("reply.stop", conversation_id=str(conversation_id), issued_at=issued_at)
    await apublish(conversation_id, stop)


async def reply_audio_skip(*, reply_id: str) -> None:
    """A stopped reply's sentences still queued for TTS are skipped by the workers."""
    await audio_store().aflag_set(_skip_audio_key(reply_id), 300)


# --- Reply (web process, async) ------------------------------------------------------


@dataclass
class ReplyPlan:
    message: Message  # the reply's turn, reserved (streaming)
    request: ReplyRequest
    engines: PersonaEngines
    user_id: int
    tokens_reserved: int = 0  # of the user's daily quota (ledger.py), settled when stored
    tokens_day: dt.date | None = None


class QuotaExceeded(Exception):
    pass


async def _tokens_reserve(plan: ReplyPlan, tokens_per_day: int) -> None:
    """Reserve the most this reply can cost (its prompt and max_tokens) before the
    LLM is called. A user with less left gets a shorter reply (max_tokens cut to
    what is left), down to QUOTA_REPLY_MIN_TOKENS; below that, none."""
    if not tokens_per_day:
        return
    request = plan.request
    prompt = approx_tokens(prompt_text(request))
    plan.tokens_day = today()
    try:
        granted = await quota_reserve(
            user_id=plan.user_id,
            kind="tokens",
            amount=prompt + request.max_tokens,
            limit=tokens_per_day,
        )
    except Exception as exc:  # the ledger is away: the reply goes on, persisted as usual
        log.warning("reply tokens not reserved: %r", exc)
        return
    plan.tokens_reserved = granted
    if granted - prompt < settings.QUOTA_REPLY_MIN_TOKENS:
        raise QuotaExceeded
    if granted - prompt < request.max_tokens:
        plan.request = replace(request, max_tokens=granted - prompt)


async def _tokens_settle(plan: ReplyPlan, used: int) -> None:
    if plan.tokens_day is None or used == plan.tokens_reserved:
        return
    try:
        await quota_adjust(
            user_id=plan.user_id, kind="tokens", delta=used - plan.tokens_reserved,
            day=plan.tokens_day,
        )  # fmt: skip
    except Exception as exc:  # the counter is seeded from the stored figure after a reset
        log.warning("reply tokens not settled: %r", exc)


def reply_prepare(*, conversation_id: UUID) -> ReplyPlan:
    """Everything a reply needs: the persona and the history from the context
    cache (apps/conversations/context.py; a staff edit of the persona is written
    through on commit, so it is used on the next turn, in every process), and the
    reply's seq reserved: one query when the cache answers."""
    found = conversation_context(conversation_id=conversation_id)
    if found is None:
        raise Conversation.DoesNotExist(f"no conversation {conversation_id}")
    persona = found.persona
    engines = PersonaEngines.of(persona)
    message = reply_begin(conversation_id=conversation_id, provider=engines.llm)
    history = history_for_reply(
        conversation_id=conversation_id,
        budget_tokens=settings.LLM_HISTORY_TOKENS,
        through_seq=message.seq - 1,  # the cached copy must have seen the turn answered
    )
    request = ReplyRequest(
        system_prompt=persona.system_prompt,
        history=[ChatMessage(role=m.role, content=m.text) for m in history],
        model=persona.llm_model or settings.LLM_MODEL,
        temperature=persona.temperature,
        max_tokens=persona.max_tokens,
    )
    return ReplyPlan(message=message, request=request, engines=engines, user_id=found.user_id)


@dataclass
class ReplyState:
    """What a running reply has produced; its controller reads it on a stop."""

    reply_id: str = ""
    text: str = ""
    sentences: int = 0
    first_token_at: float | None = None
    # First token → first audio, when the audio came before the end: stored with the reply.
    first_audio_ms: int | None = None
    done: bool = False
    # Set with the task's cancel by a stop: the reply ends at its next token even if
    # the cancel was lost on the way (seen: a reply stopped mid-stream ran to the end).
    stopped: bool = False


async def reply_run(
    *,
    conversation_id: UUID,
    final_at: float,
    state: ReplyState,
    speak: bool = True,
    on_begin=None,
    tokens_per_day: int = 0,
) -> None:
    """Stream the persona's reply: tokens to the sockets as they come, each
    finished sentence to the TTS queue, the whole reply stored at the end.
    Cancelling the task (a stop) stores what was said, marked interrupted,
    and skips its sentences still queued for TTS. `on_begin(reply_id)` is
    called once the reply's message exists. The reply's tokens are reserved
    from the user's daily quota first (`tokens_per_day`; 0: unlimited)."""
    preparing = asyncio.ensure_future(
        database_sync_to_async(reply_prepare)(conversation_id=conversation_id)
    )
    try:
        plan = await asyncio.shield(preparing)
    except asyncio.CancelledError:
        # Stopped before the first token: the reply's seq may be taken already;
        # record it as an empty interrupted reply, so no turn is left "streaming".
        plan = await preparing
        await database_sync_to_async(reply_finish)(
            reply=plan.message,
            text="",
            status=Message.Status.INTERRUPTED,
            prompt_tokens=0,
            completion_tokens=0,
            final_to_first_token_ms=None,
            reply_total_ms=None,
        )
        raise
    reply_id = str(plan.message.id)
    state.reply_id = reply_id
    if on_begin is not None:
        on_begin(reply_id)
    splitter = SentenceSplitter()
    status, error_code = Message.Status.COMPLETE, ""
    usage = ReplyUsage()

    def speak_sentences(sentences: list[str]) -> None:
        if not speak:
            return
        for sentence in sentences:
            enqueue_tts(
                SentenceToSpeak(
                    conversation_id=str(conversation_id),
                    reply_id=reply_id,
                    index=state.sentences,
                    text=sentence,
                    tts_kind=plan.engines.tts,
                    voice=plan.engines.voice,
                )
            )
            state.sentences += 1

    try:
        await _tokens_reserve(plan, tokens_per_day)
        stream = llm_get(plan.engines.llm).stream_reply(plan.request)
        usage = stream.usage
        async for delta in stream.deltas:
            if state.stopped:
                raise asyncio.CancelledError
            if state.first_token_at is None:
                state.first_token_at = time.time()
            state.text += delta
            await apublish(conversation_id, event("reply.delta", reply_id=reply_id, text=delta))
            speak_sentences(splitter.feed(delta))
        speak_sentences(splitter.flush())
    except asyncio.CancelledError:
        status = Message.Status.INTERRUPTED
    except QuotaExceeded:
        status, error_code = Message.Status.FAILED, "quota_exceeded"
        await apublish(conversation_id, event("error", code=error_code, message=TOKENS_USED))
    except ProviderError as exc:
        # Cut short after some text: stored as interrupted, with what was said and why.
        status = Message.Status.INTERRUPTED if state.text else Message.Status.FAILED
        error_code = exc.code
        log.warning("reply failed (%s): %s", exc.code, exc.detail)
        metrics.provider_error(stage="llm", engine=plan.engines.llm, code=error_code)
        await apublish(conversation_id, event("error", code=exc.code, message=exc.message))
    except Exception:
        log.exception("reply failed")
        status, error_code = Message.Status.FAILED, "llm_unavailable"
        metrics.provider_error(stage="llm", engine=plan.engines.llm, code=error_code)
        await apublish(
            conversation_id,
            event("error", code=error_code, message="The persona could not answer just now."),
        )
    finally:
        state.done = True
        first_ms = _ms_between(final_at, state.first_token_at)
        await asyncio.shield(
            _reply_store(plan, state, status, error_code, usage, first_ms, final_at)
        )
    if status == Message.Status.INTERRUPTED and not error_code:
        raise asyncio.CancelledError


async def _reply_store(plan, state, status, error_code, usage, first_ms, final_at) -> None:
    usage = usage_or_estimate(usage, request=plan.request, text=state.text)
    if status == Message.Status.INTERRUPTED and state.sentences and not error_code:
        try:  # stopped (a reply cut short by its LLM still says its finished sentences)
            await reply_audio_skip(reply_id=state.reply_id)
        except Exception:
            log.warning("could not mark reply %s's audio skipped", state.reply_id)
    await database_sync_to_async(reply_finish)(
        reply=plan.message,
        text=state.text,
        status=status,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        final_to_first_token_ms=first_ms,
        reply_total_ms=_ms_between(final_at, time.time()),
        first_token_to_first_audio_ms=state.first_audio_ms,
        error_code=error_code,
        audio_parts=state.sentences,
        tts_kind=plan.engines.tts,
    )
    await _tokens_settle(plan, usage.prompt_tokens + usage.completion_tokens)


def enqueue_tts(sentence: SentenceToSpeak) -> None:
    enqueue(synthesize_sentence_task, **sentence.as_kwargs())


def _ms_between(start: float | None, end: float | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start) * 1000))
