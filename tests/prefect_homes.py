"""Prefect homes for the commands the tests run, each its own (nothing shared between tests), each
seeded with a database migrated once per session; and the Prefect server those commands report to.

A command with no PREFECT_API_URL starts Prefect's temporary server on its home's database; in a
new home it first migrates an empty one. Measured on 2 cores: a server up in 16 s in a new home,
8 s in one seeded with a migrated copy (the copy takes milliseconds), and a suite makes about 20
homes. The copy is the database the migrations would have made, so what the tests see is the same.

Most commands report instead to one real `prefect server start` per test process (`command_env`),
as a user's commands do once they run a server: the temporary server's start is about 10 s of CPU
per flow command, the largest fixed cost of the suite's commands on 2 cores. A test of the
temporary server itself (its links, its end on a signal) asks for it (`temporary=True`). The
command's home stays its own: its task cache and results, which the tests delete and check, are in
the home, not in the server.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DATABASE = "prefect.db"  # where Prefect keeps its SQLite database in a home (its default)


@functools.cache
def _migrated() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="prefect-migrated-"))
    atexit.register(shutil.rmtree, folder, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env, check=True,
                   capture_output=True, timeout=600)
    return folder / DATABASE


def prefect_home(path: str | Path) -> str:
    """`path` made a Prefect home with a migrated database, unless it holds one already."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / DATABASE).exists():
        shutil.copyfile(_migrated(), path / DATABASE)
    return str(path)


def command_env(home: str | Path, temporary: bool = False, **extra: str) -> dict:
    """The environment of a command the tests run: this one's, with `home` its Prefect home and, unless
    `temporary`, this test process's Prefect server its API (else the command starts its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", PREFECT_HOME=prefect_home(home))
    if not temporary:
        env["PREFECT_API_URL"] = shared_api()
    env.update(extra)
    return env


@functools.cache
def shared_api() -> str:
    """The API URL of a `prefect server start` for this test process, started on first use (in its
    own home) and stopped when the process exits."""
    from tests.llama_server import free_port

    home, port = Path(tempfile.mkdtemp(prefix="prefect-server-")), free_port()
    prefect_home(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # In this process's group (a signal to the test run reaches it too), and ended with this process
    # even when no exit handler runs (a worker killed outright): no server outlives the tests.
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_ended_with_parent)
    atexit.register(shutil.rmtree, home, True)
    atexit.register(_stop, server)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"prefect server start for the tests did not answer at {url} (exit code {server.poll()})")


def _ended_with_parent() -> None:
    """In the child before it runs the server: SIGTERM when the thread that started it ends (Linux's
    parent-death signal; the suite calls `shared_api` from its main thread)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
