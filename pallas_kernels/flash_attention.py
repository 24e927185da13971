"""Flash attention (FlashAttention-2) as Triton-style Pallas kernels, forward and backward.

Why: `llmc_jax.nn.ops.attention` materializes the (B, NH, T, T) scores; these kernels keep them in
on-chip tiles. The forward runs the online softmax over key blocks and saves only the output and
the log-sum-exp of each score row; the backward recomputes the probabilities tile by tile from that
log-sum-exp (p = exp(s - lse)), with one kernel for dk/dv (a program per key block) and one for dq
(a program per query block), so no program ever writes where another does (no atomics).

Grouped-query attention (Llama 3): k and v may have NKV heads, NKV dividing NH; query head h reads
kv head h // n_rep (n_rep = NH // NKV, the order of train_llama3.py's repeat_kv) through the
BlockSpec index maps, so no replicated K/V buffer is ever built. The dk/dv kernel then runs one
program per (batch, kv head, key block) that loops over the n_rep query heads of its group and sums
their contributions in its float32 accumulators: dk and dv come back (B, T, NKV, HS) directly.

Layout (B, T, NH, HS) for q, (B, T, NKV, HS) for k and v, as jax.nn.dot_product_attention. Matmul
operands stay in the input dtype (p and ds are cast to it, as ops.attention does) with float32
accumulation; the softmax statistics are float32. T need not be a block multiple: every load and
store past T is masked, and keys past T get zero probability. Causal programs stop at the diagonal,
and only the tiles that straddle the diagonal or the end of the sequence pay for the mask.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (F32, check_dtype, compiler_params, dot_f32, next_power_of_2, pl, plt,
                                   resolve_interpret)

MIN_BLOCK = 16    # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along T, each a power of two >= 16 (clamped to T rounded up to a power of two).

    The defaults are unmeasured guesses for an H100 with HS=64 until a GPU run tunes them: 64x64 in
    the forward; in the backward the tile that stays resident (key block for dk/dv, query block for
    dq) is the larger one, as two accumulators and more live operands share the registers there.
    """
    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32

    def fitted(self, T: int) -> "BlockSizes":
        """No tile larger than the sequence needs (a T=1 call runs 16-row tiles, not 64)."""
        cap = max(MIN_BLOCK, next_power_of_2(T))
        return BlockSizes(*(min(b, cap) for b in dataclasses.astuple(self)))


class _Config(NamedTuple):
    """Static (hashable) settings, the custom_vjp's non-differentiable argument."""
    causal: bool
    scale: float
    blocks: BlockSizes   # already fitted to T
    num_warps: int
    num_stages: int
    interpret: bool


# ----------------------------------------------------------------------------------------------
# pieces shared by the three kernels

def _iota(start, n: int):
    return start + jnp.arange(n, dtype=jnp.int32)


def _load_rows(ref, start, n: int, T: int):
    """Rows [start, start+n) of a (T, ...) ref; rows past T read as zeros."""
    rows = _iota(start, n)
    keep = rows < T
    return plt.load(ref.at[pl.ds(start, n)], mask=keep if ref.ndim == 1 else keep[:, None], other=0)


def _load_block(ref, start, T: int):
    """The whole BlockSpec block starting at row `start`; rows past T read as zeros."""
    keep = _iota(start, ref.shape[0]) < T
    return plt.load(ref, mask=keep if ref.ndim == 1 else keep[:, None], other=0)


def _store_block(ref, start, val, T: int):
    keep = _iota(start, ref.shape[0]) < T
    plt.store(ref, val.astype(ref.dtype), mask=keep if ref.ndim == 1 else keep[:, None])


def _scores(q, k, q_rows, k_cols, T: int, causal: bool, scale: float, masked: bool):
    """s = q k^T * scale in float32; on a masked tile, keys past T or in the future are -inf."""
    s = dot_f32(q, k, (1, 1)) * scale
    if not masked:
        return s
    keep = k_cols[None, :] < T
    if causal:
        keep = keep & (q_rows[:, None] >= k_cols[None, :])
    return jnp.where(keep, s, -jnp.inf)


