"""How a command's process ends: the interpreter's own exit steps, less the teardown of every object.

After `main` returns, CPython joins the non-daemon threads (process pools shut down there), runs the
exit handlers (Prefect's temporary server is stopped, child processes are joined, logging is
flushed), and then frees every module and object one by one. The last step is pure CPU: about 2 s
of one core after an `explain-layer` whose work is done (torch, transformers, Prefect and their
objects; `strace` shows no system call in it), nothing of which anyone reads. A command runs the
first two steps itself, flushes its standard streams and leaves with its exit code.

Where those steps are not there to call (another Python), or one raises, the process ends the
ordinary way: leaving early is a saving, never a condition for ending right.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn


def run(command: Callable[[], object]) -> NoReturn:
    """Run `command` (a click/typer app, which ends by raising SystemExit) and leave with its code.
    An exception other than SystemExit goes on as usual (its traceback is the message)."""
    try:
        command()
        code = 0
    except SystemExit as e:
        code = e.code
    if threading.current_thread() is not threading.main_thread() or not hasattr(threading, "_shutdown"):
        sys.exit(code)
    try:
        _join_threads()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - whatever went wrong, the ordinary exit reports it
        sys.exit(code)
    os._exit(_status(code))


def _join_threads() -> None:
    """The interpreter's first exit step: threads joined, pools shut down. Once more if a process
    pool raised EBADF: in CPython 3.11 its exit handler can write to its wake-up pipe just after its
    manager thread closed it (3.12 locks the two); the second call finds the pipe closed, skips it and
    joins the threads, as the interpreter's own exit would after our fallback."""
    try:
        threading._shutdown()
    except OSError:
        threading._shutdown()


def _status(code: object) -> int:
    """The exit status `sys.exit(code)` would give: None is 0, an int is itself, anything else is
    printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1
