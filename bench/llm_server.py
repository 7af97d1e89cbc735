"""A loopback OpenAI-compatible server for the LLM benchmarks: a fixed latency, no limit on
concurrency, and answers the size vLLM gives.

    python bench/llm_server.py --latency 1.0 --port 8123        # serve until killed
    from bench.llm_server import BenchServer                     # or in-process, on a free port

- `POST /v1/completions` with `echo=True, logprobs=K`: every prompt token with its top-K
  alternatives (K=15 as the simulator asks, none for the first token), `text_offset`,
  `token_logprobs`, then one generated token, as vLLM returns them. The prompt is cut into
  BPE-sized pieces (words of up to 7 characters, longer ones in 4-character chunks, tabs and newlines
  alone), so the token count and the response size are those of a real tokenizer (about 4 characters
  a token). Where a token follows a tab (the simulator's `unknown` placeholders) the alternatives are
  the digits 0-10 with a distribution drawn from the explanation and the record's token, so a
  simulation has varied, reproducible values.
- `POST /v1/completions` without echo: `n` sampled explanations (distinct, reproducible from the
  prompt and the sample index).
- `POST /v1/chat/completions`: a JSON list of `{"token", "activation"}` for the chat simulator; for
  a classifier scorer's prompt (numbered examples), 0/1 answers by a keyword rule with logprobs, or
  the intruder's number (`classify_reply`).
- `GET /v1/models`.
- A prefix cache, as providers keep one: every reply's `usage.prompt_tokens_details.cached_tokens`
  is the longest prefix, in whole blocks of `cache_block` tokens, that an earlier prompt shared
  (0 turns it off).

Faults for the robustness benchmark: `fault_rate` (0-1) of the answers are, in turn, one of
`fault_kinds` (429 with Retry-After, 500, 503, a timeout (the answer comes after `timeout_s`), a
connection reset, HTTP 200 with invalid JSON, truncated JSON, an empty `choices`, no logprobs),
chosen by a seeded generator. Counters: `requests`, `answered`, `faults` (by kind),
`max_inflight`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import signal
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("429", "500", "503", "timeout", "reset", "invalid-json", "truncated", "no-choices", "no-logprobs")
_PIECE = re.compile(r"\n|\t| ?[^\s]+| +")
_VOCAB = [" the", " of", " and", " to", " a", " in", " is", " that", " for", " it", " with", " as", " was",
          " on", " be", " at", " by", " this", " from", " or", ",", ".", "\n", "\t", " I", " he", " she", " we",
          " they", " not", " are", " his", " her", " but", " had", " have", " an", " one", " all", " were"]
DIGITS = [str(i) for i in range(11)]


def tokens_of(prompt: str) -> list[str]:
    out = []
    for piece in _PIECE.findall(prompt):
        if len(piece) <= 7:
            out.append(piece)
        else:
            out += [piece[i : i + 4] for i in range(0, len(piece), 4)]
    return out


def _h(*parts: str) -> int:
    return zlib.crc32("\x00".join(parts).encode())


# Precomputed JSON for the alternatives at ordinary positions: a few dozen variants, picked by hash.
_PLAIN = []
for _v in range(64):
    _rng = random.Random(_v)
    _alts = _rng.sample(_VOCAB, 15)
    _lps = sorted((-_rng.uniform(0.05, 9.0) for _ in range(15)), reverse=True)
    _PLAIN.append(json.dumps(dict(zip(_alts, [round(x, 4) for x in _lps])), ensure_ascii=False))


def _digit_alts(explanation: str, token: str) -> str:
    """Top-15 at a placeholder: the 11 digits (a peaked distribution at a value set by the explanation
    and the record's token) and four other tokens."""
    h = _h(explanation, token)
    peak = h % 11 if (h >> 8) % 3 == 0 else (h >> 4) % 3  # mostly low values, sometimes high
    lps = {d: round(-0.3 - 0.9 * abs(int(d) - peak) - ((h >> (int(d) % 16)) & 3) * 0.1, 4) for d in DIGITS}
    for w, lp in zip((" unknown", " none", "\n", " -"), (-6.5, -7.0, -7.5, -8.0)):
        lps[w] = lp
    return json.dumps(lps)


class PrefixCache:
    """The prompt prefixes seen so far, by block of `block` tokens (hashes only: a long benchmark
    keeps a few million ints)."""

    def __init__(self, block: int):
        self.block, self._seen, self._lock = block, set(), threading.Lock()

    def cached(self, toks: list[str]) -> int:
        if not self.block:
            return 0
        hashes, h = [], 0
        for i in range(0, len(toks) - len(toks) % self.block, self.block):
            h = zlib.crc32("".join(toks[i : i + self.block]).encode(), h)
            hashes.append(h)
        with self._lock:
            hit = next((n for n in range(len(hashes), 0, -1) if hashes[n - 1] in self._seen), 0)
            self._seen.update(hashes)
        return hit * self.block


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def echo_body(prompt: str, model: str, top: int, cache: PrefixCache | None = None) -> bytes:
    toks = tokens_of(prompt)
    start = prompt.rfind("Explanation:")
    explanation = prompt[start : prompt.find("\n", start)] if start >= 0 else ""
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    alts, lps = ["null"], ["null"]
    for i in range(1, len(toks)):
        if toks[i - 1] == "\t":
            # the record's token is the line's text before the tab
            line_start = prompt.rfind("\n", 0, offsets[i - 1]) + 1
            alts.append(_digit_alts(explanation, prompt[line_start : offsets[i - 1]]))
            lps.append("-0.5")
        else:
            v = _h(toks[i], str(i & 7)) & 63
            alts.append(_PLAIN[v] if top >= 15 else json.dumps(dict(list(json.loads(_PLAIN[v]).items())[:top])))
            lps.append("-1.25")
    gen = " the"
    toks_json = json.dumps(toks + [gen], ensure_ascii=False)
    offsets_json = json.dumps(offsets + [pos])
    alts.append(_PLAIN[0])
    lps.append("-0.7")
    body = (
        '{"id":"cmpl-bench","object":"text_completion","created":0,"model":' + json.dumps(model) + ','
        '"choices":[{"index":0,"text":' + json.dumps(prompt + gen, ensure_ascii=False) + ','
        '"logprobs":{"tokens":' + toks_json + ',"token_logprobs":[' + ",".join(lps) + '],'
        '"top_logprobs":[' + ",".join(alts) + '],"text_offset":' + offsets_json + '},"finish_reason":"length"}],'
        '"usage":' + json.dumps(_usage(len(toks), 1, cache.cached(toks) if cache else 0)) + '}'
    )
    return body.encode()


TOPICS = ["words about animals", "the word 'the' after a verb", "numbers and dates", "capitalised names",
          "punctuation at the end of a clause", "colours", "body parts", "legal language", "code identifiers",
          "the start of a sentence", "plural nouns", "negations"]


def completion_body(body: dict, cache: PrefixCache | None = None) -> bytes:
    prompt, n = body.get("prompt", ""), int(body.get("n") or 1)
    h = _h(prompt if isinstance(prompt, str) else json.dumps(prompt))
    choices = [{"index": i, "text": f" {TOPICS[(h + 7 * i) % len(TOPICS)]}, variant {(h >> 3) % 5 + i}.",
                "logprobs": None, "finish_reason": "stop"} for i in range(n)]
    toks = tokens_of(prompt) if isinstance(prompt, str) else [""]
    return json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": body.get("model"),
                       "choices": choices,
                       "usage": _usage(len(toks), 12 * n, cache.cached(toks) if cache else 0)}).encode()


