"""A local model's identity: the sha256 of every file it loads, each hashed once per file version.

Only the full content is a sound identity. A fine-tune keeps `config.json` and the safetensors
header (tensor names, shapes, dtypes) and changes only the values; sizes and mtimes say nothing
across machines (the same bytes copied get new mtimes, and `cp -p`/`rsync -t` after an edit can
keep a file's size and mtime with new bytes); a sample of the bytes misses a change elsewhere.

So each file is hashed in full, and its digest is kept in a small cache keyed by where it is and
what its inode says: (real path, device, inode, size, mtime_ns, ctime_ns). Any write moves mtime
and ctime, and ctime cannot be set back from user space (`touch -d` sets mtime only), so a changed
file never meets its old digest. A file written within the last `RACY_SECONDS` is hashed but its
digest not kept: a write in the same clock tick as the hash could leave the stat unchanged.

Cost (README, "A local model is known by its bytes"): the first use of a model folder reads and
hashes every byte once, about 28 s for 16 GB on this project's machine; later uses stat its files
and read one small cache file each, about a millisecond.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from autoexplain import files

CACHE_ENV = "AUTOEXPLAIN_DIGEST_CACHE"  # a folder, or 'off'
RACY_SECONDS = 2.0
CHUNK = 1 << 22


def cache_dir() -> Path | None:
    """Where digests are kept: $AUTOEXPLAIN_DIGEST_CACHE, else $XDG_CACHE_HOME (or ~/.cache)
    /autoexplain/digests; None when $AUTOEXPLAIN_DIGEST_CACHE is 'off'."""
    where = os.environ.get(CACHE_ENV)
    if where == "off":
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autoexplain" / "digests"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's full sha256 (hex), from the digest cache while the file's stat is unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    folder = cache_dir()
    entry = None
    if folder is not None:
        name = hashlib.sha256(stamp.encode()).hexdigest()
        entry = folder / name[:2] / name
        try:
            digest = entry.read_text(encoding="ascii").strip()
            if len(digest) == 64:
                return digest
        except (FileNotFoundError, UnicodeDecodeError):
            pass
    digest = sha256_file(real)
    if entry is not None and time.time() - max(st.st_mtime, st.st_ctime) > RACY_SECONDS:
        try:
            files.write_text(entry, digest)
        except OSError:  # a read-only or full cache folder costs a re-hash next time, nothing else
            pass
    return digest


def model_files(path: Path) -> list[Path]:
    """The files a model folder holds, in a fixed order: every regular file under it (weights,
    config, tokenizer, ...), except hidden ones (download metadata such as `.cache/`)."""
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def model_digest(path: str | os.PathLike, length: int = 16) -> str:
    """A model folder's or file's content digest: for a file its sha256; for a folder the sha256 of
    each file's relative name and sha256, in name order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)[:length]
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()[:length]
