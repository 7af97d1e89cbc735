"""Recording benchmark on the embedded default (SmolLM2-135M, middle layer).

Measures, in one process so that machine noise hits every number alike:
- GEMM throughput in the dtype the subject computes in (bf16, or float32 where the CPU has no bf16
  dot products), and from it the forward roofline for the layers actually run: a 2048^3
  product (the classic probe) and the subject's own products at the batch's shape (q|k|v, o,
  gate|up, down and the two attention products, with the pass's own weights and layouts, M =
  batch_size x window_len rows), probed between batches of the pass;
- the share of the bare forward spent outside GEMMs, two ways: torch.profiler's self time of the
  GEMM ops on a few batches, and 1 - (the pass's GEMMs at their probed rates) / (the pass's time);
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


def model_gemms(subject, top_layer: int, batch: int, window_len: int) -> list[dict]:
    """The matrix products one truncated forward runs on a batch, read from the subject itself:
    name, shape (M x K x N, with `batches` for batched products), how many times the pass runs it,
    and a callable that runs it once on the pass's own weights and layouts (a transposed weight view
    stays transposed, a residual add stays inside addmm). Shapes are the same in every layer, so one
    layer's weights stand for all; the top layer's down product is not run (the pass stops at it)."""
    cfg = subject.model.config
    rows = batch * window_len
    dtype = next(subject.model.parameters()).dtype
    products = []  # (name, w_t (K, N), bias, residual?, count)
    n = top_layer + 1
    if subject.fused is not None:
        blk = subject.fused.block(top_layer)
        products += [("qkv", blk.w_qkv, blk.b_qkv, False, n), ("o", blk.w_o, blk.b_o, True, n),
                     ("gate_up", blk.w_gu, blk.b_gu, False, n), ("down", blk.w_down, blk.b_down, True, n - 1)]
        heads, kv, head_dim = blk.n_heads, blk.n_kv, blk.head_dim
    else:
        layer = subject.model.model.layers[top_layer]
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin, count in (("q", attn.q_proj, n), ("k", attn.k_proj, n), ("v", attn.v_proj, n),
                                 ("o", attn.o_proj, n), ("gate", mlp.gate_proj, n), ("up", mlp.up_proj, n),
                                 ("down", mlp.down_proj, n - 1)):
            products.append((name, lin.weight.t(), lin.bias, False, count))
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = attn.q_proj.weight.shape[0] // heads
    gemms = []
    for name, w_t, bias, residual, count in products:
        if count <= 0:
            continue
        x = torch.randn(rows, w_t.shape[0], dtype=dtype)
        res = torch.randn(rows, w_t.shape[1], dtype=dtype) if residual else bias
        run = (lambda x=x, w=w_t, r=res: torch.addmm(r, x, w)) if res is not None else (lambda x=x, w=w_t: torch.mm(x, w))
        gemms.append({"name": name, "shape": f"{rows}x{w_t.shape[0]}x{w_t.shape[1]}", "count": count,
                      "flops": 2 * rows * w_t.shape[0] * w_t.shape[1], "run": run})
    # Attention as the fused pass runs it: query heads of a group stacked along the query axis, full
    # T x T scores (the causal mask is applied after the product, so every pair is computed).
    T, G = window_len, heads // kv
    q = torch.randn(batch, kv, G * T, head_dim, dtype=dtype)
    k = torch.randn(batch, T, kv, head_dim, dtype=dtype).permute(0, 2, 3, 1)  # views, as in the pass
    p = torch.randn(batch, kv, G * T, T, dtype=dtype)
    v = torch.randn(batch, T, kv, head_dim, dtype=dtype).transpose(1, 2)
    for name, a, b in (("attn_scores", q, k), ("attn_mix", p, v)):
        gemms.append({"name": name, "shape": f"{batch * kv}x({a.shape[2]}x{a.shape[3]}x{b.shape[3]})", "count": n,
                      "flops": 2 * batch * kv * a.shape[2] * a.shape[3] * b.shape[3],
                      "run": lambda a=a, b=b: torch.matmul(a, b)})
    return gemms


def time_gemms(gemms: list[dict], reps: int = 2) -> list[float]:
    """Seconds per call of each product (one warm-up call, then `reps` timed calls)."""
    seconds = []
    for g in gemms:
        g["run"]()
        start = time.perf_counter()
        for _ in range(reps):
            g["run"]()
        seconds.append((time.perf_counter() - start) / reps)
    return seconds


class GemmProbe:
    """Short bf16 GEMM bursts between batches of a pass, so that the roofline is measured under the
    same machine conditions as the pass itself (a shared machine drifts over minutes): the 2048^3
    probe and, when given, the subject's own products at the batch's shapes. The probes' own time is
    kept out of the pass's time."""

    def __init__(self, dtype: torch.dtype, every: int = 20, gemms: list[dict] | None = None):
        self.dtype, self.every, self.batches, self.rates, self.spent = dtype, every, 0, [], 0.0
        self.gemms, self.shape_seconds = gemms or [], []

    def __call__(self, *_):
        self.batches += 1
        if self.batches % self.every == 1:
            start = time.perf_counter()
            self.rates.append(gemm_gflops(self.dtype, reps=2))
            if self.gemms:
                self.shape_seconds.append(time_gemms(self.gemms))
            self.spent += time.perf_counter() - start

    @property
    def gflops(self) -> float:
        return sum(self.rates) / len(self.rates)

    def shape_report(self) -> dict:
        """Per product: GFLOP/s at its shape (flops over the mean of the probes' times), its share of
        the pass's GEMM time; in all: the pass's GEMM seconds per batch at those rates, and the
        flop-weighted rate (all GEMM flops the pass runs / that time)."""
        n = len(self.shape_seconds)
        mean = [sum(s[i] for s in self.shape_seconds) / n for i in range(len(self.gemms))]
        total = sum(g["count"] * t for g, t in zip(self.gemms, mean))
        flops = sum(g["count"] * g["flops"] for g in self.gemms)
        per = {g["name"]: {"shape": g["shape"], "per_pass": g["count"], "gflops": round(g["flops"] / t / 1e9, 1),
                           "gflops_min_max": [round(g["flops"] / max(s[i] for s in self.shape_seconds) / 1e9),
                                              round(g["flops"] / min(s[i] for s in self.shape_seconds) / 1e9)],
                           "pct_of_gemm_time": round(100 * g["count"] * t / total, 1)}
               for i, (g, t) in enumerate(zip(self.gemms, mean))}
        return {"per_gemm": per, "gemm_s_per_batch": total, "gflops": flops / total / 1e9, "probes": n}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_addmm_activation", "aten::mkldnn_rnn_layer")


