"""Pallas layernorm / residual_layernorm (interpret mode on the CPU) against their jnp references,
a float64 NumPy computation and llmc_jax.nn.ops; plus CUDA lowering at GPT-2 sizes and input errors."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import ops
from pallas_kernels.layernorm import (layernorm, layernorm_reference, residual_layernorm,
                                      residual_layernorm_reference)
from tests.cuda_lowering import triton_calls

EPS = 1e-5
# Small blocks so the test shapes span several of them: 100 and 2*77 rows are not multiples of
# 8 or 32 (masked last block), C=192 is not a power of two (masked columns of a 256-wide tile).
BLOCKS = dict(block_rows=8, dw_block_rows=32)
BF16 = jnp.bfloat16

# fp32: kernel and reference/float64 differ only by float32 rounding and summation order.
TOL_F32 = 1e-5
# bf16 outputs and dx: computed in float32 and rounded once to bf16's 8-bit significand (error
# <= 2^-8 of the value, plus float32 noise); vs the reference, which rounds too: one ulp (2^-7).
TOL_BF16 = 2 ** -7
# float32 w/b gradients of a bf16 run: float32 math on the same bf16 inputs, never rounded to bf16.
TOL_PARAM_F32 = 1e-5


def _tol(dtype) -> float:
    return TOL_F32 if dtype == jnp.float32 else TOL_BF16


def _inputs(shape, dtype, param_dtype, n_acts=1, seed=0):
    """n_acts activations (mean away from 0), w near 1, b near 0, and one cotangent per activation."""
    rng = np.random.default_rng(seed)
    C = shape[-1]
    acts = [jnp.asarray(rng.normal(0, 2, shape) + 1, dtype) for _ in range(n_acts)]
    w = jnp.asarray(1 + rng.normal(0, 0.1, C), param_dtype)
    b = jnp.asarray(rng.normal(0, 0.1, C), param_dtype)
    cts = [jnp.asarray(rng.normal(0, 1, shape), dtype) for _ in range(n_acts)]
    return acts, w, b, cts


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# ---- float64 NumPy truth ------------------------------------------------------------------------

def np_layernorm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
    return (x - mean) * rstd * w + b


def np_layernorm_bwd(x, w, dout):
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return dx, (dout * norm).sum(rows), dout.sum(rows)


# ---- layernorm ----------------------------------------------------------------------------------

LN_CASES = [  # (shape, activation dtype, parameter dtype)
    ((100, 192), jnp.float32, jnp.float32),
    ((2, 77, 64), jnp.float32, jnp.float32),
    ((5, 768), jnp.float32, jnp.float32),       # GPT-2 width (masked to 1024), fewer rows than a block
    ((2, 77, 64), BF16, jnp.float32),           # llm.c mixed precision: fp32 master weights
    ((100, 192), BF16, BF16),
]


@pytest.mark.parametrize("shape,dtype,param_dtype", LN_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else jnp.dtype(v).name)
def test_layernorm_matches_reference_and_float64(shape, dtype, param_dtype):
    (x,), w, b, (ct,) = _inputs(shape, dtype, param_dtype)

    def run(fn):
        out, vjp = jax.vjp(fn, x, w, b)
        return (out,) + vjp(ct)

    got = jax.jit(lambda: run(functools.partial(layernorm, **BLOCKS)))()
    ref = jax.jit(lambda: run(layernorm_reference))()
    truth = (np_layernorm(_f64(x), _f64(w), _f64(b)),) + np_layernorm_bwd(_f64(x), _f64(w), _f64(ct))
    for name, g, r, t, arg in zip(["out", "dx", "dw", "db"], got, ref, truth, [x, x, w, b]):
        assert g.shape == arg.shape and g.dtype == arg.dtype, name
        tol = TOL_PARAM_F32 if name in ("dw", "db") and arg.dtype == jnp.float32 else _tol(arg.dtype)
        assert rel_error(g, r) < tol, (name, rel_error(g, r))
        assert rel_error(g, t) < tol, (name, rel_error(g, t))


def test_layernorm_vmap():
    (x,), w, b, _ = _inputs((3, 20, 64), jnp.float32, jnp.float32)
    got = jax.jit(jax.vmap(functools.partial(layernorm, **BLOCKS), in_axes=(0, None, None)))(x, w, b)
    assert rel_error(got, layernorm_reference(x, w, b)) < TOL_F32


# ---- residual_layernorm -------------------------------------------------------------------------

RES_CASES = [  # (shape, activation dtype, parameter dtype, which outputs get a cotangent)
    ((100, 192), jnp.float32, jnp.float32, "both"),
    ((100, 192), jnp.float32, jnp.float32, "sum"),
    ((2, 77, 64), BF16, jnp.float32, "both"),
    ((2, 77, 64), BF16, jnp.float32, "norm"),
]


@pytest.mark.parametrize("shape,dtype,param_dtype,used", RES_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else v if isinstance(v, str) else jnp.dtype(v).name)
def test_residual_layernorm_matches_reference_and_float64(shape, dtype, param_dtype, used):
    """Cotangents on both outputs, or on only one (the other is then a symbolic zero)."""
    (x, r), w, b, (ct_s, ct_o) = _inputs(shape, dtype, param_dtype, n_acts=2)

    def run(fn):
        def loss(*args):
            s, out = fn(*args)
            terms = {"sum": (s, ct_s), "norm": (out, ct_o)}
            return sum(jnp.sum(a.astype(jnp.float32) * c.astype(jnp.float32))
                       for k, (a, c) in terms.items() if used in (k, "both"))
        return fn(x, r, w, b) + jax.grad(loss, argnums=(0, 1, 2, 3))(x, r, w, b)

    got = jax.jit(lambda: run(functools.partial(residual_layernorm, **BLOCKS)))()
    ref = jax.jit(lambda: run(residual_layernorm_reference))()

    # Truth from the same rounded sum the op defines: x + r rounded to the activation dtype.
    s = _f64(x) + _f64(r)
    if dtype == BF16:
        s = s.astype(ml_dtypes.bfloat16).astype(np.float64)
    ds = _f64(ct_s) if used != "norm" else np.zeros(shape)
    dout = _f64(ct_o) if used != "sum" else np.zeros(shape)
    dx, dw, db = np_layernorm_bwd(s, _f64(w), dout)
    truth = (s, np_layernorm(s, _f64(w), _f64(b)), ds + dx, ds + dx, dw, db)

    for name, g, rf, t, arg in zip(["s", "out", "dx", "dr", "dw", "db"], got, ref, truth, [x, x, x, r, w, b]):
        assert g.shape == arg.shape and g.dtype == arg.dtype, name
        tol = TOL_PARAM_F32 if name in ("dw", "db") and arg.dtype == jnp.float32 else _tol(arg.dtype)
        if name in ("dw", "db") and used == "sum":
            assert np.all(np.asarray(g) == 0), name
            continue
        # bf16 dx: the reference rounds the layernorm gradient to bf16 before adding ds (two
        # roundings), the kernel adds in float32 and rounds once: up to two bf16 ulps apart.
        ref_tol = 2 * tol if name in ("dx", "dr") and dtype == BF16 else tol
        assert rel_error(g, rf) < ref_tol, (name, rel_error(g, rf))
        assert rel_error(g, t) < tol, (name, rel_error(g, t))


def test_residual_layernorm_equals_ops_residual_then_layernorm():
    """The fused op is llm.c's residual followed by layernorm, forward and gradients (fp32)."""
    (x, r), w, b, (ct_s, ct_o) = _inputs((2, 77, 64), jnp.float32, jnp.float32, n_acts=2)

    def run(fn):
        outs, vjp = jax.vjp(fn, x, r, w, b)
        return outs + vjp((ct_s, ct_o))

    def two_ops(x, r, w, b):
        s = ops.residual(x, r)
        return s, ops.layernorm(s, w, b)

    got = jax.jit(lambda: run(functools.partial(residual_layernorm, **BLOCKS)))()
    want = jax.jit(lambda: run(two_ops))()
    for name, g, o in zip(["s", "out", "dx", "dr", "dw", "db"], got, want):
        assert rel_error(g, o) < 1e-6, (name, rel_error(g, o))  # the same float32 math, summation order aside


