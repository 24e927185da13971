"""Llama 3's RMSNorm (plain and fused with the residual) and SwiGLU: hand-written VJPs vs jax.vjp of
the plain-jnp references, and vs an independent float64 NumPy forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import rmsnorm as rn
from llmc_jax.nn.swiglu import swiglu, swiglu_reference

# As test_ops.py: fp32 differs only in summation order; bf16 rounds at different places (the
# manual backward keeps g = w*dy in fp32 where autodiff of the reference rounds it), so outputs and
# gradients agree to a few bf16 ulps: 2e-2 relative to the largest reference magnitude.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SHAPES = [(2, 16), (1, 37), (3, 5)]   # (B, T), T not always a power of two
C, H = 64, 96                         # swiglu: the fc output is 2H = 192 wide
EPS = 1e-5                            # Llama 3's norm_eps


def _inputs(name, B, T, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(0, scale, s).astype(np.float32))
    act = lambda *s: f(*s).astype(dtype)
    w = 1 + f(C, scale=0.1)
    if name == "rmsnorm":
        return (act(B, T, C) * 3 + 1, w, EPS), (0, 1)
    if name == "residual_rmsnorm":
        return (act(B, T, C), act(B, T, C) * 2, w, EPS), (0, 1, 2)
    if name == "swiglu":
        return (act(B, T, 2 * H) * 2,), (0,)
    raise KeyError(name)


OPS = {
    "rmsnorm": (rn.rmsnorm, rn.rmsnorm_reference),
    "residual_rmsnorm": (rn.residual_rmsnorm, rn.residual_rmsnorm_reference),
    "swiglu": (swiglu, swiglu_reference),
}


def _diff_fn(fn, args, diff_argnums):
    """fn as a function of the differentiable args only, the others (eps) closed over."""
    def g(*diff):
        full = list(args)
        for i, a in zip(diff_argnums, diff):
            full[i] = a
        return fn(*full)
    return g


def _random_cotangent(out, seed=7):
    """A nonzero random cotangent for every output (both outputs of residual_rmsnorm)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape).astype(np.float32)).astype(o.dtype), out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("name", list(OPS))
def test_op_vs_autodiff_of_reference(name, B, T, dtype):
    op, ref = OPS[name]
    args, diff_argnums = _inputs(name, B, T, dtype)
    diff_args = [args[i] for i in diff_argnums]
    out_m, vjp_m = jax.vjp(_diff_fn(op, args, diff_argnums), *diff_args)
    out_r, vjp_r = jax.vjp(_diff_fn(ref, args, diff_argnums), *diff_args)
    tol = TOL[dtype]
    for om, orf in zip(jax.tree.leaves(out_m), jax.tree.leaves(out_r)):
        assert om.dtype == orf.dtype == dtype and om.shape == orf.shape
        assert rel_error(om, orf) < tol, f"{name} forward: {rel_error(om, orf)}"
    cot = _random_cotangent(out_m)
    for i, (gm, gr) in enumerate(zip(vjp_m(cot), vjp_r(cot))):
        assert gm.dtype == gr.dtype == diff_args[i].dtype, f"{name} grad {i} dtype"
        assert rel_error(gm, gr) < tol, f"{name} grad of arg {diff_argnums[i]}: {rel_error(gm, gr)}"


# ----------------------------------------------------------------------------------------------
# float64 NumPy: forward and hand-written backward, written from the formulas, not from the ops

