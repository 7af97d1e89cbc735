"""How `OpenAILLM` sends a request: one attempt per concurrency slot, retries with jittered
exponential backoff (honouring Retry-After) on 429, 5xx, timeouts, lost connections and malformed
answers, the request and token rate limits, the response cache, and the accounting of each answer
against the usage trackers and the run's budget (`llm_openai.py`'s docstring says why each is so).

`Transport` is a mixin: it reads what `OpenAILLM.__init__` sets up (the openai module and client,
the slots, the pool, the bucket and windows, the cache, the retry settings)."""

from __future__ import annotations

import random
import re
import time

from autoexplain import interrupt
from autoexplain.budget import ledger
from autoexplain.counters import COUNTS
from autoexplain.llm import LLMError
from autoexplain.llm_cache import request_key
from autoexplain.server_probe import key_fix


# How servers word a prompt longer than their context: OpenAI and vLLM ("maximum context length"),
# llama.cpp's own server ("exceeds the available context size"), OpenAI's code, Ollama and TGI.
_TOO_LONG = re.compile(r"context.length|context.size|context_length_exceeded|n_ctx|too many tokens|"
                       r"input.{0,20}(?:too long|exceeds)", re.I)


class Malformed(Exception):
    """An HTTP 200 whose body is not a usable answer: retried like a 5xx."""


CHARS_PER_TOKEN = 4  # a prompt's characters per token, until the server's answers have said


