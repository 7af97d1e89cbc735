"""The orthographic channel's gates (see `autoexplain.embedding`): the surface classes'
descriptions, read from the embedding simulator's prompt file, and each explanation's z-score
against each description, kept only for the classes within ORTHO_MARGIN of its best match.

The prompt reaches an explanation's simulations through these gates alone (`prompt_dependence`).
"""

from __future__ import annotations

import json

import numpy as np

from autoexplain.errors import UserError
from autoexplain.exact import cosines, fixed_mean_std
from autoexplain.surface import ORTHO_CLASSES

PROMPT_FILE = "embedding_simulator.json"
ORTHO_MARGIN = 2.0


def load_prompt() -> tuple[list[str], list[str]]:
    """(class descriptions in ORTHO_CLASSES order, competitor descriptions) from the prompt file."""
    from autoexplain.explain import read_prompt

    data = json.loads(read_prompt(PROMPT_FILE))
    classes = data.get("classes", {})
    missing = [c for c in ORTHO_CLASSES if not str(classes.get(c, "")).strip()]
    if missing:
        raise UserError(f"{PROMPT_FILE} has no description for {', '.join(missing)}",
                        f"give every class of {', '.join(ORTHO_CLASSES)} a description under 'classes'")
    return [classes[c] for c in ORTHO_CLASSES], [str(c) for c in data.get("competitors", [])]


def background_stats(background: np.ndarray, F: np.ndarray) -> list[tuple[float, float]]:
    """Each text's (columns of F) cosines with the background words: their mean and sd. The
    prompt cannot change them, and a column's do not depend on the others'."""
    mu, sd = fixed_mean_std(cosines(background, F))
    return list(zip(mu.tolist(), sd.tolist()))


def gates(descriptions: np.ndarray, F: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """(classes + 1, n): each text's class z-scores (its `background_stats`, (n, 2), set the scale),
    kept only within the margin of its best; the last row (no class) -inf."""
    z_desc = (cosines(descriptions, F) - stats[:, 0]) / (stats[:, 1] + 1e-6)
    k = len(ORTHO_CLASSES)
    z_ortho = np.where(z_desc[:k] >= z_desc.max(0) - ORTHO_MARGIN, z_desc[:k], -np.inf)
    return np.concatenate([z_ortho, np.full((1, F.shape[1]), -np.inf)])
