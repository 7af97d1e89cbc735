"""How long the preflight's corpus check takes on a folder of many files, beside reading them whole.

    python bench/corpus_check_bench.py                    # 20,000 files of about 2 KB
    python bench/corpus_check_bench.py --files 2000 --kb 200

`corpus.check_head` reads the start of each file (what `load_documents` would refuse: an empty
folder, a file that is no UTF-8, a JSONL row without the text field) before any model is loaded;
`load_documents` reads every byte. The ratio of the two, in one process on the same files, is the
figure to compare across machines; the check's absolute time is what a user waits for a bad corpus.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from autoexplain.corpus import check_head, load_documents

WORDS = "the quick brown fox jumps over the lazy dog while seven ravens count the ships at sea".split()


def write_corpus(folder: Path, files: int, kb: int) -> None:
    line = " ".join(WORDS) + "\n"
    body = line * max(1, kb * 1024 // len(line))
    for i in range(files):
        (folder / f"doc_{i:06d}.txt").write_text(f"document {i}\n" + body)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--kb", type=int, default=2, help="size of each file")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_corpus(folder, args.files, args.kb)
        check = best_of(args.runs, lambda: check_head(str(folder)))
        read = best_of(args.runs, lambda: load_documents(str(folder), max_docs=args.files + 1))
    print(f"{args.files:,} files of {args.kb} KB: check_head {check:.2f} s, load_documents {read:.2f} s "
          f"(check / read = {check / read:.2f}; best of {args.runs})")


if __name__ == "__main__":
    main()
