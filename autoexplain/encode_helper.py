"""A second process that embeds texts beside this one, for the batches of `wordvecs.encode_each`.

A layer's explanation texts (about 27k, each embedded as if alone) are the largest piece of its
work after recording, and they run on one torch thread (a vector's bits depend on the thread
count), while the flow's second core mostly waits for the next shard to score. A helper process,
also on one thread, takes the next piece of the list whenever it is free: the two processes run the same
single-threaded computation on each text, so a vector has the same bits whichever of them
embedded it (`tests/test_determinism.py` checks that). The helper starts on first use (a spawned
process that loads the same sentence-transformer) and stays for the process's life; where it
cannot start (a daemonic process, such as a dask worker, may have no children) or breaks, this
process embeds everything itself.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

import numpy as np

from autoexplain import interrupt

HELP_FROM = 256  # texts: a shorter list is not worth the helper's start-up (seconds, once)
_pools: dict[tuple[str, str], ProcessPoolExecutor] = {}
_broken: set[tuple[str, str]] = set()  # helpers that failed: not started again in this process
_lock = threading.Lock()
_model = None  # the helper process's own copy of the embedder


def enabled() -> bool:
    return (os.environ.get("AUTOEXPLAIN_ENCODE_HELPER", "1") != "0" and (os.cpu_count() or 1) > 1
            and not multiprocessing.current_process().daemon)


def pool(model_path: str, device: str) -> ProcessPoolExecutor | None:
    """The helper for this embedder (started now if need be), or None where there is none."""
    if not enabled() or device != "cpu":
        return None
    with _lock:
        if (model_path, device) in _broken:
            return None
        if (model_path, device) not in _pools:
            _pools[(model_path, device)] = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_load, initargs=(model_path, device))
        return _pools[(model_path, device)]


def _load(model_path: str, device: str) -> None:
    global _model
    interrupt.ignore_ctrl_c()
    from sentence_transformers import SentenceTransformer

    _model = SentenceTransformer(model_path, device=device)


def loaded():
    """In the helper process: its embedder, loaded at start-up."""
    return _model


def shared(pieces: Sequence[list[str]], here: Callable[[list[str]], None], store: Callable[[list[str], np.ndarray], None],
           helper: ProcessPoolExecutor, there: Callable[[list[str]], np.ndarray]) -> None:
    """Embed every piece (a list of texts): this thread calls `here(piece)`, and a feeder thread
    hands pieces to the helper (to run `there`, a module-level function) and `store`s what it
    returns; whichever is free takes the next piece.
    Once the list is exhausted here, a piece still with the helper (starting up, or broken) is
    embedded here as well and the helper's answer to it is dropped: this never waits on the helper."""
    queue, lock, with_helper = iter(enumerate(pieces)), threading.Lock(), {}

    def feed():
        while True:
            with lock:  # taken and marked as the helper's in one step: the end below sees every piece
                i, piece = next(queue, (None, None))
                if piece is None:
                    return
                with_helper[i] = piece
            try:
                rows = helper.submit(there, piece).result()
            except Exception:  # noqa: BLE001 - a broken helper: its piece is left to this process
                _drop(helper)
                return
            with lock:
                if with_helper.pop(i, None) is None:
                    return  # taken over here
                store(piece, rows)

    threading.Thread(target=feed, name="autoexplain-encode-helper", daemon=True).start()
    while True:
        with lock:
            _i, piece = next(queue, (None, None))
        if piece is None:
            break
        here(piece)
    with lock:
        left = list(with_helper.values())
        with_helper.clear()
    for piece in left:
        here(piece)


def _drop(helper: ProcessPoolExecutor) -> None:
    with _lock:
        for key, p in list(_pools.items()):
            if p is helper:
                del _pools[key]
                _broken.add(key)
    helper.shutdown(wait=False, cancel_futures=True)