def np_rmsnorm(x, w, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * w, r


def np_rmsnorm_backward(x, w, eps, dy):
    _, r = np_rmsnorm(x, w, eps)
    xhat, g = x * r, w * dy
    dx = r * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx, np.sum(dy * xhat, axis=tuple(range(x.ndim - 1)))


def np_swiglu(h):
    up, gate = h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
    return up * gate / (1.0 + np.exp(-gate))


def np_swiglu_backward(h, dout):
    up, gate = h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
    s = 1.0 / (1.0 + np.exp(-gate))
    return np.concatenate([dout * gate * s, dout * up * s * (1 + gate * (1 - s))], axis=-1)


def _f64_case(B, T, seed=3):
    rng = np.random.default_rng(seed)
    x, r = rng.normal(size=(B, T, C)) * 2 + 0.5, rng.normal(size=(B, T, C))
    w = 1 + 0.1 * rng.normal(size=C)
    h = 2 * rng.normal(size=(B, T, 2 * H))
    return x, r, w, h, rng


def test_numpy_backward_matches_central_differences():
    """The float64 oracle's own backward, against directional central differences of its forward."""
    x, _, w, h, rng = _f64_case(2, 5)
    dy, vx, vw = rng.normal(size=x.shape), rng.normal(size=x.shape), rng.normal(size=w.shape)
    loss = lambda x_, w_: np.sum(dy * np_rmsnorm(x_, w_, EPS)[0])
    e = 1e-6
    dx, dw = np_rmsnorm_backward(x, w, EPS, dy)
    assert np.isclose(np.sum(dx * vx), (loss(x + e * vx, w) - loss(x - e * vx, w)) / (2 * e), rtol=1e-7)
    assert np.isclose(np.sum(dw * vw), (loss(x, w + e * vw) - loss(x, w - e * vw)) / (2 * e), rtol=1e-7)
    dout, vh = rng.normal(size=h[..., :H].shape), rng.normal(size=h.shape)
    sloss = lambda h_: np.sum(dout * np_swiglu(h_))
    numeric = (sloss(h + e * vh) - sloss(h - e * vh)) / (2 * e)
    assert np.isclose(np.sum(np_swiglu_backward(h, dout) * vh), numeric, rtol=1e-7)


@pytest.mark.parametrize("B,T", SHAPES)
def test_rmsnorm_vs_float64_numpy(B, T):
    x, _, w, _, rng = _f64_case(B, T)
    dy = rng.normal(size=x.shape)
    j = lambda a: jnp.asarray(a, jnp.float32)
    y, vjp = jax.vjp(lambda a, b: rn.rmsnorm(a, b, EPS), j(x), j(w))
    assert rel_error(y, np_rmsnorm(x, w, EPS)[0]) < 1e-5
    dx, dw = vjp(j(dy))
    want_dx, want_dw = np_rmsnorm_backward(x, w, EPS, dy)
    assert rel_error(dx, want_dx) < 1e-5 and rel_error(dw, want_dw) < 1e-5


@pytest.mark.parametrize("B,T", SHAPES)
def test_residual_rmsnorm_vs_float64_numpy(B, T):
    """Both outputs carry a nonzero cotangent: d(x) = d(r) = dh + the norm's dx."""
    x, r, w, _, rng = _f64_case(B, T)
    dh, dy = rng.normal(size=x.shape), rng.normal(size=x.shape)
    j = lambda a: jnp.asarray(a, jnp.float32)
    (h, y), vjp = jax.vjp(lambda a, b, c: rn.residual_rmsnorm(a, b, c, EPS), j(x), j(r), j(w))
    assert rel_error(h, x + r) < 1e-6
    assert rel_error(y, np_rmsnorm(x + r, w, EPS)[0]) < 1e-5
    dx, dr, dw = vjp((j(dh), j(dy)))
    want_dx, want_dw = np_rmsnorm_backward(x + r, w, EPS, dy)
    assert rel_error(dx, want_dx + dh) < 1e-5 and rel_error(dr, want_dx + dh) < 1e-5
    assert rel_error(dw, want_dw) < 1e-5


@pytest.mark.parametrize("B,T", SHAPES)
def test_swiglu_vs_float64_numpy(B, T):
    _, _, _, h, rng = _f64_case(B, T)
    dout = rng.normal(size=h[..., :H].shape)
    out, vjp = jax.vjp(swiglu, jnp.asarray(h, jnp.float32))
    assert out.shape == (B, T, H)
    assert rel_error(out, np_swiglu(h)) < 1e-5
    assert rel_error(vjp(jnp.asarray(dout, jnp.float32))[0], np_swiglu_backward(h, dout)) < 1e-5


# ----------------------------------------------------------------------------------------------
# eps, dtypes, jit, the [up | gate] order

def test_eps_is_the_one_passed():
    """A row of small values (mean x^2 ~ 1e-6): eps 1e-5 and 1e-6 give clearly different outputs."""
    x64 = 1e-3 * np.random.default_rng(5).normal(size=(1, 3, C))
    w64 = np.ones(C)
    x, w = jnp.asarray(x64, jnp.float32), jnp.asarray(w64, jnp.float32)
    y5, y6 = rn.rmsnorm(x, w, 1e-5), rn.rmsnorm(x, w, 1e-6)
    assert rel_error(y5, np_rmsnorm(x64, w64, 1e-5)[0]) < 1e-5
    assert rel_error(y6, np_rmsnorm(x64, w64, 1e-6)[0]) < 1e-5
    assert rel_error(y5, y6) > 0.3
    _, y5r = rn.residual_rmsnorm(x, jnp.zeros_like(x), w, 1e-5)
    _, y6r = rn.residual_rmsnorm(x, jnp.zeros_like(x), w, 1e-6)
    assert rel_error(y5r, y5) < 1e-6 and rel_error(y6r, y6) < 1e-6


def test_bf16_param_gradient_is_fp32():
    """Master weights arrive fp32 and their gradient comes back fp32; activations stay bf16."""
    (x, w, _), _ = _inputs("rmsnorm", 2, 5, jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: rn.rmsnorm(a, b, EPS), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    (x, r, w, _), _ = _inputs("residual_rmsnorm", 2, 5, jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b, c: rn.residual_rmsnorm(a, b, c, EPS), x, r, w)
    dx, dr, dw = vjp(_random_cotangent(out))
    assert [o.dtype for o in out] == [jnp.bfloat16, jnp.bfloat16]
    assert (dx.dtype, dr.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_bf16_forward_rounds_like_train_llama3():
    """n = bf16(x*r) before the weight, then the fp32 product n*w rounded once to bf16 (PyTorch's
    bf16*fp32 promotes to fp32; the next matmul rounds it): almost every element bit-identical."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(4, 9, C)).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray((1 + 0.1 * rng.normal(size=C)).astype(np.float32))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n = (x64 * np_rmsnorm(x64, w64, EPS)[1]).astype(jnp.bfloat16).astype(np.float64)
    want = (n * w64).astype(jnp.bfloat16).astype(np.float64)
    got = np.asarray(rn.rmsnorm(x, w, EPS), np.float64)
    assert np.mean(got == want) > 0.99 and rel_error(got, want) < 1e-2


def test_jit_with_static_eps():
    (x, w, _), _ = _inputs("rmsnorm", 2, 16, jnp.float32)
    loss = lambda a, b, eps: jnp.sum(rn.rmsnorm(a, b, eps) ** 2)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (l5, g5), (l6, g6) = grad(x, w, 1e-5), grad(x, w, 1e-6)
    (l5e, g5e) = jax.value_and_grad(loss, argnums=(0, 1))(x, w, 1e-5)
    assert np.isclose(float(l5), float(l5e), rtol=1e-6)
    assert all(rel_error(a, b) < 1e-6 for a, b in zip(g5, g5e))
    assert float(l5) != float(l6)
    fused = jax.jit(rn.residual_rmsnorm, static_argnums=3)
    h, y = fused(x, x, w, EPS)
    assert rel_error(y, rn.rmsnorm(x + x, w, EPS)) < 1e-6
    jit_swiglu = jax.jit(jax.grad(lambda h_: jnp.sum(swiglu(h_))))
    assert jit_swiglu(jnp.ones((2, 3, 2 * H))).shape == (2, 3, 2 * H)


def test_swiglu_first_half_is_up_second_half_is_gate():
    """llm.c's order [up (c_fc) | gate (c_fc2)]: out = up * silu(gate), not gate * silu(up)."""
    up, gate = jnp.full((1, 1, H), 2.0), jnp.full((1, 1, H), 10.0)
    out = swiglu(jnp.concatenate([up, gate], axis=-1))
    assert np.allclose(out, 2.0 * 10.0 * jax.nn.sigmoid(10.0), rtol=1e-6)            # ~20.0
    swapped = swiglu(jnp.concatenate([gate, up], axis=-1))
    assert np.allclose(swapped, 10.0 * 2.0 * jax.nn.sigmoid(2.0), rtol=1e-6)         # ~17.6


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even last axis"):
        swiglu(jnp.ones((2, 3, 7)))
    x = jnp.ones((2, 3, C))
    with pytest.raises(ValueError, match="r must match x"):
        rn.residual_rmsnorm(x, x.astype(jnp.bfloat16), jnp.ones(C), EPS)
