"""--rpm and --tpm hold in every minute of a run from its first request, the first minute included
(a limiter that starts with a minute's allowance lets twice the limit through in the first minute,
and the provider answers the excess with 429s). Against a real loopback server (tests/llama_server.py's
FaultServer: 3 prompt + 1 completion tokens a reply), on a virtual clock: the limiter's waits are
read and the send times counted, nothing is timed."""

from __future__ import annotations

import pytest

from tests.llama_server import fault_server  # noqa: F401  (fixture)
from tests.test_llm import clock, fast  # noqa: F401  (fixture: a virtual clock for the limiter's waits)


def most_in_a_minute(sent: list[tuple[float, int]]) -> int:
    """The most counted in any 60-second window [t, t + 60) of these (time, count) sends."""
    return max(sum(n for u, n in sent if t <= u < t + 60) for t, _ in sent)


def test_requests_per_minute_hold_from_the_first_request(fault_server, clock):  # noqa: F811
    """rpm 10, 25 requests one after another: 10 at once, 10 a minute later, 5 the minute after."""
    now = clock()
    srv = fault_server()
    llm = fast(srv.base_url, requests_per_minute=10, max_concurrency=64)  # the default for a URL you give
    start, sent = now.monotonic(), []
    for i in range(25):
        llm.complete([f"p{i}"], max_tokens=1)
        sent.append((now.monotonic() - start, 1))  # no wait after the send: the send's own time
    assert len(srv.requests) == 25 and most_in_a_minute(sent) == 10
    assert [t for t, _ in sent] == pytest.approx([0.0] * 10 + [60.0] * 10 + [120.0] * 5)


def test_requests_per_minute_hold_for_requests_sent_together(fault_server, clock):  # noqa: F811
    """25 requests of one batch on a frozen clock: each wait is the place the limiter gave it."""
    waits = clock(advancing=False)
    srv = fault_server()
    llm = fast(srv.base_url, requests_per_minute=10, max_concurrency=64)
    assert len(llm.complete([f"p{i}" for i in range(25)], max_tokens=1)) == 25
    assert len(srv.requests) == 25
    assert sorted(waits.sleeps) == pytest.approx([60.0] * 10 + [120.0] * 5)


def test_tokens_per_minute_hold_from_the_first_request(fault_server, clock):  # noqa: F811
    """tpm 30; the first request is estimated at 11 tokens (40 characters / 4 + max_tokens 1) until
    the server says 4, and the later ones at the server's own 3 prompt tokens for 40 characters, 4
    in all. Seven fit in the first minute (7 x 4 <= 30), an eighth only once the first left the
    window; the server's count, not the estimate, stays counted."""
    now = clock()
    srv = fault_server()
    llm = fast(srv.base_url, tokens_per_minute=30)
    start, sent = now.monotonic(), []
    for _ in range(12):
        llm.complete(["x" * 40], max_tokens=1)
        sent.append((now.monotonic() - start, 4))
    assert most_in_a_minute(sent) <= 30
    assert [t for t, _ in sent][:8] == pytest.approx([0.0] * 7 + [60.0])
    assert llm.usage.total_tokens == 48 and llm._tpm.spent == pytest.approx(48), "the server's count, not the estimate"
    unlimited = fast(srv.base_url)
    before = len(now.sleeps)
    unlimited.complete(["x" * 40] * 5, max_tokens=1)
    assert len(now.sleeps) == before and unlimited._tpm is None and unlimited._rpm is None
