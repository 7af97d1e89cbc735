"""The OpenAI backend: OpenAI itself or any server speaking its API (vLLM, llama.cpp, Ollama).

What it adds on top of the `openai` client: an in-process concurrency limit, request and token
rate limits, retries with jittered exponential backoff (honouring Retry-After) on 429, 5xx,
timeouts, lost connections and malformed answers (HTTP 200 with invalid or truncated JSON, no
choices, no logprobs), a response cache, token accounting per unit, and one clear error line for a
missing key or an unreachable server (the sending: `llm_transport.Transport`). Server quirks it works
around: `llm.py`'s docstring.

Rate limits: `requests_per_minute` and `tokens_per_minute` are sliding one-minute windows
(`llm_limits.Window`) taken before each attempt, the requests also paced by a token bucket. A
request's tokens are not known before it is answered, so it takes an estimate (its text at the
characters per token the server's answers have shown, 4 until then, plus its max_tokens per
sample) and settles the difference with the server's `usage` once answered; an attempt that fails
keeps its estimate spent (the server may have counted it).

Response cache: `self.cache` (`llm_cache`, attached by the stage) answers what it has seen before.

Concurrency: `max_concurrency` requests are in flight at most. The limit (`llm_limits.Slots`) is
taken for one attempt and given back before a backoff wait, so a request that waits to retry holds
no slot; the thread pool that runs requests is larger than the limit for the same reason. Callers
in many threads (units of a stage, shards of a flow) share one pool and one limit per LLM object.
A timeout takes one slot away (never the last; one log line per burst): a server that answers one
request at a time (llama-cpp-python's) queues the rest, and at 64 in flight most outwait the timeout,
wasted work. Slots come back one at a time when answers say one more would be answered in time too.

Stopping (`interrupt`): the pool's threads are daemons whose futures fail at a stop, no attempt is
sent after one, and the backoff and rate-limit waits end at once; a request in flight is abandoned.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from autoexplain import interrupt
from autoexplain.errors import UserError
from autoexplain.llm import (
    LLM,
    KEY_ENV,
    OPENAI_URL,
    ChatResult,
    Completion,
    LLMError,
    PromptLogprobs,
    shares,
)
from autoexplain.llm_limits import Slots, TokenBucket, Window
from autoexplain.llm_transport import Malformed, Transport

log = logging.getLogger(__name__)


try:  # faster JSON for the large echo replies, when installed (it comes with prefect)
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads


def _is_openai(url: str) -> bool:
    return (urlparse(url).hostname or "").endswith("api.openai.com")


class OpenAILLM(Transport, LLM):
    """OpenAI, or any server speaking its API, with our own concurrency limit, rate limit and retries."""

    RETRYABLE = {408, 409, 425, 429}
    thread_safe = True  # stages may call it from many threads at once
    caches_requests = True
    counts_attempts = True

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None,
                 api_key_env: str = KEY_ENV, max_concurrency: int = 8,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 max_retries: int = 6, backoff_base: float = 1.0, backoff_cap: float = 60.0, timeout: float = 120.0,
                 echo_alignment: str = "auto"):
        if max_concurrency is None or int(max_concurrency) < 1:
            raise UserError(f"the LLM concurrency must be at least 1, got {max_concurrency}", "pass --concurrency >= 1")
        super().__init__()
        import openai

        self._openai = openai
        self.name, self.base_url = model, (base_url or OPENAI_URL).rstrip("/")
        key = api_key or os.environ.get(api_key_env)
        if not key:
            if _is_openai(self.base_url):
                raise UserError(f"${api_key_env} is not set, and {self.base_url} needs an API key",
                                f"export {api_key_env}=..., or use a local server: 'openai:MODEL@http://127.0.0.1:8000/v1'")
            key = "no-key"  # local servers usually ignore it; a 401 below names the variable
        self.api_key_env = api_key_env
        self.max_retries, self.backoff_base, self.backoff_cap = max_retries, backoff_base, backoff_cap
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.timeout = float(timeout)
        import httpx

        slots = int(max_concurrency)
        # One connection per slot, kept alive: the default pool (100) would otherwise cap the concurrency.
        limits = httpx.Limits(max_connections=slots + 8, max_keepalive_connections=slots + 8)
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=timeout,
                                     http_client=httpx.Client(limits=limits, timeout=timeout))
        # Said under the limit's lock, so in the order of the limits; a burst of timeouts in one line.
        self._slots = Slots(slots, timeout, say=lambda was, now: log.warning(
            "LLM: requests to %s %s; concurrency %s from %d to %d", self.base_url, "timed out" if now < was else
            "are answered in time again", "lowered" if now < was else "raised", was, now))
        # More threads than slots: a thread waiting out a backoff holds no slot, and others use it.
        self._pool = interrupt.Pool(min(1024, 2 * slots + 8), "llm")
        # The bucket spreads requests over the minute after a burst of one round of slots; the windows
        # hold the limits in every minute from the first request (a bucket that starts full lets a
        # burst more through in the first minute: what a provider answers with 429s).
        self._bucket = TokenBucket(requests_per_minute, burst=max_concurrency) if requests_per_minute else None
        self._rpm = Window(requests_per_minute) if requests_per_minute else None
        self._tpm = Window(tokens_per_minute) if tokens_per_minute else None
        self.cache = None  # an llm_cache.ResponseCache, or None: every request is sent
        self._echo_seen = False  # learned: this server has returned prompt logprobs
        self._chat_logprobs_seen = False  # learned: this server has returned the chat logprobs asked for
        self._n_ignored = False  # learned: the server returns one choice whatever `n` says
        if echo_alignment not in ("auto", "ok", "shifted"):
            raise UserError(f"echo_alignment must be 'auto', 'ok' or 'shifted', not '{echo_alignment}'")
        # llama-cpp-python, for models without BOS, pairs each echoed prompt token with the logprobs
        # that predict the *next* one and omits the generated token. "auto" detects that from the
        # response: the token it generated has no logprobs entry of its own.
        self.echo_alignment = echo_alignment
        self.echo_shifted = echo_alignment == "shifted"

    @property
    def max_concurrency(self) -> int:
        """Requests in flight at most now: the concurrency given, less one per request that timed out
        (down to 1), plus one per raise since (`llm_limits.Slots`)."""
        return self._slots.limit

    @property
    def concurrency_given(self) -> int:
        return self._slots.ceiling

    def close(self) -> None:
        self._pool.close()
        self._client.close()

    def dollars(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float | None:
        from autoexplain.prices import dollars

        return dollars(self.name, prompt_tokens, cached_tokens, completion_tokens)

    def ping(self) -> None:
        """One request without retries: a clear error now instead of after the first batch."""
        self._request(self._client.models.list, retries=0)

    # -- API ---------------------------------------------------------------------------------------
    def complete(self, prompts, n=1, temperature=1.0, max_tokens=60, stop=None, return_errors=False):
        sinks = self._sinks()
        extra = {"stop": stop} if stop else {}

        def ask(prompt: str, k: int) -> list[Completion]:
            got: list[Completion] = []
            while len(got) < k:
                want = k - len(got)
                r = self._request(lambda: self._client.completions.create(
                    model=self.name, prompt=prompt, n=want, temperature=temperature, max_tokens=max_tokens, **extra),
                    check=self._has_choices, prompt_chars=len(prompt), completion=want * max_tokens)
                pt, ct, cached = self._tokens(r.usage)
                self._record(sinks, pt, ct, cached_tokens=cached)
                if len(r.choices) < want:
                    self._n_ignored = True
                # One prompt is billed per request however many choices come back: each choice
                # carries its share, so that a unit's samples add up to what the request cost.
                choices = sorted(r.choices, key=lambda c: c.index)
                got += [Completion(c.text, p, t, h) for c, p, t, h in
                        zip(choices, shares(pt, len(choices)), shares(ct, len(choices)), shares(cached, len(choices)))]
            return got[:k]

        def samples(prompt: str, first: int, k: int) -> list[Completion]:
            """Samples first .. first+k-1 of a prompt: the cached ones read, the rest asked for."""
            keys = [self._key("completions", prompt=prompt, temperature=temperature, max_tokens=max_tokens,
                              stop=stop, sample=i) for i in range(first, first + k)]
            got = [None if c is None else Completion(**c) for c in self._cached(keys, sinks)]
            missing = [j for j, c in enumerate(got) if c is None]
            for j, c in zip(missing, ask(prompt, len(missing)) if missing else ()):
                got[j] = c
                if self.cache is not None and c.text.strip():  # a blank answer is asked again next time
                    self.cache.put(keys[j], vars(c))
            return got

        if self._n_ignored or n == 1:
            flat = self._map(samples, [(p, i, 1) for p in prompts for i in range(n)], return_errors)
            out = []
            for i in range(len(prompts)):
                mine = flat[i * n: (i + 1) * n]
                failed = next((s for s in mine if isinstance(s, LLMError)), None)
                out.append(failed if failed is not None else [c for s in mine for c in s])
            return out
        return self._map(samples, [(p, 0, n) for p in prompts], return_errors)

    @staticmethod
    def _has_choices(r) -> None:
        if not getattr(r, "choices", None):
            raise Malformed("a reply with no choices")

    def chat(self, messages_batch, temperature=0.0, max_tokens=1024, top_logprobs=None, return_errors=False,
             sample: int = 0):
        """`sample`: which sample of these conversations this is, for the cache (a caller that asks
        the same conversation again for a new answer passes a new index). A conversation that comes
        several times in one batch (k samples of an explanation) is a new sample each time too."""
        sinks = self._sinks()
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        copies: dict[str, int] = {}
        items = []
        for messages in messages_batch:
            copy = copies[repr(messages)] = copies.get(repr(messages), -1) + 1
            items.append((messages, self._key("chat", messages=messages, temperature=temperature, max_tokens=max_tokens,
                                              top_logprobs=top_logprobs, sample=sample, copy=copy)))

        def stored(hit: dict) -> ChatResult:
            tops = hit["top_logprobs"]
            return ChatResult(hit["text"], None if tops is None else [[tuple(p) for p in row] for row in tops],
                              hit["prompt_tokens"], hit["completion_tokens"], hit.get("cached_tokens", 0))

        def check(r) -> None:
            """As for echo replies: logprobs asked for and missing are a transient fault (retried, never
            cached) once this server has shown it sends them; from one that never did, its limit."""
            self._has_choices(r)
            if not top_logprobs:
                return
            lp = r.choices[0].logprobs
            if lp is not None and lp.content is not None:
                self._chat_logprobs_seen = True
            elif self._chat_logprobs_seen:
                raise Malformed("a chat reply without the logprobs asked for")

        def ask(messages: list[dict]) -> ChatResult:
            r = self._request(lambda: self._client.chat.completions.create(
                model=self.name, messages=messages, temperature=temperature, max_tokens=max_tokens, **extra),
                check=check, prompt_chars=sum(len(str(m.get("content") or "")) for m in messages), completion=max_tokens)
            pt, ct, cached = self._tokens(r.usage)
            self._record(sinks, pt, ct, cached_tokens=cached)
            choice = r.choices[0]
            tops = None
            if top_logprobs and choice.logprobs is not None and choice.logprobs.content is not None:
                tops = [[(t.token, t.logprob) for t in item.top_logprobs] for item in choice.logprobs.content]
            return ChatResult(choice.message.content or "", tops, pt, ct, cached)

        def usable(r: ChatResult) -> bool:  # a blank reply without logprobs is asked again next time
            return bool(r.text.strip()) or r.top_logprobs is not None

        def one(messages: list[dict], key: str) -> ChatResult:
            return self._answer(key, lambda: ask(messages), stored, sinks, keep=usable)

        return self._map(one, items, return_errors)

    def _echo_data(self, raw) -> dict:
        """The JSON of an echo reply, read as plain data: the `openai` client's model construction
        costs about 30 ms of CPU per reply at 15 alternatives per prompt position, parsing 5 ms.
        Missing logprobs are a transient fault once the server has shown it returns them; from a
        server that never did, they are the server's limit, and that is said at once."""
        data = _loads(raw.http_response.content)
        choices = data.get("choices") if isinstance(data, dict) else None
        lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
        if isinstance(lp, dict) and lp.get("tokens") and lp.get("text_offset") is not None \
                and lp.get("top_logprobs") is not None:
            self._echo_seen = True
            return data
        if not isinstance(data, dict) or "choices" not in data:
            raise Malformed("a reply that is not a completion")
        if self._echo_seen:
            raise Malformed("a reply without prompt logprobs" if choices else "a reply with no choices")
        raise LLMError(f"{self.base_url} returned no prompt logprobs for model '{self.name}'",
                       "the server must support echo=True with logprobs on /v1/completions")

    def prompt_logprobs(self, prompts, top=15, return_errors=False):
        sinks = self._sinks()
        create = self._client.completions.with_raw_response.create

        def ask(prompt: str) -> PromptLogprobs:
            # max_tokens=1, not 0: llama.cpp reads 0 as "no limit". The generated token is dropped below.
            data = self._request(lambda: self._echo_data(create(
                model=self.name, prompt=prompt, echo=True, logprobs=top, max_tokens=1, temperature=0.0)),
                prompt_chars=len(prompt), completion=1)
            pt, ct, cached = self._tokens(data.get("usage"))
            self._record(sinks, pt, ct, cached_tokens=cached)
            choice = data["choices"][0]
            lp = choice["logprobs"]
            tokens = lp["tokens"]
            offsets = [min(int(o), len(prompt)) for o in lp["text_offset"]]
            keep = sum(1 for o in offsets if o < len(prompt))
            if 0 < pt <= len(tokens) and all(o >= len(prompt) for o in offsets[pt:]):
                keep = pt  # trailing prompt tokens that decode to nothing still count
            shifted = self.echo_shifted
            if self.echo_alignment == "auto" and len(choice.get("text") or "") > len(prompt):
                shifted = self.echo_shifted = keep == len(tokens)  # a token was generated but has no entry
            server = [t if t else {} for t in (lp["top_logprobs"] or [None] * len(tokens))]
            # Shifted: entry i predicts token i+1, and the entry predicting token 1 was nulled by the server.
            tops = ([{}] + server[: keep - 1]) if shifted else server[:keep]
            return PromptLogprobs(list(tokens[:keep]), offsets[:keep], tops, pt or keep, cached)

        def one(prompt: str) -> PromptLogprobs:
            # The alignment setting is in the key: the answer is stored as read with it.
            key = self._key("echo", prompt=prompt, logprobs=top, echo_alignment=self.echo_alignment)
            return self._answer(key, lambda: ask(prompt), lambda hit: PromptLogprobs(**hit), sinks)

        return self._map(one, [(p,) for p in prompts], return_errors)