class Transport:
    """The request machinery of a server LLM (see the module docstring)."""

    _prompt_seen = (0, 0)  # characters and prompt tokens of the prompts answered so far

    def _prompt_tokens(self, chars: int) -> int:
        """A prompt's tokens before it is sent: its characters at the ratio this server's answers
        have shown, 4 a token until one has. Measured with SmolLM2's tokenizer, the simulator's
        records (a token and a tab a line) run at 2.8 characters a token and the explainer's
        (token, activation) lines lower: a fixed 4 held too little against the budget and the
        tokens-per-minute window."""
        chars_seen, tokens_seen = self._prompt_seen
        return -(-chars * tokens_seen // chars_seen) if tokens_seen else -(-chars // CHARS_PER_TOKEN)

    def _learn(self, chars: int, prompt_tokens: int) -> None:
        """Count an answered prompt's characters and the tokens the server says it had."""
        if chars > 0 and prompt_tokens > 0:
            seen_chars, seen_tokens = self._prompt_seen
            self._prompt_seen = (seen_chars + chars, seen_tokens + prompt_tokens)  # one tuple: read whole

    @staticmethod
    def _message(e) -> str:
        body = getattr(e, "body", None)
        err = body.get("error", body) if isinstance(body, dict) else None
        msg = (err.get("message") or err.get("detail")) if isinstance(err, dict) else err
        return " ".join(str(msg or getattr(e, "message", "") or type(e).__name__).split())[:300]

    def _permanent(self, e, attempts: int) -> LLMError:
        status, msg = e.status_code, self._message(e)
        if status in (401, 403):
            return LLMError(f"{self.base_url} refused the API key (HTTP {status}): {msg}",
                            key_fix(self.api_key_env), status, attempts)
        if status == 404:
            return LLMError(f"{self.base_url} has no model '{self.name}' or no such endpoint (HTTP 404): {msg}",
                            f"check the model name (GET {self.base_url}/models lists them)", status, attempts)
        if status == 400 and _TOO_LONG.search(msg):
            return LLMError(f"the prompt is longer than the context of '{self.name}' at {self.base_url} (HTTP 400): {msg}",
                            "start the server with a larger context (llama.cpp: --n_ctx 8192; vLLM: --max-model-len "
                            "8192): the explainer's prompt alone is about 2,200 tokens", status, attempts)
        return LLMError(f"{self.base_url} rejected the request (HTTP {status}): {msg}",
                        "check the model and the request options", status, attempts)

    def _backoff(self, attempt: int, error) -> float:
        step = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        delay = step / 2 + random.uniform(0, step / 2)
        response = getattr(error, "response", None)
        try:
            after = float(response.headers.get("retry-after")) if response is not None else 0.0
        except (TypeError, ValueError):
            after = 0.0
        return max(delay, min(after, self.backoff_cap))

    def _request(self, call, retries: int | None = None, check=None, prompt_chars: int = 0, completion: int = 0):
        """Run one API call with retries on 429, 5xx, timeouts, lost connections and malformed answers
        (`check(response)` raises Malformed for a 200 that is no usable answer). A concurrency slot is
        held for each attempt only, never during the backoff wait. The request's prompt (`prompt_chars`
        characters, `_prompt_tokens`) and `completion` tokens as guessed before it is sent are held
        against the run's budget while it is in flight (`budget`) and taken from the tokens-per-minute
        window before each attempt (`_settle`); the answer's usage teaches the guess (`_learn`)."""
        estimate = (self._prompt_tokens(prompt_chars), completion)
        with ledger().hold(sum(estimate), self.dollars(*estimate)):
            response = self._attempts(call, self.max_retries if retries is None else retries, check, sum(estimate))
        self._learn(prompt_chars, self._tokens(self._usage(response))[0])
        return response

    def _attempts(self, call, retries: int, check, tokens: int):
        openai, attempt = self._openai, 0
        while True:
            attempt += 1
            interrupt.check()  # a stopped run sends nothing more
            if self._bucket:
                self._bucket.acquire()
            if self._rpm:
                self._rpm.acquire()
            taken = self._tpm.acquire(tokens) if self._tpm else None
            ticket = self._slots.take()
            try:
                try:
                    sent = time.monotonic()
                    COUNTS["llm_sent"] += 1
                    response = call()
                    took = time.monotonic() - sent
                except openai.APITimeoutError:
                    self._slots.lower(ticket)  # before its slot goes back: none is sent under the old limit
                    raise
                finally:
                    self._slots.give()
                if check is not None:
                    check(response)
                self._slots.answered(ticket, took)
                if taken is not None:
                    self._settle(taken, response)
                return response
            except openai.APIStatusError as e:
                COUNTS["llm_429" if e.status_code == 429 else "llm_5xx" if e.status_code >= 500 else "llm_faults"] += 1
                if e.status_code not in self.RETRYABLE and e.status_code < 500:
                    raise self._permanent(e, attempt) from None
                last = e
            except openai.APIConnectionError as e:  # APITimeoutError included (the limit is lowered above)
                COUNTS["llm_timeouts" if isinstance(e, openai.APITimeoutError) else "llm_faults"] += 1
                last = e
            except (Malformed, openai.APIResponseValidationError, ValueError) as e:  # JSONDecodeError is a ValueError
                COUNTS["llm_faults"] += 1
                last = e if isinstance(e, Malformed) else Malformed(f"invalid response body ({type(e).__name__}: "
                                                                      f"{' '.join(str(e).split())[:120]})")
            except LLMError:  # answered, but not with what was asked (no prompt logprobs): said at once
                COUNTS["llm_faults"] += 1
                raise
            if attempt > retries:
                break
            COUNTS["llm_retries"] += 1
            interrupt.sleep(self._backoff(attempt, last))
        if isinstance(last, Malformed):
            err = LLMError(f"{self.base_url} answered {attempt} times without a usable reply: {last}",
                           "check the server and the model", None, attempt)
        elif isinstance(last, openai.APITimeoutError):
            err = LLMError(f"requests to {self.base_url} timed out {attempt} times (after {self.timeout:g} s each)",
                           "raise --timeout SECONDS (flow parameter timeout) for a slow server, or lower --concurrency "
                           "for an overloaded one", None, attempt)
        elif isinstance(last, openai.APIConnectionError):
            err = LLMError(f"cannot reach {self.base_url}", "is the server running? Start it, or fix the URL "
                           "after '@' in the LLM spec", None, attempt)
        else:
            err = LLMError(f"{self.base_url} kept failing (HTTP {last.status_code}) after {attempt} attempts: "
                           f"{self._message(last)}", "try again later, or lower the concurrency / requests per minute",
                           last.status_code, attempt)
        err.transient = True  # retries exhausted: a caller may record this item as failed and go on
        raise err from None

    def _map(self, fn, items, return_errors: bool = False):
        """fn(*item) for every item on the shared pool, results in order. With return_errors, an item
        whose request failed for good (retries exhausted) gives its LLMError in place of a result;
        a permanent error (a refused key, an unknown model) is raised either way."""
        futures = [self._pool.submit(fn, *item) for item in items]
        try:
            out = []
            for f in futures:
                try:
                    out.append(f.result())
                except LLMError as e:
                    if not return_errors or not e.transient:
                        raise
                    out.append(e)
            return out
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    @staticmethod
    def _tokens(usage) -> tuple[int, int, int]:
        """Prompt, completion and cached prompt tokens (`prompt_tokens_details.cached_tokens`, which
        providers with a prefix cache bill at the cached-input price) of a reply's usage."""
        if usage is None:
            return 0, 0, 0
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else 0
            return usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, cached or 0
        details = getattr(usage, "prompt_tokens_details", None)
        return usage.prompt_tokens or 0, usage.completion_tokens or 0, getattr(details, "cached_tokens", None) or 0

    @staticmethod
    def _usage(response):
        return response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None)

    def _settle(self, taken, response) -> None:
        """Replace a request's estimate by the tokens the server says it used (when it says)."""
        used = sum(self._tokens(self._usage(response))[:2])
        if used > 0:
            self._tpm.settle(taken, used)

    def _key(self, endpoint: str, **request) -> str:
        return request_key(endpoint=endpoint, model=self.name, **request)

    def _cached(self, keys: list[str], sinks) -> list:
        """The stored answers of these keys (None where there is none), counted as cache hits."""
        got = [self.cache.get(k) for k in keys] if self.cache is not None else [None] * len(keys)
        if hits := sum(g is not None for g in got):
            self._record_cached(sinks, hits)
        return got

    def _answer(self, key: str, ask, decode, sinks, keep=None):
        """ask() once for a key: the cache's answer, or the answer of the same request in flight now.
        `keep(answer)`: whether it is worth storing (default: every answer)."""
        if self.cache is None:
            return ask()
        answer, reused = self.cache.answer(key, ask, decode, keep)
        if reused:
            self._record_cached(sinks, 1)
        return answer
