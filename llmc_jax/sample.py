"""Text generation as llm.c's trainer does it, with a KV cache.

Sampling is llm.c's: a xorshift64* coin (`XorShiftRNG`, seeded 1337 at every sampling event) and
the inverse CDF of softmax over the first V logits (`sample_index`), starting from the prompt or
from EOT. Optional temperature and top-k are applied to the logits before the softmax; with
temperature 1 and no top-k the tokens are exactly llm.c-style sampling.

Where llm.c reruns the whole forward for every new token, this module keeps each layer's keys and
values in a cache, so a new token costs one position:

    logits, cache = prefill(params, config, tokens, cache_len=S)     # tokens (B, P), P <= S
    logits, cache = decode_step(params, config, cache, token_B, pos)  # writes K/V at pos, attends <= pos

`KVCache.k` and `.v` are (L, B, S, NH, HS) in the compute dtype. Both functions are jitted once per
shape (the cache length S is static, the prompt length and `pos` are traced scalars, positions
past `pos` are masked). The forward math is the model's (`model.logits`): same ops, same fp32 /
bf16 conventions; prefill runs the op set chosen by `kernels`, the one-token decode step uses the
xla ops (layernorm, matmul, gelu) and its own attention over the cache.

Past the model's maxT (the cache length, S = min(maxT, requested length)) generation slides its
window as the full-forward sampler did: every further token is predicted from the last S tokens
at positions 0..S-1, so the positions shift each step and the cache is recomputed by a prefill over
those S tokens (a full forward per token, but only beyond maxT; llm.c never goes there).

    python -m llmc_jax.sample -e gpt2_124M.bin --prompt "Hello" -g 64 --top-k 40
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llmc_jax import cli, model, ops
from llmc_jax.config import GPTConfig
from llmc_jax.errors import ArgumentParser, UsageError, run_command

_MASK64 = (1 << 64) - 1
F32 = jnp.float32


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
# KV cache

class KVCache(NamedTuple):
    """Keys and values of every layer, (L, B, S, NH, HS) each, in the compute dtype."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]


def _dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"compute dtype must be float32 or bfloat16, got {name}")
    return name


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kernels"))
def _prefill_jit(params, tokens_BS, length, *, config: GPTConfig, dtype: str, kernels: str):
    """The model's forward over the (B, S) buffer, also returning every layer's K and V; the logits
    are those of position length-1 (positions >= length are padding, unseen by earlier ones)."""
    opset = model.op_set(kernels)
    B, S = tokens_BS.shape
    NH, HS = config.NH, config.HS
    x = opset.encoder(params["wte"], params["wpe"], tokens_BS, jnp.zeros((), dtype))

    def layer(x, lp):
        ln1 = opset.layernorm(x, lp["ln1w"], lp["ln1b"])
        qkv = opset.matmul(ln1, lp["qkvw"], lp["qkvb"])
        atty = opset.attention(qkv, NH)
        x = opset.residual(x, opset.matmul(atty, lp["attprojw"], lp["attprojb"]))
        ln2 = opset.layernorm(x, lp["ln2w"], lp["ln2b"])
        x = opset.residual(x, opset.matmul(opset.matmul_gelu(ln2, lp["fcw"], lp["fcb"]),
                                           lp["fcprojw"], lp["fcprojb"]))
        kv = qkv.reshape(B, S, 3, NH, HS)
        return x, (kv[:, :, 1], kv[:, :, 2])

    x, (k, v) = lax.scan(layer, x, {name: params[name] for name in model.LAYER_PARAMS})
    h_last = lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)            # (B, 1, C)
    h_last = opset.layernorm(h_last, params["lnfw"], params["lnfb"])
    return ops.logits(h_last, params["wte"])[:, 0], KVCache(k, v)


def _cached_attention(q_BHD, k_BSHD, v_BSHD, pos):
    """One query per sequence against the cached keys 0..pos, as ops.attention computes a row:
    fp32 scores scaled by 1/sqrt(HS), softmax through the log-sum-exp, fp32-accumulated output."""
    B, NH, HS = q_BHD.shape
    S = k_BSHD.shape[1]
    prec = ops._precision(q_BHD.dtype)
    s = jnp.einsum("bhd,bkhd->bhk", q_BHD, k_BSHD, precision=prec,
                   preferred_element_type=F32) * (1.0 / math.sqrt(HS))
    s = jnp.where(jnp.arange(S) <= pos, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse).astype(v_BSHD.dtype)
    out = jnp.einsum("bhk,bkhd->bhd", p, v_BSHD, precision=prec, preferred_element_type=F32)
    return out.reshape(B, 1, NH * HS).astype(q_BHD.dtype)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _decode_jit(params, cache: KVCache, token_B, pos, *, config: GPTConfig):
    dt = cache.k.dtype
    NH, HS = config.NH, config.HS
    B = token_B.shape[0]
    x = jnp.take(params["wte"], token_B, axis=0) + lax.dynamic_index_in_dim(params["wpe"], pos, keepdims=False)
    x = x.astype(dt)[:, None, :]                                           # (B, 1, C)

    def layer(carry, xs):
        x, kc, vc = carry
        lp, l = xs
        ln1 = ops.layernorm(x, lp["ln1w"], lp["ln1b"])
        qkv = ops.matmul(ln1, lp["qkvw"], lp["qkvb"]).reshape(B, 3, NH, HS)
        kc = lax.dynamic_update_slice(kc, qkv[None, :, 1:2], (l, 0, pos, 0, 0))
        vc = lax.dynamic_update_slice(vc, qkv[None, :, 2:3], (l, 0, pos, 0, 0))
        atty = _cached_attention(qkv[:, 0], lax.dynamic_index_in_dim(kc, l, keepdims=False),
                                 lax.dynamic_index_in_dim(vc, l, keepdims=False), pos)
        x = ops.residual(x, ops.matmul(atty, lp["attprojw"], lp["attprojb"]))
        ln2 = ops.layernorm(x, lp["ln2w"], lp["ln2b"])
        fch = ops.matmul(ln2, lp["fcw"], lp["fcb"])
        x = ops.residual(x, ops.matmul(ops.gelu(fch), lp["fcprojw"], lp["fcprojb"]))
        return (x, kc, vc), None

    xs = ({name: params[name] for name in model.LAYER_PARAMS}, jnp.arange(config.L))
    (x, k, v), _ = lax.scan(layer, (x, cache.k, cache.v), xs)
    h = ops.layernorm(x, params["lnfw"], params["lnfb"])
    return ops.logits(h, params["wte"])[:, 0], KVCache(k, v)


