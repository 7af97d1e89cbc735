"""The concurrency limit of a server LLM (`llm_limits.Slots`): a request that times out takes one
slot away, down to 1, so that a client facing a server that answers one request at a time ends up
sending one at a time; quick answers give the slots back. The limiter alone, with threads; then the client
against a real loopback server that, like llama-cpp-python's, serves one request at a time."""

from __future__ import annotations

import json
import logging
import re
import select
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from autoexplain import interrupt
from autoexplain.llm import LLMError, OpenAILLM
from autoexplain.llm_limits import Slots
from tests.llama_server import canned_reply, fault_server  # noqa: F401  (fixture)
from tests.test_llm_stop import in_thread

LIVENESS_S = 30  # a bound on waits that a correct limiter ends at once


def holder(slots: Slots, inside: threading.Event, leave: threading.Event, errors: list) -> threading.Thread:
    """A thread that takes a slot, says so, and keeps it until `leave` is set."""
    def run():
        try:
            with slots:
                inside.set()
                leave.wait(LIVENESS_S)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_lowered_below_the_slots_held_it_admits_nobody_until_enough_have_left():
    """Three held, the limit lowered to 1: a fourth waits while 3, then 2, then 1 are held, and is let
    in once none is. Each negative check gives a broken limiter 0.2 s to let the waiter in."""
    slots, errors = Slots(3), []
    leaves = [threading.Event() for _ in range(3)]
    for leave in leaves:
        inside = threading.Event()
        holder(slots, inside, leave, errors)
        assert inside.wait(LIVENESS_S)
    assert (slots.lower(), slots.lower(), slots.lower()) == (2, 1, None), "never below 1"
    waiter_in, waiter_leave = threading.Event(), threading.Event()
    waiter = holder(slots, waiter_in, waiter_leave, errors)
    for leave in leaves[:2]:
        assert not waiter_in.wait(0.2), f"let in with {slots.held} held at limit {slots.limit}"
        leave.set()
    assert not waiter_in.wait(0.2), "let in with 1 held at limit 1"
    leaves[2].set()
    assert waiter_in.wait(LIVENESS_S), "the last holder left: the waiter gets the slot"
    assert (slots.held, slots.limit) == (1, 1)
    waiter_leave.set()
    waiter.join(LIVENESS_S)
    assert slots.held == 0 and not errors


def full(slots: Slots) -> tuple[int, bool]:
    """The ticket of a request sent with every slot taken: take them all, keep the last one's ticket."""
    tickets = [slots.take() for _ in range(slots.limit)]
    for _ in tickets:
        slots.give()
    return tickets[-1]


def test_quick_answers_at_a_full_limit_give_slots_back_and_a_timeout_after_a_raise_asks_for_more():
    """Timeout 10 s, 2 answers of evidence: at limit 1 an answer in 2 s says that two in a row (4 s of
    a one-at-a-time server's work) finish inside half the timeout; 3 s does not. Only answers sent
    under the current limit with every slot taken count, never above the limit given."""
    slots = Slots(3, timeout=10.0, evidence=2)
    old = full(slots)
    assert (slots.lower(), slots.lower(), slots.lower()) == (2, 1, None)
    assert [slots.answered(full(slots), s) for s in (2.0, 3.0, 2.0)] == [None, None, None], "a slow one breaks the run"
    assert slots.answered(old, 0.1) is None, "sent under limit 3: says nothing of limit 1"
    assert slots.answered(full(slots), 2.0) == 2
    lone = slots.take()
    slots.give()
    assert [slots.answered(lone, 0.1) for _ in range(4)] == [None] * 4, "sent with a slot free: says nothing of one more"
    probe = full(slots)
    assert slots.lower(probe) == 1, "a request sent under the raise timed out"
    assert [slots.answered(full(slots), 2.0) for _ in range(4)] == [None, None, None, 2], "twice the evidence now"
    assert [slots.answered(full(slots), 3.0) for _ in range(4)] == [None, None, None, 3], "3 s * 3/2 < 5 s"
    assert slots.answered(full(slots), 0.1) is None and slots.limit == 3, "never above the limit given"
    assert slots.lower(old) == 2 and slots.lower(probe) == 1, "timeouts of requests sent before the last raise"
    assert [slots.answered(full(slots), 0.1) for _ in range(4)] == [None, None, None, 2], "ask no more than before"


