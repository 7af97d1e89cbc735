"""The response cache of the server LLMs: every answer paid for is kept on disk, keyed by what was
asked, so that a resumed, repeated or crashed-and-rerun stage sends no request twice and a sampled
(temperature 1) candidate comes back the same.

- **Key**: sha256 of the request's full content as canonical JSON: the endpoint, the model name,
  the prompt or messages, every parameter that shapes the answer (temperature, max_tokens, stop,
  logprobs, ...) and, for samples, the sample's index (sample 0, 1, ... of a prompt are separate
  entries; a request for n samples reads the ones it has and asks only for the rest). The server's
  URL and the API key are no part of it: the same model name on two servers (a GPU box and its twin)
  is taken to be the same model, so a cache is shared between them. Only usable answers are stored;
  a failed request, or a blank completion or chat reply, is asked again next time.
- **Where**: `<output root>/llm_cache/` by default; the stage that uses an LLM attaches it
  (`attach`, from `layer.run_explain` and `layer.run_simulate`). `$AUTOEXPLAIN_LLM_CACHE` names
  another folder, or `off` turns the cache off (`set_cache`: CLI `--no-cache`, flow and deployment
  parameter `cache: false`).
- **Bounded**: a `diskcache.Cache` (an SQLite index and files, safe across the threads and
  processes of one machine), at most `$AUTOEXPLAIN_LLM_CACHE_MB` megabytes (default 16384); the
  least recently used entries are evicted first. Values are zlib-compressed JSON: an all-at-once
  answer (top-15 alternatives at every prompt position) took about 25 kB against bench/llm_server.py,
  so the default holds about 650,000 of them, a 3,072-unit layer at 200 requests a unit.
- **Between machines**: for an output root on a URL (`remote`), the local cache lives in the URL's
  mirror, and every entry is also written to `<url>/llm_cache/<key[:2]>/<key>.json.z`: a file per
  key, content-addressed, so machines that write the same key race harmlessly and nothing needs a
  lock. A local miss reads that file before asking the server. The URL side is not bounded by us:
  give the bucket a lifecycle rule (expire after N days) if it must be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
import zlib
from concurrent.futures import Future
from pathlib import Path

from autoexplain.run_scope import setting

CACHE_ENV, CACHE_MB_ENV = "AUTOEXPLAIN_LLM_CACHE", "AUTOEXPLAIN_LLM_CACHE_MB"
DEFAULT_MB = 16384
FOLDER = "llm_cache"
_OFF = ("off", "0", "false", "no")

log = logging.getLogger(__name__)


_BEFORE_OFF: list = []  # $AUTOEXPLAIN_LLM_CACHE as it was before set_cache(False) turned it off


def set_cache(on: bool = True) -> None:
    """Turn the response cache off, or back on, for this process and the processes it starts (set
    in the environment, like `llm.set_limits`). On undoes only what an earlier set_cache(False) did,
    so a user's own AUTOEXPLAIN_LLM_CACHE (a folder, or 'off') stands."""
    if not on:
        if not _BEFORE_OFF:
            _BEFORE_OFF.append(os.environ.get(CACHE_ENV))
        os.environ[CACHE_ENV] = "off"
    elif _BEFORE_OFF:
        before = _BEFORE_OFF.pop()
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


def enabled() -> bool:
    return (setting(CACHE_ENV) or "").strip().lower() not in _OFF


try:  # the echo answers are large (top-15 alternatives at every prompt position): orjson is 5-10x faster
    import orjson

    def _dumps(value, sort: bool = False) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - it comes with prefect
    def _dumps(value, sort: bool = False) -> bytes:
        return json.dumps(value, sort_keys=sort, separators=(",", ":")).encode()

    _loads = json.loads


def request_key(**request) -> str:
    """The key of one answer: the request's content (see the module's docstring)."""
    return hashlib.sha256(_dumps(request, sort=True)).hexdigest()


