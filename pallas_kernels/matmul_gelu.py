"""Fused matmul + bias + GELU (tanh) as Pallas kernels: llm.c's fc layer followed by its GELU.

Forward: out = gelu_tanh(x @ w.T + b), w in llm.c's (OC, C) layout. The GELU runs in float32 on
the float32 accumulator, so the pre-activation never makes an extra HBM round trip before it; the
kernel also writes the pre-activation (in x's dtype), which is what the backward needs, as llm.c
saves fch next to fch_gelu.

Backward: dpre = dout * gelu'(pre) is recomputed inside each backward kernel from the saved
pre-activation and is never written to HBM. One kernel makes dx = dpre @ w, one makes
dw = dpre^T @ x together with db = column sums of dpre.

Dtype policy as llmc_jax.nn.ops (llm.c mixed precision): compute dtype = x's dtype; w and b may be
float32 master weights while x is bfloat16 (w is cast to x's dtype inside the kernels, b is added
in float32); dots accumulate in float32; dw and db come back in w's and b's own dtypes.

The row count N = prod(x.shape[:-1]) is arbitrary (the row edge is masked); C and OC must be
multiples of the C and OC block sizes (GPT-2: C 768..1600 and OC = 4C are multiples of 64).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (F32, check_dtype, compiler_params, dot_f32, gelu_f32, gelu_grad_f32, pl, plt,
                                   resolve_interpret)


class _Config(NamedTuple):
    """Static kernel settings (hashable: a nondiff argument of the custom_vjp)."""
    block_m: int   # rows per tile (the N axis)
    block_n: int   # OC columns per tile
    block_k: int   # C columns per tile
    num_warps: int | None
    num_stages: int | None
    interpret: bool


def _rows_ok(start, size: int, N: int):
    """(size, 1) mask of the rows start .. start+size-1 that exist (row index < N)."""
    return (start + jnp.arange(size) < N)[:, None]


def _dpre(dout_ref, pre_ref, rows, cols, mask):
    """dout * gelu'(pre) in float32 for one tile; masked rows load 0 and so give 0."""
    dout = plt.load(dout_ref.at[rows, cols], mask=mask, other=0.0).astype(F32)
    pre = plt.load(pre_ref.at[rows, cols], mask=mask, other=0.0).astype(F32)
    return dout * gelu_grad_f32(pre)


# ----------------------------------------------------------------------------------------------
# kernels

def _fwd_kernel(x_ref, w_ref, b_ref, out_ref, pre_ref, *, N: int, block_k: int):
    """One (block_m, block_n) tile of pre = x @ w.T + b and out = gelu(pre), looping over C."""
    block_m, C = x_ref.shape
    block_n = w_ref.shape[0]
    ok = _rows_ok(pl.program_id(0) * block_m, block_m, N)

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        x = plt.load(x_ref.at[:, cols], mask=ok, other=0.0)
        w = w_ref[:, cols].astype(x.dtype)
        return acc + dot_f32(x, w, (1, 1))

    acc = lax.fori_loop(0, C // block_k, step, jnp.zeros((block_m, block_n), F32))
    pre = acc + b_ref[...].astype(F32)[None, :]
    plt.store(pre_ref, pre.astype(pre_ref.dtype), mask=ok)
    plt.store(out_ref, gelu_f32(pre).astype(out_ref.dtype), mask=ok)


def _dx_kernel(dout_ref, pre_ref, w_ref, dx_ref, *, N: int, block_n: int):
    """One (block_m, block_k) tile of dx = dpre @ w, looping over OC; dpre stays on chip."""
    block_m, OC = dout_ref.shape
    block_k = w_ref.shape[1]
    ok = _rows_ok(pl.program_id(0) * block_m, block_m, N)

    def step(n, acc):
        cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
        dpre = _dpre(dout_ref, pre_ref, slice(None), cols, ok).astype(dx_ref.dtype)
        w = w_ref[cols, :].astype(dx_ref.dtype)
        return acc + dot_f32(dpre, w, (1, 0))

    acc = lax.fori_loop(0, OC // block_n, step, jnp.zeros((block_m, block_k), F32))
    plt.store(dx_ref, acc.astype(dx_ref.dtype), mask=ok)


def _dw_kernel(dout_ref, pre_ref, x_ref, dw_ref, db_ref, *, N: int, block_m: int):
    """One (block_n, block_k) tile of dw = dpre^T @ x, looping over all N rows (edge masked);
    the programs of the first C block also write db = column sums of dpre for their OC block."""
    block_n = dout_ref.shape[1]
    block_k = x_ref.shape[1]

    def step(r, carry):
        dw, db = carry
        start = pl.multiple_of(r * block_m, block_m)
        rows = pl.ds(start, block_m)
        ok = _rows_ok(start, block_m, N)
        dpre = _dpre(dout_ref, pre_ref, rows, slice(None), ok)
        x = plt.load(x_ref.at[rows, :], mask=ok, other=0.0)
        return dw + dot_f32(dpre.astype(x.dtype), x, (0, 0)), db + jnp.sum(dpre, axis=0)

    init = (jnp.zeros((block_n, block_k), F32), jnp.zeros((block_n,), F32))
    dw, db = lax.fori_loop(0, pl.cdiv(N, block_m), step, init)
    dw_ref[...] = dw.astype(dw_ref.dtype)

    @pl.when(pl.program_id(1) == 0)
    def _():
        db_ref[...] = db.astype(db_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (2-D: x_NC, w_OCC, b_OC)

def _forward(cfg: _Config, x_NC, w_OCC, b_OC):
    N, C = x_NC.shape
    OC = w_OCC.shape[0]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, N=N, block_k=bk),
        out_shape=(jax.ShapeDtypeStruct((N, OC), x_NC.dtype), jax.ShapeDtypeStruct((N, OC), x_NC.dtype)),
        grid=(pl.cdiv(N, bm), OC // bn),
        in_specs=[pl.BlockSpec((bm, C), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, C), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn,), lambda i, j: (j,))],
        out_specs=(tile, tile),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="matmul_gelu_fwd",
    )(x_NC, w_OCC, b_OC)


