"""Recording benchmark on the embedded default (SmolLM2-135M, middle layer).

Measures, in one process so that machine noise hits every number alike:
- bf16 GEMM throughput, and from it the forward roofline for the layers actually run;
- the bare truncated forward pass, and the full recording pass (selection included), interleaved
  batch by batch so that machine drift cannot pose as selection overhead;
- Hugging Face's own hooked forward on the first batches, against the fused pass (`autoexplain.fused`);
- model load time, first (dequantise GGUF) and cached.
Peak RSS is measured per corpus size in child processes (`--rss`), since maxrss only grows.

    python bench/record_bench.py --tokens 1000000            # throughput + overhead
    python bench/record_bench.py --rss 250000 500000 1000000 # peak RSS per corpus size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def gemm_gflops(dtype=torch.bfloat16, n=2048, reps=8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n**3 / (time.perf_counter() - start) / 1e9


def flops_per_token(subject, top_layer: int, window_len: int) -> float:
    """2 x the weights the truncated pass multiplies by, plus attention scores and mixing: blocks
    0..top_layer without the top block's output projection (the pass stops at its input), no
    embedding, no lm_head."""
    cfg = subject.model.config
    blocks = [b for b in subject.model.model.layers[: top_layer + 1]]
    weights = sum(p.numel() for b in blocks for name, p in b.named_parameters() if p.dim() == 2)
    weights -= subject.projections[top_layer].weight.numel()
    attention = 2 * 2 * window_len * cfg.hidden_size * (top_layer + 1) / 2  # causal: half the pairs
    return 2 * weights + attention


class GemmProbe:
    """Short bf16 GEMM bursts between batches of a pass, so that the roofline is measured under the
    same machine conditions as the pass itself (a shared machine drifts over minutes). The probes'
    own time is kept out of the pass's time."""

    def __init__(self, every: int = 40):
        self.every, self.batches, self.rates, self.spent = every, 0, [], 0.0

    def __call__(self, *_):
        self.batches += 1
        if self.batches % self.every == 1:
            start = time.perf_counter()
            self.rates.append(gemm_gflops(reps=2))
            self.spent += time.perf_counter() - start

    @property
    def gflops(self) -> float:
        return sum(self.rates) / len(self.rates)


