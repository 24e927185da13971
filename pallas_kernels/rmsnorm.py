"""RMSNorm (Llama 3) and llm.c's fused residual + RMSNorm as Pallas (Triton) kernels, forward and backward.

Same math and dtype policy as `llmc_jax.nn.rmsnorm` (train_llama3.py's RMSNorm):
    rstd = rsqrt(mean(x^2) + eps)       float32, per row; saved for the backward
    y    = round(round(x * rstd) * w)   x * rstd rounded to x's dtype (.type_as(x)), then the float32
                                        product with w rounded once to x's dtype
    dx   = rstd * (g - xhat * mean(g * xhat)),  g = w * dy, xhat = x * rstd (float32, unrounded)
    dw   = sum over rows of dy * xhat   (float32, cast to w's dtype)
The fused op normalises the sum x + r rounded to the activation dtype and returns that sum too; its
backward adds the sum's own cotangent to dx in float32 and rounds once (llm.c's dx +=).

Kernels: the layout and tiling of pallas_kernels.layernorm (N rows of C channels, the row padded to
a power of two and masked; one forward program per block_rows rows; one backward program per
dw_block_rows rows writing one float32 (C,) partial of dw, the partials summed outside), with the
mean and the bias gone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.common import (check_rows, F32, load_rows, next_power_of_2, pl, plt, row_config,
                                   SAVED_NORM_STATS, SAVED_RESIDUAL,
                                   row_params, row_sub_tile, row_tile_masks,
                                   RowConfig)
# the row kernels' shared settings (block sizes, warps): one definition for both norms




# ----------------------------------------------------------------------------------------------
# kernels

def _fwd_kernel(*refs, N: int, C: int, eps: float, residual: bool):
    if residual:
        x_ref, r_ref, w_ref, h_ref, out_ref, rstd_ref = refs
    else:
        x_ref, w_ref, out_ref, rstd_ref = refs
        r_ref = h_ref = None
    block_rows, BC = out_ref.shape
    row_ok, col_ok, mask = row_tile_masks(N, C, block_rows, BC)
    x = load_rows(x_ref, r_ref, h_ref, mask)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / C + eps)           # masked columns are 0: the sum is over C
    n = (x * rstd[:, None]).astype(out_ref.dtype).astype(F32)    # .type_as(x) before the weight
    w = plt.load(w_ref, mask=col_ok, other=0.0).astype(F32)
    plt.store(out_ref, (n * w[None, :]).astype(out_ref.dtype), mask=mask)
    plt.store(rstd_ref, rstd, mask=row_ok)


def _bwd_kernel(*refs, N: int, C: int, block_rows: int, residual: bool):
    if residual:
        x_ref, w_ref, rstd_ref, dout_ref, dh_ref, dx_ref, dw_ref = refs
    else:
        x_ref, w_ref, rstd_ref, dout_ref, dx_ref, dw_ref = refs
    rows_per_program, BC = x_ref.shape
    col_ok = jnp.arange(BC) < C
    w = plt.load(w_ref, mask=col_ok, other=0.0).astype(F32)
    first_row = pl.program_id(0) * rows_per_program

    def tile(j, dw):
        row_ok, mask, rows, load = row_sub_tile(first_row, j, block_rows, N, col_ok)
        rstd = plt.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
        xhat = load(x_ref) * rstd[:, None]
        dout = load(dout_ref)
        g = dout * w[None, :]
        dx = rstd[:, None] * (g - xhat * (jnp.sum(g * xhat, axis=1) / C)[:, None])
        if residual:  # the residual stream's cotangent joins here: dx = dr = the total, rounded once
            dx = dx + load(dh_ref)
        plt.store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask=mask)
        return dw + jnp.sum(dout * xhat, axis=0)

    dw = lax.fori_loop(0, rows_per_program // block_rows, tile, jnp.zeros((BC,), F32))
    plt.store(dw_ref, dw, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# pallas_calls on (N, C) rows

def _forward(cfg: RowConfig, x: jax.Array, r: jax.Array | None, w: jax.Array):
    """(out, rstd), or (h, out, rstd) with h = x + r when r is given."""
    N, C = x.shape
    BC, br = next_power_of_2(C), cfg.block_rows
    residual = r is not None
    tile = pl.BlockSpec((br, BC), lambda i: (i, 0))
    act = jax.ShapeDtypeStruct((N, C), x.dtype)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, N=N, C=C, eps=cfg.eps, residual=residual),
        out_shape=(act,) * (1 + residual) + (jax.ShapeDtypeStruct((N,), F32),),
        grid=(pl.cdiv(N, br),),
        in_specs=[tile] * (1 + residual) + [pl.BlockSpec((BC,), lambda i: (0,))],
        out_specs=(tile,) * (1 + residual) + (pl.BlockSpec((br,), lambda i: (i,)),),
        compiler_params=row_params(cfg, br * BC),
        interpret=cfg.interpret,
        name="residual_rmsnorm_fwd" if residual else "rmsnorm_fwd",
    )(*((x, r) if residual else (x,)), w)


def _backward(cfg: RowConfig, x, w, rstd, dout, dh=None):
    """(dx, dw): dx in x's dtype (plus dh when given, in float32 before the rounding), dw in w's."""
    N, C = x.shape
    BC, rows = next_power_of_2(C), cfg.dw_block_rows
    residual = dh is not None
    num_blocks = pl.cdiv(N, rows)
    tile = pl.BlockSpec((rows, BC), lambda i: (i, 0))
    dx, dw_part = pl.pallas_call(
        functools.partial(_bwd_kernel, N=N, C=C, block_rows=cfg.block_rows, residual=residual),
        out_shape=(jax.ShapeDtypeStruct((N, C), x.dtype), jax.ShapeDtypeStruct((num_blocks, C), F32)),
        grid=(num_blocks,),
        in_specs=[tile, pl.BlockSpec((BC,), lambda i: (0,)), pl.BlockSpec((rows,), lambda i: (i,))]
        + [tile] * (1 + residual),
        out_specs=(tile, pl.BlockSpec((None, BC), lambda i: (i, 0))),
        compiler_params=row_params(cfg, cfg.block_rows * BC),
        interpret=cfg.interpret,
        name="residual_rmsnorm_bwd" if residual else "rmsnorm_bwd",
    )(x, w, rstd, dout, *((dh,) if residual else ()))
    return dx, jnp.sum(dw_part, axis=0).astype(w.dtype)


# ----------------------------------------------------------------------------------------------
# custom_vjps on (N, C); residuals as llmc_jax.nn.rmsnorm: the input (the rounded sum for the
# fused op), w and the float32 rstd

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rmsnorm(cfg, x, w):
    return _forward(cfg, x, None, w)[0]


def _rmsnorm_fwd(cfg, x, w):
    out, rstd = _forward(cfg, x, None, w)
    return out, (x, w, checkpoint_name(rstd, SAVED_NORM_STATS))


def _rmsnorm_bwd(cfg, res, dout):
    return _backward(cfg, *res, dout)


_rmsnorm.defvjp(_rmsnorm_fwd, _rmsnorm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _residual_rmsnorm(cfg, x, r, w):
    return tuple(_forward(cfg, x, r, w)[:2])


def _residual_rmsnorm_fwd(cfg, x, r, w):
    h, out, rstd = _forward(cfg, x, r, w)
    h = checkpoint_name(h, SAVED_RESIDUAL)
    return (h, out), (h, w, checkpoint_name(rstd, SAVED_NORM_STATS))


def _residual_rmsnorm_bwd(cfg, res, cts):
    dh, dout = cts
    dx, dw = _backward(cfg, *res, dout, dh.astype(res[0].dtype))
    return dx, dx, dw


_residual_rmsnorm.defvjp(_residual_rmsnorm_fwd, _residual_rmsnorm_bwd)


# ----------------------------------------------------------------------------------------------
# public API; eps has no default, as in llmc_jax.nn.rmsnorm: every caller passes the model file's.
# Tuning defaults (block_rows=4, dw_block_rows=32, warps from the tile size) as layernorm's:
# unmeasured guesses for an H100.

def rmsnorm(x: jax.Array, w: jax.Array, eps: float, *, block_rows: int = 4, dw_block_rows: int = 32,
            num_warps: int | None = None, num_stages: int | None = None,
            interpret: bool | None = None) -> jax.Array:
    """RMSNorm over the last axis of x (..., C) with weight w (C,); output in x's dtype."""
    C = check_rows(x, {"w": w})
    cfg = row_config(x.size // C, eps, block_rows, dw_block_rows, num_warps, num_stages, interpret)
    return _rmsnorm(cfg, x.reshape(-1, C), w).reshape(x.shape)


def residual_rmsnorm(x: jax.Array, r: jax.Array, w: jax.Array, eps: float, *, block_rows: int = 4,
                     dw_block_rows: int = 32, num_warps: int | None = None, num_stages: int | None = None,
                     interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(x + r, rmsnorm(x + r)) from one forward kernel, as llm.c's fused_residual_rmsnorm_forward:
    the sum is rounded to the activation dtype and the norm is of that rounded sum."""
    C = check_rows(x, {"w": w})
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"r must match x in shape and dtype: x is {x.dtype}{list(x.shape)}, "
                         f"r is {r.dtype}{list(r.shape)}")
    cfg = row_config(x.size // C, eps, block_rows, dw_block_rows, num_warps, num_stages, interpret)
    h, out = _residual_rmsnorm(cfg, x.reshape(-1, C), r.reshape(-1, C), w)
    return h.reshape(x.shape), out.reshape(x.shape)


__all__ = ["rmsnorm", "residual_rmsnorm"]
