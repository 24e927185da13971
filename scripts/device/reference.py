"""The truth the Pallas kernels are held to: their forward and backward in float64 NumPy (the
formulas of the kernels' CPU tests), on inputs drawn as those tests draw them, with the tests' own
tolerances. Runs on the host; only the inputs handed to the kernel go to the device."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# Relative tolerances, max |got - truth| / max |truth| (the CPU tests' measure, tests/conftest.py
# rel_error), per kernel and activation dtype: the CPU tests' own constants (tests/test_device_check.py
# checks that they still agree):
#   attention    tests/test_pallas_flash_attention.py  TOL_F32 1e-5, TOL_BF16 1e-2
#   layernorm    tests/test_pallas_layernorm.py        TOL_F32 1e-5, TOL_BF16 2^-7 (out, dx),
#                                                      TOL_PARAM_F32 1e-5 (fp32 dw, db of a bf16 run)
#   rmsnorm      tests/test_pallas_rmsnorm.py          TOL_F32 1e-5 (also the fp32 dw), TOL_BF16 2^-7
#   matmul_gelu  tests/test_pallas_matmul_gelu.py      FP32_TOL 1e-5, BF16_TOL 1e-2 (dw, db too)
TOLERANCES = {
    "attention": {"float32": 1e-5, "bfloat16": 1e-2},
    "layernorm": {"float32": 1e-5, "bfloat16": 2 ** -7, "param_float32": 1e-5},
    "rmsnorm": {"float32": 1e-5, "bfloat16": 2 ** -7, "param_float32": 1e-5},
    "matmul_gelu": {"float32": 1e-5, "bfloat16": 1e-2, "param_float32": 1e-2},
}
EPS = 1e-5      # llm.c's layernorm epsilon; the RMSNorm cases use the same


def _rounded(a, dtype: str):
    """a (float64) as the device will hold it in dtype, back in float64."""
    import ml_dtypes
    return a.astype(ml_dtypes.bfloat16).astype(np.float64) if dtype == "bfloat16" else a.astype(np.float32).astype(
        np.float64)


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, scale: float) -> tuple:
    """float64 causal attention forward and its hand-derived backward (the formulas of
    tests/test_pallas_flash_attention.py), q (B, T, NH, HS), k and v (B, T, NKV, HS)."""
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    rep = NH // NKV
    qh, doh = q.transpose(0, 2, 1, 3), do.transpose(0, 2, 1, 3)                  # (B, NH, T, HS)
    kh, vh = (np.repeat(a, rep, axis=2).transpose(0, 2, 1, 3) for a in (k, v))     # head h <- kv head h // rep
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    del s
    out = np.matmul(p, vh)
    dv = np.matmul(p.transpose(0, 1, 3, 2), doh)
    dp = np.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * scale
    del dp, p
    dq = np.matmul(ds, kh)
    dk = np.matmul(ds.transpose(0, 1, 3, 2), qh)
    group = lambda g: g.reshape(B, NKV, rep, T, HS).sum(axis=2).transpose(0, 2, 1, 3)   # sum each kv head's group
    return out.transpose(0, 2, 1, 3), dq.transpose(0, 2, 1, 3), group(dk), group(dv)


def np_layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, dout: np.ndarray) -> tuple:
    """(out, dx, dw, db) in float64 (tests/test_pallas_layernorm.py's np_layernorm and _bwd)."""
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / ((((x - mean) ** 2).mean(-1, keepdims=True) + EPS) ** 0.5)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True))
    return norm * w + b, dx, (dout * norm).sum(0), dout.sum(0)


def np_rmsnorm(x: np.ndarray, w: np.ndarray, dout: np.ndarray) -> tuple:
    """(out, dx, dw) in float64 (tests/test_pallas_rmsnorm.py's np_rmsnorm and _bwd)."""
    rstd = 1 / (((x * x).mean(-1, keepdims=True) + EPS) ** 0.5)
    xhat, g = x * rstd, dout * w
    return xhat * w, rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dout * xhat).sum(0)


def np_matmul_gelu(x: np.ndarray, w: np.ndarray, b: np.ndarray, g: np.ndarray) -> tuple:
    """(out, dx, dw, db) in float64 (tests/test_pallas_matmul_gelu.py's float64_truth); w as the
    kernel sees it (rounded to the activation dtype)."""
    s = math.sqrt(2.0 / math.pi)
    pre = x @ w.T + b
    t = np.tanh(s * (pre + 0.044715 * pre ** 3))
    dpre = g * (0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * pre ** 2))
    return 0.5 * pre * (1.0 + t), dpre @ w, dpre.T @ x, dpre.sum(axis=0)


def _tolerances(kernel: str, dtype: str) -> tuple[float, float]:
    """(activation tolerance, fp32 parameter-gradient tolerance) of the kernel's family."""
    fam = "layernorm" if "layernorm" in kernel else "rmsnorm" if "rmsnorm" in kernel else kernel
    tol = TOLERANCES[fam][dtype]
    return tol, TOLERANCES[fam].get("param_float32", tol)


