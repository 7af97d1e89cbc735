"""One interface to the language models that explain and simulate, with two backends.

`make_llm(spec, **kw)` picks the backend from a spec string:

    None | "local"          LocalLLM on the embedded SmolLM2-135M-Instruct (transformers, CPU or GPU)
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
`Usage.requests` counts answered requests; retries are not counted.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

from autoexplain.counters import COUNTS
from autoexplain.errors import UserError

OPENAI_URL = "https://api.openai.com/v1"


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class PromptLogprobs:
    tokens: list[str]  # the prompt as the model tokenised it
    offsets: list[int]  # character offset of each token in the prompt
    top_logprobs: list[dict[str, float]]  # per token: the top alternatives predicted at that position ({} for the first)
    prompt_tokens: int


@dataclass
class ChatResult:
    text: str
    top_logprobs: list[list[tuple[str, float]]] | None  # per output token, best first; None if not asked
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += requests

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "requests": self.requests}


class LLMError(UserError):
    """A request that failed for good: a permanent HTTP error, or retries exhausted."""

    def __init__(self, problem: str, fix: str | None = None, status: int | None = None, attempts: int = 1):
        super().__init__(problem, fix)
        self.status, self.attempts = status, attempts


_TRACKERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("autoexplain_llm_trackers", default=())


class LLM(ABC):
    name: str

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

    @staticmethod
    def _record(sinks: list[Usage], prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        COUNTS["llm_requests"] += requests
        for u in sinks:
            u.add(prompt_tokens, completion_tokens, requests)

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

    def close(self) -> None:
        pass


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    cuts = [i for s in stop or () if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def _merge_top(pairs) -> dict[str, float]:
    """Token strings to logprobs; ids that decode to the same string pool their probability."""
    out: dict[str, float] = {}
    for s, v in pairs:
        out[s] = v if s not in out else float(math.log(math.exp(out[s]) + math.exp(v)))
    return out


class LocalLLM(LLM):
    """A Hugging Face causal LM run in-process with transformers (bf16 by default)."""

    def __init__(self, spec: str | None = None, *, subject=None, batch_size: int = 8, device=None,
                 logits_budget: int = 1 << 27, seed: int = 0):
        super().__init__()
        self.seed = seed
        import torch

        from autoexplain.subject import load_subject

        self._torch = torch
        self.subject = subject or load_subject(spec, device=device)
        self.name = self.subject.name
        self.model, self.tok = self.subject.model, self.subject.tokenizer
        self.batch_size, self.logits_budget = batch_size, logits_budget
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        self._eos = eos
        self._pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos[0] if eos else 0)
        with_special = self.tok("x")["input_ids"]
        plain = self.tok("x", add_special_tokens=False)["input_ids"]
        self._prefix = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self._strs: dict[int, str] = {}

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def _str(self, i: int) -> str:
        if i not in self._strs:
            self._strs[i] = self.tok.decode([i])
        return self._strs[i]

    @staticmethod
    def _batches(seqs: list[list[int]], per_batch: int):
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad less
        for s in range(0, len(order), per_batch):
            yield order[s: s + per_batch]

    def _padded(self, seqs: list[list[int]], left: bool):
        """Left padding for generation (every prompt ends at the last column), right for scoring."""
        torch, width = self._torch, max(map(len, seqs))
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[r, cols], mask[r, cols] = torch.tensor(seq), 1
        return ids.to(self._device), mask.to(self._device), width

    def _generate(self, id_lists: list[list[int]], n: int, temperature: float, max_tokens: int, logits: bool):
        """Sample n continuations per prompt. The prompt is read once and its KV cache is copied n
        times (`generate(num_return_sequences=n)` would re-read the prompt n times), and only the
        last position's logits are computed during the prompt pass."""
        torch = self._torch
        ids, mask, width = self._padded(id_lists, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_logits: list = []
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            cache, last = out.cache, out.logits[:, -1]
            if n > 1:
                cache.batch_repeat_interleave(n)
                last, mask = last.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            pos = positions[:, -1:].repeat_interleave(n, 0)
            done = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
            eos = torch.tensor(self._eos or [-1], device=last.device)
            # Sample from a generator seeded by the prompts, never from torch's global RNG: the same
            # prompts give the same samples whatever ran before, in whichever thread or process.
            gen = torch.Generator(device=last.device)
            blob = repr((self.seed, id_lists, n, temperature, max_tokens)).encode()
            gen.manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1)
            rows = []
            for _ in range(max_tokens):
                if logits:
                    step_logits.append(last)
                if temperature > 0:
                    probs = torch.softmax(last.float() / temperature, -1)
                    token = torch.multinomial(probs, 1, generator=gen)[:, 0]
                else:
                    token = last.argmax(-1)
                token = torch.where(done, torch.full_like(token, self._pad), token)
                rows.append(token)
                done |= torch.isin(token, eos)
                if bool(done.all()):
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], 1)
                pos = pos + 1
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                                 use_cache=True)
                cache, last = out.cache, out.logits[:, -1]
        seqs = torch.stack(rows, 1).tolist() if rows else [[] for _ in range(last.shape[0])]
        cut = [row[: next((j for j, t in enumerate(row) if t in self._eos), len(row))] for row in seqs]
        return cut, step_logits

    def complete(self, prompts, n=1, temperature=1.0, max_tokens=60, stop=None):
        sinks = self._sinks()
        encoded = [self.tok(p)["input_ids"] for p in prompts]
        results: list[list[Completion]] = [[] for _ in prompts]
        for batch in self._batches(encoded, max(1, self.batch_size // n)):
            rows, _ = self._generate([encoded[i] for i in batch], n, temperature, max_tokens, logits=False)
            for k, i in enumerate(batch):
                for row in rows[k * n: (k + 1) * n]:
                    text = _cut_at_stop(self.tok.decode(row, skip_special_tokens=True), stop)
                    results[i].append(Completion(text, len(encoded[i]), len(row)))
                self._record(sinks, len(encoded[i]), sum(c.completion_tokens for c in results[i]))
        return results

    def chat(self, messages_batch, temperature=0.0, max_tokens=1024, top_logprobs=None):
        torch, sinks = self._torch, self._sinks()
        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_batch]
        encoded = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        results: list[ChatResult | None] = [None] * len(texts)
        for batch in self._batches(encoded, self.batch_size):
            rows, step_logits = self._generate([encoded[i] for i in batch], 1, temperature, max_tokens,
                                               logits=bool(top_logprobs))
            for k, i in enumerate(batch):
                tops = None
                if top_logprobs:
                    tops = []
                    for s in range(len(rows[k])):
                        vals, ids = torch.log_softmax(step_logits[s][k].float(), -1).topk(top_logprobs)
                        tops.append([(self._str(t), float(v)) for t, v in zip(ids.tolist(), vals.tolist())])
                text = self.tok.decode(rows[k], skip_special_tokens=True)
                results[i] = ChatResult(text, tops, len(encoded[i]), len(rows[k]))
                self._record(sinks, len(encoded[i]), len(rows[k]))
        return results

    def prompt_logprobs(self, prompts, top=15):
        torch, sinks = self._torch, self._sinks()
        if not getattr(self.tok, "is_fast", False):
            raise UserError(f"the tokenizer of {self.name} is not a fast tokenizer", "prompt logprobs need its offset mapping")
        enc = [self.tok(p, add_special_tokens=False, return_offsets_mapping=True) for p in prompts]
        seqs = [self._prefix + e["input_ids"] for e in enc]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        results: list[PromptLogprobs | None] = [None] * len(prompts)
        per_batch = max(1, min(self.batch_size, self.logits_budget // (vocab * max(map(len, seqs), default=1))))
        for batch in self._batches(seqs, per_batch):
            ids, mask, _ = self._padded([seqs[i] for i in batch], left=False)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, i in enumerate(batch):
                full, n_pre = seqs[i], len(self._prefix)
                tops: list[dict[str, float]] = [{}] if n_pre == 0 else []  # nothing predicts a first token
                for s in range(max(n_pre, 1) - 1, len(full) - 1, 256):  # logits at p-1 predict token p
                    chunk = logits[r, s: min(s + 256, len(full) - 1)].float()
                    vals, tids = torch.log_softmax(chunk, -1).topk(top)
                    for v_row, t_row in zip(vals.tolist(), tids.tolist()):
                        tops.append(_merge_top((self._str(t), v) for t, v in zip(t_row, v_row)))
                own = enc[i]["input_ids"]
                results[i] = PromptLogprobs([self._str(t) for t in own], [a for a, _b in enc[i]["offset_mapping"]],
                                            tops, len(full))
                self._record(sinks, len(full), 0)
        return results


class TokenBucket:
    """Requests per minute with a burst: each acquire takes a token, waiting for the refill if needed."""

    def __init__(self, per_minute: float, burst: int = 1):
        self.rate, self.capacity = per_minute / 60.0, float(max(1, burst))
        self._tokens, self._t = self.capacity, time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= 1  # reserve now, so waiters are served in arrival order
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def _is_openai(url: str) -> bool:
    return (urlparse(url).hostname or "").endswith("api.openai.com")


class OpenAILLM(LLM):
    """OpenAI, or any server speaking its API, with our own concurrency limit, rate limit and retries."""

    RETRYABLE = {408, 409, 425, 429}

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 requests_per_minute: float | None = None, max_retries: int = 6, backoff_base: float = 1.0,
                 backoff_cap: float = 60.0, timeout: float = 120.0, echo_alignment: str = "auto"):
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
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="llm")
        self._bucket = TokenBucket(requests_per_minute, burst=max_concurrency) if requests_per_minute else None
        self._n_ignored = False  # learned: the server returns one choice whatever `n` says
        if echo_alignment not in ("auto", "ok", "shifted"):
            raise UserError(f"echo_alignment must be 'auto', 'ok' or 'shifted', not '{echo_alignment}'")
        # llama-cpp-python, for models without BOS, pairs each echoed prompt token with the logprobs
        # that predict the *next* one and omits the generated token. "auto" detects that from the
        # response: the token it generated has no logprobs entry of its own.
        self.echo_alignment = echo_alignment
        self.echo_shifted = echo_alignment == "shifted"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- transport -------------------------------------------------------------------------------
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
                            f"set a valid key in ${self.api_key_env}", status, attempts)
        if status == 404:
            return LLMError(f"{self.base_url} has no model '{self.name}' or no such endpoint (HTTP 404): {msg}",
                            f"check the model name (GET {self.base_url}/models lists them)", status, attempts)
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

    def _request(self, call, retries: int | None = None):
        """Run one API call with retries on 429, 5xx, timeouts and lost connections."""
        openai, attempt = self._openai, 0
        retries = self.max_retries if retries is None else retries
        while True:
            attempt += 1
            if self._bucket:
                self._bucket.acquire()
            try:
                return call()
            except openai.APIStatusError as e:
                if e.status_code not in self.RETRYABLE and e.status_code < 500:
                    raise self._permanent(e, attempt) from None
                last = e
            except openai.APIConnectionError as e:  # APITimeoutError included
                last = e
            if attempt > retries:
                break
            time.sleep(self._backoff(attempt, last))
        if isinstance(last, openai.APITimeoutError):
            raise LLMError(f"requests to {self.base_url} timed out {attempt} times",
                           "the server is overloaded or the timeout too short", None, attempt) from None
        if isinstance(last, openai.APIConnectionError):
            raise LLMError(f"cannot reach {self.base_url}", "is the server running? Start it, or fix the URL "
                           "after '@' in the LLM spec", None, attempt) from None
        raise LLMError(f"{self.base_url} kept failing (HTTP {last.status_code}) after {attempt} attempts: {self._message(last)}",
                       "try again later, or lower the concurrency / requests per minute", last.status_code, attempt) from None

    def _map(self, fn, items):
        futures = [self._pool.submit(fn, *item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def ping(self) -> None:
        """One request without retries: a clear error now instead of after the first batch."""
        self._request(self._client.models.list, retries=0)

    @staticmethod
    def _tokens(usage) -> tuple[int, int]:
        return (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage is not None else (0, 0)

    # -- API ---------------------------------------------------------------------------------------
    def complete(self, prompts, n=1, temperature=1.0, max_tokens=60, stop=None):
        sinks = self._sinks()
        extra = {"stop": stop} if stop else {}

        def one(prompt: str, k: int) -> list[Completion]:
            got: list[Completion] = []
            while len(got) < k:
                want = k - len(got)
                r = self._request(lambda: self._client.completions.create(
                    model=self.name, prompt=prompt, n=want, temperature=temperature, max_tokens=max_tokens, **extra))
                pt, ct = self._tokens(r.usage)
                self._record(sinks, pt, ct)
                if not r.choices:
                    raise LLMError(f"{self.base_url} returned no completion for model '{self.name}'")
                if len(r.choices) < want:
                    self._n_ignored = True
                share = round(ct / len(r.choices))
                got += [Completion(c.text, pt, share) for c in sorted(r.choices, key=lambda c: c.index)]
            return got[:k]

        if self._n_ignored or n == 1:
            flat = self._map(one, [(p, 1) for p in prompts for _ in range(n)])
            return [[c for s in flat[i * n: (i + 1) * n] for c in s] for i in range(len(prompts))]
        return self._map(one, [(p, n) for p in prompts])

    def chat(self, messages_batch, temperature=0.0, max_tokens=1024, top_logprobs=None):
        sinks = self._sinks()
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}

        def one(messages: list[dict]) -> ChatResult:
            r = self._request(lambda: self._client.chat.completions.create(
                model=self.name, messages=messages, temperature=temperature, max_tokens=max_tokens, **extra))
            pt, ct = self._tokens(r.usage)
            self._record(sinks, pt, ct)
            if not r.choices:
                raise LLMError(f"{self.base_url} returned no chat reply for model '{self.name}'")
            choice = r.choices[0]
            tops = None
            if top_logprobs and choice.logprobs is not None and choice.logprobs.content is not None:
                tops = [[(t.token, t.logprob) for t in item.top_logprobs] for item in choice.logprobs.content]
            return ChatResult(choice.message.content or "", tops, pt, ct)

        return self._map(one, [(m,) for m in messages_batch])

    def prompt_logprobs(self, prompts, top=15):
        sinks = self._sinks()

        def one(prompt: str) -> PromptLogprobs:
            # max_tokens=1, not 0: llama.cpp reads 0 as "no limit". The generated token is dropped below.
            r = self._request(lambda: self._client.completions.create(
                model=self.name, prompt=prompt, echo=True, logprobs=top, max_tokens=1, temperature=0.0))
            pt, ct = self._tokens(r.usage)
            self._record(sinks, pt, ct)
            lp = r.choices[0].logprobs if r.choices else None
            if lp is None or not lp.tokens:
                raise LLMError(f"{self.base_url} returned no prompt logprobs for model '{self.name}'",
                               "the server must support echo=True with logprobs on /v1/completions")
            offsets = [min(int(o), len(prompt)) for o in lp.text_offset]
            keep = sum(1 for o in offsets if o < len(prompt))
            if 0 < pt <= len(lp.tokens) and all(o >= len(prompt) for o in offsets[pt:]):
                keep = pt  # trailing prompt tokens that decode to nothing still count
            shifted = self.echo_shifted
            if self.echo_alignment == "auto" and len(r.choices[0].text or "") > len(prompt):
                shifted = self.echo_shifted = keep == len(lp.tokens)  # a token was generated but has no entry
            server = [dict(t) if t else {} for t in (lp.top_logprobs or [None] * len(lp.tokens))]
            # Shifted: entry i predicts token i+1, and the entry predicting token 1 was nulled by the server.
            tops = ([{}] + server[: keep - 1]) if shifted else server[:keep]
            return PromptLogprobs(list(lp.tokens[:keep]), offsets[:keep], tops, pt or keep)

        return self._map(one, [(p,) for p in prompts])


def make_llm(spec: str | None = None, **kw) -> LLM:
    """Build an LLM from a spec string (grammar in the module docstring)."""
    spec = (spec or "local").strip()
    kind, _, rest = spec.partition(":")
    if kind == "local":
        return LocalLLM(rest or None, **kw)
    if kind == "openai":
        if not rest:
            raise UserError(f"LLM spec '{spec}' names no model", "write 'openai:MODEL' or 'openai:MODEL@http://host:port/v1'")
        at = rest.rfind("@http")
        model, url = (rest[:at], rest[at + 1:]) if at > 0 else (rest, kw.pop("base_url", None))
        return OpenAILLM(model, url, **kw)
    raise UserError(f"unknown LLM spec '{spec}'",
                    "use 'local', 'local:MODEL', 'openai:MODEL' or 'openai:MODEL@http://host:port/v1'")
