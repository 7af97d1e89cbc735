"""The fused Llama pass computes the same neurons as Hugging Face's own forward, hooked."""

import pytest
import torch

from autoexplain import fused
from autoexplain.subject import load_subject, wrap


def _both(subject, layers, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, len(subject.tokenizer), (3, 16))
    return subject.mlp_activations(ids, layers), subject.mlp_activations(ids, layers, hooked=True)


def test_fused_equals_hooked_in_float32(tiny_llama_dir):
    subject = load_subject(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(2)
    with torch.no_grad():  # norm weights of 1 would not test their folding into the products
        for layer in subject.model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    assert subject.fused is not None, "a Llama subject takes the fused pass"
    got, want = _both(subject, [0, 2])
    assert set(got) == set(want) == {0, 2}
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-5)


def test_fused_equals_hooked_within_bf16_rounding(tiny_llama_dir):
    subject = load_subject(tiny_llama_dir, dtype=torch.bfloat16)
    got, want = _both(subject, [1, 2])
    for layer in want:
        g, w = got[layer].float(), want[layer].float()
        assert g.dtype == w.dtype and g.shape == w.shape
        # bf16 keeps 8 bits of mantissa; two orders of rounding differ by a few ulps of the scale.
        assert (g - w).abs().max() <= 0.03 * w.abs().max()
        assert torch.corrcoef(torch.stack([g.flatten(), w.flatten()]))[0, 1] > 0.999


def test_fused_handles_biases_and_grouped_heads(tmp_path, smollm2_tokenizer):
    """Qwen2's q/k/v carry biases; 4 query heads share 2 key-value heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # random biases: zero ones would test nothing
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    subject = wrap(model, smollm2_tokenizer, "tiny-qwen2")
    assert subject.fused is not None
    got, want = _both(subject, [0, 1], seed=3)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-5)


def test_other_layouts_take_the_hooked_pass(tiny_gpt2_dir, tiny_llama_dir, monkeypatch):
    assert load_subject(tiny_gpt2_dir).fused is None
    assert not fused.supports(load_subject(tiny_gpt2_dir).model)
    monkeypatch.setenv("AUTOEXPLAIN_FUSED", "0")
    assert load_subject(tiny_llama_dir).fused is None


def test_every_point_from_one_pass_equals_hooked(tiny_llama_dir):
    """All points of two layers from one fused pass: the residual is added into in place and the
    scratch buffers are reused, so a point taken early must not change as the pass goes on."""
    subject = load_subject(tiny_llama_dir, dtype=torch.float32)
    assert subject.fused is not None
    torch.manual_seed(3)
    with torch.no_grad():  # gains of 1 would make the normed MLP input with and without its gain one tensor
        for layer in subject.model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    points = [(layer, point) for layer in (0, 1)
              for point in ("resid_pre", "mlp_in", "mlp_module_in", "units", "mlp_out", "mlp_module_out", "resid_post")]
    torch.manual_seed(4)
    ids = torch.randint(0, len(subject.tokenizer), (2, 12))
    got, want = subject.capture(ids, points), subject.capture(ids, points, hooked=True)
    assert set(got) == set(want) == set(points)
    for key in points:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{key}")
    again = subject.capture(ids, points)  # a second batch reuses the buffers: the first's tensors stay
    for key in points:
        assert torch.equal(again[key], got[key]), key
