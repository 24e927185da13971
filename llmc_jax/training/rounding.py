"""llm.c's stochastic rounding of fp32 values into bfloat16 (llmc/cuda_utils.cuh), counter-based.

Rounding to nearest loses every AdamW update under half a bf16 ulp of its weight (most of them late
in training); stochastic rounding keeps them in expectation: x rounds up with probability equal to
the fraction of an ulp its low 16 bits hold, so E[round(x)] = x.

The random bits are llm.c's SquirrelNoise5 hash, but of the element's position in the whole tensor
and a seed made from (step, tensor): no RNG state to save (a resumed run rounds as the original),
and a tensor sharded over any number of devices rounds each element as one device would (the
position is the global one; XLA partitions the iota). llm.c hashes the CUDA thread position with a
per-call seed from a xorshift state instead, so the bits differ from llm.c's; the rule is its.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
BASE_SEED = 13371337          # llm.c's rng seed (its rank offset is left out: the same bits on every device)
_NOISE = tuple(np.uint32(v) for v in (0xD2A80A3F, 0xA884F197, 0x6C736F4B, 0xB79F3ABB, 0x1B56C4F5))


def squirrel_noise5(position: jax.Array, seed: jax.Array) -> jax.Array:
    """SquirrelNoise5 (llm.c's copy of eiserloh.net/noise): a 32-bit hash of a uint32 position."""
    m = position.astype(jnp.uint32) * _NOISE[0]
    m = m + jnp.asarray(seed, jnp.uint32)
    m = m ^ (m >> 9)
    m = m + _NOISE[1]
    m = m ^ (m >> 11)
    m = m * _NOISE[2]
    m = m ^ (m >> 13)
    m = m + _NOISE[3]
    m = m ^ (m >> 15)
    m = m * _NOISE[4]
    return m ^ (m >> 17)


def tensor_seed(step: jax.Array | int, tensor_index: int, base: int = BASE_SEED) -> jax.Array:
    """The seed of one tensor's rounding at one step: the step's hash, hashed again with the tensor."""
    step_seed = squirrel_noise5(jnp.asarray(step, jnp.uint32), jnp.uint32(base))
    return squirrel_noise5(jnp.uint32(tensor_index), step_seed)


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major position in a tensor of `shape`, uint32 (wraps past 2**32 elements)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def stochastic_round_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
    """x (float32) to bfloat16, up or down at random, up with probability (low 16 bits) / 2**16.

    llm.c's rule: with threshold = 16 random bits, the low 16 bits of the fp32 word either fill
    (then round-to-nearest carries into the bf16 mantissa) or clear (truncation)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    threshold = squirrel_noise5(flat_index(x.shape), seed) & jnp.uint32(0xFFFF)
    up = (bits & jnp.uint32(0xFFFF)) > threshold
    bits = jnp.where(up, bits | jnp.uint32(0xFFFF), bits & jnp.uint32(0xFFFF0000))
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.bfloat16)


def apply_updates(params: dict[str, Any], updates: dict[str, Any], rounding: str,
                  step: jax.Array | int) -> dict[str, Any]:
    """params + updates in float32, stored back in each param's dtype.

    bf16 params (-w 0) are written by `rounding` ("stochastic", as llm.c, or "nearest"); the seed
    of tensor i (sorted names) at `step` makes the write reproducible. fp32 params are unaffected."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"param rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    out = {}
    for i, name in enumerate(sorted(params)):
        p = params[name]
        new = p.astype(jnp.float32) + updates[name].astype(jnp.float32)
        if p.dtype == jnp.bfloat16 and rounding == "stochastic":
            out[name] = stochastic_round_bf16(new, tensor_seed(step, i))
        else:
            out[name] = new.astype(p.dtype)
    return out
