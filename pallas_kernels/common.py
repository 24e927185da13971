"""What every kernel in this package shares: where it runs, how it is compiled, and the numerics
that more than one kernel (and, later, llmc_jax.nn.ops) uses: the float32-accumulating dot, the GELU
tanh approximation with its derivative, and the layernorm epsilon. This package never imports
llmc_jax; the dependency, if any, goes the other way.

The kernels are Triton-style Pallas (grid + BlockSpec, masked loads and stores). On a GPU they
compile through Triton; on a CPU the same kernel body runs in Pallas' interpret mode, which is how
CI tests them. Interpret mode silently clamps an out-of-bounds dynamic read, so every kernel here
masks its edge blocks rather than relying on the tests to catch a missing mask.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32

LN_EPS = 1e-5                           # llm.c's layernorm epsilon
GELU_SCALE = math.sqrt(2.0 / math.pi)   # the GELU tanh approximation's constants, as llm.c
GELU_CUBIC = 0.044715


# The names (jax.ad_checkpoint.checkpoint_name) the ops give the residuals their backward reads that
# llm.c keeps at every -r: the families' rematerialization policies save them by name, so that
# recomputing an op in the backward is never recomputing its forward's expensive part.
SAVED_RESIDUAL = "residual"        # the residual stream a norm reads (llm.c's residual2 and residual3)
SAVED_NORM_STATS = "norm_stats"    # layernorm's mean and rstd, RMSNorm's rstd
SAVED_ATTN_STATS = "attn_stats"    # attention's per-row log-sum-exp (llm.c's att with cuDNN)


_TARGET_BACKENDS: list[str] = []     # innermost last: set by compiling_for


@contextlib.contextmanager
def compiling_for(backend: str) -> Iterator[None]:
    """Trace as for `backend` ("gpu") whatever this machine has: a plan compiling for a GPU that is not
    here (llmc_jax.planning) needs the kernels' Triton lowering, not interpret mode, and cuDNN's checks
    to pass. Only tracing is affected: run nothing traced inside it on this machine."""
    _TARGET_BACKENDS.append(backend)
    try:
        yield
    finally:
        _TARGET_BACKENDS.pop()


def target_backend() -> str:
    """The backend being traced for: compiling_for's, else JAX's default."""
    return _TARGET_BACKENDS[-1] if _TARGET_BACKENDS else jax.default_backend()


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret when the target backend is not a GPU, compile otherwise."""
    if interpret is None:
        return target_backend() not in ("gpu", "cuda", "rocm")
    return bool(interpret)


def compiler_params(num_warps: int | None = None, num_stages: int | None = None) -> plt.CompilerParams:
    """Triton compiler parameters, always passed explicitly (without them a `pallas_call` on a
    GPU goes to the Mosaic GPU backend, not Triton)."""
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_dtype(name: str, x: jax.Array) -> None:
    """The kernels take float32 or bfloat16 and accumulate in float32."""
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"{name} must be float32 or bfloat16, got {x.dtype}; cast it before the call")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_f32(a, b, contract: tuple[int, int]):
    """a . b contracting a's axis contract[0] with b's axis contract[1] (no batch axes); the
    operands keep their dtype, the accumulator and result are float32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=F32)


def gelu_f32(u):
    """GELU, tanh approximation, of float32 u (the formula of llm.c's gelu_forward)."""
    return 0.5 * u * (1.0 + jnp.tanh(GELU_SCALE * (u + GELU_CUBIC * u * u * u)))


def gelu_grad_f32(u):
    """d gelu_f32(u) / du for float32 u (the same formula as llm.c's gelu_backward)."""
    t = jnp.tanh(GELU_SCALE * (u + GELU_CUBIC * u * u * u))
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * u * u)


__all__ = ["F32", "LN_EPS", "GELU_SCALE", "GELU_CUBIC", "compiling_for", "target_backend", "resolve_interpret", "compiler_params", "check_dtype",
           "next_power_of_2", "dot_f32", "gelu_f32", "gelu_grad_f32", "pl", "plt"]


# ----------------------------------------------------------------------------------------------
# row kernels (layernorm, RMSNorm)

