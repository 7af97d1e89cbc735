"""A command leaves with its exit code after the interpreter's exit steps (threads and process pools
joined, exit handlers run, streams flushed), and without the teardown of every object."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import atexit, sys
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from autoexplain import leave

    class Noisy:
        def __del__(self):
            sys.stderr.write("torn down\\n")

    def square(x):
        return x * x

    def command():
        atexit.register(lambda: open(sys.argv[1], "w").write("handlers ran"))
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        print(pool.submit(square, 7).result())
        sys.stdout.write("x" * 300_000)  # left in the buffer: the exit must flush it
        {end}

    if __name__ == "__main__":  # not in the pool's spawned child, which imports this file too
        keep = Noisy()  # a module global: freed only by the interpreter's teardown
        leave.run(command)
""")


@pytest.mark.parametrize("end, code", [("return", 0), ("raise SystemExit(4)", 4), ("raise SystemExit(None)", 0),
                                       ("raise SystemExit('one line')", 1)])
def test_a_command_leaves_with_its_code_its_output_and_its_exit_handlers(tmp_path, end, code):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(end=end))
    mark = tmp_path / "handlers"
    done = subprocess.run([sys.executable, str(script), str(mark)], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stdout == "49\n" + "x" * 300_000
    assert mark.read_text() == "handlers ran"
    assert "torn down" not in done.stderr  # no teardown of module globals: that is the time saved
    assert ("one line" in done.stderr) == (code == 1)


def test_an_error_still_ends_with_its_traceback(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(end="raise ValueError('bad')"))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "ValueError: bad" in done.stderr and "Traceback" in done.stderr
