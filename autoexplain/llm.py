"""One interface to the language models that explain and simulate, with two backends.

`make_llm(spec, **kw)` picks the backend from a spec string:

    None | "local"          LocalLLM (llm_local.py) on the embedded SmolLM2-135M-Instruct (transformers, CPU or GPU)
    "local:MODEL"           LocalLLM on MODEL: a built-in alias, a model folder, a .gguf file, a hub name
    "openai:MODEL"          OpenAILLM on api.openai.com; the key comes from $OPENAI_API_KEY
    "openai:MODEL@URL"      OpenAILLM on any OpenAI-compatible server (vLLM, llama.cpp, Ollama), e.g.
                            "openai:Qwen/Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1"

Keyword arguments go to the backend's constructor (api_key_env, max_concurrency, requests_per_minute,
max_retries, batch_size, ...). MODEL may contain ':' (Ollama tags); URL starts after the last "@http".

Token accounting: every call adds to `llm.usage` (the running total) and to each `with llm.track() as
usage:` block open in the calling context, so the cost of one unit is countable even when units run
concurrently in threads.

Server notes: llama.cpp's server treats max_tokens=0 as "no limit", ignores `n` and rejects a list of
prompts, so prompt logprobs ask for one generated token and drop it, one request per prompt, and
`complete` tops up samples with extra requests when a server returns fewer than `n` choices.
llama-cpp-python also shifts echoed logprobs by one for models without BOS (see `echo_alignment`).
api.openai.com serves /v1/completions only for its base models and caps `logprobs` at 5.
`Usage.requests` counts answered requests; retries are not counted. `Usage.cached` counts the answers
read from the response cache (`llm_cache`) instead: no request, no tokens paid.
"""

from __future__ import annotations

import contextvars
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field

from autoexplain.budget import ledger
from autoexplain.counters import COUNTS
from autoexplain.errors import UserError

OPENAI_URL = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"  # where a server LLM's API key is, unless its spec names another ('#VAR')


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, served from the provider's prefix cache (billed less)


def shares(total: int, n: int) -> list[int]:
    """`total` split into n whole parts that add up to it (the first ones a token larger): a prompt
    read once for n samples is paid once, so each sample carries its share of it."""
    whole, extra = divmod(int(total), max(1, n))
    return [whole + (i < extra) for i in range(n)]


@dataclass
class PromptLogprobs:
    tokens: list[str]  # the prompt as the model tokenised it
    offsets: list[int]  # character offset of each token in the prompt
    top_logprobs: list[dict[str, float]]  # per token: the top alternatives predicted at that position ({} for the first)
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass
class ChatResult:
    text: str
    top_logprobs: list[list[tuple[str, float]]] | None  # per output token, best first; None if not asked
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cached: int = 0  # answers (samples, records) read from the response cache: no request sent
    cached_tokens: int = 0  # prompt tokens the provider served from its prefix cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, requests: int = 1, cached_tokens: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += requests
            self.cached_tokens += cached_tokens

    def add_cached(self, answers: int) -> None:
        with self._lock:
            self.cached += answers

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "requests": self.requests,
                "cached": self.cached, "cached_tokens": self.cached_tokens}


class LLMError(UserError):
    """A request that failed for good: a permanent HTTP error, or retries exhausted."""

    transient = False  # True: retries ran out on a fault that may pass; the item may be recorded as failed

    def __init__(self, problem: str, fix: str | None = None, status: int | None = None, attempts: int = 1):
        super().__init__(problem, fix)
        self.status, self.attempts = status, attempts

    @property
    def reason(self) -> str:
        return self.problem


_TRACKERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("autoexplain_llm_trackers", default=())


