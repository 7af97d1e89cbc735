"""Real servers for the LLM tests: llama.cpp's OpenAI-compatible server, and a fault injector.

- `LlamaServer` runs llama-cpp-python's server (`llama_cpp.server`'s own `main`, in a process of its
  own) on a free loopback port with the embedded SmolLM2 GGUF and waits until /v1/models answers.
  It starts it through this file (`python tests/llama_server.py ARGS`), which is `python -m
  llama_cpp.server ARGS` with two changes. The model is loaded with `use_extra_bufts=False`: llama.cpp's
  extra CPU buffer types (AMX tiles and repacked weights) crash the server with a segmentation fault on
  its first completion on CPUs with AMX (Intel Sapphire Rapids and later); the plain CPU buffers work
  on every CPU. And the top logprobs of echoed prompt tokens are ranked with numpy (`top_first`), not
  by a Python sort of the whole vocabulary per token: the same answer, 50 s sooner per simulator prompt.
- `FaultServer` is a small HTTP server on 127.0.0.1 that answers the first requests with the
  statuses it was given (429, 500, ...), then either a fixed status, a canned OpenAI-format reply, or
  the reply of an upstream server it proxies to. It records every request it sees. With `hold=True`
  each request waits until the test releases it, so a test can count what is in flight exactly.
  Like a real server it may also want a key (401 otherwise), serve only some models (404 for the
  others), ignore `echo` (no prompt logprobs), and sample (`varied`: every completion differs).

Fixtures: `llama_server` (session scope) and `fault_server` (a factory; servers stop after the test).
Import them into a test module: `from tests.llama_server import llama_server, fault_server`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest

from autoexplain.server_probe import ECHO_PROBE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model_path: str, timeout: float = 120.0, n_ctx: int = 2048):
        self.model_path, self.port = model_path, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = "smollm2"  # the alias it serves under
        self._log = tempfile.NamedTemporaryFile("w+", prefix="llama_server_", suffix=".log", delete=False)
        threads = str(os.cpu_count() or 2)
        cmd = [sys.executable, os.path.abspath(__file__), "--model", model_path, "--model_alias", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx),
               "--n_threads", threads, "--n_threads_batch", threads]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        raise RuntimeError(f"llama.cpp server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        os.unlink(self._log.name)


def canned_reply(path: str, body: dict, chat=None, models=(), echo: bool = True, sample: int | None = None) -> dict:
    """An OpenAI-format reply to `body` at `path`. `models`: what GET /models lists; `echo`: whether
    echo requests get their prompt logprobs; `sample`: a number that makes this completion's text
    differ from the others' (a sampling server), None for always the same text."""
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    model = body.get("model", "canned")
    if path.endswith("/chat/completions"):
        content = chat(body["messages"]) if chat else "canned"
        return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": model, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": "stop"}]}
    if path.endswith("/models"):
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fault"} for m in models]}
    if echo and body.get("echo") and body.get("logprobs") is not None:
        return echo_reply(body["prompt"], model)
    text = " canned" if sample is None else f" canned sample {sample}"
    return {"id": "cmpl-fault", "object": "text_completion", "created": 0, "model": model, "usage": usage,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}]}


def echo_reply(prompt: str, model: str) -> dict:
    """What OpenAI (and vLLM) send for echo=True, logprobs=k, max_tokens=1: every prompt token, each with
    the distribution that predicted it (none for the first), then the generated token " canned"."""
    pieces = re.findall(r"\s*\S+|\s+", prompt) + [" canned"]
    offsets = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    tops = [None] + [{p: -0.25, "<other>": -1.5} for p in pieces[1:]]
    logprobs = {"tokens": pieces, "text_offset": offsets, "top_logprobs": tops,
                "token_logprobs": [None] + [-0.25] * (len(pieces) - 1)}
    usage = {"prompt_tokens": len(pieces) - 1, "completion_tokens": 1, "total_tokens": len(pieces)}
    return {"id": "cmpl-echo", "object": "text_completion", "created": 0, "model": model, "usage": usage,
            "choices": [{"index": 0, "text": prompt + " canned", "logprobs": logprobs, "finish_reason": "length"}]}


MALFORMED = ("invalid-json", "truncated", "no-choices", "no-logprobs", "reset")