def test_timeouts_of_requests_sent_under_one_limit_are_said_together_once_over():
    """Eight requests sent under limit 8, five time out together: each takes its slot away at once
    (8 -> 3), and the five are said in one move once a request sent under 3 is answered (an answer
    of one sent under 8 says nothing of 3). A timeout of a request sent under 3 is news, a burst of
    its own that the older two join; it is said once no request is left in flight. Then quick
    answers raise the limit, said after."""
    said = []
    slots = Slots(8, timeout=10.0, evidence=2, say=lambda was, limit: said.append((was, limit)))
    old = [slots.take() for _ in range(8)]
    for ticket in old[:5]:
        slots.give()
        slots.lower(ticket)
    assert (slots.limit, said) == (3, [])
    slots.give()
    slots.answered(old[5], 0.1)
    assert said == [], "sent under 8: no news of 3"
    new = slots.take()
    slots.give()
    slots.answered(new, 0.1)
    assert said == [(8, 3)]
    new = slots.take()
    slots.give()
    assert slots.lower(new) == 2
    slots.give()
    assert slots.lower(old[6]) == 1 and said == [(8, 3)], "one sent under 8 still in flight"
    slots.give()
    assert slots.lower(old[7]) is None and said == [(8, 3), (3, 1)]
    assert [slots.answered(full(slots), 1.0) for _ in range(2)] == [None, 2]
    assert said == [(8, 3), (3, 1), (1, 2)]


def test_waiters_for_a_slot_leave_at_a_stop():
    slots, errors = Slots(1), []
    inside, leave = threading.Event(), threading.Event()
    holder(slots, inside, leave, errors)
    assert inside.wait(LIVENESS_S)
    waiter = holder(slots, threading.Event(), threading.Event(), errors)
    try:
        interrupt.stop(signal.SIGINT)
        waiter.join(LIVENESS_S)
        assert not waiter.is_alive() and len(errors) == 1 and isinstance(errors[0], interrupt.Interrupted)
    finally:
        interrupt.reset()
        leave.set()


MOVE = re.compile(r"LLM: requests to (\S+) (timed out|are answered in time again); concurrency (lowered|raised) from (\d+) to (\d+)")


def moves(caplog, url: str) -> list[tuple[int, int]]:
    """The concurrency's moves the log said, in order, as (from, to), each checked to start where
    the one before it ended and to say the reason that goes with its direction."""
    out = []
    for message in (r.getMessage() for r in caplog.records if "concurrency" in r.getMessage()):
        m = MOVE.fullmatch(message)
        assert m and m[1] == url and (m[2] == "timed out") == (m[3] == "lowered") == (int(m[5]) < int(m[4])), message
        assert not out or out[-1][1] == int(m[4]), (out, message)
        out.append((int(m[4]), int(m[5])))
    return out


