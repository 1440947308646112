"""Kind → engine. Engines are built lazily, once per process, and cached:
a worker loads its model on the first task (or at start-up) and keeps it."""

import functools
import importlib
import logging
import threading

from django.conf import settings

from .base import LanguageModel, SpeechToText, TextToSpeech

STT_KINDS = {
    "faster_whisper": "apps.pipeline.providers.faster_whisper.FasterWhisperSTT",
    "openai": "apps.pipeline.providers.openai_stt.OpenAISTT",
}
LLM_KINDS = {
    "echo": "apps.pipeline.providers.echo.EchoLLM",
    "openai": "apps.pipeline.providers.openai_llm.OpenAILLM",
    "local": "apps.pipeline.providers.local_llm.LocalLLM",
}
TTS_KINDS = {
    "piper": "apps.pipeline.providers.piper.PiperTTS",
    "espeak": "apps.pipeline.providers.espeak.EspeakTTS",
    "openai": "apps.pipeline.providers.openai_tts.OpenAITTS",
}


def _build(kinds: dict[str, str], kind: str, stage: str):
    try:
        path = kinds[kind]
    except KeyError:
        raise ValueError(
            f"unknown {stage} kind {kind!r}; known: {', '.join(sorted(kinds))}"
        ) from None
    module_name, class_name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)()


@functools.cache
def _cached(stage: str, kind: str):
    kinds = {"STT": STT_KINDS, "LLM": LLM_KINDS, "TTS": TTS_KINDS}[stage]
    return _build(kinds, kind, stage)


def stt_get(kind: str = "") -> SpeechToText:
    return _cached("STT", kind or settings.STT_KIND)


def llm_get(kind: str = "") -> LanguageModel:
    return _cached("LLM", kind or settings.LLM_KIND)


def tts_get(kind: str = "") -> TextToSpeech:
    return _cached("TTS", kind or settings.TTS_KIND)


def llm_warm_in_background() -> None:
    """Build the deployment's LLM engine on a thread, at process start: the `openai`
    SDK takes about 2.5 s to import, which the first reply would otherwise spend on
    the event loop, stalling every socket of the process."""

    def build() -> None:
        try:
            llm_get()
        except Exception:  # a misconfigured engine fails its first reply, clearly
            logging.getLogger(__name__).warning("LLM engine not built", exc_info=True)

    threading.Thread(target=build, name="llm-warm", daemon=True).start()