# The whole (padded) row of a tile lives in registers; wider rows would need a column loop.
MAX_C = 8192


class RowConfig(NamedTuple):
    """A row kernel's (layernorm, RMSNorm) static settings: the custom_vjp's non-differentiable argument."""
    eps: float
    block_rows: int
    dw_block_rows: int
    num_warps: int | None
    num_stages: int | None
    interpret: bool


def _pow2(name: str, v: int) -> None:
    if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"{name} must be a positive power of two (Triton block sizes are), got {v!r}")


def row_config(N: int, eps: float, block_rows: int, dw_block_rows: int, num_warps: int | None,
            num_stages: int | None, interpret: bool | None) -> RowConfig:
    _pow2("block_rows", block_rows)
    _pow2("dw_block_rows", dw_block_rows)
    if dw_block_rows < block_rows:
        raise ValueError(f"dw_block_rows ({dw_block_rows}) must be >= block_rows ({block_rows}): each "
                         "backward program walks its dw_block_rows rows in tiles of block_rows")
    # Few rows: shrink the blocks rather than loop over tiles that are all masked off.
    rows = next_power_of_2(N)
    block_rows = min(block_rows, rows)
    return RowConfig(float(eps), block_rows, max(block_rows, min(dw_block_rows, rows)),
                   num_warps, num_stages, resolve_interpret(interpret))


def row_params(cfg: RowConfig, tile_elems: int):
    """Triton parameters; unless given, about 16 float32 values of a tile per thread, 4..16 warps."""
    warps = cfg.num_warps if cfg.num_warps is not None else min(16, max(4, tile_elems // 512))
    return compiler_params(warps, cfg.num_stages)


def check_rows(x: jax.Array, weights: dict[str, jax.Array]) -> int:
    """C of a row kernel's input x (..., C) and its (C,) weights, or a ValueError saying what is wrong."""
    for name, a in (("x", x), *weights.items()):
        check_dtype(name, a)
    if x.ndim < 1:
        raise ValueError("x must have a channel axis: shape (..., C)")
    C = x.shape[-1]
    if any(w.shape != (C,) for w in weights.values()):
        raise ValueError(f"{' and '.join(weights)} must have shape (C,) = ({C},) for x of shape {x.shape}, "
                         f"got {' and '.join(str(w.shape) for w in weights.values())}")
    if not 1 <= C <= MAX_C:
        raise ValueError(f"C = {C} is out of range: this kernel holds a whole row in registers and "
                         f"takes 1 <= C <= {MAX_C}")
    if x.size == 0:
        raise ValueError(f"x of shape {x.shape} has no rows to normalise")
    return C


def row_tile_masks(N: int, C: int, block_rows: int, BC: int):
    """(row_ok, col_ok, mask) of this program's (block_rows, BC) tile of an (N, C) array."""
    row_ok = pl.program_id(0) * block_rows + jnp.arange(block_rows) < N
    col_ok = jnp.arange(BC) < C
    return row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def load_rows(x_ref, r_ref, sum_ref, mask) -> jax.Array:
    """The tile of x in float32; with a residual r_ref, x + r rounded to the activation dtype first and
    stored to sum_ref (llm.c's fused residual: the sum is rounded, then normalised)."""
    x = plt.load(x_ref, mask=mask, other=0.0)
    if r_ref is not None:
        x = (x.astype(F32) + plt.load(r_ref, mask=mask, other=0.0).astype(F32)).astype(sum_ref.dtype)
        plt.store(sum_ref, x, mask=mask)
    return x.astype(F32)


def row_sub_tile(first_row, j, block_rows: int, N: int, col_ok):
    """Sub-tile j (block_rows rows) of a backward program's rows: (row_ok, mask, rows, load), where
    load(ref) reads the sub-tile of ref in float32 with every edge masked."""
    start = pl.multiple_of(j * block_rows, block_rows)
    row_ok = first_row + start + jnp.arange(block_rows) < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows = pl.ds(start, block_rows)

    def load(ref):
        return plt.load(ref.at[rows, :], mask=mask, other=0.0).astype(F32)
    return row_ok, mask, rows, load