_WORD = re.compile(r"[a-z]{3,}")
_STOP = {"the", "and", "for", "with", "that", "this", "are", "was", "words", "word", "token", "tokens", "text"}


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _STOP


def classify_reply(user: str) -> tuple[str, list | None]:
    """A classifier scorer's answer by a keyword rule, and per answer digit its (token, logprob)
    alternatives. Detection and fuzzing: an example is 1 when a word of the explanation (3+
    letters, a few stop words left out) is among its marked tokens (fuzzing) or its words
    (detection), with P(1) = 0.1 + 0.8 x the fraction of the explanation's words found. Intruder (no
    explanation): the example whose marked words share least with the others'. An explanation
    holding the word 'garble' gets a reply that is no list, for the parse-failure tests."""
    examples = re.findall(r"^Example (\d+): (.*)$", user, re.M)
    marked = [" ".join(re.findall(r"<<(.*?)>>", text)) or text for _, text in examples]
    found = re.search(r"^Explanation: (.*)$", user, re.M)
    if found is None:  # the intruder
        sets = [_words(m) for m in marked]
        shared = [len(s & set().union(*(o for j, o in enumerate(sets) if j != i))) for i, s in enumerate(sets)]
        return str(shared.index(min(shared)) + 1), None
    if "garble" in found.group(1):
        return "I am not sure which ones.", None
    explanation = _words(found.group(1))
    answers, tops = [], []
    for m in marked:
        frac = len(explanation & _words(m)) / max(1, len(explanation))
        p1 = 0.1 + 0.8 * frac
        d = "1" if frac > 0 else "0"
        answers.append(d)
        alt = [("1", math.log(p1)), ("0", math.log(1 - p1))]
        tops.append(alt if d == "1" else alt[::-1])
    text = "[" + ", ".join(answers) + "]"
    content = [{"token": "[", "logprob": 0.0, "top_logprobs": [{"token": "[", "logprob": 0.0}]}]
    for i, (d, alt) in enumerate(zip(answers, tops)):
        content.append({"token": d, "logprob": alt[0][1],
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alt]})
        sep = ", " if i < len(answers) - 1 else "]"
        content.append({"token": sep, "logprob": 0.0, "top_logprobs": [{"token": sep, "logprob": 0.0}]})
    return text, content