def _tokens_2d(tokens) -> np.ndarray:
    arr = np.asarray(tokens, np.int32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty (B, P) or (P,) sequence, got shape {arr.shape}")
    return arr


def prefill(params: dict, config: GPTConfig, tokens, *, cache_len: int | None = None,
            dtype=jnp.float32, kernels: str = "xla") -> tuple[jax.Array, KVCache]:
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
    return _prefill_jit(params, jnp.asarray(buf), jnp.int32(P), config=config, dtype=_dtype_name(dtype),
                        kernels=kernels)


def decode_step(params: dict, config: GPTConfig, cache: KVCache, token, pos) -> tuple[jax.Array, KVCache]:
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

def generate(params: dict, config: GPTConfig, num_tokens: int, eot: int, *, dtype=jnp.float32,
             kernels: str = "xla", seed: int = 1337, prompt: list[int] | None = None,
             temperature: float = 1.0, top_k: int | None = None) -> list[int]:
    """`num_tokens` tokens: the prompt (or [eot]) followed by sampled ones, as llm.c samples
    (xorshift64* seeded `seed`, one coin per token, inverse CDF over the first V logits).
    Uses the KV cache; beyond maxT the window slides (see the module docstring)."""
    tokens = list(prompt) if prompt else [eot]
    if len(tokens) >= num_tokens:
        return tokens
    params = jax.tree.map(jnp.asarray, params)     # one host->device copy, not one per token
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


# ----------------------------------------------------------------------------------------------
# CLI

def _get_tokenizer(name: str):
    from llmc_jax.tokenizer import get_tokenizer
    try:
        return get_tokenizer(name)
    except RuntimeError as e:          # no GPT-2 BPE files offline, or a corrupt one: say what to do
        raise SystemExit(f"cannot load the {name} tokenizer: {e}") from None


# xorshift64* needs a non-zero 64-bit state
BOUNDS = {"gen_tokens": cli.POSITIVE, "temperature": cli.NONNEG, "top_k": cli.POSITIVE,
          "seed": cli.Bound("in [1, 2**64)", lambda v: 1 <= v < 2**64)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.sample",
                       description="Sample from a GPT-2 model (llm.c's xorshift sampler, KV cache).")
    p.add_argument("-e", "--init", required=True,
                   help="model: an llm.c .bin file or a descriptor (d12, gpt2:d24, tiny: random init)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from EOT alone)")
    p.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=1337, help="xorshift seed (default 1337, as llm.c)")
    p.add_argument("--tokenizer", choices=("gpt2", "byte"),
                   help="default: byte when the model's V is 256, gpt2 otherwise")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--kernels", choices=model.KERNELS, default="xla", help="op set for the prompt forward")
    p.add_argument("--no-eot", action="store_true",
                   help="do not put EOT before the prompt (by default it is, as every training document)")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from llmc_jax.gradcheck import load_model
    config, params = load_model(args.init)
    tok = _get_tokenizer(args.tokenizer or ("byte" if config.V == 256 else "gpt2"))
    prompt = ([] if args.no_eot and args.prompt else [tok.eot]) + tok.encode(args.prompt)
    bad = [t for t in prompt if not 0 <= t < config.V]
    if bad:
        raise UsageError(f"the prompt has token ids outside the model's vocabulary V={config.V} "
                         f"(e.g. {bad[0]}); choose the model's tokenizer with --tokenizer")
    print(f"model {args.init}: L={config.L} NH={config.NH} C={config.C} maxT={config.maxT} V={config.V}; "
          f"prompt {len(prompt)} tokens, generating {args.gen_tokens}", file=sys.stderr)
    t0 = time.perf_counter()
    out = generate(params, config, len(prompt) + args.gen_tokens, tok.eot, dtype=jnp.dtype(args.dtype),
                   kernels=args.kernels, seed=args.seed, prompt=prompt, temperature=args.temperature,
                   top_k=args.top_k)
    dt = time.perf_counter() - t0
    print(tok.decode(out[len(prompt):]))
    print(f"{args.gen_tokens} tokens in {dt:.2f} s (compilation included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_command(main, "use --dtype bfloat16, or a smaller model")
