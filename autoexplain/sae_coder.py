"""A sparse coder (SAE or transcoder) held as plain tensors, whatever format it came from, and its
encoding into latents.

Every reader in `autoexplain.sae_formats` brings its checkpoint to one layout, `W_enc [d_in, d_sae]`
and `W_dec [d_sae, d_out]`, so the formula below is written once. Encoding runs in float32
whatever the checkpoint's dtype: latents feed top-k selection and quantiles, where bf16 rounding
reorders near-ties between windows.

Hook points (`POINTS`) are where a coder reads in layer L, exactly as `autoexplain.hooked` says:
`resid_pre` and `resid_post` are the input and output of `layers[L]`; `mlp_in` and `mlp_out` mean
what TransformerLens's `ln2.hook_normalized` and `hook_mlp_out` mean (the normalised MLP input
before the norm's gain; what the MLP adds to the stream, after any post-MLP norm); `mlp_module_in`
and `mlp_module_out` are the input and output of the `layers[L].mlp` module itself, where sparsify
hooks. They differ where a norm has a gain other than 1 or a model norms the MLP's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from autoexplain.errors import UserError

POINTS = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "mlp_module_in", "mlp_module_out")
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "groupmax")
CHOOSERS = ("topk", "groupmax")  # architectures that pick k latents per token
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

# TransformerLens hook names (what SAELens configs carry) and the point each one reads.
# `mlp.hook_in`/`mlp.hook_out` are the hooks circuit-tracer adds around TransformerLens's MLP in a
# model loaded with fold_ln=False: the MLP's input with the norm's gain, its output before any
# post-MLP norm, i.e. the Hugging Face MLP module's own input and output.
_TL_POINTS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_in": "mlp_module_in",
    "mlp.hook_out": "mlp_module_out",
}
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    point: str  # one of POINTS

    def __str__(self) -> str:
        return f"layer {self.layer} {self.point}"


def parse_tl_hook(name: str, where: str) -> HookPoint:
    """A TransformerLens hook name as (layer, point); `where` names the file for the error."""
    m = _TL_NAME.match(name or "")
    if not m or m.group(2) not in _TL_POINTS:
        raise UserError(
            f"hook point '{name}' in {where} is not one autoexplain can read from a Hugging Face model",
            "use an SAE on blocks.L.hook_resid_pre, hook_resid_post, hook_mlp_out, mlp.hook_out, or a transcoder "
            "on blocks.L.ln2.hook_normalized / blocks.L.mlp.hook_in",
        )
    return HookPoint(int(m.group(1)), _TL_POINTS[m.group(2)])


@dataclass
class SparseCoder:
    """Weights in one layout plus what the encoder needs to know; `hook` is None when the
    checkpoint does not say where it reads (a bare GemmaScope params.npz outside its folder tree)."""

    source: str  # the path it was read from, for messages
    format: str  # saelens | sparsify | gemmascope
    architecture: str  # one of ARCHITECTURES
    transcoder: bool
    hook: HookPoint | None
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]; gated coders use b_gate and b_mag instead and keep zeros here
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    subtract_b_dec: bool = False
    k: int | None = None
    threshold: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_mag: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    normalize: str = "none"
    rescale_by_decoder_norm: bool = False
    model_name: str | None = None  # the model it was trained on, as its config names it (None: it does not)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    def check(self) -> "SparseCoder":
        """Shapes and settings that agree with each other, or one line saying which do not."""
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"{self.source}: unknown architecture '{self.architecture}'",
                            f"autoexplain reads {', '.join(ARCHITECTURES)}")
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"{self.source}: unknown normalize_activations '{self.normalize}'",
                            f"autoexplain reads {', '.join(NORMALIZATIONS)}")
        d_in, d_sae = self.W_enc.shape
        expected = {"W_dec": (d_sae, None), "b_enc": (d_sae,), "threshold": (d_sae,), "b_gate": (d_sae,),
                    "b_mag": (d_sae,), "r_mag": (d_sae,), "b_dec": (self.W_dec.shape[-1],)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is None:
                continue
            if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
                want = "x".join("*" if s is None else str(s) for s in shape)
                raise UserError(f"{self.source}: tensor {name} has shape {list(t.shape)}, expected [{want}] "
                                f"for W_enc [{d_in}, {d_sae}]", "the checkpoint is damaged or not in the format its files suggest")
        if self.subtract_b_dec and self.d_out != d_in:
            raise UserError(f"{self.source}: b_dec is subtracted from the input but has width {self.d_out}, not d_in {d_in}",
                            "set apply_b_dec_to_input false for a transcoder")
        needs = {"topk": ("k", self.k), "groupmax": ("k", self.k), "jumprelu": ("threshold", self.threshold),
                 "gated": ("b_gate, b_mag and r_mag", self.b_gate if self.b_mag is not None and self.r_mag is not None else None)}
        if self.architecture in needs and needs[self.architecture][1] is None:
            raise UserError(f"{self.source}: a {self.architecture} coder without {needs[self.architecture][0]}",
                            "the checkpoint is incomplete")
        if self.k is not None and not 0 < self.k <= d_sae:
            raise UserError(f"{self.source}: k = {self.k} is outside 1..{d_sae}", "fix k in its config")
        if self.architecture == "groupmax" and d_sae % self.k:
            raise UserError(f"{self.source}: groupmax needs k to divide the {d_sae} latents, k = {self.k}", "fix k in its config")
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] of activations x [..., d_in] taken at `hook`."""
        if self.architecture in CHOOSERS:
            indices, values = self.encode_chosen(x)
            out = torch.zeros((*indices.shape[:-1], self.d_sae), dtype=values.dtype, device=values.device)
            return out.scatter_(-1, indices, values)
        x = self._input(x)
        if self.architecture == "gated":
            gate = x @ self.W_enc + self.b_gate
            magnitude = torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return (gate > 0).to(magnitude.dtype) * magnitude
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        return torch.relu(pre)

    @torch.no_grad()
    def encode_chosen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a coder that chooses k latents per token (`CHOOSERS`): their indices and values
        [..., k], every other latent being 0; `encode` is these scattered into d_sae zeros."""
        pre = self._input(x) @ self.W_enc + self.b_enc
        if self.rescale_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return top.indices, top.values.relu()
        # groupmax: one winner per contiguous block of d_sae / k latents.
        best = pre.relu().unflatten(-1, (self.k, -1)).max(dim=-1)
        group = self.d_sae // self.k  # latents per block
        return best.indices + torch.arange(0, self.d_sae, group, device=pre.device), best.values

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.device, torch.float32)
        if self.normalize == "constant_norm_rescale":
            x = x * (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
        elif self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        # expected_average_only_in: the scale is folded into the weights when SAELens saves, so
        # the stored encoder already expects raw activations.
        if self.subtract_b_dec:
            x = x - self.b_dec
        return x

    def to_float32(self) -> "SparseCoder":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().to(torch.float32))
        return self