class FaultServer:
    """Answers the first len(fail_with) requests with those statuses, then `then_status` forever
    (200: a canned reply, or the upstream's reply when `upstream` is set). `chat(messages)` gives the
    content of canned chat replies.

    An item of `fail_with` may also name a malformed reply (MALFORMED): "invalid-json" (HTTP 200,
    a body that is not JSON), "truncated" (HTTP 200, the first half of the reply's JSON), "no-choices"
    (HTTP 200, `choices` empty), "no-logprobs" (HTTP 200, every choice's `logprobs` null) or "reset"
    (the connection is reset, no reply).

    `inflight` counts the requests that arrived and are not answered yet: a request stops counting
    just before its response is written, so a client that waits for a response before sending its
    next request is never seen twice. `max_inflight` is the most there ever were, `answered` how many
    were answered (`replied`: which). With `hold=True` every request waits, before it is answered, until `release()` lets
    it go; `wait_for(predicate)` waits for a state of the server.

    Server traits: `api_key` (a request without `Authorization: Bearer <it>` gets 401), `models` (the
    models GET /models lists; a request for another gets 404; None: it serves any model and lists
    none), `echo=False` (echo requests are answered without prompt logprobs, as by a server that
    ignores `echo`), `varied=True` (every canned completion's text carries a new number), `text` (every
    canned completion's text, e.g. "\n" for a server that answers blank; None: the usual one).

    The preflight's probes (GET /models, and the echo request whose prompt is
    `server_probe.ECHO_PROBE`) are answered by the traits, never scripted, and counted in `probes`, not
    in `requests`."""

    def __init__(self, fail_with=(), then_status: int = 200, upstream: str | None = None,
                 retry_after: float | None = None, hold: bool = False, chat=None, api_key: str | None = None,
                 models=None, echo: bool = True, varied: bool = False, text: str | None = None):
        self.script, self.then_status, self.upstream = list(fail_with), then_status, upstream
        self.retry_after, self.hold, self.chat = retry_after, hold, chat
        self.api_key, self.models, self.echo, self.varied = api_key, models, echo, varied
        self.samples, self.text = 0, text
        self.requests: list[dict] = []
        self.probes = 0
        self.inflight = self.max_inflight = self.answered = 0
        self.replied: list[dict] = []  # the requests answered (or reset), in that order
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._released = threading.Semaphore(0)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _next_status(self, request: dict) -> int:
        with self._changed:
            self.requests.append(request)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self._changed.notify_all()
            return self.script.pop(0) if self.script else self.then_status

    def _answered(self, request: dict) -> None:
        with self._changed:
            self.inflight -= 1
            self.answered += 1
            self.replied.append(request)
            self._changed.notify_all()

    def refusal(self, authorization: str | None, body: dict):
        """(status, payload, headers) of a request the server's traits refuse, else None."""
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}
            return 401, json.dumps({"error": error}).encode(), {}
        if self.models is not None and "model" in body and body["model"] not in self.models:
            error = {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError", "code": 404}
            return 404, json.dumps({"error": error}).encode(), {}
        return None

    def _sample(self) -> int | None:
        if not self.varied:
            return None
        with self._lock:
            self.samples += 1
            return self.samples

    def release(self, n: int = 1) -> None:
        """Let n held requests (or requests still to come) be answered."""
        self._released.release(n)

    def wait_for(self, predicate, deadlock_s: float = 300.0) -> None:
        """Wait until predicate() holds; it is checked whenever a request arrives or is answered.
        The limit only turns a hang into an error."""
        if not self.happens(predicate, deadlock_s):
            raise AssertionError(f"still not so after {deadlock_s:.0f} s: {len(self.requests)} requests, "
                                 f"{self.answered} answered")

    def happens(self, predicate, within_s: float) -> bool:
        """Whether predicate() holds now or comes to hold within `within_s`."""
        with self._changed:
            return self._changed.wait_for(predicate, within_s)

    def _handler(self):
        from bench.llm_server import JSONHandler  # here: this file also runs as a script, where bench is not importable

        server = self

        class Handler(JSONHandler):
            def _reply(self, status, raw: bytes, body: dict) -> tuple[int, bytes, dict]:
                if isinstance(status, str):
                    return self._malformed(status, raw, body)
                if status != 200:
                    error = {"error": {"message": f"injected HTTP {status}", "type": "fault", "code": status}}
                    headers = {"Retry-After": str(server.retry_after)} if server.retry_after is not None else {}
                    return status, json.dumps(error).encode(), headers
                if server.upstream is None:
                    reply = canned_reply(self.path, body, server.chat, server.models or (), server.echo, server._sample())
                    if server.text is not None and reply.get("object") == "text_completion" and not body.get("echo"):
                        reply["choices"][0]["text"] = server.text
                    return 200, json.dumps(reply).encode(), {}
                target = server.upstream.rsplit("/v1", 1)[0] + self.path
                req = urllib.request.Request(target, data=raw or None, method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        return r.status, r.read(), {}
                except urllib.error.HTTPError as e:
                    return e.code, e.read(), {}

            def _malformed(self, kind: str, raw: bytes, body: dict) -> tuple[int, bytes, dict]:
                if kind not in MALFORMED:
                    raise ValueError(f"unknown scripted reply '{kind}'")
                if kind == "invalid-json":
                    return 200, b"{this is not json", {}
                status, payload, headers = self._reply(200, raw, body)
                if kind == "truncated":
                    return 200, payload[: len(payload) // 2], headers
                reply = json.loads(payload)
                if kind == "no-choices":
                    reply["choices"] = []
                elif kind == "no-logprobs":
                    for choice in reply.get("choices", []):
                        choice["logprobs"] = None
                return 200, json.dumps(reply).encode(), headers

            def _reset(self):
                import struct

                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else {}
                refused = server.refusal(self.headers.get("Authorization"), body)
                if (self.command == "GET" and self.path.endswith("/models")) or body.get("prompt") == ECHO_PROBE:
                    # a probe of autoexplain.preflight: answered by the traits, never scripted or counted
                    server.probes += 1
                    return self._send(*(refused or self._reply(200, raw, body)))
                request = {"method": self.command, "path": self.path, "json": body, "t": time.monotonic()}
                status = server._next_status(request)
                try:
                    if server.hold:
                        server._released.acquire()
                    reply = None if status == "reset" else (refused or self._reply(status, raw, body))
                finally:
                    server._answered(request)  # before the response goes out: the client cannot have sent its next one
                if reply is None:
                    return self._reset()
                self._send(*reply)

            do_GET = do_POST = _serve

        return Handler

    def stop(self) -> None:
        self._released.release(1_000_000)  # nothing stays held
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def llama_server():
    from autoexplain.defaults import resolve_model

    server = LlamaServer(resolve_model("smollm2"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bench_server():
    """bench/llm_server.py's server with no latency: echo logprobs with digits at every placeholder,
    explanations and chat replies, for any model name."""
    from bench.llm_server import BenchServer

    server = BenchServer(latency=0.0)
    yield server
    server.stop()


@pytest.fixture
def fault_server():
    started: list[FaultServer] = []

    def make(**kw) -> FaultServer:
        started.append(FaultServer(**kw))
        return started[-1]

    yield make
    for s in started:
        s.stop()


TOP_KEPT = 100  # alternatives `top_first` ranks per token; OpenAI's APIs allow at most 20


def top_first(pairs, key=None, reverse=False):
    """`sorted` for llama_cpp.llama, where each echoed token's alternatives are ranked as
    `sorted(zip(logprobs, range(n)), reverse=True)[:k]`: 49,152 Python tuples sorted per token, about
    0.1 s each, 50 s for one 525-token simulator prompt. For exactly that call this returns the same
    first TOP_KEPT pairs, in the same order (higher logprob first; of equal ones, the higher index),
    from numpy; every other call is the builtin's."""
    import numpy as np

    row = None
    if type(pairs) is zip and reverse and key is None:
        values, indices = (it.__reduce__() for it in pairs.__reduce__()[1])
        if (isinstance(values[1][0], np.ndarray) and values[1][0].ndim == 1 and values[2] == 0
                and indices[1][0] == range(values[1][0].size) and indices[2] == 0):
            row = values[1][0]
    if row is None:
        return sorted(pairs, key=key, reverse=reverse)
    kept = min(TOP_KEPT, row.size)
    kth = np.partition(row, row.size - kept)[row.size - kept]
    above = np.flatnonzero(row > kth)
    chosen = np.concatenate([above, np.flatnonzero(row == kth)[::-1][: kept - above.size]])
    chosen = chosen[np.lexsort((-chosen, -row[chosen]))]
    return [(row[i], int(i)) for i in chosen]


def serve_without_extra_buffer_types() -> None:
    """`python -m llama_cpp.server ARGS`, with the model loaded with `use_extra_bufts=False` and echoed
    logprobs ranked by `top_first`.

    llama-cpp-python's `Llama` does not expose that llama.cpp model parameter, and its server has no
    option for it; both take the model parameters from `llama_model_default_params()`, so that is
    where it is set. Everything else is llama_cpp.server's own `main`: its arguments, its app, its
    uvicorn loop."""
    import llama_cpp.llama as llama_py
    import llama_cpp.llama_cpp as llama_cpp_c
    from llama_cpp.server.__main__ import main

    llama_py.sorted = top_first  # a module global shadows the builtin for that module only

    defaults = llama_cpp_c.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    if not any(name == "use_extra_bufts" for name, *_ in llama_cpp_c.llama_model_params._fields_):
        raise SystemExit("this llama-cpp-python has no use_extra_bufts model parameter (0.3.36 has it)")
    llama_cpp_c.llama_model_default_params = model_params
    sys.argv[0] = "llama_cpp.server"
    main()


if __name__ == "__main__":
    serve_without_extra_buffer_types()
