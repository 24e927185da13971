"""The whole model: manual backward vs autodiff, forward vs an independent float64 NumPy GPT-2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_gpt2
from conftest import TEST_CONFIG, random_batch, rel_error
from llmc_jax.models import gpt2, gpt2_reference
from llmc_jax.models.config import PARAM_NAMES, from_descriptor
from llmc_jax.nn.kernels import Kernels, ModelOptions

CFG = TEST_CONFIG


def _jnp(params):
    return {k: jnp.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T", [(2, 16), (1, 45)])
def test_manual_gradients_match_autodiff(tiny_params, dtype, tol, B, T):
    x, y = random_batch(CFG, B, T)
    p = _jnp(tiny_params)
    loss_m, g_m = jax.jit(gpt2.value_and_grad(CFG, ModelOptions(dtype=dtype)))(p, x, y)
    loss_a, g_a = jax.jit(gpt2_reference.value_and_grad(CFG, dtype=dtype))(p, x, y)
    assert abs(float(loss_m) - float(loss_a)) < tol * abs(float(loss_a))
    for name in PARAM_NAMES:
        assert g_m[name].dtype == jnp.float32, name   # fp32 master gradients in both paths
        assert rel_error(g_m[name], g_a[name]) < tol, f"{name}: {rel_error(g_m[name], g_a[name])}"
    assert np.all(np.asarray(g_m["wte"])[CFG.V:] == 0.0)   # padded vocab rows: exactly zero


def test_forward_matches_float64_numpy(tiny_params):
    x, y = random_batch(CFG, 2, 11)
    want_logits, _ = numpy_gpt2.forward(tiny_params, x, CFG)
    got = jax.jit(lambda p, i: gpt2.logits(p, i, CFG))(_jnp(tiny_params), x)
    assert got.shape == (2, 11, CFG.Vp)
    assert rel_error(got, want_logits) < 1e-5
    loss = jax.jit(lambda p, i, t: gpt2.loss(p, i, t, CFG))(_jnp(tiny_params), x, y)
    assert abs(float(loss) - numpy_gpt2.loss(tiny_params, x, y, CFG)) < 1e-5


def test_bf16_forward_close_to_float64(tiny_params):
    x, y = random_batch(CFG, 2, 11)
    loss = jax.jit(lambda p, i, t: gpt2.loss(p, i, t, CFG, ModelOptions(dtype=jnp.bfloat16)))(_jnp(tiny_params), x, y)
    # bf16 activations: ~3 significant digits on a loss of ~5.5
    assert abs(float(loss) - numpy_gpt2.loss(tiny_params, x, y, CFG)) < 2e-2


def test_causality(tiny_params):
    """Changing token t never changes the logits at positions before t."""
    x, _ = random_batch(CFG, 1, 20)
    f = jax.jit(lambda p, i: gpt2.logits(p, i, CFG))
    base = np.asarray(f(_jnp(tiny_params), x))
    for t in (0, 7, 19):
        x2 = x.copy()
        x2[0, t] = (x2[0, t] + 1) % CFG.V
        out = np.asarray(f(_jnp(tiny_params), x2))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


@pytest.mark.parametrize("recompute", [1, 2])
def test_recompute_gives_same_gradients(tiny_params, recompute):
    x, y = random_batch(CFG, 2, 16)
    p = _jnp(tiny_params)
    l0, g0 = jax.jit(gpt2.value_and_grad(CFG))(p, x, y)
    l1, g1 = jax.jit(gpt2.value_and_grad(CFG, ModelOptions(recompute=recompute)))(p, x, y)
    assert float(l0) == float(l1)
    for name in PARAM_NAMES:
        assert rel_error(g1[name], g0[name]) < 1e-6, name


def test_parameter_counts():
    assert from_descriptor("d12").num_parameters == 124_475_904
    assert from_descriptor("gpt2:d24").num_parameters == 354_871_296
    assert from_descriptor("d36").num_parameters == 774_090_240
    assert from_descriptor("d48").num_parameters == 1_557_686_400


def test_sequence_longer_than_maxT_is_refused(tiny_params):
    x = np.zeros((1, CFG.maxT + 1), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's maxT"):
        gpt2.logits(_jnp(tiny_params), x, CFG)


def test_unknown_kernels_name():
    with pytest.raises(ValueError, match="unknown kernels"):
        Kernels.resolve("cuda")


def test_init_cache_returns_the_same_bits(tmp_path, monkeypatch):
    from llmc_jax.formats import llmc_init
    monkeypatch.setenv("LLMC_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(llmc_init, "INIT_CACHE_MIN_PARAMS", 0)
    drawn = llmc_init.init_params(CFG)                       # drawn and written to the cache
    cached = list((tmp_path / "init").iterdir())
    assert len(cached) == 1
    again = llmc_init.init_params(CFG)                       # read back
    want = llmc_init.init_params_llmc(CFG)
    for k in want:
        np.testing.assert_array_equal(drawn[k], want[k])
        np.testing.assert_array_equal(again[k], want[k])


def test_gpt2_is_a_model_family():
    """Every member of the family interface is there, and the registry finds it from the config."""
    from llmc_jax.models import family
    members = [n for n in vars(family.ModelFamily) if not n.startswith("_")]
    assert {"forward", "head", "loss", "value_and_grad", "empty_cache", "init_params", "write_model",
            "config_record"} <= set(members)
    for name in members:
        assert hasattr(gpt2, name), name
    assert family.family_of(CFG) is gpt2 and family.reference_of(CFG) is gpt2_reference
    assert gpt2.config_record(CFG) == {"L": CFG.L, "NH": CFG.NH, "C": CFG.C, "maxT": CFG.maxT, "V": CFG.V,
                                       "Vp": CFG.Vp}
    with pytest.raises(TypeError, match="no model family"):
        family.family_of(object())


def test_one_forward_serves_prefill_and_decode(tiny_params):
    """forward with a cache: a prompt's hidden states equal the cache-free forward's, and a decoded
    token's equal the cache-free forward's last position (the same block, attending through the cache)."""
    from llmc_jax.nn.kv_cache import KVCache
    p = _jnp(tiny_params)
    x = np.random.default_rng(1).integers(0, CFG.V, size=(2, 9)).astype(np.int32)
    h_full, none = jax.jit(lambda p, i: gpt2.forward(p, i, CFG))(p, x)
    assert none is None
    cache = gpt2.empty_cache(CFG, 2, 16, jnp.float32)
    h_prompt, cache = jax.jit(lambda p, i, c: gpt2.forward(p, i, CFG, cache=c))(p, x[:, :8], cache)
    assert isinstance(cache, KVCache) and cache.length == 16
    np.testing.assert_array_equal(np.asarray(h_prompt), np.asarray(jax.jit(
        lambda p, i: gpt2.forward(p, i, CFG)[0])(p, x[:, :8])))
    h_next, cache = jax.jit(lambda p, i, c, pos: gpt2.forward(p, i, CFG, cache=c, pos=pos))(
        p, x[:, 8:9], cache, jnp.int32(8))
    np.testing.assert_allclose(np.asarray(h_next[:, 0]), np.asarray(h_full[:, 8]), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="from position 0 only"):
        gpt2.forward(p, x[:, :4], CFG, cache=gpt2.empty_cache(CFG, 2, 16, jnp.float32), pos=3)
