"""Prefect's temporary server for a flow command (none is configured: no PREFECT_API_URL), in a
process that no SIGINT or SIGTERM ends: the command ends it when it exits.

A stopped run must record its end (Crashed) in this server before the command exits; a run left
Running there is a phantom in the UI for ever. But the signal that stops the command reaches the
server too: a terminal's Ctrl-C goes to the whole process group, and so does the SIGTERM of
`timeout` or a CI runner; systemd sends its SIGTERM to every process of the service. Prefect's own
temporary server (`SubprocessASGIServer`) ends on either (uvicorn handles both), and is told to
stop by SIGTERM, so it cannot be shielded from one: this one blocks both and shuts down, as
uvicorn does on a signal (its task-run recorder writes what it holds), when its stdin closes, which
also happens when the command is killed outright (no server is left behind).

Its database and settings are Prefect's as for its own temporary server (PREFECT_HOME's prefect.db).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from autoexplain import interrupt, leave

STOP_S = 10.0  # the most the command waits at its exit for the server to shut down


def launch() -> Callable[[], str]:
    """Start the server now; the call returned waits until it answers and returns its API URL. The
    command goes on meanwhile (it imports its flow, loads its simulator): on 2 cores that hides
    seconds of the server's start. It is shut down when this process exits."""
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    started: list[subprocess.Popen] = []
    # Started with both signals blocked; the server keeps them blocked in all its threads (`serve`).
    interrupt.shielded(lambda: started.append(subprocess.Popen(
        [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)))
    proc = started[0]
    atexit.register(stop, proc)
    return lambda: _answering(proc)


def later_ui() -> str:
    """Where `prefect server start`, with this process's settings, serves the UI over the database
    this server writes to: a run's "View at" link that still opens after the command has ended."""
    from prefect.settings import get_current_settings

    api = get_current_settings().server.api
    host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
    return f"http://{host}:{api.port}"


def _answering(proc: subprocess.Popen) -> str:
    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    port = proc.stdout.readline().strip()
    proc.stdout.close()
    if not port.isdigit():
        raise RuntimeError(f"Prefect's temporary server did not start (exit code {proc.wait()})")
    url = f"http://127.0.0.1:{int(port)}/api"
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client(timeout=5) as client:
        while True:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect's temporary server at {url} did not answer (exit code {proc.poll()})")
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    """Close its stdin, its cue to shut down, and wait for that (kill it if it takes too long)."""
    try:
        proc.stdin.close()
        proc.wait(timeout=STOP_S)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def serve() -> None:
    """The server process: bind a free port, say which on stdout, serve until stdin closes."""
    # Blocked already (`start`); every thread started here inherits the mask, and uvicorn's handlers
    # for the two signals, set in this main thread, never run.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(interrupt.SIGNALS))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)  # before the slow imports: `start` waits on its health
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads the pipe after the port
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error", lifespan="on"))

    def cue():
        sys.stdin.buffer.read()  # until the command closes it, or exits
        server.should_exit = True

    threading.Thread(target=cue, name="stop-cue", daemon=True).start()
    leave.run(lambda: server.run(sockets=[sock]))  # the command waits for this process's end


if __name__ == "__main__":
    serve()
