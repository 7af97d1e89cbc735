"""Atomic writes: the one way a file (or a folder) is replaced, so that a reader sees the old one or
the whole new one, never a part (a crash, a full disk, two processes at once)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """A new, empty temporary file in `path`'s folder (created if needed), named as a write in
    progress (`layout.in_progress`). `suffix` keeps an extension that a writer insists on (numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def temporary_folder_beside(path: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside `path`, named as a write in progress: a folder is built
    there and renamed to `path` whole (what to do when `path` is there already is the caller's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write; moved onto `path` when the block ends without an error, removed
    when it raises."""
    tmp = temporary_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
