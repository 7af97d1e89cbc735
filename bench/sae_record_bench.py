"""Recording an SAE's latents: a 16,384-latent TopK SAE on layer 15's residual stream of the
embedded SmolLM2-135M (random weights in SAELens layout: throughput and memory do not depend on
what the latents mean, and TopK fixes how many fire per token).

- Throughput: the recording pass (forward to the hook, encoding, selection) against the bare
  forward plus encoding of the same batch, run right after it inside the pass, so that machine
  drift hits both alike (as `record_bench.py` does for neurons). Target: recording >= 85 % of bare.
  The bare encoding is the one recording runs (`sparse_activations`: a TopK coder's chosen latents,
  never scattered into a dense tokens x latents tensor), so the share is what selection, statistics
  and the end of the pass cost on top of the work any recorder must do.
- Peak RSS per corpus size, each in a child process (maxrss only grows). Target: <= 3 GiB, flat
  from 250k to 1M tokens.

    python bench/sae_record_bench.py --tokens 1000000
    python bench/sae_record_bench.py --rss 250000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYER, LATENTS, K = 15, 16384, 32


def write_sae(folder: Path, d_in: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    w_dec = torch.randn(LATENTS, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    save_file({"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(LATENTS), "W_dec": w_dec,
               "b_dec": torch.zeros(d_in)}, folder / "sae_weights.safetensors")
    cfg = {"d_in": d_in, "d_sae": LATENTS, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "architecture": "topk", "k": K,
           "metadata": {"model_name": "SmolLM2-135M-Instruct", "hook_name": f"blocks.{LAYER}.hook_resid_post",
                        "context_size": 64, "prepend_bos": False}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def setup(tokens: int):
    from autoexplain.record import build_windows
    from autoexplain.source_coder import open_unit_source
    from autoexplain.subject import load_subject

    subject = load_subject()
    out = tempfile.mkdtemp(prefix="bench-sae-")
    sae = write_sae(Path(out) / "sae", subject.model.config.hidden_size)
    source = open_unit_source(f"sae:{sae}", "smollm2")
    return subject, source, build_windows(subject, "default", out, 64, tokens, 0), out


def measure(tokens: int, batch_size: int) -> dict:
    from autoexplain.record import RecordConfig, record_layers, windows_batches

    subject, source, windows, out = setup(tokens)
    bare_batches, timed = windows_batches(windows, batch_size), {"bare": 0.0}

    def bare(*_):
        _ids, input_ids = next(bare_batches)
        start = time.perf_counter()
        source.sparse_activations(subject, input_ids, [LAYER])
        timed["last"] = time.perf_counter()
        timed["bare"] += timed["last"] - start

    start = time.perf_counter()
    record_layers(subject, windows, RecordConfig([LAYER], batch_size=batch_size), out, progress=bare, source=source)
    stop = time.perf_counter()
    record_s, end_s = stop - start - timed["bare"], stop - timed["last"]
    n_tok = windows.n_windows * 64
    # The end of the pass (records, shape statistics, each latent's output tokens) costs the same
    # whatever the corpus size; the streaming share is what a longer corpus tends to.
    return {"tokens": n_tok, "latents": LATENTS, "k": K, "layer": LAYER, "batch_size": batch_size,
            "bare_forward_and_encode_tok_s": round(n_tok / timed["bare"]), "record_tok_s": round(n_tok / record_s),
            "record_pct_of_bare": round(100 * timed["bare"] / record_s, 1),
            "end_of_pass_s": round(end_s, 1),
            "streaming_pct_of_bare": round(100 * timed["bare"] / (record_s - end_s), 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def rss_child(tokens: int) -> dict:
    from autoexplain.record import RecordConfig, record_layers

    subject, source, windows, out = setup(tokens)
    after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record_layers(subject, windows, RecordConfig([LAYER]), out, source=source)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens": windows.n_windows * 64, "peak_rss_gib": round(peak, 3), "rss_after_setup_gib": round(after_setup, 3)}


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from record_bench import cpu_kind

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss", type=int, nargs="*", help="corpus sizes to measure peak RSS for, each in a child")
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        print(json.dumps(rss_child(args.child_rss)))
        return
    result = {"cpu": cpu_kind(), "torch_threads": torch.get_num_threads()}
    if args.rss:
        result["rss"] = [json.loads(subprocess.run([sys.executable, __file__, "--child-rss", str(n)], check=True,
                                                   capture_output=True, text=True).stdout.strip().splitlines()[-1])
                         for n in args.rss]
    else:
        result.update(measure(args.tokens, args.batch_size))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
