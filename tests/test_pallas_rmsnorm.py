"""Pallas rmsnorm / residual_rmsnorm (interpret mode on the CPU) against llmc_jax.nn.rmsnorm (the xla
custom_vjp ops the model runs otherwise) and a float64 NumPy computation; plus CUDA lowering at
Llama 3 sizes and input errors."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import rmsnorm as xla_rms
from pallas_kernels.rmsnorm import residual_rmsnorm, rmsnorm
from tests.cuda_lowering import triton_calls

EPS = 1e-5
BF16 = jnp.bfloat16
# Small blocks so the test rows span several of them: 2*37 = 74 rows is no multiple of 8 or 32
# (masked last tile of the forward and of a backward program), C=96 is no power of two (masked
# columns of a 128-wide tile).
BLOCKS = dict(block_rows=8, dw_block_rows=32)
SHAPE = (2, 37, 96)

# fp32, and the float32 dw of a bf16 run (float32 math on the same bf16 inputs, never rounded to
# bf16): kernel, xla op and float64 differ only by float32 rounding and summation order.
TOL_F32 = 1e-5
# bf16 outputs and dx: computed in float32 from the same bf16 inputs and rounded to bf16 (8-bit
# significand: half an ulp is at most 2^-8 of the value). The forward rounds twice (x * rstd, then
# the product with w, as train_llama3.py's .type_as(x)), dx once; the float64 truth rounds neither:
# < 2 * 2^-8 = 2^-7 of the largest value (4.2e-3 measured for out, 3.3e-3 for dx). The xla op
# rounds at the same points (bit-equal on the CPU here); it is held to the same 2^-7.
TOL_BF16 = 2 ** -7


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _inputs(dtype, n_acts=1, w_dtype=jnp.float32, seed=0):
    """n_acts activations and cotangents of SHAPE in dtype, w near 1 (float32: master weights)."""
    rng = np.random.default_rng(seed)
    acts = [jnp.asarray(rng.normal(0.5, 2, SHAPE), dtype) for _ in range(n_acts)]
    w = jnp.asarray(1 + rng.normal(0, 0.1, SHAPE[-1]), w_dtype)
    cts = [jnp.asarray(rng.normal(0, 1, SHAPE), dtype) for _ in range(n_acts)]
    return acts, w, cts


def np_rmsnorm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w


def np_rmsnorm_bwd(x, w, dout):
    """(dx, dw) by hand in float64: dx = rstd (g - xhat mean(g xhat)), g = w dout; dw = sum dout xhat."""
    rstd = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    xhat, g = x * rstd, dout * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dout * xhat).sum(tuple(range(x.ndim - 1)))


def _check(name, got, xla, truth, arg):
    assert got.shape == arg.shape and got.dtype == arg.dtype, name
    tol = TOL_F32 if arg.dtype == jnp.float32 else TOL_BF16
    assert rel_error(got, xla) < tol, (name, rel_error(got, xla))
    assert rel_error(got, truth) < tol, (name, rel_error(got, truth))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["fp32", "bf16"])
def test_rmsnorm_matches_xla_op_and_float64(dtype):
    (x,), w, (ct,) = _inputs(dtype)

    def run(fn):
        out, vjp = jax.vjp(fn, x, w)
        return (out,) + vjp(ct)

    got = jax.jit(lambda: run(functools.partial(rmsnorm, eps=EPS, **BLOCKS)))()
    xla = jax.jit(lambda: run(functools.partial(xla_rms.rmsnorm, eps=EPS)))()
    truth = (np_rmsnorm(_f64(x), _f64(w)),) + np_rmsnorm_bwd(_f64(x), _f64(w), _f64(ct))
    for name, g, r, t, arg in zip(["out", "dx", "dw"], got, xla, truth, [x, x, w]):
        _check(name, g, r, t, arg)


@pytest.mark.parametrize("dtype,w_dtype", [(jnp.float32, jnp.float32), (BF16, jnp.float32), (BF16, BF16)],
                         ids=["fp32", "bf16", "bf16-no-master-weights"])
def test_residual_rmsnorm_matches_xla_op_and_float64(dtype, w_dtype):
    """Cotangents on both outputs (the model's use: the sum feeds the next block, the norm its branch)."""
    (x, r), w, (ct_h, ct_o) = _inputs(dtype, n_acts=2, w_dtype=w_dtype)

    def run(fn):
        outs, vjp = jax.vjp(fn, x, r, w)
        return outs + vjp((ct_h, ct_o))

    got = jax.jit(lambda: run(functools.partial(residual_rmsnorm, eps=EPS, **BLOCKS)))()
    xla = jax.jit(lambda: run(functools.partial(xla_rms.residual_rmsnorm, eps=EPS)))()

    # truth from the sum the op defines: x + r rounded to the activation dtype
    h = _f64(x) + _f64(r)
    if dtype == BF16:
        h = h.astype(ml_dtypes.bfloat16).astype(np.float64)
    dx, dw = np_rmsnorm_bwd(h, _f64(w), _f64(ct_o))
    truth = (h, np_rmsnorm(h, _f64(w)), dx + _f64(ct_h), dx + _f64(ct_h), dw)
    for name, g, rf, t, arg in zip(["h", "out", "dx", "dr", "dw"], got, xla, truth, [x, x, x, r, w]):
        _check(name, g, rf, t, arg)


def test_residual_rmsnorm_sum_only_cotangent():
    """Only the sum used (the norm's cotangent a symbolic zero): dx = dr = the sum's cotangent, dw = 0."""
    (x, r), w, (ct_h, _) = _inputs(jnp.float32, n_acts=2)
    loss = lambda x, r, w: jnp.sum(residual_rmsnorm(x, r, w, EPS, **BLOCKS)[0] * ct_h)
    dx, dr, dw = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, r, w)
    assert np.array_equal(dx, ct_h) and np.array_equal(dr, ct_h) and not np.any(dw)


