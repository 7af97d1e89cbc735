"""How a parameter is named to the user who set it: a CLI flag, or a flow (deployment) parameter.

Its own module, with nothing heavy in it, so that the readers whose errors name a parameter (the
preflight, the corpus) spell it the same way without importing each other.
"""

from __future__ import annotations

from typing import Callable

Spelling = Callable[[str], str]
# The CLI flags whose name is not the parameter's own with dashes.
_FLAGS = {"n_random": "--random", "n_boot": "--bootstrap", "top_k": "--top-k", "quantile_per_bin": "--per-quantile"}


def flow_name(name: str) -> str:
    return f"parameter {name}"


def cli_flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))
