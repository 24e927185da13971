"""Text generation as llm.c's trainer does it, with a KV cache: the library behind `sample` and `train -s`.

Sampling is llm.c's: a xorshift64* coin (`XorShiftRNG`, seeded 1337 at every sampling event) and
the inverse CDF of softmax over the first V logits (`sample_index`), starting from the prompt or
from EOT. Optional temperature and top-k are applied to the logits before the softmax; with
temperature 1 and no top-k the tokens are exactly llm.c-style sampling.

Where llm.c reruns the whole forward for every new token, the model family's one forward keeps
each layer's keys and values in a cache (kv_cache.py), so a new token costs one position:

    logits, cache = prefill(params, config, tokens, cache_len=S)     # tokens (B, P), P <= S
    logits, cache = decode_step(params, config, cache, token_B, pos)  # writes K/V at pos, attends <= pos

Both are jitted once per shape (the cache length S is static, the prompt length and `pos` are
traced scalars, positions past `pos` are masked). Prefill runs the op set chosen by `kernels`,
the one-token decode step the xla ops. Past the model's maxT (S = min(maxT, requested length))
the window slides as a full-forward sampler's would: every further token is predicted from the
last S tokens at positions 0..S-1, so the cache is recomputed by a prefill over those S tokens
(a full forward per token, but only beyond maxT; llm.c never goes there).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llmc_jax.models.family import family_of
from llmc_jax.nn import ops
from llmc_jax.nn.kernels import XLA, Kernels, ModelOptions
from llmc_jax.nn.kv_cache import KVCache

_MASK64 = (1 << 64) - 1


class XorShiftRNG:
    """llm.c's sampler RNG (xorshift64*), so the same state gives the same coins as llm.c."""

    def __init__(self, seed: int = 1337):
        self.state = seed & _MASK64

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s = (s ^ (s << 25)) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & _MASK64) >> 32

    def f32(self) -> float:
        return (self.u32() >> 8) / 16777216.0


def sample_index(logits_V: np.ndarray, coin: float, temperature: float = 1.0, top_k: int | None = None) -> int:
    """Inverse CDF of softmax(logits / temperature) at `coin` in [0, 1), the softmax taken over the
    top_k largest logits only (ties at the k-th value are all kept). Temperature 0 is greedy."""
    z = np.asarray(logits_V, np.float64)
    if top_k is not None and 0 < top_k < len(z):
        kth = np.partition(z, len(z) - top_k)[len(z) - top_k]
        z = np.where(z >= kth, z, -np.inf)
    if temperature != 1.0:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            return int(np.argmax(z))
        z = z / temperature
    cdf = np.cumsum(np.exp(z - z.max()))
    return int(min(np.searchsorted(cdf, coin * cdf[-1], side="right"), len(z) - 1))


# ----------------------------------------------------------------------------------------------
# prefill and decode: the model family's forward with a cache

def _dtype(dtype) -> jnp.dtype:
    dt = jnp.dtype(dtype)
    if dt.name not in ("float32", "bfloat16"):
        raise ValueError(f"compute dtype must be float32 or bfloat16, got {dt.name}")
    return dt


@functools.partial(jax.jit, static_argnames=("config", "opts"))
def _prefill_jit(params, tokens_BS, length, *, config: Any, opts: ModelOptions):
    """The forward over the (B, S) buffer, filling a cache of length S; the logits are those of
    position length-1 (positions >= length are padding, unseen by earlier ones)."""
    family = family_of(config)
    B, S = tokens_BS.shape
    cache = family.empty_cache(config, B, S, opts.dtype)
    h, cache = family.forward(params, tokens_BS, config, opts, cache=cache, pos=0)
    h_last = lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)            # (B, 1, C)
    return family.head(params, h_last)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _decode_jit(params, cache: KVCache, token_B, pos, *, config: Any):
    family = family_of(config)
    opts = ModelOptions(dtype=cache.k.dtype, kernels=XLA)
    h, cache = family.forward(params, token_B[:, None], config, opts, cache=cache, pos=pos)
    return family.head(params, h)[:, 0], cache


