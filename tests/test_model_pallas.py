"""The model with --kernels pallas (kernels in interpret mode on the CPU) against the xla op set and
the autodiff oracle; the kernel choice the CLI resolves."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_CONFIG, random_batch, rel_error
from llmc_jax import gradcheck
from llmc_jax.models import gpt2, gpt2_reference
from llmc_jax.models.config import PARAM_NAMES
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


def test_pallas_model_bf16_close_to_autodiff(batch_and_params):
    p, x, y = batch_and_params
    loss_p, g_p = jax.jit(gpt2.value_and_grad(CFG, ModelOptions(dtype=jnp.bfloat16, kernels=PALLAS)))(p, x, y)
    loss_a, g_a = jax.jit(gpt2_reference.value_and_grad(CFG, dtype=jnp.bfloat16))(p, x, y)
    # bf16 activations rounded at different places: the same 3e-2 as the xla op set's bf16 test
    assert abs(float(loss_p) - float(loss_a)) < 3e-2 * float(loss_a)
    for name in PARAM_NAMES:
        assert g_p[name].dtype == jnp.float32
        assert rel_error(g_p[name], g_a[name]) < 3e-2, f"{name}: {rel_error(g_p[name], g_a[name])}"


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


def test_gradcheck_with_pallas_kernels(capsys):
    assert gradcheck.main(["-e", "tiny", "-b", "1", "-t", "32", "--kernels", "pallas"]) == 0
    out = capsys.readouterr().out
    assert "kernels pallas" in out and "all OK" in out and out.count(" OK") >= len(PARAM_NAMES)


def test_kernel_choice_is_resolved_once():
    assert Kernels.resolve("xla") == Kernels() and str(Kernels()) == "xla"
    assert Kernels.resolve("pallas", attention=None, layernorm="pallas") == PALLAS and str(PALLAS) == "pallas"
    assert PALLAS.uses_pallas and not Kernels().uses_pallas
    mixed = Kernels.resolve("pallas", attention="cudnn")
    assert mixed == Kernels(attention="cudnn", layernorm="pallas", matmul_gelu="pallas")
    assert str(mixed) == "pallas (attention=cudnn)"
    assert str(Kernels.resolve("pallas", recompute=1)) == "pallas (matmul_gelu=xla)"
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