def profile_forward(forward, batches: list[torch.Tensor], layer: int) -> dict:
    """Self CPU time of GEMM ops vs everything else over a few batches of the bare forward."""
    from torch.profiler import ProfilerActivity, profile

    forward(batches[0], [layer])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for ids in batches:
            forward(ids, [layer])
        wall = time.perf_counter() - start
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    gemm = sum(t for k, t in ops.items() if k in GEMM_OPS)
    others = sorted(((k, t) for k, t in ops.items() if k not in GEMM_OPS), key=lambda kv: -kv[1])
    return {
        "batches": len(batches),
        "wall_ms_per_batch": round(1e3 * wall / len(batches), 1),
        "gemm_pct": round(100 * gemm / total, 1),
        "non_gemm_pct": round(100 * (total - gemm) / total, 1),
        "top_non_gemm_ops_pct": {k: round(100 * t / total, 1) for k, t in others[:8]},
    }


def measure(tokens: int, layer: int | None, batch_size: int, hooked_batches: int = 60, profile_batches: int = 5) -> dict:
    from autoexplain.record import RecordConfig, windows_batches, build_windows, record_layers
    from autoexplain.subject import UNITS, load_subject

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
    gemms = model_gemms(subject, layer, batch_size, 64)
    dtype = subject.model.dtype  # the roofline is that of the dtype the pass computes in
    probe, bare_batches = GemmProbe(dtype, gemms=gemms), windows_batches(windows, batch_size)
    # The recorder calls `subject.capture`; the bare forward calls the same bound method directly,
    # so only the recording's own passes go through the timer.
    capture, timed = subject.capture, {"bare": 0.0, "record_forward": 0.0}

    def record_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return capture(*args, **kwargs)
        finally:
            timed["record_forward"] += time.perf_counter() - start

    def bare_forward(*_):
        _ids, input_ids = next(bare_batches)
        start = time.perf_counter()
        capture(input_ids, [(layer, UNITS)])
        timed["bare"] += time.perf_counter() - start
        probe()

    subject.capture = record_forward
    start = time.perf_counter()
    record_layers(subject, windows, RecordConfig([layer], batch_size=batch_size), out, progress=bare_forward)
    del subject.capture
    if not timed["record_forward"]:
        raise SystemExit("the recorder no longer calls Subject.capture: time its forward where it does")
    record_s = time.perf_counter() - start - timed["bare"] - probe.spent
    bare_s = timed["bare"]

    # Hugging Face's own forward with a pre-hook (the path for layouts without a fused pass), on the
    # first batches only: enough to compare, and the comparison is what it is for.
    hooked_probe, hooked_tok = GemmProbe(dtype, every=10), 0
    start = time.perf_counter()
    for n, (_ids, input_ids) in enumerate(windows_batches(windows, batch_size)):
        if n == hooked_batches:
            break
        subject.mlp_activations(input_ids, [layer], hooked=True)
        hooked_tok += input_ids.numel()
        hooked_probe()
    hooked_s = time.perf_counter() - start - hooked_probe.spent

    # Where the bare forward's time goes, by the profiler, on a few full batches.
    first = [ids for _n, (_w, ids) in zip(range(profile_batches), windows_batches(windows, batch_size))]
    profiled = profile_forward(subject.mlp_activations, first, layer)

    fpt = flops_per_token(subject, layer, 64)
    gflops = probe.gflops
    roofline = gflops * 1e9 / fpt
    shapes = probe.shape_report()
    # The pass with nothing but its GEMMs, each at the rate probed at its own shape.
    shape_roofline = batch_size * 64 / shapes["gemm_s_per_batch"]
    return {
        "tokens": n_tok,
        "layer": layer,
        "batch_size": batch_size,
        "load_s_cached": round(load_s, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "gemm_gflops": round(gflops, 1),
        "gemm_probes_min_max_n": [round(min(probe.rates)), round(max(probe.rates)), len(probe.rates)],
        "gemm_fp32_gflops": round(gemm_gflops(torch.float32), 1),
        # small: where bf16 is emulated (AVX2 alone) a 2048^3 product takes seconds
        "gemm_bf16_gflops_512": round(gemm_gflops(torch.bfloat16, n=512, reps=2), 1),
        "mflops_per_token": round(fpt / 1e6, 1),
        "roofline_tok_s": round(roofline),
        "model_shape_gemms": shapes["per_gemm"],
        "model_shape_gemm_gflops": round(shapes["gflops"], 1),
        "model_shape_probes": shapes["probes"],
        "model_shape_gemm_ms_per_batch": round(1e3 * shapes["gemm_s_per_batch"], 1),
        "model_shape_roofline_tok_s": round(shape_roofline),
        "bare_forward_tok_s": round(n_tok / bare_s),
        "record_tok_s": round(n_tok / record_s),
        "record_pct_of_roofline": round(100 * n_tok / record_s / roofline, 1),
        "bare_pct_of_roofline": round(100 * n_tok / bare_s / roofline, 1),
        "record_pct_of_model_shape_roofline": round(100 * n_tok / record_s / shape_roofline, 1),
        "bare_pct_of_model_shape_roofline": round(100 * n_tok / bare_s / shape_roofline, 1),
        "non_gemm_share_of_bare_pct": round(100 * (1 - n_tok / bare_s / shape_roofline), 1),
        "profile": profiled,
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
    from autoexplain.record import windows_batches, build_windows
    from autoexplain.subject import load_subject

    subject = load_subject()
    windows = build_windows(subject, "default", tempfile.mkdtemp(prefix="bench-naive-"), 64, tokens, 0)
    layer = subject.n_layers // 2
    kept = [subject.mlp_activations(ids, [layer])[layer].clone() for _w, ids in windows_batches(windows, 32)]
    everything = torch.cat(kept)  # (windows, 64, units)
    everything.amax(dim=1).float().topk(40, dim=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens": windows.n_windows * 64, "naive_peak_rss_gib": round(peak, 3),
            "activation_bytes_gib": round(everything.numel() * 2 / 2**30, 3)}


def cpu_kind() -> str:
    """The CPU's model name and its widest units: AMX, AVX512-BF16, AVX512 or AVX2 alone (each kind
    benches differently; the last has the subject compute in float32)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    kind = next((k for flag, k in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512, no bf16"))
                 if flag in flags), "AVX2 alone")
    family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model\t")), "?")
    return f"{kind} ({name}, family {family}, model {model})"


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
    ap.add_argument("--profile-batches", type=int, default=5, help="batches of the bare forward to profile")
    ap.add_argument("--no-first-load", dest="first_load", action="store_false",
                    help="skip timing the first (GGUF-converting) model load")
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
    result = measure(args.tokens, args.layer, args.batch_size, profile_batches=args.profile_batches)
    result["load_s_first"] = round(first_load_seconds(), 2) if args.first_load else None
    result["cpu"] = cpu_kind()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