def _key_blocks(q_start, block_q: int, block_k: int, T: int, causal: bool):
    """(n_full, n_all): a query block needs key blocks [0, n_all); those below n_full lie entirely
    below the diagonal and inside T, so they need no mask. Key 0 is in the first block visited and
    is visible to every row, so each row's running max is finite after the first step."""
    if causal:
        return (q_start + 1) // block_k, (jnp.minimum(q_start + block_q, T) + block_k - 1) // block_k
    return T // block_k, pl.cdiv(T, block_k)


def _loop(lo, hi, step, carry, **static):
    return lax.fori_loop(lo, hi, functools.partial(step, **static), carry)


# ----------------------------------------------------------------------------------------------
# kernels (the B and NH axes are squeezed out of every block: refs are (rows, HS) or (rows,))

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, T, causal, scale, block_k):
    """One query block: online softmax over key blocks; writes o and lse = max + log(sum)."""
    block_q, HS = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q_rows = _iota(q_start, block_q)
    q = _load_block(q_ref, q_start, T)

    def step(j, carry, masked):
        acc, m, l = carry
        k_start = j * block_k
        k, v = _load_rows(k_ref, k_start, block_k, T), _load_rows(v_ref, k_start, block_k, T)
        s = _scores(q, k, q_rows, _iota(k_start, block_k), T, causal, scale, masked)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)                       # rescales what was summed under the old max
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l

    n_full, n_all = _key_blocks(q_start, block_q, block_k, T, causal)
    carry = (jnp.zeros((block_q, HS), F32), jnp.full((block_q,), -jnp.inf, F32), jnp.zeros((block_q,), F32))
    carry = _loop(0, n_full, step, carry, masked=False)
    acc, m, l = _loop(n_full, n_all, step, carry, masked=True)
    _store_block(o_ref, q_start, acc / l[:, None], T)
    _store_block(lse_ref, q_start, m + jnp.log(l), T)


def _load_head_rows(ref, start, n: int, T: int, r):
    """Rows [start, start+n) of query head r of a (T, n_rep, HS) group ref, or of an (n_rep, T)
    statistic; rows past T read as zeros."""
    keep = _iota(start, n) < T
    if ref.ndim == 2:
        return plt.load(ref.at[r, pl.ds(start, n)], mask=keep, other=0)
    return plt.load(ref.at[pl.ds(start, n), r, :], mask=keep[:, None], other=0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, T, causal, scale, block_q):
    """One key block of one kv head: dv = sum_q p^T dO, dk = sum_q ds^T q over the query blocks that
    see it, of each of the n_rep query heads that share this kv head (q, dO are (T, n_rep, HS)).

    Query rows past T read as zeros (q, dO, lse, delta), so their p is finite and their dO and ds
    are zero: they add nothing, and only the causal mask is needed here."""
    block_k, HS = k_ref.shape
    n_rep = q_ref.shape[1]
    k_start = pl.program_id(2) * block_k
    k_cols = _iota(k_start, block_k)
    k, v = _load_block(k_ref, k_start, T), _load_block(v_ref, k_start, T)

    def step(i, carry, masked, r):
        dk, dv = carry
        q_start = i * block_q
        q, do = _load_head_rows(q_ref, q_start, block_q, T, r), _load_head_rows(do_ref, q_start, block_q, T, r)
        lse = _load_head_rows(lse_ref, q_start, block_q, T, r)
        delta = _load_head_rows(delta_ref, q_start, block_q, T, r)
        s = _scores(q, k, _iota(q_start, block_q), k_cols, T, causal, scale, masked)
        p = jnp.exp(s - lse[:, None])
        dv = dv + dot_f32(p.astype(do.dtype), do, (0, 0))
        dp = dot_f32(do, v, (1, 1))
        ds = (p * (dp - delta[:, None]) * scale).astype(q.dtype)
        return dk + dot_f32(ds, q, (0, 0)), dv

    n_q = pl.cdiv(T, block_q)
    first = 0
    if causal:   # start at the first query block that reaches this key block; mask the diagonal tiles
        first = (k_start + block_k - 1 + block_q - 1) // block_q    # rows from here see all its keys
        first = jnp.minimum(first, n_q)

    def head(r, carry):   # the group's query heads, summed into the one pair of accumulators
        if causal:
            carry = _loop(k_start // block_q, first, step, carry, masked=True, r=r)
        return _loop(first, n_q, step, carry, masked=False, r=r)

    carry = (jnp.zeros((block_k, HS), F32), jnp.zeros((block_k, HS), F32))
    dk, dv = lax.fori_loop(0, n_rep, head, carry)
    _store_block(dk_ref, k_start, dk, T)
    _store_block(dv_ref, k_start, dv, T)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, T, causal, scale, block_k):
    """One query block: dq = sum_k ds k over the key blocks it sees (the same ones as the forward)."""
    block_q, HS = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q_rows = _iota(q_start, block_q)
    q, do = _load_block(q_ref, q_start, T), _load_block(do_ref, q_start, T)
    lse, delta = _load_block(lse_ref, q_start, T), _load_block(delta_ref, q_start, T)

    def step(j, dq, masked):
        k_start = j * block_k
        k, v = _load_rows(k_ref, k_start, block_k, T), _load_rows(v_ref, k_start, block_k, T)
        s = _scores(q, k, q_rows, _iota(k_start, block_k), T, causal, scale, masked)
        p = jnp.exp(s - lse[:, None])
        dp = dot_f32(do, v, (1, 1))
        ds = (p * (dp - delta[:, None]) * scale).astype(k.dtype)
        return dq + dot_f32(ds, k, (1, 0))

    n_full, n_all = _key_blocks(q_start, block_q, block_k, T, causal)
    dq = _loop(0, n_full, step, jnp.zeros((block_q, HS), F32), masked=False)
    dq = _loop(n_full, n_all, step, dq, masked=True)
    _store_block(dq_ref, q_start, dq, T)


