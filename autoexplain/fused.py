"""A fused forward pass for Llama-style subjects, used when recording.

Recording is bound by the subject's forward pass. Hugging Face's Llama code runs q, k and v, and
gate and up, as separate matrix products, widens every RMSNorm to float32 with half a dozen passes
over the hidden state, recomputes the rotary tables on every call and adds residuals as separate
passes. On a 2-core CPU the products run near the bf16 GEMM rate, but the rest costs about a quarter
of the pass. This module computes the same neurons from the same weights with fewer, larger steps:

- q|k|v and gate|up are each one product against a concatenated weight;
- each RMSNorm weight is folded into the product that follows it (W @ (w * x) == (W * w) @ x);
- the residual adds ride on the output products (`addmm_` into the residual);
- RMSNorm runs in a reused float32 buffer (widen, norm per row, scale, round), and the attention's
  mask and scaling ride on the score product;
- every intermediate is written into buffers reused across layers and batches, which page faults
  in freshly allocated memory made cost about a tenth of the pass;
- rotary tables come from the model's own rotary module once per window length, and q and k are
  rotated together;
- grouped-query attention reads each key-value head once for its group of query heads.

It is used only for configurations whose computation it reproduces (see `supports`); every other
model takes the hooked Hugging Face pass. A test checks the two against each other in float32
(equal to rounding) and bf16 (equal within bf16 rounding).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a Llama-style decoder this pass reproduces exactly."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    # Sliding-window attention would mask what plain causal attention sees.
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return False
    block = layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(block, n) for n in needed):
        return False
    attn, mlp = block.self_attn, block.mlp
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) and \
        all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


class _Block:
    """One decoder layer's weights, rearranged for the fused pass."""

    def __init__(self, layer, cfg):
        attn, mlp = layer.self_attn, layer.mlp
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.q_proj.weight.shape[0] // self.n_heads
        self.scaling = attn.scaling
        self.eps1 = layer.input_layernorm.variance_epsilon
        self.eps2 = layer.post_attention_layernorm.variance_epsilon
        w1, w2 = layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()
        self.norm2_weight = layer.post_attention_layernorm.weight  # what the MLP's input is scaled by
        dtype = attn.q_proj.weight.dtype
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).float() * w1
        self.w_qkv = qkv.to(dtype).t()  # (hidden, q+k+v): a transposed view is what mm wants
        self.b_qkv = _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj)
        self.w_o, self.b_o = attn.o_proj.weight.t(), attn.o_proj.bias
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float() * w2
        self.w_gu = gate_up.to(dtype).t()
        self.b_gu = _cat_bias(mlp.gate_proj, mlp.up_proj)
        self.w_down, self.b_down = mlp.down_proj.weight.t(), mlp.down_proj.bias
        self.n_units = mlp.gate_proj.weight.shape[0]


def _cat_bias(*linears):
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
                      for b, m in zip(biases, linears)])


class _Buffers(threading.local):
    """Scratch tensors reused by every layer and batch of one shape, one set per thread.

    A batch allocates about 100 MB of intermediates; glibc gives blocks that large back to the
    kernel when they are freed (unmapped, or trimmed off the heap), so each batch faulted them in
    again (17-30k minor faults and 27-63 ms of system time per 2,048-token batch on a 2-core EPYC,
    about a tenth of the pass). Writing into the same buffers (`out=`) keeps them mapped; nothing a
    caller keeps points into them."""

    def get(self, name: str, shape: tuple, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The buffer `name`, of `shape`, on like's device, in `dtype` (like's by default)."""
        dtype = dtype or like.dtype
        held = self.__dict__.get(name)
        if held is None or held.shape != shape or held.dtype != dtype or held.device != like.device:
            held = self.__dict__[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return held


def _normed(h: torch.Tensor, eps: float, out: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight (folded into the next product), computed in float32 in `wide` and
    rounded once into `out`, as HF's explicit upcast does. `F.rms_norm` makes six passes on CPU
    (pow, mean, add, rsqrt, mul, cast) and allocates each: 2.5 against 0.2 ms for a (2048, 576)
    bf16 batch on a 2-core EPYC. A bf16 `h` times a float32 factor would widen h into new memory."""
    wide.copy_(h)
    inv = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
    inv.square_().div_(h.shape[-1]).add_(eps).rsqrt_()
    return out.copy_(wide.mul_(inv))


