"""Where a coder's hook name reads in a Hugging Face model, checked on tiny models whose norms have
gains other than 1 (random in [0.5, 2]): with unit gains a norm's output equals its normalised
input, and reading one for the other went unseen.

The expected tensors are computed here with plain torch from hooks on the Hugging Face modules:
TransformerLens's `ln2.hook_normalized` is the norm's input over its RMS (centred first for
LayerNorm), before the gain; sparsify's `layers.L.mlp` is the `mlp` module's own input and output;
`hook_mlp_out` is what the MLP adds to the residual stream, after Gemma 2's post-MLP norm.
"""

from __future__ import annotations

import pytest
import torch

from autoexplain.sae import load_coder, parse_source
from autoexplain.subject import wrap
from tests.test_sae import cfg_6x, write_saelens, write_sparsify

D, LATENTS = 32, 40


def _coder(tmp_path, kind: str, fmt: str, hook: str):
    """A coder of width D reading `hook` (a TransformerLens name, or a sparsify folder name)."""
    g = torch.Generator().manual_seed(7)
    t = {"W_enc": torch.randn(D, LATENTS, generator=g), "W_dec": torch.randn(LATENTS, D, generator=g),
         "b_dec": torch.randn(D, generator=g) * 0.1, "b_enc": torch.randn(LATENTS, generator=g) * 0.1}
    transcoder = kind == "transcoder"
    if fmt == "sparsify":
        folder = write_sparsify(tmp_path / f"{kind}-run" / hook, t, k=4, transcode=transcoder)
    else:
        arch = "transcoder" if transcoder else "standard"
        folder = write_saelens(tmp_path / f"{kind}-{hook}", dict(cfg_6x(arch, hook), d_in=D, d_sae=LATENTS, d_out=D), t)
    return load_coder(parse_source(f"{kind}:{folder}"))


def _gains(norms, gemma: bool = False) -> None:
    """Gains uniform in [0.5, 2]; Gemma's RMSNorm scales by (1 + weight)."""
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 2.0)
            if gemma:
                norm.weight.sub_(1.0)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0, 0.5)


def _seen(model, ids, **modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each named module in a plain forward pass."""
    seen, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(
            lambda _m, args, out, name=name: seen.__setitem__(name, (args[0].detach().clone(), out.detach().clone()))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def _rms_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _passes(subject, ids, hook):
    """The hidden states at `hook` from the fused pass (where the model has one) and the hooked one."""
    passes = {"hooked": subject.hidden_states(ids, hook, hooked=True)}
    if subject.fused is not None:
        passes["fused"] = subject.hidden_states(ids, hook)
    return passes


@pytest.fixture
def ids():
    return torch.randint(0, 2000, (2, 11), generator=torch.Generator().manual_seed(5))


def test_ln2_hook_normalized_on_llama_is_x_over_rms_without_the_gain(tmp_path, smollm2_tokenizer, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=D, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float().eval()
    block = model.model.layers[1]
    _gains([n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)])
    subject = wrap(model, smollm2_tokenizer, "tiny-llama-gains")
    seen = _seen(model, ids, norm=block.post_attention_layernorm, mlp=block.mlp)
    normalised = _rms_normalised(seen["norm"][0], block.post_attention_layernorm.variance_epsilon)
    assert not torch.allclose(normalised, seen["mlp"][0], atol=1e-2), "the gain must matter here"

    tc = _coder(tmp_path, "transcoder", "saelens", "blocks.1.ln2.hook_normalized")
    circuit = _coder(tmp_path, "transcoder", "saelens", "blocks.1.mlp.hook_in")
    assert set(_passes(subject, ids, tc.hook)) == {"hooked", "fused"}
    for name, got in _passes(subject, ids, tc.hook).items():
        torch.testing.assert_close(got, normalised, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(tc.encode(got), tc.encode(normalised), rtol=1e-4, atol=1e-4, msg=name)
    # circuit-tracer's mlp.hook_in (TransformerLens without folding) is the MLP's input, gain and all.
    for name, got in _passes(subject, ids, circuit.hook).items():
        torch.testing.assert_close(got, seen["mlp"][0], rtol=1e-4, atol=1e-5, msg=name)


def test_ln2_hook_normalized_on_gpt2_is_centred_and_scaled_without_weight_or_bias(tmp_path, smollm2_tokenizer, ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=D, n_inner=40, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).float().eval()
    _gains([n for block in model.transformer.h for n in (block.ln_1, block.ln_2)])
    subject = wrap(model, smollm2_tokenizer, "tiny-gpt2-gains")
    ln = model.transformer.h[1].ln_2
    seen = _seen(model, ids, ln=ln)
    x = seen["ln"][0] - seen["ln"][0].mean(-1, keepdim=True)
    # TransformerLens's LayerNormPre (the default fold_ln=True) and the publicly trained GPT-2 transcoders.
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps)
    assert not torch.allclose(expected, seen["ln"][1], atol=1e-2), "the weight and bias must matter here"

    tc = _coder(tmp_path, "transcoder", "saelens", "blocks.1.ln2.hook_normalized")
    for name, got in _passes(subject, ids, tc.hook).items():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_sparsify_mlp_reads_the_module_and_hook_mlp_out_reads_after_gemma2s_post_norm(tmp_path, smollm2_tokenizer, ids):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(smollm2_tokenizer), hidden_size=D, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       sliding_window=16)
    model = Gemma2ForCausalLM(cfg).float().eval()
    _gains([n for name, n in model.named_modules() if name.endswith("layernorm") or name.endswith(".norm")], gemma=True)
    subject = wrap(model, smollm2_tokenizer, "tiny-gemma2-gains")
    block = model.model.layers[1]
    seen = _seen(model, ids, mlp=block.mlp, post=block.post_feedforward_layernorm, pre=block.pre_feedforward_layernorm)
    assert not torch.allclose(seen["mlp"][1], seen["post"][1], atol=1e-2), "the post-MLP norm must matter here"

    expected = {
        ("sae", "sparsify", "layers.1.mlp"): seen["mlp"][1],  # the module's output, before the norm
        ("transcoder", "sparsify", "layers.1.mlp"): seen["mlp"][0],  # its input, with the pre-norm's gain
        ("sae", "saelens", "blocks.1.hook_mlp_out"): seen["post"][1],  # what the MLP adds to the stream
        ("transcoder", "saelens", "blocks.1.ln2.hook_normalized"):
            _rms_normalised(seen["pre"][0], block.pre_feedforward_layernorm.eps),  # x / rms, not x / rms * (1 + w)
    }
    for (kind, fmt, hook), want in expected.items():
        coder = _coder(tmp_path, kind, fmt, hook)
        got = subject.hidden_states(ids, coder.hook)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{fmt} {hook}")
        torch.testing.assert_close(coder.encode(got), coder.encode(want), rtol=1e-4, atol=1e-4, msg=f"{fmt} {hook}")