def _tokens_2d(tokens) -> np.ndarray:
    arr = np.asarray(tokens, np.int32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty (B, P) or (P,) sequence, got shape {arr.shape}")
    return arr


def prefill(params: dict, config: Any, tokens, *, cache_len: int | None = None,
            dtype=jnp.float32, kernels: Kernels = XLA) -> tuple[jax.Array, KVCache]:
    """Run the prompt `tokens` ((B, P) or (P,)) through the model and fill a cache of length
    `cache_len` (default maxT; P <= cache_len <= maxT). Returns the (B, Vp) logits of the last
    prompt position, in the compute dtype, and the cache (positions >= P hold padding, which the
    decode steps overwrite before attending to them)."""
    arr = _tokens_2d(tokens)
    B, P = arr.shape
    S = config.maxT if cache_len is None else int(cache_len)
    if not P <= S <= config.maxT:
        raise ValueError(f"need prompt length P={P} <= cache_len={S} <= maxT={config.maxT}")
    buf = np.zeros((B, S), np.int32)
    buf[:, :P] = arr
    return _prefill_jit(params, jnp.asarray(buf), jnp.int32(P), config=config,
                        opts=ModelOptions(dtype=_dtype(dtype), kernels=kernels))


def decode_step(params: dict, config: Any, cache: KVCache, token, pos) -> tuple[jax.Array, KVCache]:
    """Feed `token` ((B,) or a scalar) at position `pos` (< cache length; may be traced): writes its
    K/V into the cache and attends to positions 0..pos. Returns the (B, Vp) logits in the cache's
    dtype and the new cache; the cache passed in is donated (do not use it again)."""
    token_B = jnp.asarray(token, jnp.int32).reshape(-1)
    if isinstance(pos, (int, np.integer)) and not 0 <= pos < cache.length:
        raise ValueError(f"position {pos} is outside the cache of length {cache.length}")
    if token_B.shape[0] != cache.k.shape[1]:
        raise ValueError(f"{token_B.shape[0]} tokens for a cache of batch {cache.k.shape[1]}")
    return _decode_jit(params, cache, token_B, jnp.asarray(pos, jnp.int32), config=config)


# ----------------------------------------------------------------------------------------------
# generation

def generate(params: dict, config: Any, num_tokens: int, eot: int, *, dtype=jnp.float32,
             kernels: Kernels = XLA, seed: int = 1337, prompt: list[int] | None = None,
             temperature: float = 1.0, top_k: int | None = None) -> list[int]:
    """`num_tokens` tokens: the prompt (or [eot]) followed by sampled ones, as llm.c samples
    (xorshift64* seeded `seed`, one coin per token, inverse CDF over the first V logits).
    Uses the KV cache; beyond maxT the window slides (see the module docstring)."""
    tokens = list(prompt) if prompt else [eot]
    if len(tokens) >= num_tokens:
        return tokens
    # one host->device copy in the compute dtype, not one per token (decode reads half the bytes in bf16)
    params = ops.compute_copy(jax.tree.map(jnp.asarray, params), _dtype(dtype))
    S = min(config.maxT, num_tokens)
    rng = XorShiftRNG(seed)
    logits, cache = prefill(params, config, tokens[-S:], cache_len=S, dtype=dtype, kernels=kernels)
    while True:
        row = np.asarray(logits[0, :config.V]).astype(np.float32)
        tokens.append(sample_index(row, rng.f32(), temperature, top_k))
        n = len(tokens)
        if n >= num_tokens:
            return tokens
        if n <= S:
            logits, cache = decode_step(params, config, cache, tokens[-1:], n - 1)
        else:   # past maxT: the last S tokens at positions 0..S-1, so every K/V changes
            logits, cache = prefill(params, config, tokens[-S:], cache_len=S, dtype=dtype, kernels=kernels)