# ---- CUDA lowering (no execution): every kernel must go through Triton ---------------------------

@pytest.mark.parametrize("C", [768, 1600])
@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["fp32", "bf16"])
def test_lowers_to_triton_at_gpt2_size(dtype, C):
    x = jax.ShapeDtypeStruct((8, 1024, C), dtype)
    p = jax.ShapeDtypeStruct((C,), jnp.float32)
    ln = functools.partial(layernorm, interpret=False)
    res_ln = functools.partial(residual_layernorm, interpret=False)

    def ln_loss(x, w, b):
        return jnp.sum(ln(x, w, b).astype(jnp.float32))

    def res_loss(x, r, w, b):
        s, out = res_ln(x, r, w, b)
        return jnp.sum(s.astype(jnp.float32)) + jnp.sum(out.astype(jnp.float32))

    assert triton_calls(ln, x, p, p) >= 1
    assert triton_calls(jax.grad(ln_loss, argnums=(0, 1, 2)), x, p, p) >= 2   # forward + backward
    assert triton_calls(lambda *a: res_ln(*a), x, x, p, p) >= 1
    assert triton_calls(jax.grad(res_loss, argnums=(0, 1, 2, 3)), x, x, p, p) >= 2


# ---- errors -------------------------------------------------------------------------------------

def _bad(**over):
    args = dict(x=jnp.zeros((4, 64)), w=jnp.ones(64), b=jnp.zeros(64))
    args.update(over)
    return args


@pytest.mark.parametrize("args,kw,exc,match", [
    (_bad(w=jnp.ones(32)), {}, ValueError, "shape"),
    (_bad(x=jnp.zeros((4, 64), jnp.int32)), {}, TypeError, "float32 or bfloat16"),
    (_bad(b=jnp.zeros(64, jnp.float16)), {}, TypeError, "float32 or bfloat16"),
    (_bad(x=jnp.zeros(())), {}, ValueError, "channel axis"),
    (_bad(x=jnp.zeros((0, 64))), {}, ValueError, "no rows"),
    (_bad(x=jnp.zeros((2, 16384)), w=jnp.ones(16384), b=jnp.zeros(16384)), {}, ValueError, "C = 16384"),
    (_bad(), dict(block_rows=6), ValueError, "power of two"),
    (_bad(), dict(block_rows=16, dw_block_rows=8), ValueError, "dw_block_rows"),
], ids=["w_shape", "x_int", "b_fp16", "x_scalar", "no_rows", "C_too_big", "block_rows", "dw_block_rows"])
def test_layernorm_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        layernorm(args["x"], args["w"], args["b"], **kw)


@pytest.mark.parametrize("r", [jnp.zeros((4, 32)), jnp.zeros((4, 64), BF16)], ids=["shape", "dtype"])
def test_residual_layernorm_errors(r):
    with pytest.raises(ValueError, match="r must match x"):
        residual_layernorm(jnp.zeros((4, 64)), r, jnp.ones(64), jnp.zeros(64))
