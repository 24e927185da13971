"""The Llama 3 family: hand-derived backward vs JAX autodiff of the plain-jnp oracle, -r, and the
one forward serving prefill and decode (KV cache with grouped heads) as it serves training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import llama_test_params, rel_error
from llmc_jax.evals import generate
from llmc_jax.models import llama, llama_reference
from llmc_jax.models.family import family_of, load_model, reference_of
from llmc_jax.models.llama_config import from_descriptor
from llmc_jax.nn.kernels import ModelOptions

CFG = from_descriptor("llama3:tiny")      # NH=4, NKV=2 (n_rep 2), HS=16 (all three RoPE bands), hidden 224


@pytest.fixture(scope="module")
def params():
    return {k: jnp.asarray(v) for k, v in llama_test_params(CFG).items()}


def _batch(B, T, seed=0):
    tok = np.random.default_rng(seed).integers(0, CFG.V, size=(B, T + 1)).astype(np.int32)
    return jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:])


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_manual_backward_matches_autodiff(params, dtype, tol):
    x, y = _batch(2, 37)
    loss_m, g_m = jax.jit(llama.value_and_grad(CFG, ModelOptions(dtype=dtype)))(params, x, y)
    loss_a, g_a = jax.jit(llama_reference.value_and_grad(CFG, dtype=dtype))(params, x, y)
    assert abs(float(loss_m) - float(loss_a)) < tol * float(loss_a)
    assert set(g_m) == set(CFG.param_shapes())
    for name in g_m:
        assert g_m[name].dtype == jnp.float32, name
        assert rel_error(g_m[name], g_a[name]) < tol, f"{name}: {rel_error(g_m[name], g_a[name])}"


def test_recompute_keeps_gradients(params):
    """-r 2 (both RMSNorms and SwiGLU recomputed in the backward; -r 1 saves a superset of it)."""
    x, y = _batch(2, 16)
    l0, g0 = jax.jit(llama.value_and_grad(CFG))(params, x, y)
    l1, g1 = jax.jit(llama.value_and_grad(CFG, ModelOptions(recompute=2)))(params, x, y)
    assert float(l0) == float(l1)
    for name in g0:
        assert rel_error(g1[name], g0[name]) < 1e-6, name


def test_family_registry_and_descriptor_loading():
    assert family_of(CFG) is llama and reference_of(CFG) is llama_reference
    cfg, p = load_model("llama3:tiny")
    assert cfg == CFG and {k: v.shape for k, v in p.items()} == CFG.param_shapes()
    assert np.all(p["ln1w"] == 1.0) and abs(float(np.std(p["qkvw"])) - 0.02) < 1e-3


def test_kv_cache_decoding_matches_full_forwards(params):
    """Prefill 5 tokens, decode 11 more one position at a time: every step's logits equal the
    full forward's at that position (the cache holds NKV=2 heads, read by 4 query heads)."""
    idx = np.random.default_rng(2).integers(0, CFG.V, size=(2, 16)).astype(np.int32)
    full = np.asarray(jax.jit(lambda p, i: llama.logits(p, i, CFG))(params, jnp.asarray(idx)))
    logits, cache = generate.prefill(params, CFG, idx[:, :5], cache_len=16)
    assert cache.k.shape == (CFG.L, 2, 16, CFG.NKV, CFG.HS)
    np.testing.assert_allclose(np.asarray(logits), full[:, 4], atol=1e-5, rtol=0)
    for pos in range(5, 16):
        logits, cache = generate.decode_step(params, CFG, cache, idx[:, pos], pos)
        np.testing.assert_allclose(np.asarray(logits), full[:, pos], atol=1e-5, rtol=0)