def _attention_problem(shape, dtype: str, rng, put, f64):
    import jax.numpy as jnp
    import pallas_kernels.flash_attention as fa
    act = jnp.dtype(dtype)
    tol, _ = _tolerances("attention", dtype)
    B, T, NH, NKV, HS = shape
    q, k, v, do = (rng.normal(0, s, sh) for s, sh in ((1.5, (B, T, NH, HS)), (1.0, (B, T, NKV, HS)),
                                                      (1.0, (B, T, NKV, HS)), (1.0, (B, T, NH, HS))))
    truth = np_attention(f64(q), f64(k), f64(v), f64(do), HS ** -0.5)
    fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=True)
    return (fn, [put(q), put(k), put(v)], put(do),
            list(zip(("out", "dq", "dk", "dv"), truth, [tol] * 4)), [act] * 4)


def _norm_problem(kernel: str, shape, dtype: str, rng, put, f64):
    import jax.numpy as jnp
    import pallas_kernels.layernorm as pln
    import pallas_kernels.rmsnorm as prms
    act = jnp.dtype(dtype)
    tol, ptol = _tolerances(kernel, dtype)
    N, C = shape
    x, r = rng.normal(1, 2, (N, C)), rng.normal(0, 1, (N, C))
    w, b = 1 + rng.normal(0, 0.1, C), rng.normal(0, 0.1, C)
    ct_s, ct_o = rng.normal(0, 1, (N, C)), rng.normal(0, 1, (N, C))
    w32, b32 = f64(w, "float32"), f64(b, "float32")
    residual = kernel.startswith("residual")
    # the fused ops normalise the sum x + r rounded to the activation dtype, and return that sum
    s64 = f64(f64(x) + f64(r)) if residual else f64(x)
    if "layernorm" in kernel:
        out, dx, dw, db = np_layernorm(s64, w32, b32, f64(ct_o))
        params = [put(w, jnp.float32), put(b, jnp.float32)]
        grads = [("dw", dw, ptol), ("db", db, ptol)]
        fn = pln.residual_layernorm if residual else pln.layernorm
    else:
        out, dx, dw = np_rmsnorm(s64, w32, f64(ct_o))
        params = [put(w, jnp.float32)]
        grads = [("dw", dw, ptol)]
        op = prms.residual_rmsnorm if residual else prms.rmsnorm
        fn = (lambda x, r, w: op(x, r, w, EPS)) if residual else (lambda x, w: op(x, w, EPS))
    if residual:
        dx = dx + f64(ct_s)
        return (fn, [put(x), put(r)] + params, (put(ct_s), put(ct_o)),
                [("sum", s64, tol), ("out", out, tol), ("dx", dx, tol), ("dr", dx, tol)] + grads,
                [act, act, act, act] + [jnp.float32] * len(grads))
    return (fn, [put(x)] + params, put(ct_o), [("out", out, tol), ("dx", dx, tol)] + grads,
            [act, act] + [jnp.float32] * len(grads))


def _matmul_gelu_problem(shape, dtype: str, rng, put, f64):
    import jax.numpy as jnp
    import pallas_kernels.matmul_gelu as pmg
    act = jnp.dtype(dtype)
    tol, ptol = _tolerances("matmul_gelu", dtype)
    N, C, OC = shape
    x, w = rng.normal(0, 1, (N, C)), rng.normal(0, 1, (OC, C)) / math.sqrt(C)
    b, g = rng.normal(0, 0.5, OC), rng.normal(0, 1, (N, OC))
    truth = np_matmul_gelu(f64(x), f64(f64(w, "float32")), f64(b, "float32"), f64(g))
    return (pmg.matmul_gelu, [put(x), put(w, jnp.float32), put(b, jnp.float32)], put(g),
            list(zip(("out", "dx", "dw", "db"), truth, [tol, tol, ptol, ptol])),
            [act, act, jnp.float32, jnp.float32])


def kernel_problem(kernel: str, shape: tuple, dtype: str, rng: Any) -> tuple:
    """(fn, device args, device cotangents, float64 truth [(name, array, tol)], expected out dtypes).
    Inputs as the CPU tests draw them; fp32 master weights (llm.c's mixed precision)."""
    import jax.numpy as jnp
    act = jnp.dtype(dtype)
    put = lambda a, dt=act: jnp.asarray(a, dt)
    f64 = lambda a, dt=dtype: _rounded(a, dt)
    if kernel == "attention":
        return _attention_problem(shape, dtype, rng, put, f64)
    if kernel in ("layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm"):
        return _norm_problem(kernel, shape, dtype, rng, put, f64)
    if kernel == "matmul_gelu":
        return _matmul_gelu_problem(shape, dtype, rng, put, f64)
    raise ValueError(f"unknown kernel {kernel!r}")
