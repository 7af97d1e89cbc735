"""Ctrl-C and SIGTERM stop a run within seconds while its LLM requests are in flight or waiting to
retry (`autoexplain.interrupt`): exit 130 or 143 with one line and no traceback, nothing of the
unfinished stage sealed, and the answers received before the signal reused by the next run. Then,
in process, what a stop does to an LLM's calls and to units sharing a local model's calls.

The commands run as real processes against real loopback servers (tests/llama_server.py's
FaultServer) that hold every request or answer 503 with a long Retry-After; a signal is sent once
the server has seen the requests arrive. The bound on the exit is a liveness check (before the
mend such a process did not end at all), not a speed target."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from autoexplain import interrupt
from autoexplain.llm import OpenAILLM
from tests.llama_server import fault_server  # noqa: F401  (fixture)
from tests.prefect_homes import prefect_home

EXE = [sys.executable, "-m", "autoexplain.flows.cli"]  # the console script's module
LIVENESS_S = 30  # the most a stopped command may take to exit; a working stop takes a few seconds
MODEL = "test-model"


@pytest.fixture(autouse=True)
def no_stop_left():
    yield
    interrupt.reset()  # an in-process stop must not reach the next test


def eventually(predicate, within_s: float = 120.0) -> None:
    """Poll until predicate() holds; the limit only turns a hang into an error."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {within_s:.0f} s")
        time.sleep(0.05)


class Command(subprocess.Popen):
    """A command in a process group of its own, its stderr in the file `log`: a process that
    outlives the test (Prefect's server, left by a command that did not stop) is ended with the
    group (`end`), and none can hold a pipe of the test open."""

    def __init__(self, log: Path, *args: str, home: Path | None = None):
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
        env.update(HF_HUB_OFFLINE="1", COLUMNS="200", **({"PREFECT_HOME": prefect_home(home)} if home else {}))
        self.log = log
        with open(log, "w") as err:
            super().__init__([*EXE, *args], stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)


def end(proc: Command) -> None:
    """Whatever is left of the command's process group goes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finished(proc: Command, within_s: float) -> tuple[int | None, str]:
    """(exit code or None when still running after within_s, stderr)."""
    try:
        code = proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        code = None
    return code, proc.log.read_text()


def stopped(proc: Command, signum: int) -> str:
    """Send the signal, wait for the exit (at most LIVENESS_S), check the exit code and the one line;
    returns stderr."""
    proc.send_signal(signum)
    code, err = finished(proc, LIVENESS_S)
    name = signal.Signals(signum).name
    assert code is not None, f"still running {LIVENESS_S} s after {name}; stderr: {err[-3000:]}"
    assert code == 128 + signum, (code, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("interrupted")]
    assert len(said) == 1 and said[0] == lines[-1], err[-3000:]
    assert said[0].startswith(f"interrupted ({name}): ") and "rerun the same command" in said[0]
    assert "still running" not in said[0], "it stopped on its own, not by the forced end"
    assert "Traceback" not in err, err[-3000:]
    return err


def sealed(out: Path, stage: str) -> list[Path]:
    return sorted((out / stage).glob("*/manifest.json"))


@pytest.fixture(scope="module")
def explained(tiny_records):
    """Units 0-3 of the tiny recording explained offline (no LLM): the simulate stage's input."""
    from autoexplain.layer import run_explain

    records_dir, out = tiny_records
    return records_dir, run_explain(records_dir, 1, out, [0, 1, 2, 3], explainer="embedding").directory


