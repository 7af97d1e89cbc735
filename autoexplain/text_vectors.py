"""Explanation texts embedded once per explanations output and kept beside the outputs.

Re-simulating the same explanations (a simulator-prompt edit, the nightly rescore) then embeds
nothing and recomputes nothing of a text that the prompt cannot change: a simulator that
`uses_text_vectors` returns from `warm` what it would otherwise compute again (the embedding
simulator: each text's vector, and its cosines' mean and sd against the background), and takes it
back through `add_texts`. Each value is a function of its text, the encoding and the simulator's
fixed background alone, so what is loaded has the very bits a fresh computation would have.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from autoexplain import files, layout
from autoexplain.storage import content_key


def use_text_vectors(explanations: pa.Table, out, sim) -> None:
    if not sim.uses_text_vectors:
        return
    texts = explanation_texts(explanations)
    if not texts:
        return
    name = content_key({"embedder": sim.embedder, "encoding": sim.encoding, "texts": texts})
    path = layout.memo(out, "text_vectors") / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            if sim.add_texts(**{k: saved[k] for k in saved.files}):
                return
    kept = sim.warm(texts)  # none kept, or kept by an older version or for another background
    with files.replacing(path, ".npz") as tmp:
        np.savez(tmp, **{k: np.array(v, dtype=str) if isinstance(v, (list, str)) else v for k, v in kept.items()})


def explanation_texts(explanations: pa.Table) -> list[str]:
    """Every text an explanations output gives its units (each candidate, else the text), sorted."""
    return sorted({t for c, t in zip(explanations.column("candidates").to_pylist(),
                                     explanations.column("text").to_pylist()) for t in (c or [t])})