def measure(tokens: int, layer: int | None, batch_size: int, hooked_batches: int = 60) -> dict:
    from autoexplain.record import RecordConfig, _windows_batches, build_windows, record_layers
    from autoexplain.subject import load_subject

    t0 = time.perf_counter()
    subject = load_subject()
    load_s = time.perf_counter() - t0
    layer = subject.n_layers // 2 if layer is None else layer
    out = tempfile.mkdtemp(prefix="bench-record-")
    windows = build_windows(subject, "default", out, 64, tokens, 0)
    n_tok = windows.n_windows * 64

    # The recording pass, with the bare forward of each batch run right after it (same windows,
    # same moment): a shared machine drifts by several percent between two passes minutes apart,
    # which swamped the overhead when the passes ran one after the other. The recording's own
    # forward passes are timed too, so the overhead splits into selection work and any slowdown
    # that selection causes in the forward (cache or allocator effects).
    probe, bare_batches = GemmProbe(), _windows_batches(windows, batch_size)
    forward, timed = subject.mlp_activations, {"bare": 0.0, "record_forward": 0.0}

    def record_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            timed["record_forward"] += time.perf_counter() - start

    def bare_forward(*_):
        _ids, input_ids = next(bare_batches)
        start = time.perf_counter()
        forward(input_ids, [layer])
        timed["bare"] += time.perf_counter() - start
        probe()

    subject.mlp_activations = record_forward
    start = time.perf_counter()
    record_layers(subject, windows, RecordConfig([layer], batch_size=batch_size), out, progress=bare_forward)
    del subject.mlp_activations
    record_s = time.perf_counter() - start - timed["bare"] - probe.spent
    bare_s = timed["bare"]

    # Hugging Face's own forward with a pre-hook (the path for layouts without a fused pass), on the
    # first batches only: enough to compare, and the comparison is what it is for.
    hooked_probe, hooked_tok = GemmProbe(every=10), 0
    start = time.perf_counter()
    for n, (_ids, input_ids) in enumerate(_windows_batches(windows, batch_size)):
        if n == hooked_batches:
            break
        subject.mlp_activations(input_ids, [layer], hooked=True)
        hooked_tok += input_ids.numel()
        hooked_probe()
    hooked_s = time.perf_counter() - start - hooked_probe.spent

    fpt = flops_per_token(subject, layer, 64)
    gflops = probe.gflops
    roofline = gflops * 1e9 / fpt
    return {
        "tokens": n_tok,
        "layer": layer,
        "batch_size": batch_size,
        "load_s_cached": round(load_s, 2),
        "gemm_bf16_gflops": round(gflops, 1),
        "gemm_probes_min_max_n": [round(min(probe.rates)), round(max(probe.rates)), len(probe.rates)],
        "gemm_fp32_gflops": round(gemm_gflops(torch.float32), 1),
        "mflops_per_token": round(fpt / 1e6, 1),
        "roofline_tok_s": round(roofline),
        "bare_forward_tok_s": round(n_tok / bare_s),
        "record_tok_s": round(n_tok / record_s),
        "record_pct_of_roofline": round(100 * n_tok / record_s / roofline, 1),
        "bare_pct_of_roofline": round(100 * n_tok / bare_s / roofline, 1),
        "fused_pass": subject.fused is not None,
        "hooked_hf_forward_tok_s": round(hooked_tok / hooked_s) if hooked_tok else None,
        "hooked_hf_pct_of_roofline": round(100 * hooked_tok / hooked_s / (hooked_probe.gflops * 1e9 / fpt), 1)
        if hooked_tok else None,
        "selection_overhead_pct": round(100 * (record_s - bare_s) / bare_s, 1),
        "of_which_selection_work_pct": round(100 * (record_s - timed["record_forward"]) / bare_s, 1),
        "of_which_slower_forward_pct": round(100 * (timed["record_forward"] - bare_s) / bare_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def rss_child(tokens: int) -> dict:
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    subject = load_subject()
    out = tempfile.mkdtemp(prefix="bench-rss-")
    windows = build_windows(subject, "default", out, 64, tokens, 0)
    after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record_layers(subject, windows, RecordConfig([subject.n_layers // 2]), out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens": windows.n_windows * 64, "peak_rss_gib": round(peak, 3),
            "rss_after_load_gib": round(after_setup, 3)}


def naive_child(tokens: int) -> dict:
    """The naive approach: keep every activation (tokens x units, bf16), then take the top-k."""
    from autoexplain.record import _windows_batches, build_windows
    from autoexplain.subject import load_subject

    subject = load_subject()
    windows = build_windows(subject, "default", tempfile.mkdtemp(prefix="bench-naive-"), 64, tokens, 0)
    layer = subject.n_layers // 2
    kept = [subject.mlp_activations(ids, [layer])[layer].clone() for _w, ids in _windows_batches(windows, 32)]
    everything = torch.cat(kept)  # (windows, 64, units)
    everything.amax(dim=1).float().topk(40, dim=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens": windows.n_windows * 64, "naive_peak_rss_gib": round(peak, 3),
            "activation_bytes_gib": round(everything.numel() * 2 / 2**30, 3)}


def first_load_seconds() -> float:
    """Load time with an empty conversion cache: the GGUF is dequantised and converted."""
    with tempfile.TemporaryDirectory() as cache:
        code = "from autoexplain.subject import load_subject; print(load_subject().load_seconds)"
        env = {**__import__("os").environ, "AUTOEXPLAIN_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss", type=int, nargs="*", help="corpus sizes to measure peak RSS for")
    ap.add_argument("--naive", type=int, nargs="*", help="corpus sizes for the store-everything approach")
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-naive", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        print(json.dumps(rss_child(args.child_rss)))
        return
    if args.child_naive:
        print(json.dumps(naive_child(args.child_naive)))
        return
    if args.rss or args.naive:
        for flag, sizes in (("--child-rss", args.rss or []), ("--child-naive", args.naive or [])):
            for n in sizes:
                out = subprocess.run([sys.executable, __file__, flag, str(n)], capture_output=True, text=True, check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)
        return
    result = measure(args.tokens, args.layer, args.batch_size)
    result["load_s_first"] = round(first_load_seconds(), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
