"""SAE and transcoder checkpoints of every format and architecture, written here with the real file
names, tensor names, shapes, dtypes and config fields, then read back through `autoexplain.sae`.

Encoding is checked against the formulas, written again below in numpy (float64) from the
formats' documentation rather than from `autoexplain.sae_coder`, so a mistake must be made twice
to pass. Where the format's own library is installed (sae-lens, eai-sparsify) its latents on the
same folder are compared too; without it those tests skip and say so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from autoexplain.errors import UserError
from autoexplain.sae import ModelDims, check_subject, load_coder, model_dims, open_source, parse_source

D_IN, D_SAE, K = 8, 24, 3
TINY = ModelDims("tiny", 4, D_IN)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def weights(arch: str, seed: int = 0, d_out: int = D_IN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": rand(g, D_IN, D_SAE), "W_dec": rand(g, D_SAE, d_out), "b_dec": rand(g, d_out) * 0.3}
    if arch == "gated":
        t.update(b_gate=rand(g, D_SAE) * 0.5, b_mag=rand(g, D_SAE) * 0.5, r_mag=rand(g, D_SAE) * 0.2)
    else:
        # TopK coders get a negative bias so that some tokens' top k include negative
        # pre-activations, which the ReLU after the selection must zero.
        t["b_enc"] = rand(g, D_SAE) * 0.5 - (7.0 if arch == "topk" else 0.0)
    if "jumprelu" in arch:
        t["threshold"] = torch.rand(D_SAE, generator=g) * 1.5
    return t


def cfg_6x(arch: str, hook: str, **extra) -> dict:
    return {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": "transcoder" not in arch,
            "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
            "metadata": {"sae_lens_version": "6.12.0", "sae_lens_training_version": "6.12.0", "model_name": "tiny",
                         "hook_name": hook, "hook_head_index": None, "context_size": 128, "prepend_bos": True,
                         "dataset_path": "monology/pile-uncopyrighted", "model_class_name": "HookedTransformer"}, **extra}


def cfg_pre6(hook: str, activation: str = "relu", **extra) -> dict:
    return {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "tiny",
            "hook_name": hook, "hook_layer": int(hook.split(".")[1]), "hook_head_index": None,
            "activation_fn_str": activation, "activation_fn_kwargs": {"k": K} if activation == "topk" else {},
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0",
            "prepend_bos": True, "dataset_path": "NeelNanda/pile-10k", "context_size": 128, "normalize_activations": "none", **extra}


def write_saelens(folder, cfg, tensors, dtype=torch.float32):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: t.to(dtype).contiguous() for n, t in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def write_sparsify(folder, tensors, k=K, transcode=False, activation="topk"):
    folder.mkdir(parents=True)
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"activation": activation, "expansion_factor": d_sae // d_in, "normalize_decoder": True, "num_latents": d_sae,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": tensors["W_enc"].T.contiguous(), "encoder.bias": tensors["b_enc"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}, folder / "sae.safetensors")
    return folder


def write_gemmascope(folder, tensors):
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: t.numpy().astype(np.float32) for n, t in tensors.items()})
    return folder


# --- the formulas, independently -----------------------------------------------------------------

def np_of(t):
    return t.double().numpy()


def keep_top(pre, k):
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return np.maximum(out, 0)


def formula(arch, t, x, subtract=True, k=K):
    x = np_of(x) - (np_of(t["b_dec"]) if subtract else 0)
    W = np_of(t["W_enc"])
    if arch == "gated":
        gate = x @ W + np_of(t["b_gate"]) > 0
        return gate * np.maximum(x @ (W * np.exp(np_of(t["r_mag"]))) + np_of(t["b_mag"]), 0)
    pre = x @ W + np_of(t["b_enc"])
    if arch == "jumprelu":
        return np.where(pre > np_of(t["threshold"]), np.maximum(pre, 0), 0)
    if arch == "topk":
        return keep_top(pre, k)
    return np.maximum(pre, 0)


@pytest.fixture
def x():
    return torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(9)) * 2


def assert_encodes(coder, expected, x):
    got = coder.encode(x).double().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).any() and (expected == 0).any()  # the test would notice a wrong mask


# --- SAELens ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_6x_architectures(tmp_path, x, arch):
    t = weights(arch)
    cfg = cfg_6x(arch, "blocks.2.hook_resid_post", **({"k": K, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}))
    coder = load_coder(parse_source(f"sae:{write_saelens(tmp_path / arch, cfg, t)}"))
    assert (coder.format, coder.architecture, coder.transcoder) == ("saelens", arch, False)
    assert (coder.hook.layer, coder.hook.point, coder.d_in, coder.d_sae) == (2, "resid_post", D_IN, D_SAE)
    assert_encodes(coder, formula(arch, t, x), x)
    if arch == "topk":
        assert (formula(arch, t, x) > 0).sum(-1).min() < K


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path, x):
    t = weights("topk")
    cfg = cfg_6x("topk", "blocks.1.hook_mlp_out", k=K, rescale_acts_by_decoder_norm=True)
    coder = load_coder(parse_source(f"sae:{write_saelens(tmp_path / 's', cfg, t)}"))
    pre = (np_of(x) - np_of(t["b_dec"])) @ np_of(t["W_enc"]) + np_of(t["b_enc"])
    assert coder.hook.point == "mlp_out"
    assert_encodes(coder, keep_top(pre * np.linalg.norm(np_of(t["W_dec"]), axis=-1), K), x)


@pytest.mark.parametrize("arch,point,reads", [("transcoder", "ln2.hook_normalized", "mlp_in"),
                                              ("skip_transcoder", "mlp.hook_in", "mlp_module_in"),
                                              ("jumprelu_transcoder", "ln2.hook_normalized", "mlp_in")])
def test_saelens_transcoders_read_the_mlp_input(tmp_path, x, arch, point, reads):
    t = weights(arch, d_out=D_IN + 4)  # d_out differs from d_in: b_dec cannot be subtracted
    if arch == "skip_transcoder":
        t["W_skip"] = torch.zeros(D_IN + 4, D_IN)
    cfg = cfg_6x(arch, f"blocks.3.{point}", d_out=D_IN + 4)
    coder = load_coder(parse_source(f"transcoder:{write_saelens(tmp_path / arch, cfg, t)}"))
    assert coder.transcoder and (coder.hook.layer, coder.hook.point, coder.d_out) == (3, reads, D_IN + 4)
    assert_encodes(coder, formula("jumprelu" if "jumprelu" in arch else "standard", t, x, subtract=False), x)


def test_saelens_pre6_configs(tmp_path, x):
    t = weights("standard")
    relu = write_saelens(tmp_path / "relu", cfg_pre6("blocks.0.hook_resid_pre"), t)
    coder = load_coder(parse_source(f"sae:{relu}"))
    assert (coder.architecture, coder.hook.layer, coder.hook.point) == ("standard", 0, "resid_pre")
    assert_encodes(coder, formula("standard", t, x), x)

    topk = write_saelens(tmp_path / "topk", cfg_pre6("blocks.1.hook_resid_post", "topk"), t)
    assert_encodes(load_coder(parse_source(f"sae:{topk}")), formula("topk", t, x), x)

    # The oldest spelling: hook_point, activation_fn, a boolean normalize_activations, no b_dec subtraction.
    old = cfg_pre6("blocks.2.hook_resid_pre", apply_b_dec_to_input=False, normalize_activations=False)
    old["hook_point"] = old.pop("hook_name")
    old["activation_fn"] = old.pop("activation_fn_str")
    coder = load_coder(parse_source(f"sae:{write_saelens(tmp_path / 'old', old, t)}"))
    assert coder.hook.layer == 2
    assert_encodes(coder, formula("standard", t, x, subtract=False), x)


def test_saelens_bfloat16_weights_encode_in_float32(tmp_path, x):
    t = {n: v.to(torch.bfloat16) for n, v in weights("jumprelu").items()}
    folder = write_saelens(tmp_path / "bf16", cfg_6x("jumprelu", "blocks.2.hook_resid_post", dtype="bfloat16"), t, torch.bfloat16)
    coder = load_coder(parse_source(f"sae:{folder}"))
    assert coder.W_enc.dtype == torch.float32 and coder.encode(x.to(torch.bfloat16)).dtype == torch.float32
    assert_encodes(coder, formula("jumprelu", t, x), x)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_saelens_run_time_normalisation(tmp_path, x, mode):
    t = weights("standard")
    coder = load_coder(parse_source(f"sae:{write_saelens(tmp_path / mode, cfg_6x('standard', 'blocks.2.hook_resid_post', normalize_activations=mode), t)}"))
    xs = np_of(x)
    if mode == "constant_norm_rescale":
        xs = xs * np.sqrt(D_IN) / np.linalg.norm(xs, axis=-1, keepdims=True)
    else:
        xs = xs - xs.mean(-1, keepdims=True)
        xs = xs / (xs.std(-1, ddof=1, keepdims=True) + 1e-5)
    expected = np.maximum((xs - np_of(t["b_dec"])) @ np_of(t["W_enc"]) + np_of(t["b_enc"]), 0)
    assert_encodes(coder, expected, x)


# --- sparsify -----------------------------------------------------------------------------------

def test_sparsify_hookpoint_folder_and_parent(tmp_path, x):
    t0, t2 = weights("topk", 0), weights("topk", 2)
    write_sparsify(tmp_path / "run" / "layers.0", t0)
    write_sparsify(tmp_path / "run" / "layers.2", t2)
    coder = load_coder(parse_source(f"sae:{tmp_path / 'run' / 'layers.2'}"))
    assert (coder.format, coder.architecture, coder.hook.layer, coder.hook.point) == ("sparsify", "topk", 2, "resid_post")
    # sparsify stores the encoder as an nn.Linear: the same matrix, transposed.
    assert torch.equal(coder.W_enc, t2["W_enc"])
    assert_encodes(coder, formula("topk", t2, x), x)
    from_parent = load_coder(parse_source(f"sae:{tmp_path / 'run'}"), layer=0)
    assert from_parent.hook.layer == 0
    assert_encodes(from_parent, formula("topk", t0, x), x)


def test_sparsify_mlp_sae_and_transcoder(tmp_path, x):
    t = weights("topk")
    sae = load_coder(parse_source(f"sae:{write_sparsify(tmp_path / 'a' / 'layers.1.mlp', t)}"))
    assert (sae.hook.layer, sae.hook.point) == (1, "mlp_module_out")  # the module itself, not hook_mlp_out
    tc = load_coder(parse_source(f"transcoder:{write_sparsify(tmp_path / 'b' / 'layers.1.mlp', t, transcode=True)}"))
    assert (tc.hook.layer, tc.hook.point, tc.transcoder) == (1, "mlp_module_in", True)
    assert_encodes(tc, formula("topk", t, x, subtract=False), x)


def test_sparsify_groupmax(tmp_path, x):
    t = weights("topk")
    coder = load_coder(parse_source(f"sae:{write_sparsify(tmp_path / 'layers.3', t, k=4, activation='groupmax')}"))
    pre = np.maximum((np_of(x) - np_of(t["b_dec"])) @ np_of(t["W_enc"]) + np_of(t["b_enc"]), 0)
    groups = pre.reshape(*pre.shape[:-1], 4, D_SAE // 4)
    expected = np.where(groups == groups.max(-1, keepdims=True), groups, 0).reshape(pre.shape)
    assert_encodes(coder, expected, x)


# --- GemmaScope ---------------------------------------------------------------------------------

def test_gemmascope_params_npz(tmp_path, x):
    t = weights("jumprelu")
    folder = write_gemmascope(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50", t)
    for path in (folder, folder / "params.npz"):
        coder = load_coder(parse_source(f"sae:{path}"))
        assert (coder.format, coder.architecture, coder.hook.layer, coder.hook.point) == ("gemmascope", "jumprelu", 3, "resid_post")
        assert_encodes(coder, formula("jumprelu", t, x, subtract=False), x)
    mlp = write_gemmascope(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "average_l0_9", t)
    assert load_coder(parse_source(f"sae:{mlp}")).hook.point == "mlp_out"
    tc = write_gemmascope(tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_2" / "width_16k" / "average_l0_9", t)
    assert load_coder(parse_source(f"transcoder:{tc}")).hook.point == "mlp_module_in"
    bare = write_gemmascope(tmp_path / "somewhere", t)
    assert load_coder(parse_source(f"sae:{bare}"), layer=1).hook.layer == 1
    att = write_gemmascope(tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "average_l0_9", t)
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{att}"))
    one_line(e, "attention-output SAE")


def test_gemmascope_in_the_hugging_face_cache(tmp_path, x):
    """As `hf_hub_download` leaves it: the repository's folder named models--google--<release>, the
    file a link into blobs/. The release and layer come from the folders the link sits in."""
    t = weights("jumprelu")
    blob = write_gemmascope(tmp_path / "blobs", t) / "params.npz"
    for repo, source, point in (("gemma-scope-2b-pt-mlp", "sae", "mlp_out"), ("gemma-scope-2b-pt-res", "sae", "resid_post"),
                                ("gemma-scope-2b-pt-transcoders", "transcoder", "mlp_module_in")):
        folder = tmp_path / f"models--google--{repo}" / "snapshots" / "abc123" / "layer_3" / "width_16k" / "average_l0_32"
        folder.mkdir(parents=True)
        (folder / "params.npz").symlink_to(blob)
        coder = load_coder(parse_source(f"{source}:{folder}"))
        assert (coder.hook.layer, coder.hook.point, coder.transcoder) == (3, point, source == "transcoder"), repo
    assert_encodes(coder, formula("jumprelu", t, x, subtract=False), x)
    att = tmp_path / "models--google--gemma-scope-2b-pt-att" / "snapshots" / "abc123" / "layer_1"
    att.mkdir(parents=True)
    (att / "params.npz").symlink_to(blob)
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{att}"))
    one_line(e, "attention-output SAE")


# --- the spec, model dims and bad input: one line each, before any work --------------------------

def one_line(excinfo, *words):
    text = str(excinfo.value)
    assert "\n" not in text and excinfo.value.fix, text
    for w in words:
        assert w in text, text


def test_parse_source():
    assert parse_source("mlp").kind == "mlp" and parse_source("mlp").path is None
    assert str(parse_source("sae:/x/y")) == "sae:/x/y" and parse_source("transcoder:~/t").kind == "transcoder"
    for bad in ("", "sae", "sae:", "neurons", "mlp:3", "SAE:/x"):
        with pytest.raises(UserError) as e:
            parse_source(bad)
        one_line(e, "unit source")


def test_model_dims_and_open_source(tmp_path, tiny_llama_dir):
    assert model_dims(tiny_llama_dir) == ModelDims(tiny_llama_dir, 3, 32)
    assert (d := model_dims("smollm2")).n_layers == 30 and d.d_model == 576
    assert open_source("mlp", tiny_llama_dir) == (parse_source("mlp"), None)
    t = weights("standard")
    wide = {n: torch.randn(32, D_SAE) if n == "W_enc" else v for n, v in t.items()}
    wide.update(W_dec=torch.randn(D_SAE, 32), b_dec=torch.zeros(32))
    cfg = dict(cfg_6x("standard", "blocks.1.hook_resid_post"), d_in=32)
    spec, coder = open_source(f"sae:{write_saelens(tmp_path / 'fits', cfg, wide)}", tiny_llama_dir, layer=1)
    assert spec.kind == "sae" and coder.d_in == 32


def test_bad_folders(tmp_path):
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{tmp_path / 'missing'}"))
    one_line(e, "does not exist")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{tmp_path / 'junk'}"))
    one_line(e, "holds no SAE", "sae_weights.safetensors", "params.npz")
    folder = write_saelens(tmp_path / "partial", cfg_6x("jumprelu", "blocks.1.hook_resid_post"), {n: v for n, v in weights("jumprelu").items() if n != "threshold"})
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{folder}"))
    one_line(e, "lacks threshold")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    (tmp_path / "broken" / "sae_weights.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{tmp_path / 'broken'}"))
    one_line(e, "cfg.json")


def test_hook_points_the_subject_lacks(tmp_path):
    t = weights("standard")
    deep = load_coder(parse_source(f"sae:{write_saelens(tmp_path / 'deep', cfg_6x('standard', 'blocks.9.hook_resid_post'), t)}"))
    with pytest.raises(UserError) as e:
        check_subject(deep, TINY)
    one_line(e, "layer 9", "layers 0..3")
    for n, hook in enumerate(("blocks.1.attn.hook_z", "blocks.1.hook_resid_mid", "hook_embed")):
        with pytest.raises(UserError) as e:
            load_coder(parse_source(f"sae:{write_saelens(tmp_path / f'h{n}', cfg_6x('standard', hook), t)}"))
        one_line(e, hook)
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{write_sparsify(tmp_path / 'x' / 'layers.1.self_attn', weights('topk'))}"))
    one_line(e, "layers.1.self_attn")


def test_width_mismatch(tmp_path):
    coder = load_coder(parse_source(f"sae:{write_saelens(tmp_path / 's', cfg_6x('standard', 'blocks.1.hook_resid_post'), weights('standard'))}"))
    with pytest.raises(UserError) as e:
        check_subject(coder, ModelDims("wide", 4, 16))
    one_line(e, "d_in 8", "16")
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{write_saelens(tmp_path / 'lie', dict(cfg_6x('standard', 'blocks.1.hook_resid_post'), d_in=9), weights('standard'))}"))
    one_line(e, "d_in = 9")


def test_unknown_architectures(tmp_path):
    t = weights("standard")
    cases = [write_saelens(tmp_path / "a", cfg_6x("wavelet", "blocks.1.hook_resid_post"), t),
             write_saelens(tmp_path / "b", cfg_pre6("blocks.1.hook_resid_post", "tanh-relu"), t),
             write_sparsify(tmp_path / "c" / "layers.1", weights("topk"), activation="softmax")]
    for folder in cases:
        with pytest.raises(UserError) as e:
            load_coder(parse_source(f"sae:{folder}"))
        one_line(e, "unknown architecture")


def test_transcoder_given_as_sae_and_back(tmp_path):
    tc = write_saelens(tmp_path / "tc", cfg_6x("transcoder", "blocks.1.ln2.hook_normalized", d_out=D_IN), weights("transcoder"))
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{tc}"))
    one_line(e, "is a transcoder", f"transcoder:{tc}")
    sp = write_sparsify(tmp_path / "sp" / "layers.1.mlp", weights("topk"), transcode=True)
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{sp}"))
    one_line(e, "is a transcoder")
    sae = write_saelens(tmp_path / "sae", cfg_6x("standard", "blocks.1.hook_resid_post"), weights("standard"))
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"transcoder:{sae}"))
    one_line(e, "is an SAE", f"sae:{sae}")


def test_layer_must_agree_or_be_given(tmp_path):
    sae = write_saelens(tmp_path / "sae", cfg_6x("standard", "blocks.1.hook_resid_post"), weights("standard"))
    assert load_coder(parse_source(f"sae:{sae}"), layer=1).hook.layer == 1
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{sae}"), layer=2)
    one_line(e, "layer 2 disagrees", "set the layer to 1")
    with pytest.raises(UserError) as e:
        load_coder(parse_source(f"sae:{write_gemmascope(tmp_path / 'bare', weights('jumprelu'))}"))
    one_line(e, "does not say which layer", "set the layer to the layer it was trained on")
    write_sparsify(tmp_path / "run" / "layers.0", weights("topk"))
    write_sparsify(tmp_path / "run" / "layers.4", weights("topk"))
    for layer, words in ((None, ("several hookpoints", "layers.0, layers.4")), (2, ("none for layer 2",))):
        with pytest.raises(UserError) as e:
            load_coder(parse_source(f"sae:{tmp_path / 'run'}"), layer=layer)
        one_line(e, *words)
