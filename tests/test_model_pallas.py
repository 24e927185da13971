"""The model with --kernels pallas (kernels in interpret mode on the CPU) against the xla op set and
the autodiff oracle, GPT-2 and Llama 3; the kernel choice the CLI resolves."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_CONFIG, llama_test_params, random_batch, rel_error
from llmc_jax import gradcheck
from llmc_jax.models import gpt2, gpt2_reference, llama
from llmc_jax.models.config import PARAM_NAMES
from llmc_jax.models.llama_config import from_descriptor
from llmc_jax.nn.gqa_attention import gqa_attention
from llmc_jax.nn.kernels import Kernels, ModelOptions

PALLAS = Kernels.resolve("pallas")

CFG = TEST_CONFIG          # NH=4, C=64: HS=16, the smallest head the flash kernel takes


@pytest.fixture(scope="module")
def batch_and_params():
    from conftest import random_params
    x, y = random_batch(CFG, 2, 45)        # T=45: no kernel block divides it, every edge is masked
    return {k: jnp.asarray(v) for k, v in random_params(CFG).items()}, x, y


@pytest.fixture(scope="module")
def xla_fp32(batch_and_params):
    p, x, y = batch_and_params
    return jax.jit(gpt2.value_and_grad(CFG))(p, x, y)


def test_pallas_model_matches_xla_and_autodiff_fp32(batch_and_params, xla_fp32):
    p, x, y = batch_and_params
    loss_p, g_p = jax.jit(gpt2.value_and_grad(CFG, ModelOptions(kernels=PALLAS)))(p, x, y)
    loss_x, g_x = xla_fp32
    loss_a, g_a = jax.jit(gpt2_reference.value_and_grad(CFG))(p, x, y)
    # fp32 throughout: only summation order differs (flash attention's blocked softmax, row kernels)
    assert abs(float(loss_p) - float(loss_x)) < 1e-5 * float(loss_x)
    assert abs(float(loss_p) - float(loss_a)) < 1e-5 * float(loss_a)
    for name in PARAM_NAMES:
        assert rel_error(g_p[name], g_x[name]) < 1e-5, f"{name}: {rel_error(g_p[name], g_x[name])}"
        assert rel_error(g_p[name], g_a[name]) < 1e-5, f"{name}: {rel_error(g_p[name], g_a[name])}"


def test_pallas_with_recompute_keeps_gradients(batch_and_params, xla_fp32):
    """-r 2 keeps only the MLP pre-activation, so the fc layer falls back to matmul + GELU; the
    pallas layernorm and attention are still recomputed/used, and the gradients do not move."""
    p, x, y = batch_and_params
    kernels = Kernels.resolve("pallas", recompute=2)
    loss_r, g_r = jax.jit(gpt2.value_and_grad(CFG, ModelOptions(kernels=kernels, recompute=2)))(p, x, y)
    loss_x, g_x = xla_fp32
    assert abs(float(loss_r) - float(loss_x)) < 1e-5 * float(loss_x)
    for name in PARAM_NAMES:
        assert rel_error(g_r[name], g_x[name]) < 1e-5, name


def test_kernel_choice_is_resolved_once():
    assert Kernels.resolve("xla") == Kernels() and str(Kernels()) == "xla"
    assert Kernels.resolve("pallas", attention=None, layernorm="pallas") == PALLAS and str(PALLAS) == "pallas"
    mixed = Kernels.resolve("pallas", attention="cudnn")
    assert mixed == Kernels(attention="cudnn", layernorm="pallas", matmul_gelu="pallas")
    assert str(mixed) == "pallas (attention=cudnn)"
    assert str(Kernels.resolve("pallas", recompute=1)) == "pallas (matmul_gelu=xla)"
    # a family's line names only the ops it has: Llama 3 has no fused matmul+GELU
    from llmc_jax.models import gpt2, llama
    assert Kernels.resolve("pallas", recompute=1).describe(llama.KERNEL_OPS) == "pallas"
    assert Kernels.resolve("pallas", recompute=1).describe(gpt2.KERNEL_OPS) == "pallas (matmul_gelu=xla)"
    assert Kernels(matmul_gelu="pallas").describe(llama.KERNEL_OPS) == "xla"
    assert str(Kernels(attention="pallas")) == "xla (attention=pallas)"
    # -r 1/2 keep only the MLP pre-activation: the family choice falls back to xla for the fused MLP ...
    assert Kernels.resolve("pallas", recompute=1) == Kernels("pallas", "pallas", "xla")
    # ... and asking for it by name is refused
    with pytest.raises(ValueError, match="--matmul-gelu pallas needs -r 0"):
        Kernels.resolve("xla", recompute=2, matmul_gelu="pallas")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU and --dtype bfloat16"):
        Kernels.resolve("xla", attention="cudnn", platform="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU and --dtype bfloat16"):
        Kernels.resolve("xla", attention="cudnn", platform="gpu", dtype="float32")
    assert Kernels.resolve("xla", attention="cudnn", platform="gpu", dtype="bfloat16").attention == "cudnn"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        Kernels.resolve("xla", attention="triton")
    with pytest.raises(ValueError, match="no per-op kernel choice"):
        Kernels.resolve("xla", softmax="pallas")
    with pytest.raises(ValueError, match="unknown layernorm implementation"):
        Kernels(layernorm="cudnn")


def test_cudnn_attention_refused_off_gpu(batch_and_params):
    if jax.default_backend() == "gpu":
        pytest.skip("this host has a GPU")
    p, x, _ = batch_and_params
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        gpt2.logits(p, x, CFG, ModelOptions(kernels=Kernels(attention="cudnn")))


def test_train_with_pallas_kernels_reproduces_llmc_losses(tmp_path, capsys):
    """The train command with every Pallas kernel (-r 0, so the fused MLP kernel is used too) gives
    llm.c's own CPU trainer losses on the tiny fixture, as the xla op set does (same 2e-5)."""
    import json
    from test_train import FIXTURE, LLMC_CPU_FLAGS, _run, _stdout_losses
    expected = json.load(open(f"{FIXTURE}/expected.json"))
    out = _run(LLMC_CPU_FLAGS + ["-x", "5", "-v", "100", "-r", "0", "--kernels", "pallas"], capsys)
    assert re.search(r"\| kernels\s+\| pallas\s+\|", out), out
    train_l, _ = _stdout_losses(out)
    np.testing.assert_allclose(train_l, expected["train_losses"][:5], atol=2e-5, rtol=0)


