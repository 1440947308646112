import re

import pytest
from django.conf import settings as django_settings

from apps.pipeline.audio import pcm16_resample, pcm16_seconds, wav_read
from apps.pipeline.providers import registry
from apps.pipeline.providers.base import ChatMessage, ProviderError, ReplyRequest, Transcript
from apps.pipeline.providers.echo import EchoLLM
from apps.pipeline.providers.espeak import EspeakTTS
from apps.pipeline.providers.openai_llm import OpenAILLM
from apps.pipeline.providers.openai_stt import OpenAISTT
from apps.pipeline.providers.openai_tts import OpenAITTS

from . import fake_openai

AUDIO = django_settings.BASE_DIR / "tests" / "data" / "audio"


def normalised(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def clip(name: str) -> bytes:
    pcm, rate = wav_read((AUDIO / name).read_bytes())
    assert rate == 16_000
    return pcm


def reply_request(text: str = "What time is it in Lisbon?") -> ReplyRequest:
    return ReplyRequest(
        system_prompt="You are a helpful persona.",
        history=[
            ChatMessage("user", "Hi."),
            ChatMessage("assistant", "Hello!"),
            ChatMessage("user", text),
        ],
        model="fake-model",
        temperature=0.5,
        max_tokens=64,
    )


async def collect(stream) -> list[str]:
    return [delta async for delta in stream.deltas]


@pytest.fixture(scope="module")
def whisper():
    return registry.stt_get("faster_whisper")  # loaded once per process


@pytest.fixture(scope="module")
def piper():
    return registry.tts_get("piper")


# --- faster-whisper ----------------------------------------------------------------


def test_faster_whisper_transcribes_jfk(whisper):
    transcript = whisper.transcribe(clip("faster-whisper_jfk.wav"))

    assert "ask not what your country can do for you" in normalised(transcript.text)
    assert transcript.text == transcript.text.strip()
    assert 0 < transcript.confidence <= 1


@pytest.mark.parametrize("name", ["leopard_empty.wav", "speechbrain_noise2.wav"])
def test_faster_whisper_finds_no_words_in_non_speech(whisper, name):
    assert whisper.transcribe(clip(name)) == Transcript("")


def test_faster_whisper_empty_audio_is_empty_transcript(whisper):
    assert whisper.transcribe(b"") == Transcript("")
    assert whisper.transcribe(b"\x00") == Transcript("")


def test_faster_whisper_batch_keeps_order(whisper):
    speech = clip("speechbrain_spk1_snt1.wav")

    batch = whisper.transcribe_batch([b"", speech])

    assert batch[0] == Transcript("")
    assert batch[1].text == whisper.transcribe(speech).text
    assert "dog" in normalised(batch[1].text)


# --- Piper and espeak-ng -----------------------------------------------------------


def test_piper_speaks_words_whisper_hears_back(piper, whisper):
    text = "I would like to book a table for two."
    words = len(text.split())

    speech = piper.synthesize(text)

    assert speech.sample_rate == 22_050
    assert 0.2 * words <= pcm16_seconds(speech.pcm, speech.sample_rate) <= 1.0 * words
    pcm16k = pcm16_resample(speech.pcm, from_rate=speech.sample_rate, to_rate=16_000)
    assert normalised(whisper.transcribe(pcm16k).text) == normalised(text)


def test_piper_ignores_a_voice_that_is_not_an_onnx_file(piper):
    speech = piper.synthesize("Hello.", voice="/nonexistent/voice.onnx")

    assert speech.sample_rate == 22_050
    assert len(speech.pcm) > 0


def test_piper_empty_text_is_silence(piper):
    assert piper.synthesize("  ").pcm == b""
    assert [(c.pcm, c.last) for c in piper.synthesize_stream("  ")] == [(b"", True)]


def test_piper_streams_each_sentence_it_finds_as_soon_as_it_is_made(piper, whisper, monkeypatch):
    # given a text Piper speaks as three sentences, and a count of sentences made
    text = "Good evening, and welcome to the show. I would like to book a table. We come at eight."
    voice = piper._voice(piper.default_path)
    made = []
    real = voice.phoneme_ids_to_audio
    monkeypatch.setattr(
        voice, "phoneme_ids_to_audio", lambda *a, **kw: made.append(1) or real(*a, **kw)
    )

    # when the first piece is taken
    stream = piper.synthesize_stream(text)
    first = next(stream)

    # then only the first sentence has been made (and is what the piece says)
    assert len(made) == 1 and first.pcm and not first.last
    heard_first = normalised(whisper.transcribe(to_16k(first.pcm)).text)
    assert "welcome" in heard_first and "table" not in heard_first
    # and the rest follows, one piece a sentence, the last one marked
    rest = list(stream)
    assert len(made) == 3 and [c.last for c in rest] == [False, True]
    pieces = [first, *rest]
    assert {c.sample_rate for c in pieces} == {22_050}
    # and the pieces together say the whole text, as long as `synthesize` says it
    pcm = b"".join(c.pcm for c in pieces)
    heard = normalised(whisper.transcribe(to_16k(pcm)).text).split()
    keywords = ["welcome", "table", "eight"]  # one a sentence
    assert [w for w in heard if w in keywords] == keywords
    seconds = pcm16_seconds(pcm, 22_050)
    assert seconds == pytest.approx(pcm16_seconds(piper.synthesize(text).pcm, 22_050), rel=0.2)


def test_piper_speaks_one_clause_in_one_piece(piper):
    pieces = list(piper.synthesize_stream("Sure, here is what I think about it,"))

    assert [c.last for c in pieces] == [True] and pieces[0].pcm


def to_16k(pcm: bytes) -> bytes:
    return pcm16_resample(pcm, from_rate=22_050, to_rate=16_000)


def test_espeak_produces_audio():
    speech = EspeakTTS().synthesize("Hello from the robot voice.", voice="en-us")

    assert speech.sample_rate == 22_050
    assert pcm16_seconds(speech.pcm, speech.sample_rate) > 0.5


def test_espeak_gives_its_audio_as_one_last_piece():
    [piece] = EspeakTTS().synthesize_stream("One sentence. And another one.")

    assert piece.last and pcm16_seconds(piece.pcm, piece.sample_rate) > 1.0


def test_espeak_speaks_option_like_text_instead_of_parsing_it():
    speech = EspeakTTS().synthesize("--help")

    assert pcm16_seconds(speech.pcm, speech.sample_rate) > 0.1


@pytest.mark.parametrize("voice", ["nosuchvoice", "en; rm -rf /", "--stdin"])
def test_espeak_bad_voice_is_tts_unavailable(voice):
    with pytest.raises(ProviderError) as error:
        EspeakTTS().synthesize("hello", voice=voice)

    assert error.value.code == "tts_unavailable"
    assert error.value.detail and voice not in error.value.message  # the cause: logs only


def test_espeak_missing_binary_is_tts_unavailable(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)

    with pytest.raises(ProviderError, match="not installed") as error:
        EspeakTTS().synthesize("hello")

    assert error.value.code == "tts_unavailable"


# --- echo stand-in -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_echo_streams_the_users_words_and_fills_usage():
    stream = EchoLLM().stream_reply(reply_request("tell me about the northern lights"))
    assert stream.usage.completion_tokens == 0

    deltas = await collect(stream)

    assert len(deltas) >= 5
    text = "".join(deltas)
    assert text.startswith("(echo)")
    assert "tell me about the northern lights" in text
    assert len(re.findall(r"[.!?](\s|$)", text)) >= 2  # two sentences for TTS
    assert stream.usage.prompt_tokens >= 10
    assert stream.usage.completion_tokens >= len(text.split())


@pytest.mark.asyncio
async def test_echo_with_nothing_said_still_answers():
    request = reply_request()
    request = ReplyRequest("", [], request.model, request.temperature, request.max_tokens)

    text = "".join(await collect(EchoLLM().stream_reply(request)))

    assert text.startswith("(echo)")


# --- OpenAI-compatible engines against the local fake -------------------------------


@pytest.fixture
def fake(settings):
    with fake_openai.FakeOpenAI() as server:
        settings.LLM_BASE_URL = server.base_url
        settings.OPENAI_BASE_URL = server.base_url
        settings.LLM_API_KEY = "test-key"
        settings.LLM_MAX_RETRIES = 0
        settings.LLM_TIMEOUT_S = 2.0
        settings.LLM_DEADLINE_S = 5.0
        yield server


@pytest.mark.asyncio
async def test_openai_llm_streams_deltas_and_usage(fake):
    stream = OpenAILLM().stream_reply(reply_request())

    deltas = await collect(stream)

    assert deltas == fake_openai.REPLY_TOKENS
    assert stream.usage.prompt_tokens == fake_openai.PROMPT_TOKENS
    assert stream.usage.completion_tokens == len(fake_openai.REPLY_TOKENS)
    sent = fake_openai.json.loads(fake.requests[-1]["body"])
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 64
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer test-key"


@pytest.mark.asyncio
async def test_openai_llm_reuses_its_client_within_a_loop(fake):
    llm = OpenAILLM()

    await collect(llm.stream_reply(reply_request()))
    await collect(llm.stream_reply(reply_request()))

    assert len(llm._clients) == 1
    assert len(fake.requests) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("rate_limit", "llm_rate_limited"),
        ("server_error", "llm_unavailable"),
        ("slow", "llm_timeout"),
    ],
)
async def test_openai_llm_faults_map_to_provider_errors(fake, settings, fault, code):
    fake.fault = fault
    settings.LLM_TIMEOUT_S = 0.3

    with pytest.raises(ProviderError) as error:
        await collect(OpenAILLM().stream_reply(reply_request()))

    assert error.value.code == code
    assert len(fake.requests) == 1  # LLM_MAX_RETRIES=0


