"""Streamed parquet tables (`tables.TableWriter`): written on a second thread, in order, and a write
that fails leaves no file behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain.tables import TableWriter


def _windows(first: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**31 - 1, size=(n, 64), dtype=np.int32)  # incompressible
    return pa.table({"window_id": np.arange(first, first + n), "doc_id": np.zeros(n, dtype=np.int64),
                     "token_ids": list(ids), "tokens": [["x"] * 64] * n})


def test_tables_written_behind_arrive_whole_and_in_order(tmp_path):
    path = tmp_path / "windows.parquet"
    with TableWriter(path, "windows") as writer:
        for c in range(12):
            writer.write_table(_windows(c * 500, 500, c))
        assert not path.exists()  # only once closed
    got = pq.read_table(path)
    assert got.column("window_id").to_pylist() == list(range(6000))
    want = np.concatenate([np.stack(_windows(0, 500, c).column("token_ids").to_pylist()) for c in range(12)])
    assert np.array_equal(np.stack(got.column("token_ids").to_pylist()), want)
    assert [p.name for p in tmp_path.iterdir()] == ["windows.parquet"]


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
sys.path[:0] = [{tests!r}]
from test_tables import _windows
from autoexplain.tables import TableWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
try:
    with TableWriter(Path({path!r}), "windows") as writer:
        for c in range(20):
            writer.write_table(_windows(c * 500, 500, c))
except OSError as e:
    print("raised", type(e).__name__)
"""


def test_a_failed_write_behind_is_raised_and_leaves_nothing(tmp_path):
    """A real write failure (the file-size limit: a disk that fills) on the writing thread is raised
    in the caller, and neither the table nor its temporary stays."""
    path = tmp_path / "windows.parquet"
    script = FULL_DISK.format(tests=str(Path(__file__).parent), path=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "raised OSError" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