# ----------------------------------------------------------------------------------------------
# pallas_calls

def _tile_spec(block: int, HS: int) -> pl.BlockSpec:
    """Block i of head h of a (B, T, heads, HS) array for grid point (b, h, i)."""
    return pl.BlockSpec((None, block, None, HS), lambda b, h, i: (b, i, h, 0))


def _whole_spec(T: int, HS: int, n_rep: int = 1) -> pl.BlockSpec:
    """All T rows of one (b, head) slice of a (B, T, heads, HS) array, for a kernel to loop over; with
    n_rep > 1 the array is K or V and query head h (grid axis 1) reads kv head h // n_rep."""
    return pl.BlockSpec((None, T, None, HS), lambda b, h, i: (b, 0, h // n_rep, 0))


def _group_spec(T: int, HS: int, n_rep: int) -> pl.BlockSpec:
    """All T rows of the n_rep query heads g*n_rep .. g*n_rep+n_rep-1 of a (B, T, NH, HS) array, for
    grid point (b, g, i) of the dk/dv kernel: (T, n_rep, HS) refs."""
    return pl.BlockSpec((None, T, n_rep, HS), lambda b, g, i: (b, 0, g, 0))


def _row_spec(block: int | None, T: int) -> pl.BlockSpec:
    """Block i of a (B, NH, T) statistic, or all T of it when block is None."""
    if block is None:
        return pl.BlockSpec((None, None, T), lambda b, h, i: (b, h, 0))
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _forward(cfg: _Config, q, k, v):
    """(out, lse): out in q's dtype, lse (B, NH, T) float32."""
    B, T, NH, HS = q.shape
    n_rep = NH // k.shape[2]
    blocks = cfg.blocks
    bq = blocks.block_q
    kernel = functools.partial(_fwd_kernel, T=T, causal=cfg.causal, scale=cfg.scale, block_k=blocks.block_k)
    return pl.pallas_call(
        kernel, grid=(B, NH, pl.cdiv(T, bq)),
        in_specs=[_tile_spec(bq, HS), _whole_spec(T, HS, n_rep), _whole_spec(T, HS, n_rep)],
        out_specs=[_tile_spec(bq, HS), _row_spec(bq, T)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, NH, T), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q, k, v)


def _backward(cfg: _Config, q, k, v, do, lse, delta):
    """(dq, dk, dv), each in its input's shape and dtype."""
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    n_rep = NH // NKV
    blocks = cfg.blocks
    group = _group_spec(T, HS, n_rep)
    stat = pl.BlockSpec((None, n_rep, T), lambda b, g, i: (b, g, 0))   # the group's n_rep rows of lse, delta
    bk = blocks.block_k_dkv
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, T=T, causal=cfg.causal, scale=cfg.scale, block_q=blocks.block_q_dkv),
        grid=(B, NKV, pl.cdiv(T, bk)),
        in_specs=[group, _tile_spec(bk, HS), _tile_spec(bk, HS), group, stat, stat],
        out_specs=[_tile_spec(bk, HS), _tile_spec(bk, HS)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta)
    bq = blocks.block_q_dq
    tile, row, kv = _tile_spec(bq, HS), _row_spec(bq, T), _whole_spec(T, HS, n_rep)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, T=T, causal=cfg.causal, scale=cfg.scale, block_k=blocks.block_k_dq),
        grid=(B, NH, pl.cdiv(T, bq)),
        in_specs=[tile, kv, kv, tile, row, row],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp; residuals: q, k, v, the output and the float32 log-sum-exp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v):
    return _forward(cfg, q, k, v)[0]