def simulate(records_dir: Path, explanations: Path, url: str, out: Path, log: Path) -> Command:
    return Command(log, "simulate", "--records", str(records_dir), "--explanations", str(explanations),
                   "--simulator", f"all-at-once:openai:{MODEL}@{url}", "--out", str(out))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_stage_whose_requests_hang_and_a_rerun_reuses_the_answers(fault_server, explained,
                                                                                   tmp_path, signum):
    """A server that answers 3 requests and holds the rest: once the answers are in the response
    cache and more requests are in flight, the signal ends the command; nothing is sealed. The same
    command, once the server answers again, asks none of the 3 again and seals the stage."""
    records_dir, explanations = explained
    srv = fault_server(hold=True)
    srv.release(3)
    out = tmp_path / "out"
    proc = simulate(records_dir, explanations, srv.base_url, out, tmp_path / "first.log")
    try:
        srv.wait_for(lambda: srv.answered == 3 and srv.inflight >= 8)
        eventually(lambda: cached(out) == 3)  # the answers are kept before the signal is sent
        replied = [r["json"]["prompt"] for r in srv.replied]
        err = stopped(proc, signum)
    finally:
        end(proc)
    assert sealed(out, "simulations") == [] and cached(out) == 3
    # What the stopped run sent and paid is said before its interrupted line, as on every other end.
    # (Connections the loopback server's listen queue turned away may show as other faults.)
    lines = [line for line in err.splitlines() if line.strip()]
    said = re.fullmatch(r"LLM: ([\d,]+) requests sent \(3 answered; (?:[\d,]+ other faults, )?([\d,]+) in flight at the "
                        r"stop; [\d,]+ sent again\), 0 answers from the cache; this run spent .*", " ".join(lines[-2].split()))
    assert said and int(said[1]) >= 3 + int(said[2]) >= 3 + 8, err[-3000:]
    srv.hold = False
    srv.release(1_000_000)  # what the stopped command left held is let go too
    srv.wait_for(lambda: srv.inflight == 0)
    asked_before = len(srv.requests)
    again = simulate(records_dir, explanations, srv.base_url, out, tmp_path / "again.log")
    try:
        code, err = finished(again, 600)
    finally:
        end(again)
    assert code == 0, err[-3000:]
    assert len(sealed(out, "simulations")) == 1
    asked = [r["json"]["prompt"] for r in srv.requests[asked_before:]]
    assert asked and not set(asked) & set(replied), "the answers received before the signal are not asked again"
    # Sent counts every attempt, answered what the server answered (a connection the loopback server's
    # listen queue turned away is sent again, and the server never sees it).
    from tests.test_llm_costs import answered

    from_cache = int(re.search(r"([\d,]+) answers? from the cache", err)[1])
    assert answered(err) == len(asked) and from_cache >= 3


def cached(out: Path) -> int:
    """Entries in the response cache under `out` (read through diskcache, which other processes may share)."""
    import diskcache

    if not (out / "llm_cache").is_dir():
        return 0
    with diskcache.Cache(str(out / "llm_cache")) as cache:
        return len(cache)


def test_ctrl_c_ends_the_backoff_of_every_request(fault_server, explained, tmp_path):
    """Every request answered 503 with an hour's Retry-After: each waits to retry (capped at a
    minute), holding no slot. Ctrl-C ends those waits at once, and none was asked again before the
    command ended."""
    records_dir, explanations = explained
    srv = fault_server(then_status=503, retry_after=3600)
    out = tmp_path / "out"
    proc = simulate(records_dir, explanations, srv.base_url, out, tmp_path / "stderr.log")
    try:
        srv.wait_for(lambda: len(srv.requests) >= 16)
        stopped(proc, signal.SIGINT)
    finally:
        end(proc)
    prompts = [r["json"]["prompt"] for r in srv.requests]
    assert len(prompts) == len(set(prompts)), "no request was retried: each was in its backoff wait"
    assert sealed(out, "simulations") == []


@pytest.mark.slow
def test_sigterm_stops_explain_layer_under_prefect(fault_server, tiny_llama_dir, prose_corpus, tmp_path):
    """The flow command: Prefect runs the stages in task threads and swaps in its own SIGTERM
    handler while the flow runs; the run still ends within seconds, with one line."""
    srv = fault_server(hold=True)
    out = tmp_path / "out"
    proc = explain_layer(srv, tiny_llama_dir, prose_corpus, out, tmp_path / "prefect-home", tmp_path / "stderr.log")
    try:
        srv.wait_for(lambda: srv.inflight >= 8)
        stopped(proc, signal.SIGTERM)
    finally:
        end(proc)
    assert sealed(out, "explanations") and sealed(out, "simulations") == []



def flow_runs(home: Path, message: bool = False) -> list[tuple[str, ...]]:
    """(flow name, state type[, state message]) of every flow run in the Prefect database under
    `home`, read with sqlite itself: the command's temporary server is gone once it has exited."""
    import sqlite3

    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute("SELECT flow.name, flow_run.state_type" + (", flow_run_state.message" if message else "") +
                          " FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
                          " JOIN flow_run_state ON flow_run_state.id = flow_run.state_id").fetchall()


