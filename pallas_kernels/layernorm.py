"""LayerNorm and llm.c's fused residual + LayerNorm as Pallas (Triton) kernels, forward and backward.

Same math and dtype policy as `llmc_jax.nn.ops.layernorm`: statistics over the last axis in float32,
biased variance, output in the activation's dtype, parameters cast inside (their gradients come
back in their own dtypes). As in llm.c the forward saves the float32 mean and rstd per row, so the
backward never recomputes the statistics.

Kernels (N rows of C channels; the row is padded to BC = next power of two >= C and masked, since
GPT-2's 768/1280/1600 are not powers of two):
- forward: grid (cdiv(N, block_rows),); each program normalises a (block_rows, BC) tile and writes
  out, mean and rstd (residual_layernorm: first the rounded sum x + r, written out as well).
- backward: grid (cdiv(N, dw_block_rows),); each program walks its dw_block_rows rows in
  (block_rows, BC) tiles, writes dx (plus the incoming gradient of x + r for residual_layernorm)
  and sums dout * norm and dout of its rows into one float32 (BC,) partial each; the
  (num_blocks, C) partials are summed outside by one jnp.sum.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.common import (check_rows, F32, LN_EPS, load_rows, next_power_of_2, pl, plt, row_config,
                                   SAVED_NORM_STATS, SAVED_RESIDUAL,
                                   row_params, row_sub_tile, row_tile_masks,
                                   RowConfig)


# ----------------------------------------------------------------------------------------------
# kernels

def _fwd_kernel(*refs, N: int, C: int, eps: float, residual: bool):
    if residual:
        x_ref, r_ref, w_ref, b_ref, s_ref, out_ref, mean_ref, rstd_ref = refs
    else:
        x_ref, w_ref, b_ref, out_ref, mean_ref, rstd_ref = refs
        r_ref = s_ref = None
    block_rows, BC = out_ref.shape
    row_ok, col_ok, mask = row_tile_masks(N, C, block_rows, BC)
    x = load_rows(x_ref, r_ref, s_ref, mask)
    mean = jnp.sum(x, axis=1) / C
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / C + eps)
    w = plt.load(w_ref, mask=col_ok, other=0.0).astype(F32)
    b = plt.load(b_ref, mask=col_ok, other=0.0).astype(F32)
    out = xc * rstd[:, None] * w[None, :] + b[None, :]
    plt.store(out_ref, out.astype(out_ref.dtype), mask=mask)
    plt.store(mean_ref, mean, mask=row_ok)
    plt.store(rstd_ref, rstd, mask=row_ok)


def _bwd_kernel(*refs, N: int, C: int, block_rows: int, residual: bool):
    if residual:
        x_ref, w_ref, mean_ref, rstd_ref, dout_ref, ds_ref, dx_ref, dw_ref, db_ref = refs
    else:
        x_ref, w_ref, mean_ref, rstd_ref, dout_ref, dx_ref, dw_ref, db_ref = refs
    rows_per_program, BC = x_ref.shape
    col_ok = jnp.arange(BC) < C
    w = plt.load(w_ref, mask=col_ok, other=0.0).astype(F32)
    first_row = pl.program_id(0) * rows_per_program

    def tile(j, acc):
        dw, db = acc
        row_ok, mask, rows, load = row_sub_tile(first_row, j, block_rows, N, col_ok)
        mean = plt.load(mean_ref.at[rows], mask=row_ok, other=0.0)
        rstd = plt.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
        norm = jnp.where(mask, (load(x_ref) - mean[:, None]) * rstd[:, None], 0.0)
        dout = load(dout_ref)
        dnorm = dout * w[None, :]
        # dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), means over the C real channels
        dnorm_mean = jnp.sum(dnorm, axis=1) / C
        dnorm_norm_mean = jnp.sum(dnorm * norm, axis=1) / C
        dx = rstd[:, None] * (dnorm - dnorm_mean[:, None] - norm * dnorm_norm_mean[:, None])
        if residual:  # the gradient of x + r joins here, so dx = dr = the total
            dx = dx + load(ds_ref)
        plt.store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask=mask)
        return dw + jnp.sum(dout * norm, axis=0), db + jnp.sum(dout, axis=0)

    zeros = jnp.zeros((BC,), F32)
    dw, db = lax.fori_loop(0, rows_per_program // block_rows, tile, (zeros, zeros))
    plt.store(dw_ref, dw, mask=col_ok)
    plt.store(db_ref, db, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# pallas_calls on (N, C) rows

def _forward(cfg: RowConfig, x: jax.Array, r: jax.Array | None, w: jax.Array, b: jax.Array):
    """(out, mean, rstd), or (s, out, mean, rstd) with s = x + r when r is given."""
    N, C = x.shape
    BC, br = next_power_of_2(C), cfg.block_rows
    residual = r is not None
    tile = pl.BlockSpec((br, BC), lambda i: (i, 0))
    vec = pl.BlockSpec((BC,), lambda i: (0,))
    row = pl.BlockSpec((br,), lambda i: (i,))
    act = jax.ShapeDtypeStruct((N, C), x.dtype)
    stat = jax.ShapeDtypeStruct((N,), F32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, N=N, C=C, eps=cfg.eps, residual=residual),
        out_shape=(act,) * (1 + residual) + (stat, stat),
        grid=(pl.cdiv(N, br),),
        in_specs=[tile] * (1 + residual) + [vec, vec],
        out_specs=(tile,) * (1 + residual) + (row, row),
        compiler_params=row_params(cfg, br * BC),
        interpret=cfg.interpret,
        name="residual_layernorm_fwd" if residual else "layernorm_fwd",
    )(*((x, r) if residual else (x,)), w, b)


def _backward(cfg: RowConfig, x, w, b, mean, rstd, dout, ds=None):
    """(dx, dw, db): dx in x's dtype (plus ds when given), dw and db in w's and b's dtypes."""
    N, C = x.shape
    BC, rows = next_power_of_2(C), cfg.dw_block_rows
    residual = ds is not None
    num_blocks = pl.cdiv(N, rows)
    tile = pl.BlockSpec((rows, BC), lambda i: (i, 0))
    row = pl.BlockSpec((rows,), lambda i: (i,))
    partial = pl.BlockSpec((None, BC), lambda i: (i, 0))
    dx, dw_part, db_part = pl.pallas_call(
        functools.partial(_bwd_kernel, N=N, C=C, block_rows=cfg.block_rows, residual=residual),
        out_shape=(jax.ShapeDtypeStruct((N, C), x.dtype),) + (jax.ShapeDtypeStruct((num_blocks, C), F32),) * 2,
        grid=(num_blocks,),
        in_specs=[tile, pl.BlockSpec((BC,), lambda i: (0,)), row, row] + [tile] * (1 + residual),
        out_specs=(tile, partial, partial),
        compiler_params=row_params(cfg, cfg.block_rows * BC),
        interpret=cfg.interpret,
        name="residual_layernorm_bwd" if residual else "layernorm_bwd",
    )(x, w, mean, rstd, dout, *((ds,) if residual else ()))
    return dx, jnp.sum(dw_part, axis=0).astype(w.dtype), jnp.sum(db_part, axis=0).astype(b.dtype)


