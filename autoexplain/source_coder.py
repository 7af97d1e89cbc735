"""A sparse coder's latents as a unit source: an SAE or transcoder read at its hook point.

Recording takes the subject's hidden states at the coder's hook point (from a forward pass that
stops once every source recorded beside it has its points) and encodes them batch by batch, so no
more than one batch of tokens x latents is held at once. Latents are non-negative: one polarity each.

A source's kind names its units' pages and tables ('L15/sae-res-16k'); its identity, which enters
the records key, is the kind plus the coder's file content, so new weights at the same path record
anew.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from autoexplain.sae import SourceSpec, load_coder, open_source, parse_source
from autoexplain.latents import SparseLatents
from autoexplain.sae_coder import CHOOSERS, SparseCoder
from autoexplain.sources import MLP, UnitSource

MLP_KIND = MLP.kind

if TYPE_CHECKING:
    import torch

    from autoexplain.subject import Subject

# Short names of hook points in a source's kind; a transcoder reads the MLP's input and writes its
# output, so its kind says 'tc' and no point.
_POINT_NAMES = {"resid_post": "res", "resid_pre": "res-pre", "mlp_out": "mlp-out", "mlp_in": "mlp-in",
                "mlp_module_out": "mlp-module-out", "mlp_module_in": "mlp-module-in"}


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def coder_kind(spec: SourceSpec, coder: SparseCoder) -> str:
    """'sae-res-16k' for a 16,384-latent residual-stream SAE, 'tc-4k' for a transcoder."""
    if spec.kind == "transcoder":
        return f"tc-{_size(coder.d_sae)}"
    return f"sae-{_POINT_NAMES[coder.hook.point]}-{_size(coder.d_sae)}"


class CoderSource(UnitSource):
    polarities, sparse = (1,), True

    def __init__(self, spec: SourceSpec, coder: SparseCoder):
        self.spec, self.coder = spec, coder.to_float32()
        self.kind = coder_kind(spec, coder)
        self.layer = coder.hook.layer

    def identity(self) -> dict:
        from autoexplain.weights import model_digest

        from autoexplain.identity import code_identity

        return {"kind": self.kind, "spec": self.spec.kind, "weights": model_digest(Path(self.coder.source)),
                "code": code_identity(CoderSource.from_captured, CoderSource.sparse_from_captured)}

    def n_units(self, subject: "Subject") -> int:
        return self.coder.d_sae

    def directions(self, subject: "Subject", layer: int) -> "torch.Tensor":
        return self.coder.W_dec  # [d_sae, d_out]: a latent's decoder row is what it writes

    def reads(self, layers: list[int]) -> list[tuple[int, str]]:
        if layers != [self.layer]:
            raise ValueError(f"{self.kind} reads layer {self.layer} only, asked for {layers}")
        return [(self.layer, self.coder.hook.point)]

    def from_captured(self, captured: dict, layers: list[int]) -> dict[int, "torch.Tensor"]:
        return {self.layer: self.coder.encode(self._hidden(captured, layers))}

    def sparse_from_captured(self, captured: dict, layers: list[int]) -> dict[int, SparseLatents]:
        """A TopK or GroupMax coder's chosen latents go straight to their entries, with no dense
        tokens x latents tensor in between; other coders' latents are scanned once for non-zeros."""
        x = self._hidden(captured, layers)
        if self.coder.architecture in CHOOSERS:
            return {self.layer: SparseLatents.from_topk(*self.coder.encode_chosen(x), self.coder.d_sae)}
        return {self.layer: SparseLatents.from_dense(self.coder.encode(x))}

    def _hidden(self, captured: dict, layers: list[int]) -> "torch.Tensor":
        (point,) = self.reads(layers)
        return captured[point]


def open_unit_source(text: str | None, model: str, layer: int | None = None) -> UnitSource:
    """The unit source a `--source` value names, checked against `model`'s config before any work:
    a coder ('sae:PATH', 'transcoder:PATH') or a registered source's kind ('mlp', the default)."""
    from autoexplain.registry import make_source

    if ":" not in (text or ""):
        return make_source(text)
    spec, coder = open_source(text, model, layer)
    return CoderSource(spec, coder)


def kind_of(text: str | None) -> str:
    """The kind of units a `--source` value names, the name its runs and pages go by: a coder's
    derived kind ('sae:PATH' -> 'sae-res-16k'), or the value itself when it is a kind already."""
    return kind_and_layer(text)[0]


def kind_and_layer(text: str | None) -> tuple[str, int | None]:
    """`kind_of`, and the layer a coder reads (None for a kind, which names no coder)."""
    from autoexplain.errors import UserError
    from autoexplain.records import KIND

    text = text or MLP_KIND
    if ":" in text:
        spec = parse_source(text)
        coder = load_coder(spec)
        return coder_kind(spec, coder), coder.hook.layer
    if not re.fullmatch(KIND, text):
        raise UserError(f"'{text}' is no unit source", "write mlp, sae:PATH, transcoder:PATH or a kind such as sae-res-16k")
    return text, None


def other_coder(out: str, layer: int, source: UnitSource, source_id: str) -> str | None:
    """The coder whose latents a local output root already holds at this layer under the same kind
    as `source` (so the same run pointer and pages), when it is another coder: another file, not
    this file's weights retrained (a rerun replaces those, as it replaces any run). None when none.
    `source_id`: the content key of `source.identity()`, as its recording's manifest names it."""
    from autoexplain.remote import is_url
    from autoexplain.storage import read_manifest, read_run

    if source.kind == MLP_KIND or is_url(out) or not Path(out).is_dir():
        return None
    run = read_run(out, layer, source.kind)
    if run is None or not Path(run["records"]["path"]).is_dir():
        return None
    params = read_manifest(run["records"]["path"])["params"]
    theirs = params.get("source_spec") or ""
    if params.get("source_id") == source_id or ":" not in theirs:
        return None
    if parse_source(theirs).path.resolve() == source.spec.path.resolve():  # parsed paths are expanded
        return None
    return theirs


def recorded_source(records_dir, model: str, layer: int, now: str | None = None) -> UnitSource:
    """The unit source a recording read, opened again (for work that reads the same units on other
    windows), or one line saying why it cannot be: a coder since moved or changed. A coder is read at
    `now` (the run's own 'sae:PATH') where given: a recording is keyed by the coder's content, so one
    reused from a run that read the same file at another path names that path, maybe gone since."""
    from autoexplain.errors import UserError
    from autoexplain.storage import content_key, read_manifest

    params = read_manifest(Path(records_dir))["params"]
    if params.get("source", MLP_KIND) == MLP_KIND:
        return MLP
    spec = now if ":" in (now or "") else params["source_spec"]
    if not parse_source(spec).path.exists():
        raise UserError(f"the coder that {records_dir} was recorded with is no longer at {parse_source(spec).path}",
                        "give the run's source as the coder where it is now ('sae:PATH' or 'transcoder:PATH')")
    source = open_unit_source(spec, model, layer)
    if content_key(source.identity()) != params["source_id"]:
        raise UserError(f"the coder at {parse_source(spec).path} is not the one {records_dir} was recorded with "
                        "(changed or another)", "record again with the coder as it is now")
    return source
