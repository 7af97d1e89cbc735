"""Unit and layer lists as users write them: '0-99', '3,7,9', 'all'.

One reader for both, light to import (the preflight checks these specs before anything heavy loads),
so units and layers refuse alike and name what they read.
"""

from __future__ import annotations

import re

from autoexplain.errors import UserError

_PART = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")  # one entry of a list: 7 or 3-9


def parse_units(spec: str | None, n_units: int | None = None) -> list[int] | None:
    """'0-99', '3,7,9' or 'all'/None (every unit: None when the layer size is not known)."""
    if spec is None or spec == "all":
        return None if n_units is None else list(range(n_units))
    if not str(spec).strip():  # an unset shell variable, most likely: not a request for every unit
        raise UserError(f"'{spec}' names no unit", "pass units like 0-99 or 3,7, or 'all' (or leave them out) for every unit")
    return parse_indices(spec, n_units, "unit", "0-99")


def parse_indices(spec, limit: int | None, noun: str, example: str) -> list[int]:
    """Indices from a spec like '0-99' or '3,7,9', sorted and unique: the one reader of unit and
    layer lists, so both refuse alike and name what they read (`noun`, with a range `example`)."""
    indices: list[int] = []
    for part in str(spec).split(","):
        # A number or FROM-TO, whole: '0-' (an unfinished range) is not 0, and '0--3' is no range
        # (no index is negative).
        m = _PART.fullmatch(part)
        if not m:
            raise UserError(f"cannot read {noun}s '{spec}': '{part.strip()}' is neither a {noun} nor a range FROM-TO",
                            f"use a range like {example}, a list like 3,7, or 'all' ({noun}s count from 0)")
        a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if b < a:
            raise UserError(f"the {noun} range '{part.strip()}' runs backwards", f"write it as {b}-{a}")
        indices += list(range(a, b + 1))
    bad = [i for i in indices if i < 0 or (limit is not None and i >= limit)]
    if bad:
        held = f"0..{limit - 1}" if limit is not None else "0 and up"
        raise UserError(f"{noun} {bad[0]} is out of range: the {'model' if noun == 'layer' else 'layer'} has {noun}s {held}",
                        f"pass {noun}s in range")
    return sorted(set(indices))
