"""Outputs on any fsspec URL (`s3://bucket/run`, `gs://...`, `file:///mnt/share/out`, `memory://...`).

Stages keep reading and writing local files: a URL output root is worked on through a local mirror
folder (`$AUTOEXPLAIN_CACHE/mirror/<hash of the URL>`, default `~/.cache/autoexplain`). A sealed stage
folder is pushed to `<url>/<stage>/<key>/`, every file first and `manifest.json` last, so a remote
folder counts as complete only once its manifest exists: the same rule as on disk. A stage whose
folder is missing from the mirror but complete at the URL is pulled instead of computed, so a
rerun on a fresh machine or dask worker with the same URL recomputes nothing.

The mirror-to-URL mapping is registered per process by `open_root`; paths outside a registered
mirror are left alone, so local output roots behave exactly as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from autoexplain import defaults, files, layout
from autoexplain.errors import UserError
from autoexplain.layout import MANIFEST
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# An object appears whole on these when its upload ends: a temporary name plus a "move" (a copy and
# a delete there) would double the traffic and buy nothing.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "r2", "memory"}

_roots: dict[Path, tuple[str, object, str]] = {}  # mirror folder -> (url, filesystem, path on it)


def is_url(text) -> bool:
    return bool(_URL.match(str(text)))


def filesystem(url: str):
    """(fsspec filesystem, path on it) for a URL, or a UserError naming what to install or fix."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        # fsspec raises its own ImportError from the one that names the module missing (aiohttp for
        # http://, not fsspec, whose module the class lives in)
        missing = getattr(e.__cause__, "name", None) or getattr(e, "name", None)
        package = (missing or known_implementations.get(protocol, {}).get("class", protocol)).split(".")[0]
        raise UserError(f"{protocol}:// outputs need the package '{package}', which is not installed",
                        f"pip install {package}") from None
    except ValueError as e:
        if "protocol not known" not in str(e).lower():
            raise
        raise UserError(f"unknown storage protocol '{protocol}://' in {url}",
                        "use a local folder or a URL fsspec knows (file://, s3://, gs://, az://, ...)") from None
    except OSError as e:  # a file system that connects or opens its archive when it is made
        raise _unreachable(url, e) from None

def in_process(url: str) -> bool:
    """Whether a URL's storage lives in this process's memory only (`memory://`): gone when it exits."""
    return str(url).split("://", 1)[0].lower() == "memory"


def _object_store(fs) -> bool:
    return bool(_ATOMIC_PUT & set([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol))

def _unreachable(url: str, e: Exception) -> UserError:
    return UserError(f"cannot reach {url}: {type(e).__name__}: {e}",
                     "check the URL, the credentials and that the location exists and is writable")

def check(url: str, create: bool = True):
    """(filesystem, path on it) of a URL that answers, creating its folder where folders exist; with
    `create` False (a command that only reads a root) one that is not there is a UserError, and
    nothing is made: a mistyped URL must not leave a folder behind."""
    fs, base = filesystem(url)
    try:
        if not create:
            there = fs.exists(base)
        elif _object_store(fs):
            fs.exists(base)  # no folders to make there, and makedirs would create a missing bucket
        else:
            fs.makedirs(base, exist_ok=True)
    except OSError as e:
        raise _unreachable(url, e) from None
    if not create and not there:
        raise UserError(f"{url} does not exist", "check the URL: pass the output root an explain-layer run wrote")
    return fs, base

def open_root(out: str | os.PathLike, create: bool = True) -> Path:
    """The local folder to write an output root into: `out` itself for a path, the URL's mirror
    (registered in this process, so that stage folders under it are pulled and pushed) for a URL.
    `create` False: only read, so a URL that is not there is a UserError (`check`)."""
    if not is_url(out):
        return Path(out)
    url = str(out).rstrip("/")
    mirror = (defaults.cache_root() / "mirror" / hashlib.sha256(url.encode()).hexdigest()[:16]).resolve()
    if mirror not in _roots:
        fs, base = check(url, create)
        _roots[mirror] = (url, fs, base.rstrip("/"))
    mirror.mkdir(parents=True, exist_ok=True)
    return mirror

def _where(path: str | os.PathLike):
    """(url, filesystem, path on it) of a local path inside a registered mirror, else None."""
    if not _roots:
        return None
    path = Path(path).resolve()
    for root, (url, fs, base) in list(_roots.items()):
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return (url, fs, base) if rel == "." else (f"{url}/{rel}", fs, f"{base}/{rel}")
    return None

def local_path(uri_: str) -> Path | None:
    """Where a URI (`uri`'s) is on this machine: a file:// URI's path, or a URL's place in the mirror
    of a root registered in this process; None for a URL of another root."""
    if uri_.startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri_).path))
    for root, (url, _fs, _base) in list(_roots.items()):
        if uri_ == url or uri_.startswith(url + "/"):
            return root / uri_[len(url):].lstrip("/")
    return None

