"""How many rows a local model reads per forward pass, and how a sample's seed is made: the two
settings that let prompts of many units share a pass without changing any unit's result.

`local_batch_size`: `LocalLLM(batch_size=...)` or `AllAtOnceSimulator(batch_size=...)` when given,
else $AUTOEXPLAIN_LOCAL_BATCH (set in the environment, so Dask workers and task processes see it),
else 16 rows on a CPU and 64 on a GPU (bench/local_batch_bench.py, bench/RESULTS.md). Results do
not depend on it beyond float noise, so it is no part of any cache key.
"""

from __future__ import annotations

import hashlib
import os

LOCAL_BATCH_ENV = "AUTOEXPLAIN_LOCAL_BATCH"
CPU_BATCH, CUDA_BATCH = 16, 64


def local_batch_size(model, batch_size: int | None = None) -> int:
    """Rows (prompts, or samples of prompts) per forward pass of a local model. On a CPU the
    throughput stops growing at a few dozen rows while the KV copies keep growing; a GPU wants
    many rows to be busy."""
    chosen = batch_size or os.environ.get(LOCAL_BATCH_ENV)
    if chosen:
        return max(1, int(chosen))
    device = next(model.parameters()).device
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH


def sample_seed(*identity) -> int:
    """A generator seed from what a sample is (its prompt, its settings, its index), never from
    where it sits in a batch: a unit's samples do not depend on which units share its batch."""
    return int.from_bytes(hashlib.sha256(repr(identity).encode()).digest()[:8], "little") >> 1
