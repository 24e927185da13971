"""Hugging Face checkpoints in and out, checked against transformers itself (PyTorch, fp32, CPU).

Randomly initialised GPT2LMHeadModel and LlamaForCausalLM of small shapes (nothing is downloaded)
are saved with save_pretrained; our model loaded from that directory must give their logits and
loss (1e-5) and every gradient (1e-4 relative to the tensor's largest entry: the two differ only in
fp32 summation order), the same greedy tokens, and our export must load back into theirs and
round-trip bit for bit. transformers and torch are a test extra (installed by the README's
command); without them these tests skip with the reason.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers checks need torch (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]' installs transformers")

from llmc_jax import export  # noqa: E402
from llmc_jax.errors import UsageError  # noqa: E402
from llmc_jax.evals.generate import generate  # noqa: E402
from llmc_jax.formats import hf_checkpoint  # noqa: E402
from llmc_jax.models.family import family_of, load_model, read_model  # noqa: E402

B, T, V = 2, 12, 97
LOSS_TOL, GRAD_TOL, LOGIT_TOL = 1e-5, 1e-4, 1e-5

GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=V)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=False,
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
CASES = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config, GPT2),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, LLAMA),
    "llama-tied-unscaled": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                            {**LLAMA, "tie_word_embeddings": True, "rope_scaling": None}),
}


def _hf_model(case: str, path):
    cls, config_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    model = cls(config_cls(**kwargs)).eval()
    with torch.no_grad():      # HF initialises norms to 1 and biases to 0: make every tensor count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _batch():
    rng = np.random.default_rng(1)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def _hf_loss_and_grads(model, x, y):
    model.zero_grad()
    logits = model(torch.tensor(x)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    return logits.detach().numpy(), float(loss.detach()), grads


def _ours_in_hf_names(config, tree):
    """A params-shaped tree (params or grads) under HF's names and layouts (the map is linear)."""
    out = (hf_checkpoint._gpt2_out if config.__class__.__name__ == "GPTConfig" else hf_checkpoint._llama_out)
    return out(config, {k: np.asarray(v) for k, v in tree.items()})[1]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_every_gradient_match_transformers(case, tmp_path):
    model = _hf_model(case, tmp_path)
    x, y = _batch()
    ref_logits, ref_loss, ref_grads = _hf_loss_and_grads(model, x, y)
    config, params = load_model(str(tmp_path))
    fam = family_of(config)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    logits = np.asarray(fam.logits(p, jnp.asarray(x, jnp.int32), config))[..., :V]
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=LOGIT_TOL)
    loss, grads = fam.value_and_grad(config)(p, jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))
    assert abs(float(loss) - ref_loss) < LOSS_TOL
    ours = _ours_in_hf_names(config, grads)
    hf_names = {n for n in ref_grads if not (case == "gpt2" and n == "lm_head.weight")}
    assert set(ours) == hf_names
    for name in sorted(hf_names):
        err = np.abs(ours[name] - ref_grads[name]).max() / np.abs(ref_grads[name]).max()
        assert err < GRAD_TOL, f"{case} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_greedy_decoding_matches_transformers(case, tmp_path):
    model = _hf_model(case, tmp_path)
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                             pad_token_id=0, eos_token_id=None)[0].tolist()
    config, params = load_model(str(tmp_path))
    ours = generate(params, config, len(prompt) + 10, eot=0, prompt=prompt, top_k=1)
    assert ours == ref


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_export_loads_into_transformers_and_round_trips(case, tmp_path):
    _hf_model(case, tmp_path / "src")
    config, params = load_model(str(tmp_path / "src"))
    # through llm.c's .bin and back out to HF: both steps lossless in fp32
    assert export.main(["-e", str(tmp_path / "src"), "--format", "llmc", "-o", str(tmp_path / "m.bin")]) == 0
    assert export.main(["-e", str(tmp_path / "m.bin"), "--format", "hf", "-o", str(tmp_path / "out")]) == 0
    config2, params2 = read_model(str(tmp_path / "out"))
    assert config2 == config                               # RoPE scaling (factor 32) survives the .bin
    for name, value in params.items():
        np.testing.assert_array_equal(params2[name], value, err_msg=name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x, _ = _batch()
    with torch.no_grad():
        ref = theirs(torch.tensor(x)).logits.numpy()
    ours = np.asarray(family_of(config).logits({k: jnp.asarray(v) for k, v in params.items()},
                                               jnp.asarray(x, jnp.int32), config))[..., :V]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_TOL)