@pytest.mark.asyncio
async def test_openai_llm_whole_reply_is_bounded_by_the_deadline(fake, settings):
    fake.fault = "slow_stream"
    fake.delay_s = 0.5
    settings.LLM_DEADLINE_S = 1.2
    stream = OpenAILLM().stream_reply(reply_request())
    received = []

    with pytest.raises(ProviderError) as error:
        async for delta in stream.deltas:
            received.append(delta)

    assert error.value.code == "llm_timeout"
    assert 1 <= len(received) < len(fake_openai.REPLY_TOKENS)


@pytest.mark.asyncio
async def test_openai_llm_unreachable_is_llm_unavailable(settings):
    with fake_openai.FakeOpenAI() as server:
        base_url = server.base_url  # closed on exit: nothing listens there any more
    settings.LLM_BASE_URL = base_url
    settings.LLM_MAX_RETRIES = 0

    with pytest.raises(ProviderError) as error:
        await collect(OpenAILLM().stream_reply(reply_request()))

    assert error.value.code == "llm_unavailable"
    # the client is told a plain sentence; the exception's text is for operators only
    assert error.value.message == "The persona could not answer just now."
    assert "onnect" in error.value.detail and "onnect" not in error.value.message


def test_openai_tts_returns_24khz_pcm(fake):
    speech = OpenAITTS().synthesize("Hello there.")

    assert speech.sample_rate == 24_000
    assert len(speech.pcm) == int(fake.speech_seconds * 24_000) * 2
    sent = fake_openai.json.loads(fake.requests[-1]["body"])
    assert sent["response_format"] == "pcm"
    assert sent["voice"] == "alloy"
    assert sent["input"] == "Hello there."