def _backward_dx(cfg: _Config, dout_NOC, pre_NOC, w_OCC):
    N, OC = dout_NOC.shape
    C = w_OCC.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    rows = pl.BlockSpec((bm, OC), lambda i, c: (i, 0))
    return pl.pallas_call(
        functools.partial(_dx_kernel, N=N, block_n=bn),
        out_shape=jax.ShapeDtypeStruct((N, C), dout_NOC.dtype),
        grid=(pl.cdiv(N, bm), C // bk),
        in_specs=[rows, rows, pl.BlockSpec((OC, bk), lambda i, c: (0, c))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, c: (i, c)),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="matmul_gelu_bwd_dx",
    )(dout_NOC, pre_NOC, w_OCC)


def _backward_dw_db(cfg: _Config, dout_NOC, pre_NOC, x_NC, w_dtype, b_dtype):
    N, OC = dout_NOC.shape
    C = x_NC.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cols = pl.BlockSpec((N, bn), lambda j, c: (0, j))
    return pl.pallas_call(
        functools.partial(_dw_kernel, N=N, block_m=bm),
        out_shape=(jax.ShapeDtypeStruct((OC, C), w_dtype), jax.ShapeDtypeStruct((OC,), b_dtype)),
        grid=(OC // bn, C // bk),
        in_specs=[cols, cols, pl.BlockSpec((N, bk), lambda j, c: (0, c))],
        out_specs=(pl.BlockSpec((bn, bk), lambda j, c: (j, c)), pl.BlockSpec((bn,), lambda j, c: (j,))),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="matmul_gelu_bwd_dw_db",
    )(dout_NOC, pre_NOC, x_NC)


# ----------------------------------------------------------------------------------------------
# custom_vjp on (N, C) rows; residuals as llm.c: x, w, b and the pre-activation (fch)

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_gelu_2d(cfg: _Config, x_NC, w_OCC, b_OC):
    return _forward(cfg, x_NC, w_OCC, b_OC)[0]


def _matmul_gelu_2d_fwd(cfg: _Config, x_NC, w_OCC, b_OC):
    out, pre = _forward(cfg, x_NC, w_OCC, b_OC)
    return out, (x_NC, w_OCC, b_OC, pre)


def _matmul_gelu_2d_bwd(cfg: _Config, res, dout_NOC):
    x_NC, w_OCC, b_OC, pre = res
    dx = _backward_dx(cfg, dout_NOC, pre, w_OCC)
    dw, db = _backward_dw_db(cfg, dout_NOC, pre, x_NC, w_OCC.dtype, b_OC.dtype)
    return dx, dw, db


_matmul_gelu_2d.defvjp(_matmul_gelu_2d_fwd, _matmul_gelu_2d_bwd)


# ----------------------------------------------------------------------------------------------
# public API

def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton tile dimension), got {value!r}")


def matmul_gelu(x: jax.Array, w: jax.Array, b: jax.Array, *, block_m: int = 128, block_n: int | None = None,
                block_k: int = 64, num_warps: int | None = None, num_stages: int | None = None,
                interpret: bool | None = None) -> jax.Array:
    """gelu_tanh(x @ w.T + b) for x (..., C), w (OC, C), b (OC,); the output (..., OC) has x's dtype.

    Tiles: block_m rows, block_n OC columns (None: 128 when it divides OC, else 64), block_k C
    columns; C must be a multiple of block_k and OC of block_n. The defaults (and Triton's own
    num_warps / num_stages defaults) are unmeasured guesses for an H100 until a GPU run tunes them.
    """
    for name, a in (("x", x), ("w", w), ("b", b)):
        check_dtype(name, a)
    if x.ndim < 1 or w.ndim != 2 or b.ndim != 1:
        raise ValueError(f"expected x (..., C), w (OC, C), b (OC,); got x {x.shape}, w {w.shape}, b {b.shape}")
    OC, C = w.shape
    if x.shape[-1] != C or b.shape[0] != OC:
        raise ValueError(f"x's last axis must equal w.shape[1] and b must be (w.shape[0],); "
                         f"got x {x.shape}, w {w.shape}, b {b.shape}")
    N = math.prod(x.shape[:-1])
    if N == 0:
        raise ValueError(f"x {x.shape} has no rows")
    if block_n is None:
        block_n = 128 if OC % 128 == 0 else 64
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _check_block(name, value)
    if C % block_k:
        raise ValueError(f"C={C} must be a multiple of block_k={block_k}: pass a block_k that divides C "
                         "(C a multiple of 64 works with the default)")
    if OC % block_n:
        raise ValueError(f"OC={OC} must be a multiple of block_n={block_n}: pass a block_n that divides OC "
                         "(OC a multiple of 64 works with the default)")
    cfg = _Config(block_m, block_n, block_k, num_warps, num_stages, resolve_interpret(interpret))
    out_NOC = _matmul_gelu_2d(cfg, x.reshape(N, C), w, b)
    return out_NOC.reshape(*x.shape[:-1], OC)


def matmul_gelu_reference(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Plain-jnp twin of `matmul_gelu` (same casts, float32 GELU), differentiated by JAX itself."""
    pre = jnp.einsum("...c,oc->...o", x, w.astype(x.dtype), preferred_element_type=F32) + b.astype(F32)
    return gelu_f32(pre).astype(x.dtype)


__all__ = ["matmul_gelu", "matmul_gelu_reference"]
