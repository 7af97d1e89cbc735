"""How many rows a local model reads per forward pass, how a sample's seed is made, and how rows
that continue one shared prompt prefix attend to it: what lets prompts of many units share a pass
without changing any unit's result.

`local_batch_size`: `LocalLLM(batch_size=...)` or `AllAtOnceSimulator(batch_size=...)` when given,
else $AUTOEXPLAIN_LOCAL_BATCH (set in the environment, so Dask workers and task processes see it),
else 16 rows on a CPU and 64 on a GPU (bench/local_batch_bench.py, bench/RESULTS.md). Results do
not depend on it (see `shared_prefix_attention` and `AllAtOnceSimulator`), so it is no part of any
cache key.

`shared_prefix_attention`: rows that continue one prefix (the simulator's few-shot prompt, read once
into a KV cache) attend to it without a copy of its keys and values per row. The stock path copies
the prefix's cache once per row and attends over the concatenation; on a loaded 2-core CPU that
made a 16-row pass of SmolLM2 cost 0.29 s per row against 0.16-0.19 s in a 4-row pass (0.19 against
0.17 at lighter load). Here every query of every row of the pass meets the one prefix in a single
attention call (one long row, batch 1), then its own row causally, and the two are merged by their
log-sum-exps: a 16-row pass is then the cheapest per row, by 5-15 % on a CPU. A query's
result depends only on its own row (bench/RESULTS.md, issue 13 item 7, has the probe).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager

LOCAL_BATCH_ENV = "AUTOEXPLAIN_LOCAL_BATCH"
CPU_BATCH, CUDA_BATCH = 16, 64
# A generated prompt is left-padded to `prompt_width` and batched only with prompts of that width
# (`LocalLLM._batches`): coarse, so that prompts of many units still share a pass (the bench's
# eight ~1,100-token prompts fall in one width at 256, in two at 64), and relative below that, so a
# short prompt pays at most a quarter of its length in pads.
PROMPT_BUCKET = 256


def prompt_width(n: int) -> int:
    """The padded width of an n-token prompt: the next multiple of a power of two between 8 and
    PROMPT_BUCKET, about a quarter of n. A function of n alone, so of the prompt alone."""
    step = max(8, min(PROMPT_BUCKET, 1 << max(0, n.bit_length() - 3)))
    return -(-n // step) * step


def env_batch_size() -> int | None:
    """$AUTOEXPLAIN_LOCAL_BATCH as a row count, None when unset; anything else is refused."""
    from autoexplain.errors import UserError

    value = os.environ.get(LOCAL_BATCH_ENV)
    if not value:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"{LOCAL_BATCH_ENV}={value!r} is not a number of rows", "set it to a whole number >= 1 or unset it")
    return int(value)


def local_batch_size(model, batch_size: int | None = None) -> int:
    """Rows (prompts, or samples of prompts) per forward pass of a local model. On a CPU the
    throughput stops growing at a few dozen rows while the KV copies keep growing; a GPU wants
    many rows to be busy."""
    chosen = batch_size or env_batch_size()
    if chosen:
        return max(1, int(chosen))
    device = next(model.parameters()).device
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH


def sample_seed(*identity) -> int:
    """A generator seed from what a sample is (its prompt, its settings, its index), never from
    where it sits in a batch: a unit's samples do not depend on which units share its batch."""
    return int.from_bytes(hashlib.sha256(repr(identity).encode()).digest()[:8], "little") >> 1


# -- attention of many rows to one shared prefix ------------------------------------------------
PREFIX_ATTENTION = "autoexplain-shared-prefix"
PREFIX_KWARG = "autoexplain_prefix"  # per layer, the prefix's (keys, values), each (1, kv heads, P, d)


def _parts_flash(query, key, value, scale, causal):
    """(output, log-sum-exp) of one attention call by the CPU flash kernel (fp32 softmax inside)."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)


def _parts_math(query, key, value, scale, causal):
    """The same in plain float32 torch, for devices without the CPU kernel."""
    import torch

    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=scores.device).tril(m - n),
                                    float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse[..., None]), value.float()).to(query.dtype), lse


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for rows (B, heads, W, d) that follow one prefix: prefix part + own causal part.
    Without the prefix keyword it is transformers' sdpa, so other callers of the model see no
    change while it is installed."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pk, pv = prefix[module.layer_idx]
    b, heads, w, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    parts = _parts_flash if query.device.type == "cpu" else _parts_math
    # Query heads of one kv head, of every row, as one long row against the prefix's keys.
    flat = query.view(b, kv_heads, group, w, d).transpose(0, 1).reshape(1, kv_heads, b * group * w, d)
    out_p, lse_p = parts(flat, pk, pv, scale, False)
    out_p = out_p.view(kv_heads, b, group, w, d).transpose(0, 1).reshape(b, heads, w, d)
    lse_p = lse_p.view(kv_heads, b, group, w).transpose(0, 1).reshape(b, heads, w)
    out_o, lse_o = parts(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), scale, True)
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = torch.exp(lse_p - top)[..., None], torch.exp(lse_o - top)[..., None]
    out = (out_p.float() * w_p + out_o.float() * w_o) / (w_p + w_o)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def prefix_keys_values(cache) -> list:
    """Per layer, (keys, values) of a batch-1 prefix cache, as `shared_prefix_attention` reads them."""
    return [(layer.keys, layer.values) for layer in cache.layers]


@contextmanager
def prefix_attention(model):
    """Installs `shared_prefix_attention` on a model that uses sdpa, for the block; yields whether
    it did (else the caller takes the stock path, with a copy of the prefix cache per row)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    # Plain causal attention only: a sliding window or soft-capped logits would need their own merge.
    plain = not getattr(config, "sliding_window", None) and not getattr(config, "attn_logit_softcapping", None)
    if config._attn_implementation != "sdpa" or not hasattr(model.base_model, "layers") or not plain:
        yield False
        return
    AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    config._attn_implementation = PREFIX_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