def test_openai_tts_gives_its_audio_as_one_last_piece(fake):
    [piece] = OpenAITTS().synthesize_stream("Hello there. How are you?")

    assert piece.last and piece.sample_rate == 24_000
    assert len(piece.pcm) == int(fake.speech_seconds * 24_000) * 2


def test_openai_tts_failure_is_tts_unavailable(fake):
    fake.fault = "server_error"

    with pytest.raises(ProviderError) as error:
        OpenAITTS().synthesize("Hello there.", voice="verse")

    assert error.value.code == "tts_unavailable"


def test_openai_stt_sends_a_wav_and_returns_text(fake):
    transcript = OpenAISTT().transcribe(clip("speechbrain_spk1_snt1.wav"))

    assert transcript == Transcript(fake_openai.TRANSCRIPT)
    body = fake.requests[-1]["body"]
    assert b"RIFF" in body and b"WAVEfmt" in body
    assert django_settings.OPENAI_STT_MODEL.encode() in body


def test_openai_stt_skips_the_call_for_empty_audio(fake):
    assert OpenAISTT().transcribe(b"") == Transcript("")
    assert fake.requests == []


def test_openai_stt_failure_is_stt_unavailable(fake):
    fake.fault = "rate_limit"

    with pytest.raises(ProviderError) as error:
        OpenAISTT().transcribe(clip("speechbrain_spk1_snt1.wav"))

    assert error.value.code == "stt_unavailable"