class ResponseCache:
    """Answers by key: `get(key)` -> the stored JSON value or None, `put(key, value)`."""

    def __init__(self, directory: str | os.PathLike, max_mb: float = DEFAULT_MB):
        import diskcache

        from autoexplain import remote

        self.directory = Path(directory)
        self._disk = diskcache.Cache(str(self.directory), size_limit=int(max_mb * 2**20),
                                     eviction_policy="least-recently-used")
        self._remote = remote.location(self.directory)  # (url, fs, path) under a URL root, else None
        self._warned = False
        self._asking: dict[str, Future] = {}  # keys whose request is in flight now
        self._lock = threading.Lock()

    @staticmethod
    def _pack(value) -> bytes:
        return zlib.compress(_dumps(value), 1)  # level 1: most of the gain, a fraction of the CPU

    @staticmethod
    def _unpack(blob: bytes):
        return _loads(zlib.decompress(blob))

    def answer(self, key: str, ask, decode, keep=None):
        """(answer, reused): decode(the stored value), or ask() and store its answer's fields (unless
        `keep(answer)` says it is not worth keeping: a blank reply is asked again next time). A key
        asked for while the same key is in flight in another thread waits for that answer instead
        of sending the request again (identical requests of one stage run, sent together). An
        error of the one request is every waiter's error."""
        stored = self.get(key)
        if stored is not None:
            return decode(stored), True
        with self._lock:
            pending = self._asking.get(key)
            if pending is None:
                pending = self._asking[key] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return pending.result(), True
        try:
            stored = self.get(key)  # answered between the first look and taking the key?
            if stored is not None:
                answer, reused = decode(stored), True
            else:
                answer, reused = ask(), False
                if keep is None or keep(answer):
                    self.put(key, vars(answer))  # shallow: dataclasses.asdict deep-copies (20 ms an echo answer)
            pending.set_result(answer)
            return answer, reused
        except BaseException as e:
            pending.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._asking[key]

    def get(self, key: str):
        blob = self._disk.get(key)
        if blob is None and self._remote is not None:
            blob = self._remote_get(key)
            if blob is not None:
                self._disk.set(key, blob)
        return None if blob is None else self._unpack(blob)

    def put(self, key: str, value) -> None:
        blob = self._pack(value)
        self._disk.set(key, blob)
        if self._remote is not None:
            self._remote_put(key, blob)

    def volume(self) -> int:
        """Bytes on disk here (diskcache's count: its index and its files)."""
        return self._disk.volume()

    def __contains__(self, key: str) -> bool:
        return key in self._disk

    def close(self) -> None:
        self._disk.close()

    # The URL side: a failure there costs only sharing, never the run, so it is said once and skipped.
    def _path(self, key: str) -> str:
        return f"{self._remote[2]}/{key[:2]}/{key}.json.z"

    def _trouble(self, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning(f"the LLM cache at {self._remote[0]} failed ({type(e).__name__}: {e}); "
                        "answers are cached on this machine only")

    def _remote_get(self, key: str) -> bytes | None:
        try:
            return self._remote[1].cat_file(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            self._trouble(e)
            return None

    def _remote_put(self, key: str, blob: bytes) -> None:
        from autoexplain import remote

        fs, path = self._remote[1], self._path(key)
        try:
            if remote.atomic_put(fs):
                fs.pipe_file(path, blob)
                return
            parent = path.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{key}.{uuid.uuid4().hex[:8]}.part"  # readers never see half a file
            fs.pipe_file(tmp, blob)
            fs.mv(tmp, path)
        except OSError as e:
            self._trouble(e)


_OPEN: dict[Path, ResponseCache] = {}
_LOCK = threading.Lock()


def for_root(out: str | os.PathLike) -> ResponseCache | None:
    """The cache for an output root (a local folder, or a URL's mirror), or None when it is off."""
    if not enabled():
        return None
    from autoexplain.storage import open_root

    named = (setting(CACHE_ENV) or "").strip()
    directory = (Path(named).expanduser() if named else open_root(out) / FOLDER).resolve()
    mb = float(setting(CACHE_MB_ENV) or DEFAULT_MB)
    with _LOCK:
        cache = _OPEN.get(directory)
        if cache is None:
            cache = _OPEN[directory] = ResponseCache(directory, mb)
        return cache


def attach(component, out: str | os.PathLike) -> None:
    """Give the server LLM of an explainer or simulator the cache of the output root `out` (or none,
    when the cache is off). Components without a server LLM are left alone: a local model is
    deterministic and costs nothing per request."""
    from autoexplain.llm import LLM

    llm = component.llm
    if isinstance(llm, LLM) and llm.caches_requests:
        llm.cache = for_root(out)