class OneAtATimeServer:
    """Serves one request at a time, as llama-cpp-python's server does: a request is answered only
    while it is the only one open, and the others wait (here until their client gives up, which the
    server sees as the connection closing). Before two requests have ever been open together it
    answers nothing, so that the client's first requests all wait: without that, the first could be
    answered before the second arrived.

    `arrivals`: for each request, (requests open with it, requests given up before it arrived), both
    counted once the connections of those given up are seen closed. `given_up`: requests whose
    client closed the connection before an answer."""

    def __init__(self):
        self.open: dict[int, socket.socket] = {}
        self.arrivals: list[tuple[int, int]] = []
        self.given_up = self.answered = 0
        self.overlapped = False
        self._cond = threading.Condition()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _sweep(self) -> None:
        """Forget the open requests whose client has closed the connection (under the lock)."""
        for key, sock in list(self.open.items()):
            if select.select([sock], [], [], 0)[0] and not sock.recv(1, socket.MSG_PEEK):
                del self.open[key]
                self.given_up += 1
                self._cond.notify_all()

    def _wait_for_turn(self, me: int, sock: socket.socket) -> bool:
        """True when this request may be answered, False when its client gave up."""
        with self._cond:
            self._sweep()
            self.arrivals.append((len(self.open) + 1, self.given_up))
            self.open[me] = sock
            self.overlapped |= len(self.open) > 1
            while not (self.overlapped and list(self.open) == [me]):
                self._cond.wait(0.01)
                self._sweep()
                if me not in self.open:
                    return False
            del self.open[me]
            self.answered += 1
            self._cond.notify_all()
            return True

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if not server._wait_for_turn(id(self), self.connection):
                    return
                payload = json.dumps(canned_reply(self.path, body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_timeouts_bring_the_concurrency_down_to_what_the_server_answers(caplog):
    """Concurrency 4 against a server that serves one request at a time: the first four requests
    are open together and wait; each that times out takes a slot away (4 -> 3 -> 2 -> 1, said
    together), the one left is answered, and from then on the client sends one at a time, which the
    server answers. At every arrival the server sees no more requests open than the client's limit
    after the timeouts it has seen (a request given up takes its slot with it: no other request takes
    its place). The timeout only has to outlast starting four threads and the server's 10 ms look;
    the server sees a closed connection as soon as loopback delivers the close, before the client's
    next request (which follows a backoff of 5 ms or more). The 8 quick answers at limit 1 are fewer
    than a raise needs in a row (16): here a raise would cost a timeout, as this server answers
    nothing while two are open."""
    server = OneAtATimeServer()
    llm = OpenAILLM("test-model", server.base_url, api_key="test", max_concurrency=4, timeout=3.0,
                    max_retries=6, backoff_base=0.01, backoff_cap=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="autoexplain.llm_openai"):
            out = llm.complete([f"p{i}" for i in range(8)], max_tokens=1)
    finally:
        llm.close()
        server.stop()
    assert [c[0].text for c in out] == [" canned"] * 8
    assert llm.max_concurrency == 1
    said = moves(caplog, server.base_url)
    assert said and said[0][0] == 4 and said[-1][1] == 1, said
    assert server.given_up >= 3 and server.answered >= 8
    for seen, given_up in server.arrivals:
        assert seen <= max(1, 4 - given_up), server.arrivals


def test_timeouts_together_are_said_together(caplog):
    """Concurrency 16 against the server that serves one request at a time: the first 16 requests
    are open together, 15 time out together, each taking its slot away at once (16 -> 1, as with a
    line each), and the log says so in a line, not 15. One line more for each timeout still between
    giving its slot back and lowering the limit when the last answer empties the slots (said on its
    own, as it came after). No retries: the 15 retried at limit 1 would be nearly the 16 answers in
    a row that try a raise, and this server answers nothing while two are open."""
    server = OneAtATimeServer()
    llm = OpenAILLM("test-model", server.base_url, api_key="test", max_concurrency=16, timeout=3.0, max_retries=0)
    try:
        with caplog.at_level(logging.WARNING, logger="autoexplain.llm_openai"):
            out = llm.complete([f"p{i}" for i in range(20)], max_tokens=1, return_errors=True)
    finally:
        llm.close()
        server.stop()
    timed_out = [o for o in out if isinstance(o, LLMError)]
    assert len(timed_out) >= 15 and all("timed out" in str(e) for e in timed_out)
    assert llm.max_concurrency == 1
    said = moves(caplog, server.base_url)
    assert said and said[0][0] == 16 and said[-1][1] == 1 and len(said) <= 3, said
    for seen, given_up in server.arrivals:
        assert seen <= max(1, 16 - given_up), server.arrivals


def test_the_concurrency_comes_back_once_the_server_answers_quickly_again(fault_server, caplog):
    """Concurrency 4, and a server that holds the first four requests until their client gives up
    (overloaded for a while), then answers every request at once: the timeouts take the limit down
    to 1, then quick answers give the slots back one at a time (16 in a row, sent with every slot
    taken, per raise), each raise one log line, up to the 4 given and no further. The fifth request
    arrives only once all four have timed out (the limit, lowered below the slots held, admits no
    one before), so the server is released then."""
    srv = fault_server(hold=True)
    llm = OpenAILLM("test-model", srv.base_url, api_key="test", max_concurrency=4, timeout=3.0,
                    max_retries=6, backoff_base=0.01, backoff_cap=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="autoexplain.llm_openai"):
            call = in_thread(lambda: llm.complete([f"p{i}" for i in range(200)], max_tokens=1))
            srv.wait_for(lambda: len(srv.requests) == 5)
            assert llm.max_concurrency == 1
            srv.release(1_000_000)
            out = call.result(timeout=LIVENESS_S * 4)
    finally:
        llm.close()
    assert [c[0].text for c in out] == [" canned"] * 200
    said = moves(caplog, srv.base_url)
    assert said[0][0] == 4 and said[-3:] == [(1, 2), (2, 3), (3, 4)] and all(b < a for a, b in said[:-3]), said
    assert llm.max_concurrency == 4
    assert len(srv.requests) == 204, "each of the four held requests sent again once, nothing else twice"


def test_a_stage_started_after_timeouts_is_sized_for_the_concurrency_given(fault_server):
    """Eight requests time out (no retries): the limit is 1 now, but a stage that starts now runs
    enough batches for the 8 given (4 batches of 8 units, each a request per unit), so that when
    the limit climbs back there are requests to fill it. Sized by the limit now, it would run one."""
    from autoexplain.explain import LLMExplainer
    from autoexplain.pipeline import ExplainConfig, explain_workers

    srv = fault_server(hold=True)
    llm = OpenAILLM("test-model", srv.base_url, api_key="test", max_concurrency=8, timeout=0.5, max_retries=0)
    try:
        out = llm.complete([f"p{i}" for i in range(8)], max_tokens=1, return_errors=True)
    finally:
        llm.close()
    assert all(isinstance(o, LLMError) for o in out) and len(srv.requests) == 8
    assert (llm.max_concurrency, llm.concurrency_given) == (1, 8)
    assert explain_workers(LLMExplainer(llm), ExplainConfig(batch_units=8)) == 4