def _flash_fwd(cfg, q, k, v):
    out, lse = _forward(cfg, q, k, v)
    return out, (q, k, v, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, out, lse = res
    # delta = rowsum(dO * O) = sum_k p * dp, the softmax-backward term shared by dq and dk
    delta = jnp.einsum("bthd,bthd->bht", do.astype(F32), out.astype(F32))
    return _backward(cfg, q, k, v, do, lse, delta)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# public API

def _check(q, k, v, block_sizes: BlockSizes) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, x)
    grouped = (q.ndim == 4 and k.ndim == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2]
               and k.shape[3] == q.shape[3] and k.shape[2] >= 1 and q.shape[2] % k.shape[2] == 0)
    if not grouped:
        raise ValueError(f"q (B, T, NH, HS) and k, v (B, T, NKV, HS) must share one B, T, HS, with NKV dividing "
                         f"NH (NKV = NH: multi-head), got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, NH, HS = q.shape
    if min(B, T, NH) < 1:
        raise ValueError(f"B, T, NH must be >= 1, got shape {q.shape}")
    if HS < MIN_BLOCK or HS & (HS - 1):
        raise ValueError(f"head size HS={HS} must be a power of two >= {MIN_BLOCK} (Triton tile sizes); "
                         "pad the head dimension or use llmc_jax.nn.ops.attention")
    for field, b in dataclasses.asdict(block_sizes).items():
        if not isinstance(b, int) or b < MIN_BLOCK or b & (b - 1):
            raise ValueError(f"BlockSizes.{field}={b!r} must be a power of two >= {MIN_BLOCK}")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """softmax(q k^T * sm_scale [+ causal mask]) v per (batch, head), in q's dtype; q is
    (B, T, NH, HS), k and v (B, T, NKV, HS) with NKV dividing NH (query head h reads kv head
    h // (NH // NKV); NKV = NH is multi-head attention). sm_scale defaults to 1/sqrt(HS).
    Differentiable: the backward is two Pallas kernels that recompute the probabilities from the
    saved log-sum-exp; dk and dv come back in k's and v's own (B, T, NKV, HS) shape.

    num_warps=4, num_stages=2 by default for all three kernels: unmeasured guesses for an H100.
    """
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    _check(q, k, v, block_sizes)
    T, HS = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(HS) if sm_scale is None else float(sm_scale)
    cfg = _Config(bool(causal), scale, block_sizes.fitted(T), 4 if num_warps is None else num_warps,
                  2 if num_stages is None else num_stages, resolve_interpret(interpret))
    return _flash(cfg, q, k, v)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                              sm_scale: float | None = None) -> jax.Array:
    """Plain-jnp attention with the same semantics and dtype policy (float32 softmax, p cast to v's
    dtype before p @ v), for JAX to differentiate; grouped k, v are repeated to NH heads."""
    T, NH, HS = q.shape[1], q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(HS) if sm_scale is None else float(sm_scale)
    k, v = (jnp.repeat(x, NH // x.shape[2], axis=2) for x in (k, v))    # head h <- kv head h // n_rep
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) * scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=F32).astype(q.dtype)


__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference"]