# ---- CUDA lowering (no execution): every kernel must go through Triton ---------------------------

@pytest.mark.parametrize("C", [2048, 4096], ids=["llama3.2-1B", "llama3.1-8B"])
def test_lowers_to_triton_at_llama3_size(C):
    x = jax.ShapeDtypeStruct((2, 256, C), BF16)
    w = jax.ShapeDtypeStruct((C,), jnp.float32)
    rms = functools.partial(rmsnorm, eps=EPS, interpret=False)
    res = functools.partial(residual_rmsnorm, eps=EPS, interpret=False)

    def res_loss(x, r, w):
        h, out = res(x, r, w)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(out.astype(jnp.float32))

    assert triton_calls(rms, x, w) >= 1
    assert triton_calls(jax.grad(lambda x, w: jnp.sum(rms(x, w).astype(jnp.float32)), argnums=(0, 1)), x, w) >= 2
    assert triton_calls(res, x, x, w) >= 1
    assert triton_calls(jax.grad(res_loss, argnums=(0, 1, 2)), x, x, w) >= 2   # forward + backward


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("x,w,exc,match", [
    (jnp.zeros((4, 64)), jnp.ones(32), ValueError, "shape"),
    (jnp.zeros((4, 64), jnp.int32), jnp.ones(64), TypeError, "float32 or bfloat16"),
    (jnp.zeros((4, 64)), jnp.ones(64, jnp.float16), TypeError, "float32 or bfloat16"),
    (jnp.zeros(()), jnp.ones(1), ValueError, "channel axis"),
    (jnp.zeros((0, 64)), jnp.ones(64), ValueError, "no rows"),
    (jnp.zeros((2, 16384)), jnp.ones(16384), ValueError, "C = 16384"),
], ids=["w_shape", "x_int", "w_fp16", "x_scalar", "no_rows", "C_too_big"])
def test_rmsnorm_errors(x, w, exc, match):
    with pytest.raises(exc, match=match):
        rmsnorm(x, w, EPS)


@pytest.mark.parametrize("r", [jnp.zeros((4, 32)), jnp.zeros((4, 64), BF16)], ids=["shape", "dtype"])
def test_residual_rmsnorm_errors(r):
    with pytest.raises(ValueError, match="r must match x"):
        residual_rmsnorm(jnp.zeros((4, 64)), r, jnp.ones(64), EPS)
