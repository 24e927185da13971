"""Text generation as llm.c's trainer does it: a xorshift64* coin and inverse-CDF sampling over
the first V logits, the RNG reset to 1337 at every sampling event, starting from EOT."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmc_jax import model
from llmc_jax.config import GPTConfig

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


def sample_index(logits_V: np.ndarray, coin: float) -> int:
    """Inverse CDF of softmax(logits) at `coin` in [0, 1)."""
    z = np.asarray(logits_V, np.float64)
    cdf = np.cumsum(np.exp(z - z.max()))
    return int(min(np.searchsorted(cdf, coin * cdf[-1], side="right"), len(z) - 1))


def generate(params: dict, config: GPTConfig, num_tokens: int, eot: int, *, dtype=jnp.float32,
             kernels: str = "xla", seed: int = 1337, prompt: list[int] | None = None) -> list[int]:
    """Sample `num_tokens` positions (the first is the prompt or EOT) by full forwards over a fixed
    window, so one compiled forward serves every position."""
    tokens = list(prompt) if prompt else [eot]
    window = min(config.maxT, max(num_tokens, len(tokens)))
    forward = jax.jit(lambda p, x: model.logits(p, x, config, dtype=dtype, kernels=kernels))
    rng = XorShiftRNG(seed)
    while len(tokens) < num_tokens:
        ctx = tokens[-window:]
        buf = np.full((1, window), eot, np.int32)
        buf[0, :len(ctx)] = ctx
        logits = np.asarray(forward(params, buf)[0, len(ctx) - 1, :config.V], np.float32)
        tokens.append(sample_index(logits, rng.f32()))
    return tokens