def explain_layer(srv, tiny: str, corpus: Path, out: Path, home: Path, log: Path) -> Command:
    return Command(log, "explain-layer", "--model", tiny, "--corpus", str(corpus), "--layer", "1", "--units", "0-3",
                   "--tokens", "20000", "--k", "1", "--shard-size", "2", "--bootstrap", "50", "--window-len", "8",
                   "--top-k", "8", "--random", "6", "--out", str(out),
                   "--simulator", f"all-at-once:openai:{MODEL}@{srv.base_url}", home=home)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_ends_the_flow_run_in_prefect_too(fault_server, tiny_llama_dir, prose_corpus,
                                                                       tmp_path, signum):
    """A terminal's Ctrl-C goes to the whole process group, Prefect's temporary server included, and
    so does the SIGTERM of `timeout`, a CI runner or systemd (to every process of the service). The
    run's end must still reach Prefect's database before the command exits: a run left Running there
    is a phantom in the UI forever. Nothing of the stopped stage is sealed, and the same command
    then finishes the run."""
    srv = fault_server(hold=True)
    home, out = tmp_path / "prefect-home", tmp_path / "out"
    proc = explain_layer(srv, tiny_llama_dir, prose_corpus, out, home, tmp_path / "first.log")
    try:
        srv.wait_for(lambda: srv.inflight >= 8)
        assert flow_runs(home) == [("explain-layer", "RUNNING")]
        os.killpg(proc.pid, signum)
        code, err = finished(proc, LIVENESS_S)
    finally:
        end(proc)
    name = signal.Signals(signum).name
    assert code == 128 + signum, (code, err[-3000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"interrupted ({name}): "), err[-3000:]
    assert "still running" not in err, "it stopped on its own, not by the forced end"
    # Prefect's words for the exception that ended the run: its SIGTERM handler's, or Ctrl-C's.
    said = {signal.SIGINT: "an interrupt signal", signal.SIGTERM: "a termination signal"}[signum]
    assert flow_runs(home, message=True) == [("explain-layer", "CRASHED", f"Execution was aborted by {said}.")]
    assert sealed(out, "explanations") and sealed(out, "simulations") == []
    srv.hold = False
    srv.release(1_000_000)
    again = explain_layer(srv, tiny_llama_dir, prose_corpus, out, home, tmp_path / "again.log")
    try:
        code, err = finished(again, 600)
    finally:
        end(again)
    assert code == 0, err[-3000:]
    assert sorted(flow_runs(home)) == [("explain-layer", "COMPLETED"), ("explain-layer", "CRASHED")]
    assert len(sealed(out, "simulations")) == len(sealed(out, "explanations")) and sealed(out, "scores")


def test_a_command_inside_a_users_process_gives_the_signal_handlers_back():
    """`interrupt.signals` (every command runs in it) may run inside a user's process: a SIGTERM
    in the block stops it as SIGTERM, and afterwards the user's handlers and wakeup fd are back."""
    def mine(signum, frame):
        raise AssertionError("the user's handler ran inside the block")

    before = {s: signal.signal(s, mine) for s in interrupt.SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    try:
        with pytest.raises(interrupt.Interrupted) as stop, interrupt.signals(lambda signum: None):
            os.kill(os.getpid(), signal.SIGTERM)
            interrupt.sleep(LIVENESS_S)  # the handler raises here, in the main thread
        assert stop.value.signum == signal.SIGTERM and interrupt.signum() == signal.SIGTERM
        assert [signal.getsignal(s) for s in interrupt.SIGNALS] == [mine, mine]
        assert signal.set_wakeup_fd(-1) == -1, "the block's wakeup fd is gone"
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(wakeup)


def test_a_process_that_goes_on_after_a_stop_logs_again():
    """A stop silences logging (the run ends in one line); `reset` (the process goes on, as a user's
    notebook or the test suite does) gives it back: a stop in one test silenced every later test's
    Prefect run log."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("autoexplain.after_a_stop")  # any logger there is when the stop comes
    logger.addHandler(handler)
    try:
        with pytest.raises(interrupt.Interrupted), interrupt.signals(lambda signum: None):
            os.kill(os.getpid(), signal.SIGINT)
            interrupt.sleep(LIVENESS_S)
        eventually(lambda: logger.disabled, within_s=LIVENESS_S)  # the watcher silenced it
        logger.error("while stopped")
        interrupt.reset()
        logger.error("after the reset")
        assert seen == ["after the reset"]
    finally:
        logger.removeHandler(handler)


MANY_STOPS = """
import logging, os, signal, sys, threading, time
from autoexplain import interrupt
logger = logging.getLogger("autoexplain.many_stops")
for i in range(200):
    signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
    assert not interrupt.stopping() and not logger.disabled, f"stop {i} began stopped or silenced"
    try:
        with interrupt.signals(lambda signum: None):
            os.kill(os.getpid(), signum)
            interrupt.sleep(30)
    except interrupt.Interrupted as stop:
        assert stop.signum == signum, f"stop {i}: {stop.signum}"
    interrupt.reset()
deadline = time.monotonic() + 30
while any(t.name == "autoexplain-signals" for t in threading.enumerate()):
    assert time.monotonic() < deadline, "a watcher of a reset block still waits to end the process"
    time.sleep(0.05)
print("went on")
"""


def test_stops_one_after_another_in_one_process_end_nothing_after_their_reset():
    """A block's watcher thread may read its signal after the block has ended and `reset` has let
    the process go on. It stopped and silenced what came next, and ended the process 10 s later
    (exit 130: the CI on record died so inside this file). Two hundred stops in a row, each reset:
    every one begins unstopped and loud, and no watcher is left to end the process."""
    done = subprocess.run([sys.executable, "-c", MANY_STOPS], capture_output=True, text=True,
                          timeout=LIVENESS_S * 4, cwd=Path(__file__).parent.parent)
    assert (done.returncode, done.stdout.strip()) == (0, "went on"), done.stderr[-2000:]


# -- in process: what a stop does to an LLM's calls ------------------------------------------------

def in_thread(fn, *args) -> Future:
    """fn(*args) in a daemon thread: a call that a stop fails to end cannot hold the test up."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - the test reads it
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def fast(url: str, **kw) -> OpenAILLM:
    return OpenAILLM(MODEL, url, **{"max_retries": 3, "backoff_base": 0.01, "api_key": "test", **kw})


def test_a_stop_ends_calls_waiting_on_requests_in_flight_and_sends_nothing_more(fault_server):
    """Four requests held by the server, eight more waiting for a slot: a stop fails the call at
    once; the waiting ones are never sent, and a call after the stop sends nothing."""
    srv = fault_server(hold=True)
    llm = fast(srv.base_url, max_concurrency=4)
    call = in_thread(llm.complete, [f"p{i}" for i in range(12)])
    srv.wait_for(lambda: srv.inflight == 4)
    interrupt.stop(signal.SIGINT)
    with pytest.raises(interrupt.Interrupted):
        call.result(timeout=LIVENESS_S)
    with pytest.raises(interrupt.Interrupted):
        llm.complete(["after"])
    assert len(srv.requests) == 4 and srv.answered == 0
    llm.close()


def test_a_stop_ends_backoff_waits(fault_server):
    srv = fault_server(then_status=503, retry_after=3600)
    llm = fast(srv.base_url, max_concurrency=2, backoff_cap=3600)
    call = in_thread(llm.complete, [f"p{i}" for i in range(4)])
    srv.wait_for(lambda: len(srv.requests) == 4)  # each answered 503 and waiting an hour to retry
    interrupt.stop(signal.SIGTERM)
    with pytest.raises(interrupt.Interrupted) as stop:
        call.result(timeout=LIVENESS_S)
    assert stop.value.signum == signal.SIGTERM and len(srv.requests) == 4
    llm.close()


def test_a_stop_ends_units_that_share_a_local_models_calls():
    """Units whose calls are gathered into one batched call (a local model): at a stop the units
    still running are not served to their end, which could take minutes; each of their calls fails."""
    from autoexplain.rendezvous import Rendezvous

    def model(requests):
        if gathered.calls == 3:
            interrupt.stop(signal.SIGINT)
        return list(requests)

    def unit(i):
        while True:  # a unit with more calls than a stop should wait for
            gathered.call(i)

    gathered = Rendezvous(model)
    run = in_thread(lambda: list(gathered.in_order(unit, range(4), workers=4)))
    with pytest.raises(interrupt.Interrupted):
        run.result(timeout=LIVENESS_S)
    assert gathered.calls == 4, "the batch after the stop was not computed"
