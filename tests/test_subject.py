"""Neurons are the MLP hidden units: checked against a hand computation on tiny real models."""

from pathlib import Path

import pytest
import torch

from autoexplain import defaults
from autoexplain.errors import UserError
from autoexplain.subject import load_subject, wrap


def _mlp_input(model, mlp, ids):
    """The hidden state entering `mlp` on a full forward pass."""
    seen = {}
    handle = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    return seen["x"]


def test_llama_units_are_gated_product(tiny_llama_dir):
    subject = load_subject(tiny_llama_dir)
    assert (subject.n_layers, subject.n_units) == (3, 48)
    ids = torch.randint(0, 1000, (2, 8))
    acts = subject.mlp_activations(ids, [1], hooked=True)[1]

    # Recompute layer 1's MLP input by hand from the hidden state entering that layer.
    mlp = subject.model.model.layers[1].mlp
    x = _mlp_input(subject.model, mlp, ids)
    with torch.inference_mode():
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(acts, expected)
    assert (acts < 0).any() and (acts > 0).any(), "gated units fire both ways"


def test_gpt2_units_are_post_activation(tiny_gpt2_dir):
    subject = load_subject(tiny_gpt2_dir)
    assert (subject.n_layers, subject.n_units) == (2, 40)
    ids = torch.randint(0, 1000, (2, 8))
    acts = subject.mlp_activations(ids, [0, 1])
    mlp = subject.model.transformer.h[1].mlp
    x = _mlp_input(subject.model, mlp, ids)
    with torch.inference_mode():
        expected = mlp.act(mlp.c_fc(x))
    torch.testing.assert_close(acts[1], expected)
    assert set(acts) == {0, 1}


@pytest.mark.parametrize("hooked", [True, False])
def test_pass_stops_after_top_layer(tiny_llama_dir, hooked):
    subject = load_subject(tiny_llama_dir)
    calls = []
    # The fused pass never calls the modules, so watch the weights it reads instead.
    handle = subject.model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    if subject.fused:
        subject.fused.block(1).w_down = None  # the top layer's down_proj must stay unread
    out = subject.mlp_activations(torch.randint(0, 1000, (1, 8)), [0, 1], hooked=hooked)
    handle.remove()
    assert calls == [], "layers above the highest recorded one must not run"
    assert set(out) == {0, 1}
    if subject.fused and not hooked:
        assert sorted(subject.fused._blocks) == [0, 1], "no weights above the top layer are even copied"


def test_the_default_dtype_is_the_one_this_machine_multiplies_fast(tiny_llama_dir, monkeypatch):
    from autoexplain import subject as subject_mod

    cpu = torch.device("cpu")
    assert load_subject(tiny_llama_dir).model.dtype == subject_mod.compute_dtype(cpu)
    assert load_subject(tiny_llama_dir, dtype=torch.bfloat16).model.dtype == torch.bfloat16  # asked for, given
    # bf16 where the CPU has bf16 dot products, float32 where torch would emulate bf16 (AVX2: ~100x slower)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(subject_mod, "bf16_dot_products", lambda native=native: native)
        assert subject_mod.compute_dtype(cpu) == dtype
        assert load_subject(tiny_llama_dir).model.dtype == dtype


def test_layer_out_of_range(tiny_llama_dir):
    with pytest.raises(UserError, match="out of range.*0..2"):
        load_subject(tiny_llama_dir).check_layers([3])


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_subject("no-such-org/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_subject(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        load_subject(str(tmp_path / "missing.gguf"))


def test_model_without_known_mlp(tiny_llama_dir):
    subject = load_subject(tiny_llama_dir)
    for block in subject.model.model.layers:
        block.mlp = torch.nn.Identity()  # an MLP we do not understand
    with pytest.raises(UserError, match="no MLP layout"):
        wrap(subject.model, subject.tokenizer, "odd-model")


@pytest.mark.slow
def test_embedded_default_loads_from_cache(monkeypatch):
    """The GGUF is dequantised once: a second load reads the cached safetensors folder and never opens
    the GGUF as a model again (checked on the loads it makes, not by timing it)."""
    import transformers

    first = load_subject()
    folder = Path(first.model.config._name_or_path)
    assert (folder / "config.json").is_file() and folder.is_relative_to(defaults.cache_root())
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    loads, original = [], transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        loads.append((str(args[0]), kwargs.get("gguf_file")))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    second = load_subject()
    assert loads == [(str(folder), None)], "one load, of the cached folder; the GGUF is not dequantised again"
    assert Path(second.model.config._name_or_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before, "the cache was rewritten"
    assert (second.n_layers, second.n_units) == (30, 1536)
    assert second.fingerprint == first.fingerprint
