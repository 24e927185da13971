"""pallas_kernels.matmul_gelu against its jnp twin, llmc_jax.nn.ops, and float64 NumPy truth.

CPU, interpret mode, small shapes with 32-wide tiles so every grid axis has several blocks and the
row count (100, 154) leaves a partial last row block. The CUDA-lowering tests trace GPT-2 sizes
with the default tiles (no execution) so an op Triton cannot take fails here.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import ops
from pallas_kernels.common import gelu_f32, gelu_grad_f32
from pallas_kernels.matmul_gelu import matmul_gelu, matmul_gelu_reference
from tests.cuda_lowering import triton_calls

F32, BF16 = jnp.float32, jnp.bfloat16
C, OC = 128, 256
SMALL_BLOCKS = dict(block_m=32, block_n=32, block_k=32)

# name: (leading shape of x, x dtype, w/b dtype)
CASES = {
    "fp32_NC": ((100,), F32, F32),
    "fp32_BTC": ((2, 77), F32, F32),
    "bf16_BTC_fp32_params": ((2, 77), BF16, F32),
    "bf16_NC": ((100,), BF16, BF16),
}

# fp32: the kernel and its comparisons differ only in summation order, ~sqrt(C) * 6e-8 relative.
FP32_TOL = 1e-5
# bf16 (8-bit mantissa, ulp 2^-8 = 3.9e-3 relative): the path rounds pre, dpre and the result to
# bf16, so an entry near the max may be off by one to two ulps (measured <= 3.8e-3): allow 2.5 ulps.
BF16_TOL = 1e-2


def tol(x_dtype) -> float:
    return FP32_TOL if x_dtype == F32 else BF16_TOL


def value_and_vjp(fn, x, w, b, g):
    """(out, dx, dw, db) of fn under jax.jit, pulled back with the cotangent g."""
    def run(x, w, b, g):
        out, pullback = jax.vjp(fn, x, w, b)
        return (out, *pullback(g))
    return jax.jit(run)(x, w, b, g)


@functools.cache
def case_data(name: str):
    """Inputs and the Pallas and reference results of one case, computed once per session."""
    lead, x_dtype, p_dtype = CASES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(*lead, C)), x_dtype)
    w = jnp.asarray(rng.normal(size=(OC, C)) / math.sqrt(C), p_dtype)
    b = jnp.asarray(rng.normal(size=(OC,)) * 0.5, p_dtype)
    g = jnp.asarray(rng.normal(size=(*lead, OC)), x_dtype)
    pallas = value_and_vjp(functools.partial(matmul_gelu, **SMALL_BLOCKS, interpret=True), x, w, b, g)
    reference = value_and_vjp(matmul_gelu_reference, x, w, b, g)
    return (x, w, b, g), pallas, reference


def float64_truth(x, w, b, g, compute_dtype):
    """Forward and hand-derived backward in float64 NumPy, from the inputs as the kernel sees them
    (w rounded to the compute dtype; b added unrounded)."""
    x64 = np.asarray(x, np.float64).reshape(-1, C)
    w64 = np.asarray(jnp.asarray(w).astype(compute_dtype), np.float64)
    b64 = np.asarray(b, np.float64)
    g64 = np.asarray(g, np.float64).reshape(-1, OC)
    s = math.sqrt(2.0 / math.pi)
    pre = x64 @ w64.T + b64
    t = np.tanh(s * (pre + 0.044715 * pre ** 3))
    out = 0.5 * pre * (1.0 + t)
    dpre = g64 * (0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * pre ** 2))
    dx = dpre @ w64
    dw = dpre.T @ x64
    db = dpre.sum(axis=0)
    return out.reshape(*np.shape(x)[:-1], OC), dx.reshape(np.shape(x)), dw, db


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    (x, *_), pallas, reference = case_data(name)
    for what, a, r in zip(("out", "dx", "dw", "db"), pallas, reference):
        assert a.shape == r.shape and a.dtype == r.dtype, what
        assert rel_error(a, r) < tol(x.dtype), what


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_numpy(name):
    (x, w, b, g), pallas, _ = case_data(name)
    for what, a, t in zip(("out", "dx", "dw", "db"), pallas, float64_truth(x, w, b, g, x.dtype)):
        assert rel_error(a, t) < tol(x.dtype), what


@pytest.mark.parametrize("name", CASES)
def test_dtype_policy(name):
    (x, w, b, _), (out, dx, dw, db), _ = case_data(name)
    assert out.dtype == dx.dtype == x.dtype
    assert dw.dtype == w.dtype and db.dtype == b.dtype
    assert out.shape == (*x.shape[:-1], OC) and dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("name", ["fp32_NC", "fp32_BTC"])
def test_matches_llmc_ops(name):
    (x, w, b, g), pallas, _ = case_data(name)
    ops_result = value_and_vjp(lambda x, w, b: ops.gelu(ops.matmul(x, w, b)), x, w, b, g)
    for what, a, r in zip(("out", "dx", "dw", "db"), pallas, ops_result):
        assert rel_error(a, r) < FP32_TOL, what


def test_shared_gelu_helpers():
    """pallas_kernels.common's GELU pair (the kernels' float32 GELU and its hand-written derivative)
    against float64 NumPy and against JAX's own derivative of gelu_f32, over the range where the
    tanh saturates and where it does not. Measured: ~7e-8 for the value; ~3e-6 for the derivative,
    whose 1 - t*t cancels where tanh nears +-1 and so magnifies float32 tanh's rounding."""
    u = np.linspace(-8.0, 8.0, 4001, dtype=np.float32).astype(np.float64)
    s = math.sqrt(2.0 / math.pi)
    t = np.tanh(s * (u + 0.044715 * u ** 3))
    u32 = jnp.asarray(u, F32)
    assert rel_error(gelu_f32(u32), 0.5 * u * (1.0 + t)) < FP32_TOL
    grad64 = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * u ** 2)
    assert rel_error(gelu_grad_f32(u32), grad64) < FP32_TOL
    assert rel_error(gelu_grad_f32(u32), jax.vmap(jax.grad(gelu_f32))(u32)) < FP32_TOL