def chat_body(body: dict, cache: PrefixCache | None = None) -> bytes:
    user = body["messages"][-1]["content"]
    if re.search(r"^Example 1: ", user, re.M):  # a classifier scorer's prompt
        content, lp = classify_reply(user)
        return json.dumps({"id": "chat-bench", "object": "chat.completion", "created": 0, "model": body.get("model"),
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "logprobs": {"content": lp} if lp and body.get("logprobs") else None,
                                        "finish_reason": "stop"}],
                           "usage": _usage(len(user) // 4, len(content) // 4 + 1, 0)}).encode()
    marker = "each a list of tokens: "  # the chat simulator's request: several records' tokens
    try:
        records = json.loads(user[user.index(marker) + len(marker):])
    except ValueError:
        records = []
    content = json.dumps([[{"token": t, "activation": _h(user[:80], t) % 11 if _h(t) % 4 == 0 else 0} for t in toks]
                          for toks in records])
    return json.dumps({"id": "chat-bench", "object": "chat.completion", "created": 0, "model": body.get("model"),
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "logprobs": None, "finish_reason": "stop"}],
                       "usage": _usage(len(user) // 4, len(content) // 4, cache.cached(
                           [user[i : i + 4] for i in range(0, len(user), 4)]) if cache else 0)}).encode()


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet handler that answers JSON (the test suite's fault server answers with it too)."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: bytes, headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (its timeout, or a stopped run): nothing to tell it


class BenchServer:
    def __init__(self, latency: float = 1.0, port: int = 0, fault_rate: float = 0.0,
                 fault_kinds=FAULT_KINDS, seed: int = 0, timeout_s: float = 3.0, retry_after: float = 1.0,
                 cache_block: int = 16):
        self.latency, self.fault_rate, self.fault_kinds = latency, fault_rate, tuple(fault_kinds)
        self.prefix_cache = PrefixCache(cache_block)
        self.timeout_s, self.retry_after = timeout_s, retry_after
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = self.answered = self.inflight = self.max_inflight = 0
        self.faults: Counter = Counter()
        self._fault_turn = 0

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 4096

        self.httpd = Server(("127.0.0.1", port), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self.fault_rate and self._rng.random() < self.fault_rate:
                kind = self.fault_kinds[self._fault_turn % len(self.fault_kinds)]
                self._fault_turn += 1
                self.faults[kind] += 1
                return kind
        return None

    def _done(self) -> None:
        with self._lock:
            self.inflight -= 1
            self.answered += 1

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection per client slot
            # As uvicorn and vLLM do: without it, headers and body written apart meet the client's
            # delayed ACK and each answer waits ~40 ms more than the latency.
            disable_nagle_algorithm = True

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]}).encode())

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else {}
                fault = server._fault()
                arrived = time.monotonic()
                try:
                    if fault == "timeout":
                        time.sleep(server.timeout_s)
                    if fault in ("429", "500", "503"):
                        time.sleep(server.latency)
                        err = json.dumps({"error": {"message": f"injected {fault}", "type": "bench"}}).encode()
                        return self._send(int(fault), err, {"Retry-After": str(server.retry_after)} if fault == "429" else None)
                    if fault == "reset":
                        time.sleep(server.latency)
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        self.connection.close()
                        return
                    cache = server.prefix_cache
                    if self.path.endswith("/chat/completions"):
                        payload = chat_body(body, cache)
                    elif body.get("echo") and body.get("logprobs") is not None:
                        payload = echo_body(body["prompt"], body.get("model", "bench"), int(body["logprobs"]), cache)
                    else:
                        payload = completion_body(body, cache)
                    if fault == "invalid-json":
                        payload = b"{this is not json" + payload[:100]
                    elif fault == "truncated":
                        payload = payload[: len(payload) // 2]
                    elif fault == "no-choices":
                        d = json.loads(payload)
                        d["choices"] = []
                        payload = json.dumps(d).encode()
                    elif fault == "no-logprobs":
                        d = json.loads(payload)
                        for c in d["choices"]:
                            c["logprobs"] = None
                        payload = json.dumps(d).encode()
                    # The latency is the time from request to answer, the server's own work included.
                    time.sleep(max(0.0, server.latency - (time.monotonic() - arrived)))
                    self._send(200, payload)
                finally:
                    server._done()

        return Handler

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--timeout-s", type=float, default=3.0, help="how long a 'timeout' fault keeps the client waiting")
    a = ap.parse_args()
    srv = BenchServer(a.latency, a.port, a.fault_rate, timeout_s=a.timeout_s)
    print(srv.base_url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
        # What a run against it asked: the figures a benchmark reports next to its own.
        print(json.dumps({"requests": srv.requests, "answered": srv.answered, "max_inflight": srv.max_inflight,
                          "faults": dict(srv.faults)}), flush=True)


if __name__ == "__main__":
    main()
