"""What every kernel in this package shares: where it runs and how it is compiled.

The kernels are Triton-style Pallas (grid + BlockSpec, masked loads and stores). On a GPU they
compile through Triton; on a CPU the same kernel body runs in Pallas' interpret mode, which is how
CI tests them. Interpret mode silently clamps an out-of-bounds dynamic read, so every kernel here
masks its edge blocks rather than relying on the tests to catch a missing mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret when the default backend is not a GPU, compile otherwise."""
    if interpret is None:
        return jax.default_backend() not in ("gpu", "cuda", "rocm")
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


__all__ = ["F32", "resolve_interpret", "compiler_params", "check_dtype", "next_power_of_2", "pl", "plt"]