def test_vmap_with_default_blocks():
    """vmap over a batch of x sharing w and b; default tiles (one partial 128-row block)."""
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(3, 20, C)), F32)
    w = jnp.asarray(rng.normal(size=(OC, C)) / math.sqrt(C), F32)
    b = jnp.asarray(rng.normal(size=(OC,)) * 0.5, F32)
    g = jnp.asarray(rng.normal(size=(3, 20, OC)), F32)

    def batched(fn):
        return lambda xs, w, b: jax.vmap(fn, in_axes=(0, None, None))(xs, w, b)

    pallas = value_and_vjp(batched(functools.partial(matmul_gelu, interpret=True)), xs, w, b, g)
    reference = value_and_vjp(batched(matmul_gelu_reference), xs, w, b, g)
    for what, a, r in zip(("out", "dx", "dw", "db"), pallas, reference):
        assert rel_error(a, r) < FP32_TOL, what


def scalar_loss(x, w, b):
    return jnp.sum(matmul_gelu(x, w, b, interpret=False).astype(F32))


# GPT-2 124M (C 768) and GPT-2 XL (C 1600, OC 6400: default block_n 128 still divides it)
@pytest.mark.parametrize("x_dtype", [F32, BF16])
@pytest.mark.parametrize("C_gpt2", [768, 1600])
def test_lowers_for_cuda(x_dtype, C_gpt2):
    x = jax.ShapeDtypeStruct((4, 1024, C_gpt2), x_dtype)
    w = jax.ShapeDtypeStruct((4 * C_gpt2, C_gpt2), F32)
    b = jax.ShapeDtypeStruct((4 * C_gpt2,), F32)
    assert triton_calls(lambda x, w, b: matmul_gelu(x, w, b, interpret=False), x, w, b) >= 1
    # backward: the forward again (residuals) plus the dx and dw/db kernels
    assert triton_calls(jax.grad(scalar_loss, argnums=(0, 1, 2)), x, w, b) >= 3


def test_lowers_for_cuda_small_blocks():
    """The test tiles (32) are valid Triton tiles too, with a bf16 x and float32 params."""
    x = jax.ShapeDtypeStruct((100, C), BF16)
    w, b = jax.ShapeDtypeStruct((OC, C), F32), jax.ShapeDtypeStruct((OC,), F32)
    loss = lambda x, w, b: jnp.sum(matmul_gelu(x, w, b, **SMALL_BLOCKS, interpret=False).astype(F32))
    assert triton_calls(jax.grad(loss, argnums=(0, 1, 2)), x, w, b) >= 3


def _arrays(x_shape=(10, 128), w_shape=(256, 128), b_shape=(256,), x_dtype=F32, p_dtype=F32):
    return jnp.zeros(x_shape, x_dtype), jnp.zeros(w_shape, p_dtype), jnp.zeros(b_shape, p_dtype)


@pytest.mark.parametrize("args, kwargs, error, match", [
    (_arrays(x_dtype=jnp.float16), {}, TypeError, "x must be float32 or bfloat16"),
    (_arrays(p_dtype=jnp.int32), {}, TypeError, "w must be float32 or bfloat16"),
    (_arrays(x_shape=(10, 64)), {}, ValueError, "last axis must equal"),
    (_arrays(b_shape=(128,)), {}, ValueError, "b must be"),
    (_arrays(w_shape=(256, 128, 1)), {}, ValueError, "expected x"),
    (_arrays(x_shape=(0, 128)), {}, ValueError, "no rows"),
    (_arrays(x_shape=(10, 96), w_shape=(256, 96)), {}, ValueError, "multiple of block_k"),
    (_arrays(), dict(block_n=512), ValueError, "multiple of block_n"),
    (_arrays(), dict(block_m=48), ValueError, "block_m must be a power of two"),
    (_arrays(), dict(block_k=8), ValueError, "block_k must be a power of two >= 16"),
])
def test_bad_input_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        matmul_gelu(*args, **kwargs, interpret=True)
