"""What every stage task shares about Prefect's task cache and retries.

A task's cache key is the store's key of the output it makes (`store.stage_key`: its parameters,
which carry the upstream outputs' keys, with the code identity of the library functions it runs and
the prompt files it reads), and a cached result counts only while the output it names is whole: the
store is the truth. Results persist in Prefect's local storage, or on a folder or URL (`--results`).
"""

from __future__ import annotations

from pathlib import Path

from prefect.tasks import exponential_backoff

from autoexplain import remote
from autoexplain.errors import UserError
from autoexplain.schemas.contracts import ContractViolation
from autoexplain.storage import content_key, is_complete, local_ref, unanswered
from autoexplain.store import stage_key


def transient(task_, task_run, state) -> bool:
    """Retry everything except mistakes that a retry cannot fix."""
    try:
        state.result()
    except (UserError, ContractViolation):
        return False
    except Exception:
        return True
    return False


RETRY = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
             retry_condition_fn=transient, persist_result=True)


def cache_key(stage: str, entries: tuple, prompts: str = "", inputs=None):
    """The task's cache key (with the code identity of `entries`, the library functions the task
    runs), or None (run the task, whose stage finds or rebuilds its output) when
    the result cached under that key names an output that is gone, unfinished or damaged: the
    store is the truth, and a cache must never answer with a folder that is not there. `inputs`
    maps the parameters to what the output depends on, where a parameter names a file (a model or a
    corpus by its path: edited in place, it is another input)."""

    def cache_key(context, parameters) -> str | None:
        # The store's key function: a task's result is keyed as a stage output is, its parameters
        # (which carry the inputs' keys) with the code identity of what it runs.
        parameters = inputs(parameters) if inputs else parameters
        key = f"{stage}-" + stage_key({"params": {k: _by_uri(v) for k, v in parameters.items()},
                                       "prompts": prompts(parameters) if callable(prompts) else prompts}, *entries)
        return key if _cached_output_is_whole(context, key) else None

    return cache_key


def _by_uri(value):
    """A task parameter as its cache key takes it: an upstream reference by its URI alone, not by
    where this machine keeps the folder (under a URL root, a mirror whose path differs between
    machines and users; `local_ref` finds or pulls it from the URI)."""
    if isinstance(value, list):
        return [_by_uri(v) for v in value]
    if isinstance(value, dict) and "uri" in value:
        return {k: v for k, v in value.items() if k not in ("path", "windows")}
    return value


def _cached_output_is_whole(context, key: str) -> bool:
    store = getattr(context, "result_store", None)
    try:
        if store is None or not store.exists(key):
            return True  # nothing cached: the key is safe to use
        output = store.read(key).result
    except Exception:  # noqa: BLE001 - an unreadable record is as good as none
        return False
    return output_is_whole(output)


def output_is_whole(output: dict | list) -> bool:
    """Whether a task reference (or each of a list of them) still names a finished, undamaged
    output here or at its URL (records with their windows)."""
    if isinstance(output, list):
        return all(output_is_whole(o) for o in output)
    try:
        local = local_ref(output)
        path = Path(local["path"])
        if "layers" in output:
            return is_complete(path) and is_complete(Path(local["windows"]).parent)
        return is_complete(path.parent) and path.is_file() and not unanswered(path.parent)
    except (UserError, OSError, KeyError, TypeError):
        return False


def result_storage(where: str):
    """Prefect result storage on a folder or an fsspec URL. Prefect takes a folder as a Path, and
    other storage only as a block saved on its server (it refuses unsaved blocks, and file:// URLs
    in a RemoteFileSystem): one `remote-file-system/autoexplain-results-<hash>` per URL."""
    from prefect.filesystems import RemoteFileSystem

    if not remote.is_url(where):
        return Path(where).expanduser().resolve()
    _, path = remote.check(where)
    if where.startswith("file://"):
        return Path(path)
    try:
        block = RemoteFileSystem(basepath=where)
    except ValueError as e:
        raise UserError(f"cannot keep Prefect results at {where}: {e}", "pass a URL like s3://bucket/results") from None
    block.save(f"autoexplain-results-{content_key(where, 12)}", overwrite=True)
    return block


def with_results(where: str | None, *tasks):
    """The tasks, persisting their results at `where` (a folder or URL) when one is given."""
    if not where:
        return tasks
    storage = result_storage(where)
    return tuple(t.with_options(result_storage=storage) for t in tasks)