def location(path: str | os.PathLike):
    """(url, filesystem, path on it) of a local path inside a registered mirror, else None."""
    return _where(path)

def atomic_put(fs) -> bool:
    """Whether an object written to `fs` appears whole (an object store), so needs no temporary name."""
    return _object_store(fs)

def uri(path: str | os.PathLike) -> str:
    """Where a local output lives for everyone else: its URL when it is in a mirror, else file://."""
    where = _where(path)
    return where[0] if where else Path(path).resolve().as_uri()

def _hidden(rel: str) -> bool:
    # temporary names of unfinished writes, here and on the remote side
    return any(layout.in_progress(part) for part in rel.split("/"))

def _listing(fs, target: str) -> dict[str, int]:
    """{relative name: size} of the finished files under a folder at the URL ({} when it is not there)."""
    prefix = target.rstrip("/") + "/"
    fs.invalidate_cache(target)  # another machine may have changed it since we last listed
    try:
        found = fs.find(target, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(prefix):]: int(info.get("size") or 0) for name, info in found.items()
            if name.startswith(prefix) and info.get("type", "file") == "file" and not _hidden(name[len(prefix):])}


def _same_manifest(directory: Path, fs, target: str) -> bool:
    """Whether the URL's manifest of this sealed folder has the same bytes (one small read)."""
    try:
        return fs.cat_file(f"{target}/{MANIFEST}") == (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        return False


def files_there(directory: str | os.PathLike) -> dict[str, int] | None:
    """{relative name: size} of the files at the URL of a folder inside a mirror; None outside one."""
    where = _where(directory)
    if where is None:
        return None
    try:
        return _listing(where[1], where[2])
    except OSError as e:
        raise _unreachable(where[0], e) from None


def push(directory: str | os.PathLike, replace: bool = False, prune: tuple[str, ...] = ()) -> str | None:
    """Upload a local folder inside a mirror to its URL, its manifest (if any) last; returns the URL.
    A sealed folder that the URL already holds whole is left alone; one that differs
    there (missing files, other sizes, another manifest), or any with `replace` (the remote copy
    failed verification), is replaced: the remote manifest goes first, so that readers take it for
    unfinished until the new one is whole, then every file the new copy lacks. `prune`: subfolders
    of an unsealed folder (a site) that each build writes whole: their files at the URL that this
    copy lacks go, after the upload."""
    where = _where(directory)
    if where is None:
        return None
    url, fs, target = where
    directory = Path(directory)
    paths = [p for p in directory.rglob("*") if p.is_file() and not _hidden(p.relative_to(directory).as_posix())]
    paths.sort(key=lambda p: (p.name == MANIFEST and p.parent == directory, p.as_posix()))
    here = {p.relative_to(directory).as_posix(): p.stat().st_size for p in paths}
    sealed = (directory / MANIFEST).is_file()
    try:
        there = _listing(fs, target) if (sealed or replace or prune) else {}
        extra = sorted(set(there) - set(here) - {MANIFEST})  # files the URL holds and this copy lacks
        # A sealed folder the URL holds whole (the same files and sizes, a file deleted or truncated
        # there shows; the same manifest bytes), found without downloading its tables, is left alone.
        if sealed and not replace and there == here and _same_manifest(directory, fs, target):
            return url
        if replace or sealed:
            if MANIFEST in there:
                fs.rm_file(f"{target}/{MANIFEST}")
            for rel in extra:
                fs.rm_file(f"{target}/{rel}")
        objects = _object_store(fs)
        for p in paths:
            dest = f"{target}/{p.relative_to(directory).as_posix()}"
            if objects:
                fs.put_file(str(p), dest)
                continue
            parent = dest.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{p.name}.{uuid.uuid4().hex[:8]}.part"
            fs.put_file(str(p), tmp)
            fs.mv(tmp, dest)
        if prune and not (replace or sealed):  # after the upload: the old site serves until then
            for rel in extra:
                if rel.split("/", 1)[0] in prune:
                    fs.rm_file(f"{target}/{rel}")
    except OSError as e:
        raise _unreachable(url, e) from None
    return url

def pull(directory: str | os.PathLike) -> bool:
    """Download a stage folder into the mirror if its URL holds a complete one (manifest present);
    the manifest comes last here too. False when there is nothing finished to pull."""
    where = _where(directory)
    if where is None:
        return False
    url, fs, source = where
    directory = Path(directory)
    prefix = source.rstrip("/") + "/"
    try:
        fs.invalidate_cache(source)  # another machine may have written it since we last listed
        if not fs.exists(f"{source}/{MANIFEST}"):
            return False
        rels = [name[len(prefix):] for name in fs.find(source) if name.startswith(prefix)]
        rels = [rel for rel in rels if rel and not _hidden(rel)]
        for rel in sorted(rels, key=lambda r: (r == MANIFEST, r)):
            with files.replacing(directory / rel) as tmp:
                fs.get_file(f"{source}/{rel}", str(tmp))
    except OSError as e:
        raise _unreachable(url, e) from None
    return True

def fetch(folder_url: str) -> Path:
    """The local copy of a finished stage folder given by its URL (`<root>/<stage>/<key>`), pulled if
    needed: how a task finds an input that another machine wrote."""
    root, stage, key = layout.split_folder_url(folder_url)
    local = layout.folder(open_root(root), stage, key)
    if not (local / MANIFEST).is_file() and not pull(local):
        raise UserError(f"{folder_url} is not a finished stage output (no manifest.json there)",
                        "rerun the stage that writes it, with the same --out")
    return local


def push_file(path: str | os.PathLike) -> None:
    """Upload one small mutable file (a run's pointer) inside a mirror; stage folders use `push`."""
    where = _where(path)
    if where is None:
        return
    url, fs, target = where
    try:
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)
    except OSError as e:
        raise _unreachable(url, e) from None


def pull_file(path: str | os.PathLike) -> bool:
    """Download one small mutable file into the mirror when its URL has it (newer than ours or not)."""
    where = _where(path)
    if where is None:
        return Path(path).is_file()
    url, fs, source = where
    try:
        fs.invalidate_cache(source.rsplit("/", 1)[0])
        if not fs.exists(source):
            return False
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(source, str(path))
    except OSError as e:
        raise _unreachable(url, e) from None
    return True


def pull_files(directory: str | os.PathLike) -> None:
    """Download the files right inside a folder of a mirror (the run pointers) from its URL, so that
    what the URL holds is listed, not only what this machine has seen; outside a mirror, nothing."""
    where = _where(directory)
    if where is None:
        return
    url, fs, source = where
    try:
        fs.invalidate_cache(source)
        if not fs.isdir(source):
            return
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(source, detail=False)]
    except OSError as e:
        raise _unreachable(url, e) from None
    for name in names:
        if not _hidden(name):
            pull_file(Path(directory) / name)
