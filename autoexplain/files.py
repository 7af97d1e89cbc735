"""Atomic writes: the one way a file (or a folder) is replaced, so that a reader sees the old one or
the whole new one, never a part (a crash, a full disk, two processes at once).

A write in progress is a name that starts with a dot (`layout.in_progress`) and carries its writer:
`.<name>.w<pid>-<host>.<random>.tmp` (or `.old`, a folder set aside while another moves in). A
killed writer leaves it behind; `sweep_stale` removes those whose writer is gone: its process is no
longer alive on this host, or, for a writer on another host sharing the folder (whose pid means
nothing here) and for a name from before writes carried their writer, nothing in it has changed for
`STALE_AFTER` seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


STALE_AFTER = 24 * 3600  # seconds without a change before another host's write counts as dead
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_WRITE = re.compile(r"^\..+\.w(\d+)-([0-9a-f]{6})\.[^/]*\.(tmp|old)")
_UNTAGGED = re.compile(r"^\..+\.(tmp|old)(\.[A-Za-z0-9]+)?$")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


_UMASK = _umask()


def _as_created(path: Path, mode: int) -> Path:
    """`path` with the permissions a plain open() or mkdir() would have given it: tempfile makes its
    files and folders private (0600, 0700), and they keep that once renamed into place, so outputs
    would be unreadable to a colleague or a worker running as another user."""
    os.chmod(path, mode & ~_UMASK)
    return path


def writer_tag() -> str:
    """This process's mark in the names of its writes in progress."""
    return f"w{os.getpid()}-{_HOST}"


def temporary_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """A new, empty temporary file in `path`'s folder (created if needed), named as a write in
    progress (`layout.in_progress`). `suffix` keeps an extension that a writer insists on (numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return _as_created(Path(tmp), 0o666)


def temporary_folder_beside(path: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside `path`, named as a write in progress: a folder is built
    there and renamed to `path` whole (what to do when `path` is there already is the caller's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _as_created(Path(tempfile.mkdtemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)), 0o777)


def aside(path: str | os.PathLike) -> Path:
    """A name to move `path` to before replacing it, marked as this process's write in progress."""
    path = Path(path)
    return path.with_name(f".{path.name}.{writer_tag()}.{uuid.uuid4().hex[:8]}.old")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest mtime of `path` and what is directly in it (a folder's mtime does not move while
    a file in it grows)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [child.lstat().st_mtime for child in path.iterdir()]
    return max(times)


def is_stale(path: str | os.PathLike, now: float | None = None, max_age: float = STALE_AFTER) -> bool:
    """Whether `path` is a write in progress whose writer is gone (see the module docstring)."""
    path = Path(path)
    found = _WRITE.match(path.name)
    if found is None and not _UNTAGGED.match(path.name):
        return False
    if found is not None and found[2] == _HOST:
        return not _alive(int(found[1]))
    try:  # another host's, or one written before names carried their writer: by its age
        return (now if now is not None else time.time()) - _last_change(path) > max_age
    except FileNotFoundError:  # finished or swept meanwhile
        return False


def sweep_stale(folder: str | os.PathLike, max_age: float = STALE_AFTER) -> list[Path]:
    """Remove the writes in progress in `folder` whose writer is gone; returns what went. Called
    when a stage starts to write, so a killed writer's folders do not pile up beside the outputs."""
    folder, now, gone = Path(folder), time.time(), []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return gone
    for entry in entries:
        if is_stale(entry, now, max_age):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone


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