# ---- Llama 3 -------------------------------------------------------------------------------------

LLAMA = from_descriptor("llama3:tiny")      # NH=4, NKV=2 (n_rep 2), HS=16, C=64
LLAMA_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "llama3_tiny")


@pytest.fixture(scope="module")
def llama_params_and_batch():
    p = llama_test_params(LLAMA)
    tok = np.random.default_rng(5).integers(0, LLAMA.V, size=(2, 38)).astype(np.int32)    # T=37: every edge masked
    return {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:])


def test_llama_pallas_matches_xla_fp32(llama_params_and_batch):
    """--kernels pallas for Llama 3 is flash attention over the grouped K/V and the Pallas residual +
    RMSNorm (matmul_gelu does not apply); fp32, so only summation order differs: 1e-5 as GPT-2's."""
    p, x, y = llama_params_and_batch
    loss_p, g_p = jax.jit(llama.value_and_grad(LLAMA, ModelOptions(kernels=PALLAS)))(p, x, y)
    loss_x, g_x = jax.jit(llama.value_and_grad(LLAMA))(p, x, y)
    assert abs(float(loss_p) - float(loss_x)) < 1e-5 * float(loss_x)
    assert set(g_p) == set(LLAMA.param_shapes())
    for name in g_x:
        assert g_p[name].shape == g_x[name].shape and g_p[name].dtype == jnp.float32, name
        assert rel_error(g_p[name], g_x[name]) < 1e-5, f"{name}: {rel_error(g_p[name], g_x[name])}"


def test_llama_pallas_prefill_then_xla_decode(llama_params_and_batch):
    """The prompt runs the chosen (Pallas) attention over the whole cache buffer (S=21: ragged);
    decoding from that cache runs the cache's XLA attention: both equal the full xla forward (fp32)."""
    from llmc_jax.evals import generate
    p, x, _ = llama_params_and_batch
    idx = np.asarray(x[:, :14])
    full = np.asarray(jax.jit(lambda p, i: llama.logits(p, i, LLAMA))(p, jnp.asarray(idx)))
    logits, cache = generate.prefill(p, LLAMA, idx[:, :13], cache_len=21, kernels=PALLAS)
    np.testing.assert_allclose(np.asarray(logits), full[:, 12], atol=1e-5, rtol=0)
    logits, _ = generate.decode_step(p, LLAMA, cache, idx[:, 13], 13)
    np.testing.assert_allclose(np.asarray(logits), full[:, 13], atol=1e-5, rtol=0)


def test_cudnn_attention_refused_off_gpu_for_llama(llama_params_and_batch):
    if jax.default_backend() == "gpu":
        pytest.skip("this host has a GPU")
    p, x, _ = llama_params_and_batch
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        jax.eval_shape(lambda p, x: llama.logits(p, x, LLAMA, ModelOptions(kernels=Kernels(attention="cudnn"))), p, x)


def test_dot_product_attention_groups_heads_as_gqa_attention():
    """--attention cudnn passes k, v with NKV heads to jax.nn.dot_product_attention, which groups
    query head h onto kv head h // (NH // NKV) as gqa_attention does; its xla implementation (the
    same API semantics as cuDNN's, runnable here) shows the grouping order agrees (fp32, 1e-5)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(0, 1, (1, 9, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(0, 1, (1, 9, 2, 16)), jnp.float32) for _ in range(2))
    got, want = jax.jit(lambda q, k, v: (
        jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla").reshape(1, 9, 64),
        gqa_attention(q, k, v)))(q, k, v)
    assert rel_error(got, want) < 1e-5


def test_llama_gradcheck_with_pallas_kernels(capsys):
    """python -m llmc_jax.gradcheck on llm.c's Llama 3 fixture with --kernels pallas: the Pallas
    model's gradients against autodiff of the plain-jnp oracle (gradcheck's fp32 1e-4)."""
    rc = gradcheck.main(["-e", os.path.join(LLAMA_FIXTURE, "model.bin"), "-b", "1", "-t", "32",
                         "--kernels", "pallas"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "kernels pallas" in out and "all OK" in out and out.count("| OK") == len(LLAMA.param_shapes())
