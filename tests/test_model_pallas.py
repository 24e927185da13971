"""The model with --kernels pallas (kernels in interpret mode on the CPU) against the xla op set and
the autodiff oracle; the kernel-spec strings the CLI builds."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_CONFIG, random_batch, rel_error
from llmc_jax import gradcheck, model, reference
from llmc_jax.config import PARAM_NAMES

CFG = TEST_CONFIG          # NH=4, C=64: HS=16, the smallest head the flash kernel takes


@pytest.fixture(scope="module")
def batch_and_params():
    from conftest import random_params
    x, y = random_batch(CFG, 2, 45)        # T=45: no kernel block divides it, every edge is masked
    return {k: jnp.asarray(v) for k, v in random_params(CFG).items()}, x, y


@pytest.fixture(scope="module")
def xla_fp32(batch_and_params):
    p, x, y = batch_and_params
    return jax.jit(model.value_and_grad(CFG, kernels="xla"))(p, x, y)


def test_pallas_model_matches_xla_and_autodiff_fp32(batch_and_params, xla_fp32):
    p, x, y = batch_and_params
    loss_p, g_p = jax.jit(model.value_and_grad(CFG, kernels="pallas"))(p, x, y)
    loss_x, g_x = xla_fp32
    loss_a, g_a = jax.jit(reference.value_and_grad(CFG))(p, x, y)
    # fp32 throughout: only summation order differs (flash attention's blocked softmax, row kernels)
    assert abs(float(loss_p) - float(loss_x)) < 1e-5 * float(loss_x)
    assert abs(float(loss_p) - float(loss_a)) < 1e-5 * float(loss_a)
    for name in PARAM_NAMES:
        assert rel_error(g_p[name], g_x[name]) < 1e-5, f"{name}: {rel_error(g_p[name], g_x[name])}"
        assert rel_error(g_p[name], g_a[name]) < 1e-5, f"{name}: {rel_error(g_p[name], g_a[name])}"


def test_pallas_model_bf16_close_to_autodiff(batch_and_params):
    p, x, y = batch_and_params
    loss_p, g_p = jax.jit(model.value_and_grad(CFG, dtype=jnp.bfloat16, kernels="pallas"))(p, x, y)
    loss_a, g_a = jax.jit(reference.value_and_grad(CFG, dtype=jnp.bfloat16))(p, x, y)
    # bf16 activations rounded at different places: the same 3e-2 as the xla op set's bf16 test
    assert abs(float(loss_p) - float(loss_a)) < 3e-2 * float(loss_a)
    for name in PARAM_NAMES:
        assert g_p[name].dtype == jnp.float32
        assert rel_error(g_p[name], g_a[name]) < 3e-2, f"{name}: {rel_error(g_p[name], g_a[name])}"


def test_pallas_with_recompute_keeps_gradients(batch_and_params, xla_fp32):
    """-r 1 keeps only the MLP pre-activation, so the fc layer falls back to matmul + GELU; the
    pallas layernorm and attention are still recomputed/used, and the gradients do not move."""
    p, x, y = batch_and_params
    loss_r, g_r = jax.jit(model.value_and_grad(CFG, kernels="pallas", recompute=2))(p, x, y)
    loss_x, g_x = xla_fp32
    assert abs(float(loss_r) - float(loss_x)) < 1e-5 * float(loss_x)
    for name in PARAM_NAMES:
        assert rel_error(g_r[name], g_x[name]) < 1e-5, name


def test_gradcheck_with_pallas_kernels(capsys):
    assert gradcheck.main(["-e", "tiny", "-b", "1", "-t", "32", "--kernels", "pallas"]) == 0
    out = capsys.readouterr().out
    assert "kernels pallas" in out and "all OK" in out and out.count(" OK") >= len(PARAM_NAMES)


def test_kernel_spec_strings():
    assert model.kernel_spec("xla") == "xla"
    assert model.kernel_spec("pallas", attention=None, layernorm="pallas") == "pallas"
    assert model.kernel_spec("pallas", attention="cudnn") == "pallas,attention=cudnn"
    assert model.parse_kernel_spec("xla,attention=pallas") == {
        "attention": "pallas", "layernorm": "xla", "matmul_gelu": "xla"}
    with pytest.raises(ValueError, match="unknown attention implementation"):
        model.kernel_spec("xla", attention="triton")
    with pytest.raises(ValueError, match="no per-op kernel choice"):
        model.kernel_spec("xla", softmax="pallas")
    with pytest.raises(ValueError, match="bad kernel override"):
        model.op_set("xla,layernorm=cudnn")


def test_cudnn_attention_refused_off_gpu(batch_and_params):
    if jax.default_backend() == "gpu":
        pytest.skip("this host has a GPU")
    p, x, _ = batch_and_params
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        model.logits(p, x, CFG, kernels="xla,attention=cudnn")


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
