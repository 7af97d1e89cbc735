"""The typed records that flow between stages.

A *unit* is one direction of a layer read with one polarity: its `UnitId` is (source, index,
polarity). The source names what the index counts in, as 'L<layer>/<kind>': 'L3/mlp' for layer 3's
MLP hidden neurons (the `mlp` unit source, `sources`), and later, say, 'L3/sae' for a sparse
autoencoder's latents on that layer. Gated MLPs fire both ways, so neuron 7 of layer 3 gives two
explainable units, ('L3/mlp', 7, +1) and ('L3/mlp', 7, -1); a negative-polarity unit's activations
are stored negated so that "higher means firing" holds everywhere downstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SPLITS = ("train", "calib", "valid", "test")
# Each split's share of a unit's top windows (a quarter each: a recording takes them from each split's
# own documents, `splits`); planted units deal them in this order, round and round (OpenAI's stride 4).
TOP_DEAL = SPLITS
# Random windows never reach the explainer.
RANDOM_DEAL = ("calib", "valid", "test")
KINDS = ("top", "quantile", "random")
# Quantile bins of per-window max activation, as in the reference.
QUANTILE_BINS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999))
# The kinds that simulations are scored on (quantile windows are only shown to the explainer), and
# the splits that the chosen explanation is simulated on: calib fits the calibration, test reports.
SCORED_KINDS = ("top", "random")
HELD_OUT = ("calib", "test")


@dataclass(frozen=True, order=True)
class UnitId:
    source: str  # 'L<layer>/<kind>', e.g. 'L15/mlp'
    index: int
    polarity: int = 1  # +1 or -1

    def __post_init__(self):
        if self.polarity not in (1, -1):
            raise ValueError(f"polarity must be +1 or -1, got {self.polarity}")
        if not _SOURCE.fullmatch(self.source):
            raise ValueError(f"a unit source reads 'L<layer>/<kind>' (e.g. 'L15/mlp'), got {self.source!r}")

    @classmethod
    def mlp(cls, layer: int, index: int, polarity: int = 1) -> "UnitId":
        """Neuron `index` of layer `layer`'s MLP."""
        return cls(f"L{layer}/mlp", index, polarity)

    @property
    def layer(self) -> int:
        return int(_SOURCE.fullmatch(self.source).group(1))

    @property
    def kind(self) -> str:
        """The unit source's kind ('mlp')."""
        return _SOURCE.fullmatch(self.source).group(2)

    def __str__(self) -> str:
        return f"{self.source}/{self.index}{'+' if self.polarity > 0 else '-'}"


KIND = r"[a-z][a-z0-9_-]*"  # a unit source's kind, as it appears in names and paths
_SOURCE = re.compile(rf"L(\d+)/({KIND})")


@dataclass
class ActivationRecord:
    """One window of text with one unit's activation on each of its tokens."""

    tokens: list[str]
    activations: list[float]
    window_id: int = -1
    kind: str = "top"
    split: str = "train"
    quantile_bin: int | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations) if self.activations else 0.0


@dataclass
class UnitStats:
    mean: float
    std: float
    max: float
    frac_active: float
    skewness: float = float("nan")
    kurtosis: float = float("nan")
    hist_edges: list[float] = field(default_factory=list)
    hist_counts: list[int] = field(default_factory=list)
    # What it writes (`output_side.OUTPUT_COLUMNS`): the tokens its output direction promotes and
    # suppresses most, their logits, and the same with the final norm; None before the output side.
    promotes: list[str] | None = None
    promotes_logits: list[float] | None = None
    suppresses: list[str] | None = None
    suppresses_logits: list[float] | None = None
    promotes_normed: list[str] | None = None
    suppresses_normed: list[str] | None = None


@dataclass
class UnitRecords:
    """Everything recorded for one unit: the input to explanation and scoring."""

    id: UnitId
    records: list[ActivationRecord]
    stats: UnitStats | None = None

    def select(self, *, split: str | None = None, kind: str | None = None) -> list[ActivationRecord]:
        return [
            r
            for r in self.records
            if (split is None or r.split == split) and (kind is None or r.kind == kind)
        ]


def held_out(records: "list[ActivationRecord]") -> "list[ActivationRecord]":
    """The records an explanation is simulated and scored on, in their order."""
    return [r for r in records if r.kind in SCORED_KINDS and r.split in HELD_OUT]


# What the explain and simulate stages return per unit and per record (the component interfaces in
# `components` name them, so they live here with the other records, not in the stages' modules).


@dataclass
class Explanation:
    text: str
    candidates: list[str] = field(default_factory=list)
    prompt_hash: str = ""
    explainer: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failure: str | None = None  # why no candidate came back (the LLM's retries ran out)
    cached_tokens: int = 0  # prompt tokens served from the provider's prefix cache (billed less)


@dataclass
class Simulation:
    """A simulator's prediction for one record."""

    expected: list[float] | None  # one value per subject token; None when the simulation failed
    failure: str | None = None  # why it failed (parse error, missing digits, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def share(self, total, n: int, i: int) -> None:
        """Take record i's share of the tokens of a request that carried n records (`total`: a
        reply's prompt, completion and cached counts)."""
        part = lambda count: count // n + (i < count % n)  # noqa: E731 - the remainder goes to the first
        self.prompt_tokens += part(total.prompt_tokens)
        self.completion_tokens += part(getattr(total, "completion_tokens", 0))
        self.cached_tokens += part(total.cached_tokens)

    @property
    def ok(self) -> bool:
        return self.expected is not None
