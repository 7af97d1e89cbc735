"""A local model's explain and simulate stages with one unit per forward pass against many units
per pass (issue 13, item 7), on the tiny test Llama and on the embedded SmolLM2-135M-Instruct.

    python bench/local_batch_bench.py --models tiny,smollm2 --units 8 --repeat 2 --threads 1

Per model, in one process:
- explain: `pipeline.explain_stage` with k samples per unit; per unit = a LocalLLM whose batch is
  k rows (one unit's samples per generate call), cross-unit = `--batch` rows (batch / k units).
- simulate: `pipeline.simulate_stage` with the local all-at-once simulator (best-of-k by halving
  on valid, the chosen and the token-lookup texts on calib/test, shuffled controls); `before` =
  the simulator of commit BEFORE (per unit, the prompt read once per explanation), per unit = this
  code with `units_at_once = 1`, cross-unit = this code gathering `batch / 4` units per call.
Each variant runs `--repeat` times, interleaved, after one untimed warm-up; the best time is kept
(the machine is shared). Also reported: the largest difference between per-unit and cross-unit
simulated values, whether the sampled candidates are the same, the torch threads and the 1-minute
load average before and after each model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = "e3535d5"  # the last commit before cross-unit batching
WORDS = ("the of and to in is that for it with as was on be at by this from or cat dog house river blue red "
         "green seven twelve London Paris running jumped quickly slowly happy sad hand eye foot").split()


def units(n: int, tokens: int, per_split: int, seed: int = 0):
    """Synthetic units: per split `per_split` records of `tokens` tokens, top and random alternating;
    a top record fires on the unit's four favourite words."""
    from autoexplain.records import ActivationRecord, UnitId, UnitRecords

    rng = random.Random(seed)
    out = []
    for i in range(n):
        favourite, records = set(rng.sample(WORDS, 4)), []
        for split in ("train", "valid", "calib", "test"):
            for j in range(per_split):
                kind = "top" if j % 2 == 0 else "random"
                toks = [" " + rng.choice(WORDS) for _ in range(tokens)]
                acts = [(8.0 if t.strip() in favourite and kind == "top" else 0.0) + rng.random() for t in toks]
                records.append(ActivationRecord(toks, acts, window_id=len(records), kind=kind, split=split))
        out.append(UnitRecords(UnitId.mlp(15, i), records))
    return out


