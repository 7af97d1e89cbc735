"""Unit sources: what a layer's explainable units are, and how recording reads their activations.

A source has a `kind` (the registry's name for it, and the '<kind>' of every `UnitId.source` it
yields, 'L<layer>/<kind>'), the polarities each of its directions is read with, and two calls:
- `n_units(subject)`: how many directions a layer of this subject has;
- `reads(layers)`: the points of the subject's forward pass those layers' units are computed from,
  and `from_captured(captured, layers)`: per layer, a (batch, tokens, n_units) tensor of the
  directions' activations, which recording ranks into top, quantile and random windows. Recording
  captures every source's points in one pass (`Subject.capture`) and hands each source its own.
A `sparse` source is recorded from `sparse_activations` instead: the same activations as their
non-zero entries (`latents.SparseLatents`), by default found in the dense tensor.

Today's one source is `mlp`: a layer's MLP hidden neurons (the input of its down projection), read
both ways because gated MLPs fire both ways. A sparse coder's latents (`source_coder`, '--source
sae:PATH') are the other: one polarity, a kind derived from the coder ('sae-res-16k'). A source
that needs no path is a `UnitSource` subclass plus one line in `registry._source_classes`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Iterable

from autoexplain.records import UnitId

if TYPE_CHECKING:
    import torch

    from autoexplain.latents import SparseLatents
    from autoexplain.subject import Subject


class UnitSource(ABC):
    kind: ClassVar[str] = ""
    # Each direction gives one unit per polarity; a source whose activations are one-signed (ReLU
    # latents) reads them only as +1.
    polarities: ClassVar[tuple[int, ...]] = (1,)
    # Mostly zeros and never negative (a sparse coder's latents): recording keeps only non-zeros.
    sparse: ClassVar[bool] = False

    def source(self, layer: int) -> str:
        """The `UnitId.source` of this layer's units."""
        return f"L{layer}/{self.kind}"

    def identity(self) -> object:
        """What recorded activations depend on besides the subject and corpus (in the records key)."""
        return self.kind

    def unit_ids(self, layer: int, indices: Iterable[int]) -> list[UnitId]:
        """Every unit of these directions, each polarity in turn."""
        source = self.source(layer)
        return [UnitId(source, i, p) for i in indices for p in self.polarities]

    @abstractmethod
    def n_units(self, subject: "Subject") -> int:
        ...

    @abstractmethod
    def reads(self, layers: list[int]) -> list[tuple[int, str]]:
        """The (layer, point)s of the subject's pass these layers' activations are computed from
        (`Subject.capture`): one pass can then serve several sources."""

    @abstractmethod
    def from_captured(self, captured: dict, layers: list[int]) -> dict[int, "torch.Tensor"]:
        """Per layer, the (batch, tokens, n_units) activations, from what a pass captured at `reads`."""

    def sparse_from_captured(self, captured: dict, layers: list[int]) -> dict[int, "SparseLatents"]:
        """`from_captured` as its non-zero entries, what recording reads from a `sparse` source; a
        source that can name its non-zeros without a dense tensor (a TopK coder) says so here."""
        from autoexplain.latents import SparseLatents

        return {L: SparseLatents.from_dense(a) for L, a in self.from_captured(captured, layers).items()}

    def activations(self, subject: "Subject", input_ids: "torch.Tensor", layers: list[int]) -> dict[int, "torch.Tensor"]:
        return self.from_captured(subject.capture(input_ids, self.reads(layers)), layers)

    def sparse_activations(self, subject: "Subject", input_ids: "torch.Tensor",
                           layers: list[int]) -> dict[int, "SparseLatents"]:
        return self.sparse_from_captured(subject.capture(input_ids, self.reads(layers)), layers)

    @abstractmethod
    def directions(self, subject: "Subject", layer: int) -> "torch.Tensor":
        """What each unit writes to the residual stream per unit of activation: [n_units, d_model]."""


class MlpSource(UnitSource):
    """A layer's MLP hidden neurons, both polarities."""

    kind = "mlp"
    polarities = (1, -1)

    def n_units(self, subject: "Subject") -> int:
        return subject.n_units

    def reads(self, layers: list[int]) -> list[tuple[int, str]]:
        from autoexplain.subject import UNITS

        return [(layer, UNITS) for layer in layers]

    def from_captured(self, captured: dict, layers: list[int]) -> dict[int, "torch.Tensor"]:
        from autoexplain.subject import UNITS

        return {layer: captured[(layer, UNITS)] for layer in layers}

    def directions(self, subject: "Subject", layer: int) -> "torch.Tensor":
        from autoexplain.output_side import neuron_directions

        return neuron_directions(subject.projections[layer])


MLP = MlpSource()


def polarities_of(kind: str) -> tuple[int, ...]:
    """The polarities a source of this kind records: both for the MLP's neurons, +1 for the rest
    (latents of sparse coders are non-negative)."""
    return MlpSource.polarities if kind == MlpSource.kind else (1,)