class LLM(ABC):
    """A language model: `complete`, `chat` and `prompt_logprobs` are required (a backend that
    cannot serve one raises `LLMError` saying so). Optional, with defaults: `close()` (nothing to
    release) and `track()` (token accounting, done by the base class). The registry
    (`registry.make_llm`) builds one from a spec string."""

    name: str
    # Capabilities, declared here so that callers read them without probing: whether stages may
    # call it from many threads at once, and how many requests it takes at once then; whether it
    # answers from a response cache (`llm_cache.attach` sets `self.cache`).
    thread_safe: bool = False
    max_concurrency: int = 1
    concurrency_given: int = 1  # what max_concurrency was made with: a server's climbs back to it after timeouts
    caches_requests: bool = False
    counts_attempts: bool = False  # it counts each request it sends itself (a server's, with retries)
    # What its outputs depend on beyond its name, for cache keys: a local model's weights
    # (`Subject.fingerprint`); '' for a server, known by its name only.
    fingerprint: str = ""

    def __init__(self) -> None:
        self.usage = Usage()

    @contextmanager
    def track(self):
        """Count the tokens of the calls made to this LLM inside the block (in this context only)."""
        usage = Usage()
        token = _TRACKERS.set(_TRACKERS.get() + ((self, usage),))
        try:
            yield usage
        finally:
            _TRACKERS.reset(token)

    def _sinks(self) -> list[Usage]:
        return [self.usage] + [u for owner, u in _TRACKERS.get() if owner is self]

    def _record(self, sinks: list[Usage], prompt_tokens: int, completion_tokens: int, requests: int = 1,
                cached_tokens: int = 0) -> None:
        COUNTS["llm_requests"] += requests
        if not self.counts_attempts:
            COUNTS["llm_sent"] += requests
        for u in sinks:
            u.add(prompt_tokens, completion_tokens, requests, cached_tokens)
        # a local model's tokens too, at $0: the run's line says what was spent, not only what was paid
        ledger().charge(prompt_tokens + completion_tokens, self.dollars(prompt_tokens, completion_tokens, cached_tokens))

    @staticmethod
    def _record_cached(sinks: list[Usage], answers: int) -> None:
        COUNTS["llm_cache_hits"] += answers
        for u in sinks:
            u.add_cached(answers)

    @abstractmethod
    def complete(self, prompts: list[str], n: int = 1, temperature: float = 1.0, max_tokens: int = 60,
                 stop: list[str] | None = None) -> list[list[Completion]]:
        """n sampled continuations of each prompt."""

    @abstractmethod
    def chat(self, messages_batch: list[list[dict]], temperature: float = 0.0, max_tokens: int = 1024,
             top_logprobs: int | None = None) -> list[ChatResult]:
        """One assistant reply per conversation."""

    @abstractmethod
    def prompt_logprobs(self, prompts: list[str], top: int = 15) -> list[PromptLogprobs]:
        """The top predicted tokens at every position of each prompt (one pass, nothing generated)."""

    def dollars(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float | None:
        """What one request of these tokens cost: 0 for a local model (server LLMs price it)."""
        return 0.0

    def close(self) -> None:
        pass


def accepts(method, keyword: str) -> bool:
    """Whether an LLM method takes an optional keyword that only some backends have."""
    import inspect

    try:
        return keyword in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def per_item_errors(method) -> dict:
    """{"return_errors": True} for an LLM method that can give a failed item's error in its place
    (OpenAILLM: an LLMError whose `transient` retries ran out), {} for one that cannot."""
    return {"return_errors": True} if accepts(method, "return_errors") else {}


def __getattr__(name: str):
    # The OpenAI backend lives in llm_openai.py; it stays importable from here.
    if name in ("OpenAILLM", "TokenBucket"):
        from autoexplain import llm_openai

        return getattr(llm_openai, name)
    raise AttributeError(name)


CONCURRENCY_ENV, RPM_ENV, TPM_ENV, RETRIES_ENV, TIMEOUT_ENV = (
    "AUTOEXPLAIN_LLM_CONCURRENCY", "AUTOEXPLAIN_LLM_RPM", "AUTOEXPLAIN_LLM_TPM", "AUTOEXPLAIN_LLM_RETRIES",
    "AUTOEXPLAIN_LLM_TIMEOUT")
LIMIT_ENVS = (CONCURRENCY_ENV, RPM_ENV, TPM_ENV, RETRIES_ENV, TIMEOUT_ENV)
DEFAULT_CONCURRENCY, OPENAI_CONCURRENCY = 64, 8  # a server you run; api.openai.com (rate-limited per key)


def set_limits(concurrency: int | None = None, requests_per_minute: float | None = None,
               tokens_per_minute: float | None = None, retries: int | None = None,
               timeout: float | None = None) -> None:
    """The concurrency, request and token (prompt + completion) rates, retries and timeout (seconds
    an attempt waits for its answer) per request of the server LLMs made from now on here and in the
    processes started (set in the environment, which task processes inherit; dask workers, started
    before the run, get them from it: `run_settings`). None: the default (64 in flight for a URL you give, 8 for
    api.openai.com; no rate limits; 6 retries; 120 s). None changes any result: none is part of a cache key."""
    import os

    for name, value in zip(LIMIT_ENVS, (concurrency, requests_per_minute, tokens_per_minute, retries, timeout)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(value)


def limits_now() -> tuple[str | None, ...]:
    """The limits set now (`set_limits`; in a dask worker's task, its run's: `run_scope`), as one
    value: what a server LLM made now is made with."""
    from autoexplain.run_scope import setting

    return tuple(setting(name) for name in LIMIT_ENVS)


def server_limits(url: str | None) -> dict:
    """max_concurrency, requests_per_minute, tokens_per_minute and (when set) max_retries and timeout for a
    server LLM: set_limits's values or the defaults."""
    from urllib.parse import urlparse

    openai = (urlparse(url or OPENAI_URL).hostname or "").endswith("api.openai.com")
    concurrency, rpm, tpm, retries, timeout = limits_now()
    return {"max_concurrency": int(concurrency) if concurrency else (OPENAI_CONCURRENCY if openai else DEFAULT_CONCURRENCY),
            "requests_per_minute": float(rpm) if rpm else None, "tokens_per_minute": float(tpm) if tpm else None,
            **({"max_retries": int(retries)} if retries else {}), **({"timeout": float(timeout)} if timeout else {})}


def make_llm(spec: str | None = None, **kw) -> LLM:
    """Build an LLM from a spec string; keyword arguments go to the backend. The grammar and the
    building live in the registry (`registry.make_llm`); this name stays for its callers."""
    from autoexplain import registry

    return registry.make_llm(spec, **kw)
