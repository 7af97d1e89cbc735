"""`autoexplain train-sae`: hidden-state capture at each hook point, the TopK trainer on data it
must be able to fit, the saved SAELens folder read back by `autoexplain.sae` (and by SAELens where
installed), and the command end to end on a tiny Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoexplain.sae import load_coder, parse_source
from autoexplain.sae_coder import HookPoint
from autoexplain.sae_train import TrainConfig, capture, fve, save_saelens, train


def sparse_data(n=12_000, d=32, atoms=32, active=3, seed=0):
    """Each row a positive mix of `active` of `atoms` unit directions, an offset and a little
    noise: a TopK SAE with at least `atoms` latents and k >= `active` can explain nearly all of it."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    which = torch.rand(n, atoms, generator=g).argsort(-1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 4 + 1
    x = torch.einsum("nk,nkd->nd", coef, dictionary[which]) + 3.0 + 0.01 * torch.randn(n, d, generator=g)
    return x.to(torch.bfloat16)


def test_trainer_fits_sparse_data_and_the_folder_reads_back(tmp_path):
    x = sparse_data()
    cfg = TrainConfig(latents=64, k=4, batch=256, epochs=4, lr=1e-2)
    sae, scale, report = train(x, cfg)
    assert report.fve > 0.95, report
    # 32 atoms, 64 latents: about half the latents have nothing of their own to learn.
    assert report.dead_fraction < 0.75 and report.steps == 4 * ((len(x) - len(x) // 20) // 256)
    # The untrained SAE explains far less: the figure above is training, not the offset alone.
    untrained, _, before = train(x, TrainConfig(latents=64, k=4, batch=256, epochs=1, lr=1e-12))
    assert before.fve < 0.5 < report.fve

    folder = save_saelens(sae, scale, tmp_path / "sae", HookPoint(2, "resid_post"), "tiny", 8, "synthetic", report)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [folder, *folder.iterdir()]}
    assert modes == {"sae": 0o777 & ~umask, **{f.name: 0o666 & ~umask for f in folder.iterdir()}}, \
        "a coder others can read, as the umask says (not mkdtemp's 0700 or safetensors' 0600)"
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["architecture"] == "topk" and cfg_json["k"] == 4 and cfg_json["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    coder = load_coder(parse_source(f"sae:{folder}"))
    assert (coder.architecture, coder.k, coder.hook, coder.d_sae) == ("topk", 4, HookPoint(2, "resid_post"), 64)
    # The input scale is folded into the saved weights: raw activations in, the trainer's latents out.
    raw = x[:500].float()
    _recon, _pre, idx, values = sae(raw * scale)
    expected = torch.zeros(500, 64).scatter_(-1, idx, values.detach())
    torch.testing.assert_close(coder.encode(raw), expected, rtol=1e-4, atol=1e-4)
    recon = coder.encode(raw) @ coder.W_dec + coder.b_dec
    explained = 1 - (raw - recon).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum()
    assert explained > 0.95


def test_fve_with_and_without_the_top_dimension():
    x = sparse_data(n=3000).float()
    x[:, 5] *= 40  # one dimension with most of the variance, as in real residual streams
    sae, _scale, _report = train(x.to(torch.bfloat16), TrainConfig(latents=64, k=4, batch=256, epochs=1, lr=3e-3))
    x = x[:1000]
    recon = sae(x)[0].detach().double()
    err, var = (x.double() - recon).pow(2).sum(0), (x.double() - x.double().mean(0)).pow(2).sum(0)
    explained, rest, fired = fve(sae, x, batch=300)
    assert explained == pytest.approx(1 - err.sum().item() / var.sum().item(), rel=1e-6)
    keep = torch.arange(x.shape[1]) != 5
    assert rest == pytest.approx(1 - err[keep].sum().item() / var[keep].sum().item(), rel=1e-6)
    assert explained != pytest.approx(rest, abs=1e-3) and fired.sum() == (sae(x)[3] > 0).sum()


def test_sae_lens_reads_the_trained_folder(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")
    x = sparse_data(n=3000)
    sae, scale, report = train(x, TrainConfig(latents=64, k=4, batch=256, epochs=1, lr=3e-3))
    folder = save_saelens(sae, scale, tmp_path / "sae", HookPoint(1, "resid_post"), "tiny", 8, "synthetic", report)
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    raw = x[:200].float()
    torch.testing.assert_close(theirs.encode(raw).detach(), load_coder(parse_source(f"sae:{folder}")).encode(raw), rtol=1e-5, atol=1e-5)


def test_capture_matches_hidden_states(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, ...]
    torch.testing.assert_close(capture(model, HookPoint(0, "resid_post"), ids), hidden[1])
    torch.testing.assert_close(capture(model, HookPoint(1, "resid_pre"), ids), hidden[1])
    torch.testing.assert_close(capture(model, HookPoint(0, "resid_pre"), ids), hidden[0])
    mlp_in, mlp_out = capture(model, HookPoint(1, "mlp_module_in"), ids), capture(model, HookPoint(1, "mlp_out"), ids)
    with torch.inference_mode():
        torch.testing.assert_close(model.model.layers[1].mlp(mlp_in), mlp_out)
    # The MLP reads the normed residual after attention, not the raw stream.
    assert not torch.allclose(mlp_in, capture(model, HookPoint(1, "resid_pre"), ids))


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "autoexplain.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_train_sae_command(tiny_llama_dir, prose_corpus, tmp_path):
    to = tmp_path / "my_sae"
    result = run_cli("train-sae", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1", "--hook", "resid_post",
                     "--latents", "64", "--k", "4", "--tokens", "4000", "--window-len", "16", "--batch-tokens", "128",
                     "--epochs", "3", "--out", str(tmp_path / "out"), "--to", str(to))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(to)
    assert "FVE" in result.stderr and "dead" in result.stderr
    assert "steps/s" in result.stderr and "tokens/s" in result.stderr, "the train bar counts steps, capture tokens"
    report = json.loads((to / "training.json").read_text())
    from autoexplain.storage import read_manifest

    (windows,) = [d for d in (tmp_path / "out").rglob("*") if (d / "windows.parquet").is_file()]
    n_windows = read_manifest(windows)["params"]["n_windows"]
    assert n_windows > 50
    captured = n_windows * 15  # the first token of each window left out
    assert report["tokens_train"] % 128 == 0, "whole batches of --batch-tokens, the rest of an epoch left out"
    assert captured - 128 < report["tokens_train"] + report["tokens_eval"] <= captured
    coder = load_coder(parse_source(f"sae:{to}"), layer=1)
    assert (coder.hook, coder.d_in, coder.d_sae) == (HookPoint(1, "resid_post"), 32, 64)
    assert report["fve"] > 0.5, report
    assert coder.model_name == str(Path(tiny_llama_dir).absolute()), "the model's path, not an alias"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no partial folder left beside it"

    # Another --k into the same folder would replace the coder earlier runs recorded: refused first.
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    again = run_cli("train-sae", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1", "--latents", "64",
                    "--k", "8", "--tokens", "4000", "--window-len", "16", "--batch-tokens", "128",
                    "--out", str(tmp_path / "out"), "--to", str(to))
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert f"--to {to} already holds a coder" in errors[0] and "pass another --to" in errors[0]
    assert "capture" not in again.stderr, "refused before any work"
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before


def test_a_stopped_train_sae_writes_nothing_and_says_so(tiny_llama_dir, prose_corpus, tmp_path):
    """SIGTERM while it trains: no SAE folder, nothing beside it, and a line about train-sae, not LLMs."""
    import signal
    import time

    to = tmp_path / "sae" / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "autoexplain.cli", "train-sae", "--model", tiny_llama_dir,
                             "--corpus", str(prose_corpus), "--layer", "1", "--latents", "64", "--k", "4",
                             "--tokens", "200000", "--window-len", "16", "--batch-tokens", "128", "--epochs", "5000",
                             "--out", str(tmp_path / "out"), "--to", str(to)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "out").rglob("windows.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # into the capture or the training
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM): no SAE was written" in err and "LLM" not in err, err[-2000:]
    assert not to.exists() and (not to.parent.exists() or list(to.parent.iterdir()) == [])


@pytest.mark.parametrize("args,words", [
    (["--hook", "attn_out"], ["unknown --hook 'attn_out'"]),
    (["--k", "65", "--latents", "64"], ["--k 65 is more than --latents 64"]),
    (["--layer", "7"], ["layer 7 is out of range"]),
    (["--latents", "0"], ["--latents", "at least 1"]),
    (["--lr", "-1"], ["--lr must be more than 0, got -1.0"]),
    (["--tokens", "500"], ["--tokens 500 leave 475 to train on, fewer than one batch of --batch-tokens 1,024"]),
    (["--to", "/etc/hostname/sae"], ["--to: cannot write under /etc/hostname/sae: /etc/hostname is a file"]),
    (["--out", "file:///tmp/sae-url"], ["train-sae writes to a local folder, not a URL"]),
    (["--window-len", "257", "--tokens", "2000", "--batch-tokens", "256"],
     ["--window-len 257 is longer than the model's context of 256 positions — give --window-len 256 or less"]),
])
def test_train_sae_bad_input_is_one_line(tiny_llama_dir, tmp_path, args, words):
    result = run_cli("train-sae", "--model", tiny_llama_dir, "--out", str(tmp_path / "out"), *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for w in words:
        assert w in errors[0]


def test_mlp_out_is_what_the_mlp_adds_to_the_stream_on_a_post_normed_model():
    """Gemma 2 norms the MLP's output before adding it to the residual stream: `mlp_out` is after
    that norm (TransformerLens's hook_mlp_out, where GemmaScope's MLP SAEs read), so the layer's
    output is the stream before the MLP plus it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16)
    model = Gemma2ForCausalLM(cfg).eval()
    block = model.model.layers[1]
    for norm in (block.pre_feedforward_layernorm, block.post_feedforward_layernorm):
        torch.nn.init.normal_(norm.weight, std=0.5)  # zero-initialised (1 + weight): make the norm matter
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mid = {}
    handle = block.pre_feedforward_layernorm.register_forward_pre_hook(lambda _m, args: mid.setdefault("x", args[0]))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    mlp_in, mlp_out = capture(model, HookPoint(1, "mlp_module_in"), ids), capture(model, HookPoint(1, "mlp_out"), ids)
    torch.testing.assert_close(mid["x"] + mlp_out, capture(model, HookPoint(1, "resid_post"), ids))
    with torch.inference_mode():
        module_out = block.mlp(mlp_in)
        torch.testing.assert_close(module_out, capture(model, HookPoint(1, "mlp_module_out"), ids))
        assert not torch.allclose(module_out, mlp_out), "the MLP module's own output is before the norm"