def subject(name: str, device: str = "cpu", tokenizer: str | None = None):
    """`smollm2`: the embedded model; `tiny`: the tiny Llama of the tests; `random:DIR`: the
    architecture of DIR's config.json with random weights (bf16), for timing a model whose weights
    cannot travel (a device machine takes 64 MiB). `tokenizer`: a folder, else the embedded one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autoexplain.subject import load_subject, load_tokenizer, wrap

    if name == "smollm2":
        return load_subject("smollm2", device=device)  # bf16, as the stages load it
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else load_tokenizer("smollm2")
    torch.manual_seed(0)
    if name.startswith("random:"):
        cfg = AutoConfig.from_pretrained(name.split(":", 1)[1])
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        return wrap(model.to(device).eval(), tok, name)
    # the tiny Llama of tests/conftest.py
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return wrap(LlamaForCausalLM(cfg).to(device).eval(), tok, "tiny-llama")


def before_simulator():
    """AllAtOnceSimulator as it was at BEFORE, loaded from git."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:autoexplain/simulate.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "simulate_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("simulate_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AllAtOnceSimulator


def timed(fn):
    import torch

    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_model(name: str, args) -> dict:
    from autoexplain import local_batch, pipeline
    from autoexplain.llm_local import LocalLLM
    from autoexplain.simulate import AllAtOnceSimulator

    class PerUnit(AllAtOnceSimulator):
        units_at_once = 1

    subj = subject(name, args.device, args.tokenizer)
    us = units(args.units, args.tokens, args.per_split)
    cfg = pipeline.ExplainConfig(k=args.k, max_tokens=args.max_tokens, batch_units=1)
    explain = {"per-unit": LocalLLM(subject=subj, batch_size=args.k), "cross-unit": LocalLLM(subject=subj, batch_size=args.batch)}
    pipeline.explain_stage(us[:1], explain["cross-unit"], pipeline.ExplainConfig(k=1, max_tokens=2))  # warm-up
    times: dict[str, list[float]] = {}
    tables = {}
    for _ in range(args.repeat):
        for variant, llm in explain.items():
            t, tables[variant] = timed(lambda: pipeline.explain_stage(us, llm, cfg))
            times.setdefault(f"explain {variant}", []).append(t)
    same_candidates = tables["per-unit"].column("candidates").to_pylist() == tables["cross-unit"].column("candidates").to_pylist()
    explanations = tables["cross-unit"]
    if "simulate" not in args.parts:
        best = {k: min(v) for k, v in times.items()}
        return {"model": name, "units": args.units, "k": args.k, "batch": args.batch, "prompt_bucket": local_batch.PROMPT_BUCKET,
                "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                "explain ratio": round(best["explain per-unit"] / best["explain cross-unit"], 2),
                "same candidates": same_candidates}
    sims = {**({"before": before_simulator()(subj)} if args.before else {}), "per-unit": PerUnit(subj, batch_size=args.batch),
            "cross-unit": AllAtOnceSimulator(subj, batch_size=args.batch)}
    pipeline.simulate_stage(us[:2], explanations, sims["cross-unit"])  # warm-up
    results = {}
    for _ in range(args.repeat):
        for variant, sim in sims.items():
            t, results[variant] = timed(lambda: pipeline.simulate_stage(us, explanations, sim))
            times.setdefault(f"simulate {variant}", []).append(t)
    expected = {v: [r["expected"] for r in results[v][1].to_pylist()] for v in results}
    diff = max((abs(a - b) for x, y in zip(expected["per-unit"], expected["cross-unit"]) for a, b in zip(x, y)),
               default=0.0)
    diff_before = max((abs(a - b) for x, y in zip(expected.get("before", []), expected["cross-unit"])
                       for a, b in zip(x, y)), default=None)
    best = {k: min(v) for k, v in times.items()}
    return {"model": name, "units": args.units, "k": args.k, "batch": args.batch, "prompt_bucket": local_batch.PROMPT_BUCKET,
            "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "units_per_s": {k: round(args.units / v, 3) for k, v in best.items()},
            "explain ratio": round(best["explain per-unit"] / best["explain cross-unit"], 2),
            "simulate ratio vs per-unit": round(best["simulate per-unit"] / best["simulate cross-unit"], 2),
            "simulate ratio vs before": (round(best["simulate before"] / best["simulate cross-unit"], 2)
                                         if args.before else None),
            "same candidates": same_candidates, "max |per-unit - cross-unit| expected": diff,
            "max |before - cross-unit| expected": diff_before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="rows per forward pass, cross-unit (the CPU default)")
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--tokens", type=int, default=24, help="tokens per record")
    p.add_argument("--per-split", type=int, default=4, help="records per split (train, valid, calib, test)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--parts", default="explain,simulate", help="explain alone, or explain,simulate")
    p.add_argument("--prompt-bucket", type=int, default=0,
                   help="the largest step of LocalLLM's prompt widths (0: local_batch.PROMPT_BUCKET)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default). On a machine shared with other jobs use 1: with "
                        "2 OpenMP threads on 2 busy cores one pass took 0.8 s or 10 s by the load")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded SmolLM2's)")
    p.add_argument("--no-before", dest="before", action="store_false",
                   help="skip the simulator of commit BEFORE (it is read from git, absent on a device machine)")
    args = p.parse_args()
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt_bucket:
        from autoexplain import local_batch

        local_batch.PROMPT_BUCKET = args.prompt_bucket
    for name in args.models.split(","):
        load = os.getloadavg()[0]
        result = run_model(name, args)
        result.update(device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                      threads=torch.get_num_threads(), load_1min=[round(load, 2), round(os.getloadavg()[0], 2)])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