def _linear(x: torch.Tensor, w_t: torch.Tensor, bias, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t (+ bias) on 2-D rows, into `out` (None: a new tensor)."""
    return torch.mm(x, w_t, out=out) if bias is None else torch.addmm(bias, x, w_t, out=out)


def _add_product(h: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, bias) -> torch.Tensor:
    """The residual add riding on the output product: h += x @ w_t (+ bias), in place."""
    h.addmm_(x, w_t)
    return h if bias is None else h.add_(bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, x * cos + rotate_half(x) * sin, without building rotate_half(x)."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _attention(q, k, v, scaling: float, mask: torch.Tensor, bufs: _Buffers) -> torch.Tensor:
    """Causal attention over (B, T, heads, D) inputs, as (B*T, H*D) rows for the output product.

    Query heads that share a key-value head are stacked along the query axis, so K and V are read
    once per group, never copied per head; `mask` is the causal mask stacked the same way, (G*T, T),
    in the scores' dtype. The mask and the scaling ride on the score product (baddbmm), and the
    softmax reads bf16 and computes in float32 inside its kernel, as HF's float32 softmax does: the
    same probabilities without four passes of casts, scaling and masking (0.6 against 1.25 ms a
    layer for 32 windows of 64 tokens). For such short windows this is about 1.3x faster on CPU than
    SDPA's flash kernel, whose tiling is built for long sequences."""
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    heads = bufs.get("q", (B, H, T, D), q).copy_(q.permute(0, 2, 1, 3)).view(B * K, G * T, D)
    keys = bufs.get("k", (B, K, D, T), k).copy_(k.permute(0, 2, 3, 1)).view(B * K, D, T)
    values = bufs.get("v", (B, K, T, D), v).copy_(v.permute(0, 2, 1, 3)).view(B * K, T, D)
    scores = torch.baddbmm(mask.expand(B * K, -1, -1), heads, keys, alpha=scaling,
                           out=bufs.get("scores", (B * K, G * T, T), q))
    probs = torch.softmax(scores, dim=-1, out=bufs.get("probs", scores.shape, q))
    mixed = torch.bmm(probs, values, out=bufs.get("mixed", (B * K, G * T, D), q))
    rows = bufs.get("attn", (B, T, H, D), q).copy_(mixed.view(B, H, T, D).transpose(1, 2))
    return rows.view(B * T, H * D)


class FusedLlama:
    """The truncated forward pass of a Llama-style model, returning MLP hidden units per layer."""

    def __init__(self, model: torch.nn.Module):
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self._layers, self._blocks = inner.layers, {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._bufs = _Buffers()

    def block(self, i: int) -> _Block:
        """Layer i's rearranged weights, made on first use: a pass up to layer 15 of 30 copies half."""
        if i not in self._blocks:
            self._blocks[i] = _Block(self._layers[i], self.model.config)
        return self._blocks[i]

    def _rotary(self, h: torch.Tensor, T: int, groups: int):
        """Per window length: the rotary tables, and the causal mask stacked for `groups` query
        heads per key-value head."""
        key = (T, groups, h.dtype, h.device)
        if key not in self._tables:
            positions = torch.arange(T, device=h.device)[None]
            cos, sin = self.rotary(h[:1, :T], positions)  # (1, T, D), already in h's dtype
            mask = torch.full((T, T), float("-inf"), device=h.device, dtype=h.dtype).triu_(1)
            # cos and sin broadcast over heads
            self._tables[key] = (cos[0, :, None, :], sin[0, :, None, :], mask.repeat(groups, 1))
        return self._tables[key]

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor, points) -> dict[tuple[int, str], torch.Tensor]:
        """`Subject.capture`: the tensors at (layer, point)s, 'units' (a layer's MLP hidden units)
        or a hidden-state point of `sae_coder.POINTS` (as `autoexplain.hooked` reads it), from one
        pass that stops once it has them all."""
        wanted, out = set(points), {}

        def take(i: int, point: str, x: torch.Tensor) -> bool:
            if (i, point) in wanted:
                # a copy: x is a scratch buffer, or the residual that later layers add into
                out[(i, point)] = x.reshape(*input_ids.shape, -1).clone(memory_format=torch.contiguous_format)
            return len(out) == len(wanted)

        self._forward(input_ids, wanted, take)
        return out

    def _forward(self, input_ids: torch.Tensor, wanted: set, take) -> None:
        """Blocks up to the highest wanted layer, offering each point's tensor to `take(layer,
        point, x)`, which returns True to stop the pass there (nothing above it is computed). The
        normed MLP input and the MLP's output alone cost a product each: made only where wanted."""
        B, T = input_ids.shape
        bufs = self._bufs
        h = self.embed(input_ids).reshape(B * T, -1)  # this batch's own: the residual adds go into it
        first = self.block(0)
        cos, sin, mask = self._rotary(h.view(B, T, -1), T, first.n_heads // first.n_kv)
        for i in range(max(layer for layer, _ in wanted) + 1):
            blk = self.block(i)
            if take(i, "resid_pre", h):
                return
            H, K, D = blk.n_heads, blk.n_kv, blk.head_dim
            wide = bufs.get("wide", h.shape, h, torch.float32)
            normed = _normed(h, blk.eps1, bufs.get("normed", h.shape, h), wide)
            qkv = _linear(normed, blk.w_qkv, blk.b_qkv, bufs.get("qkv", (B * T, (H + 2 * K) * D), h))
            qkv = qkv.view(B, T, H + 2 * K, D)
            qk = _rotate(qkv[:, :, : H + K], cos, sin, bufs.get("qk", (B, T, H + K, D), h))
            attn = _attention(qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + K :], blk.scaling, mask, bufs)
            _add_product(h, attn, blk.w_o, blk.b_o)
            normed = _normed(h, blk.eps2, normed, wide)  # x / rms, the norm's weight being folded into w_gu
            if take(i, "mlp_in", normed):
                return
            if (i, "mlp_module_in") in wanted and take(i, "mlp_module_in", normed * blk.norm2_weight):
                return
            gu = _linear(normed, blk.w_gu, blk.b_gu, bufs.get("gu", (B * T, 2 * blk.n_units), h))
            units = F.silu(gu[:, : blk.n_units], inplace=True).mul_(gu[:, blk.n_units :])
            if take(i, "units", units):
                return
            outs = [p for p in ("mlp_out", "mlp_module_out") if (i, p) in wanted]
            if outs:  # these models have no post-MLP norm: what the module returns is what it adds
                mlp_out = _linear(units, blk.w_down, blk.b_down)
                if any([take(i, p, mlp_out) for p in outs]):
                    return
            _add_product(h, units, blk.w_down, blk.b_down)
            if take(i, "resid_post", h):
                return