def test_bfloat16_export_is_what_transformers_reads(tmp_path):
    config, params = load_model("llama3:tiny")
    assert export.main(["-e", "llama3:tiny", "--format", "hf", "--dtype", "bfloat16", "-o", str(tmp_path)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    w = theirs.model.layers[1].mlp.down_proj.weight.detach().numpy()
    ours = read_model(str(tmp_path))[1]["fcprojw"][1]
    np.testing.assert_array_equal(w, ours)
    bits = np.asarray(jnp.asarray(params["fcprojw"][1]).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(ours, bits)          # round to nearest even, as jax's cast


def test_sharded_export_is_what_transformers_reads(tmp_path):
    """Past --max-shard-gb the weights go into save_pretrained's shards and index (here 100 kB shards
    of llama3:tiny's 575 kB): transformers loads them, read_model gets the same bits, and exporting
    unsharded into the same directory leaves one checkpoint (the single file, no index or shards)."""
    from llmc_jax.formats.safetensors_io import SafetensorsFile
    config, params = load_model("llama3:tiny")
    out = tmp_path / "hf"
    assert export.main(["-e", "llama3:tiny", "--format", "hf", "--max-shard-gb", "1e-4", "-o", str(out)]) == 0
    shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    assert len(shards) >= 5 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    files = [SafetensorsFile(str(out / f)) for f in shards]
    assert all(os.path.getsize(out / f) <= 1e5 + 2 ** 14 for f in shards)      # data + header
    assert index["metadata"]["total_size"] == 4 * sum(np.prod(f.shape(k)) for f in files for k in f.keys())
    _, params2 = read_model(str(out))
    for name, value in params.items():
        np.testing.assert_array_equal(params2[name], value, err_msg=name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x, _ = _batch()
    with torch.no_grad():
        ref = theirs(torch.tensor(x)).logits.numpy()
    ours = np.asarray(family_of(config).logits({k: jnp.asarray(v) for k, v in params.items()},
                                               jnp.asarray(x, jnp.int32), config))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_TOL)
    assert export.main(["-e", "llama3:tiny", "--format", "hf", "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with pytest.raises(UsageError, match="--max-shard-gb 0.0: must be a finite number > 0"):
        export.main(["-e", "llama3:tiny", "--format", "hf", "--max-shard-gb", "0", "-o", str(out)])


def test_safetensors_files_agree_with_the_safetensors_package(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    from llmc_jax.formats.safetensors_io import SafetensorsFile, write_file
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    for dtype, torch_dtype in (("F32", torch.float32), ("BF16", torch.bfloat16)):
        write_file(tmp_path / f"ours_{dtype}.safetensors", tensors, dtype, {"format": "pt"})
        theirs = st_torch.load_file(tmp_path / f"ours_{dtype}.safetensors")
        for k, v in tensors.items():
            np.testing.assert_array_equal(theirs[k].float().numpy(), torch.tensor(v).to(torch_dtype).float().numpy())
        st_torch.save_file({k: torch.tensor(v).to(torch_dtype) for k, v in tensors.items()},
                           tmp_path / f"theirs_{dtype}.safetensors")
        f = SafetensorsFile(tmp_path / f"theirs_{dtype}.safetensors")
        for k, v in tensors.items():
            np.testing.assert_array_equal(f.get(k), torch.tensor(v).to(torch_dtype).float().numpy())


def test_bad_checkpoint_directories_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a regular file.*without config.json"):
        load_model(str(tmp_path / "empty"))
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="model_type 'bert'"):
        load_model(str(d))
    _hf_model("gpt2", tmp_path / "cut")
    path = tmp_path / "cut" / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_model(str(tmp_path / "cut"))
    cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    (tmp_path / "cut" / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(UsageError, match="activation_function 'relu'"):
        load_model(str(tmp_path / "cut"))


@pytest.mark.parametrize("case", ["llama", "llama-tied-unscaled"])
def test_rope_frequencies_match_transformers(case, tmp_path):
    """The RoPE scaling (Llama 3.2's factor 32 here) barely moves logits at short T, so check the
    frequencies themselves against transformers' rotary embedding (float32, up to 1 ulp)."""
    from llmc_jax.models.llama import freqs
    from llmc_jax.nn.rope import rope_angular_frequencies
    model = _hf_model(case, tmp_path)
    config, _ = load_model(str(tmp_path))
    ref = model.model.rotary_emb.inv_freq.numpy()
    ours = rope_angular_frequencies(config.HS, config.rope_theta, config.use_scaled_rope, config.rope_scaling)
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=0)
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(config.maxT)[None])
    table = freqs(config)                                    # (maxT, HS/2, [cos, sin]); HF repeats the halves
    np.testing.assert_allclose(table[..., 0], cos[0, :, :config.HS // 2].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(table[..., 1], sin[0, :, :config.HS // 2].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama3:small", "llama3:tiny"])
def test_llama_round_trip_keeps_the_llmc_header_and_transformers_reads_it_silently(name, tmp_path, caplog):
    """descriptor -> HF -> llm.c .bin: the header equal to the descriptor's (maxT 64, multiple_of,
    ffn_dim_multiplier: config.json's llmc_* keys), and transformers loads the HF directory without a
    warning (its max_position_embeddings must exceed llama3 RoPE's original 8192)."""
    import logging
    assert export.main(["-e", name, "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    assert export.main(["-e", str(tmp_path / "hf"), "--format", "llmc", "-o", str(tmp_path / "m.bin")]) == 0
    want, _ = load_model(name)
    got, _ = read_model(str(tmp_path / "m.bin"))
    assert got == want and (got.maxT, got.multiple_of) == (64, want.multiple_of)
    with caplog.at_level(logging.WARNING):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
