"""The KV cache: an optional argument of a model's attention, so prefill and decode run the training block.

A model family's forward takes `cache=None` (training, evaluation) or a `KVCache` and a position:

    prefill  (T > 1 tokens at positions 0..T-1): write every position's K/V, attend with the op
             set's causal attention over the tokens themselves, exactly as training does
    decode   (T == 1 token at a traced position pos): write its K/V at pos, attend to 0..pos

so a decoded token costs one position, and the block code is the training block (gemma's shape:
the cache passes through the block, the attention writes and reads it).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from llmc_jax.nn import ops

F32 = jnp.float32


class KVCache(NamedTuple):
    """Keys and values of every layer, (L, B, S, NKV, HS) each, in the compute dtype (NKV: the
    model's key/value heads; NKV == NH for GPT-2, fewer for grouped-query attention)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, L: int, B: int, S: int, NH: int, HS: int, dtype) -> KVCache:
        shape = (L, B, S, NH, HS)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, layer, k_BTHD: jax.Array, v_BTHD: jax.Array, pos) -> KVCache:
        """The cache with layer `layer`'s positions pos..pos+T-1 set (in place under jit)."""
        at = (layer, 0, pos, 0, 0)
        return KVCache(lax.dynamic_update_slice(self.k, k_BTHD[None].astype(self.k.dtype), at),
                       lax.dynamic_update_slice(self.v, v_BTHD[None].astype(self.v.dtype), at))

    def attend(self, layer, q_BHD: jax.Array, pos) -> jax.Array:
        """One query per sequence against layer `layer`'s keys 0..pos, as ops.attention computes a
        row: fp32 scores scaled by 1/sqrt(HS), softmax through the log-sum-exp, fp32-accumulated
        output. Query head h reads kv head h // (NH/NKV). (B, 1, NH*HS) in the query's dtype."""
        k_BSKD = lax.dynamic_index_in_dim(self.k, layer, keepdims=False)
        v_BSKD = lax.dynamic_index_in_dim(self.v, layer, keepdims=False)
        B, NH, HS = q_BHD.shape
        NKV = k_BSKD.shape[2]
        q = q_BHD.reshape(B, NKV, NH // NKV, HS)                           # (B, NKV, n_rep, HS)
        s = jnp.einsum("bgrd,bkgd->bgrk", q, k_BSKD, precision=ops.MATMUL_PRECISION,
                       preferred_element_type=F32) * (1.0 / math.sqrt(HS))
        s = jnp.where(jnp.arange(self.length) <= pos, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        p = jnp.exp(s - lse).astype(v_BSKD.dtype)
        out = jnp.einsum("bgrk,bkgd->bgrd", p, v_BSKD, precision=ops.MATMUL_PRECISION, preferred_element_type=F32)
        return out.reshape(B, 1, NH * HS).astype(q_BHD.dtype)


def attention(attention_op: Callable, qkv_BT3C: jax.Array, NH: int, cache: KVCache | None, layer, pos):
    """Causal self-attention on the packed qkv, through the cache when there is one: (out, cache)."""
    if cache is None:
        return attention_op(qkv_BT3C, NH), None
    q, k, v = ops.split_heads(qkv_BT3C, NH)
    cache = cache.write(layer, k, v, pos)
    if qkv_BT3C.shape[1] > 1:       # a prompt from position 0: the training attention over itself
        return attention_op(qkv_BT3C, NH), cache
    return cache.attend(layer, q[:, 0], pos), cache