# ----------------------------------------------------------------------------------------------
# custom_vjps on (N, C); residuals as in llm.c: the input (for the fused op the rounded sum),
# w, and the float32 mean and rstd (b only for its dtype)

def _named_stats(*stats):
    return tuple(checkpoint_name(s, SAVED_NORM_STATS) for s in stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layernorm(cfg, x, w, b):
    return _forward(cfg, x, None, w, b)[0]


def _layernorm_fwd(cfg, x, w, b):
    out, mean, rstd = _forward(cfg, x, None, w, b)
    return out, (x, w, b, *_named_stats(mean, rstd))


def _layernorm_bwd(cfg, res, dout):
    return _backward(cfg, *res, dout)


_layernorm.defvjp(_layernorm_fwd, _layernorm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _residual_layernorm(cfg, x, r, w, b):
    return tuple(_forward(cfg, x, r, w, b)[:2])


def _residual_layernorm_fwd(cfg, x, r, w, b):
    s, out, mean, rstd = _forward(cfg, x, r, w, b)
    s = checkpoint_name(s, SAVED_RESIDUAL)
    return (s, out), (s, w, b, *_named_stats(mean, rstd))


def _residual_layernorm_bwd(cfg, res, cts):
    ds, dout = cts
    dx, dw, db = _backward(cfg, *res, dout, ds.astype(res[0].dtype))
    return dx, dx, dw, db


_residual_layernorm.defvjp(_residual_layernorm_fwd, _residual_layernorm_bwd)


# ----------------------------------------------------------------------------------------------
# public API
#
# Default tuning (block_rows=4, dw_block_rows=32, num_warps from the tile size, Triton's default
# num_stages) are unmeasured guesses for an H100 until a GPU run tunes them. dw_block_rows sets
# the size of the dw/db partials: (N / dw_block_rows, C) float32 each.

def layernorm(x: jax.Array, w: jax.Array, b: jax.Array, *, eps: float = LN_EPS, block_rows: int = 4,
              dw_block_rows: int = 32, num_warps: int | None = None, num_stages: int | None = None,
              interpret: bool | None = None) -> jax.Array:
    """LayerNorm over the last axis of x (..., C) with weight w and bias b of shape (C,)."""
    C = check_rows(x, {"w": w, "b": b})
    cfg = row_config(x.size // C, eps, block_rows, dw_block_rows, num_warps, num_stages, interpret)
    return _layernorm(cfg, x.reshape(-1, C), w, b).reshape(x.shape)


def residual_layernorm(x: jax.Array, r: jax.Array, w: jax.Array, b: jax.Array, *, eps: float = LN_EPS,
                       block_rows: int = 4, dw_block_rows: int = 32, num_warps: int | None = None,
                       num_stages: int | None = None,
                       interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(x + r, layernorm(x + r)) from one forward kernel, as llm.c's fused residual forward: the sum
    is rounded to the activation dtype and the layernorm is of that rounded sum."""
    C = check_rows(x, {"w": w, "b": b})
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"r must match x in shape and dtype: x is {x.dtype}{list(x.shape)}, "
                         f"r is {r.dtype}{list(r.shape)}")
    cfg = row_config(x.size // C, eps, block_rows, dw_block_rows, num_warps, num_stages, interpret)
    s, out = _residual_layernorm(cfg, x.reshape(-1, C), r.reshape(-1, C), w, b)
    return s.reshape(x.shape), out.reshape(x.shape)


def layernorm_reference(x: jax.Array, w: jax.Array, b: jax.Array, *, eps: float = LN_EPS) -> jax.Array:
    """Plain jnp, differentiated by JAX: the semantics the kernels must match."""
    x32 = x.astype(F32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) / jnp.sqrt(var + eps) * w.astype(F32) + b.astype(F32)).astype(x.dtype)


def residual_layernorm_reference(x: jax.Array, r: jax.Array, w: jax.Array, b: jax.Array, *,
                                 eps: float = LN_EPS) -> tuple[jax.Array, jax.Array]:
    s = x + r
    return s, layernorm_reference(s, w, b, eps=eps)


__all__ = ["layernorm", "layernorm_reference", "residual_layernorm", "residual_layernorm_reference"]
