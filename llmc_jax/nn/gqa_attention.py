"""Grouped-query causal attention (Llama 3): NH query heads share NKV key/value heads.

Query head h reads kv head h // n_rep (n_rep = NH // NKV), the order of train_llama3.py's repeat_kv.
llm.c replicates K and V to NH heads (repkv) and runs multi-head attention; here q is viewed as
(B, T, NKV, n_rep, HS) and contracted against the NKV heads directly, so no replicated K/V buffer
exists in the forward or the backward: dk and dv come out (B, T, NKV, HS), each already summed over
its group's n_rep query heads inside the fp32-accumulating matmul.

Numerics mirror ops.attention: fp32 scores scaled by 1/sqrt(HS), -inf causal mask, the forward
saves the per-row log-sum-exp and the backward recomputes p from it, p is cast to v's dtype before
the PV matmul, every matmul accumulates in fp32 under ops.MATMUL_PRECISION.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmc_jax.nn import ops
from pallas_kernels.common import SAVED_ATTN_STATS

F32 = jnp.float32


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, precision=ops.MATMUL_PRECISION, preferred_element_type=F32)


def _grouped(q_BTNH, NKV):
    """(B, T, NH, HS) -> (B, T, NKV, n_rep, HS): query head h = g * n_rep + r sits at [g, r]."""
    B, T, NH, HS = q_BTNH.shape
    return q_BTNH.reshape(B, T, NKV, NH // NKV, HS)


def _causal_scores(qg, k):
    """Scaled, causally masked scores (B, NKV, n_rep, T, T) in fp32."""
    T, HS = qg.shape[1], qg.shape[-1]
    s = _einsum("bqgrd,bkgd->bgrqk", qg, k) * (1.0 / math.sqrt(HS))
    return jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), s, -jnp.inf)


@jax.custom_vjp
def _gqa(q_BTNH, k_BTKH, v_BTKH):
    return _gqa_fwd(q_BTNH, k_BTKH, v_BTKH)[0]


def _gqa_fwd(q_BTNH, k_BTKH, v_BTKH):
    B, T, NH, _ = q_BTNH.shape
    out, lse = ops.over_batch_chunks(_gqa_forward, ops.attention_chunks(B, NH, T), q_BTNH, k_BTKH, v_BTKH)
    return out, (q_BTNH, k_BTKH, v_BTKH, checkpoint_name(lse, SAVED_ATTN_STATS))


def _gqa_forward(q_BTNH, k_BTKH, v_BTKH):
    """(out (B, T, NH*HS), lse (B, NKV, n_rep, T, 1)) of a batch (chunk)."""
    B, T, NH, HS = q_BTNH.shape
    s = _causal_scores(_grouped(q_BTNH, k_BTKH.shape[2]), k_BTKH)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse).astype(v_BTKH.dtype)
    out = _einsum("bgrqk,bkgd->bqgrd", p, v_BTKH)
    return out.reshape(B, T, NH * HS).astype(q_BTNH.dtype), lse


def _gqa_bwd(res, dout_BTC):
    q_BTNH, k, v, lse = res
    B, T, NH, _ = q_BTNH.shape
    return ops.over_batch_chunks(_gqa_backward, ops.attention_chunks(B, NH, T), q_BTNH, k, v, lse, dout_BTC)


def _gqa_backward(q_BTNH, k, v, lse, dout_BTC):
    NKV, HS = k.shape[2], k.shape[3]
    qg = _grouped(q_BTNH, NKV)
    dt = q_BTNH.dtype
    p = jnp.exp(_causal_scores(qg, k) - lse)                              # recomputed from the saved lse
    do = dout_BTC.reshape(qg.shape)
    dv = _einsum("bgrqk,bqgrd->bkgd", p.astype(v.dtype), do)             # sums over r and q at once
    dp = _einsum("bqgrd,bkgd->bgrqk", do, v)
    # softmax backward: ds = p * (dp - sum_k p * dp); then the 1/sqrt(HS) scale
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * (1.0 / math.sqrt(HS))).astype(dt)
    dq = _einsum("bgrqk,bkgd->bqgrd", ds, k)
    dk = _einsum("bgrqk,bqgrd->bkgd", ds, qg)
    return dq.reshape(q_BTNH.shape).astype(dt), dk.astype(k.dtype), dv.astype(v.dtype)


_gqa.defvjp(_gqa_fwd, _gqa_bwd)


def _check(q_BTNH, k_BTKH, v_BTKH) -> None:
    B, T, NH, HS = q_BTNH.shape
    NKV = k_BTKH.shape[2]
    if k_BTKH.shape != v_BTKH.shape or k_BTKH.shape != (B, T, NKV, HS) or NH % NKV:
        raise ValueError(f"gqa_attention: q {q_BTNH.shape}, k {k_BTKH.shape}, v {v_BTKH.shape} "
                         "(need k, v (B, T, NKV, HS) with NKV dividing NH)")


def gqa_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array) -> jax.Array:
    """Causal attention of NH query heads over NKV kv heads; (B, T, NH*HS) in q's dtype."""
    _check(q_BTNH, k_BTKH, v_BTKH)
    return _gqa(q_BTNH, k_BTKH, v_BTKH)


# ----------------------------------------------------------------------------------------------
# the oracle: replicate K/V (llm.c's repkv), then the multi-head reference of ops

def repeat_kv(x_BTKH: jax.Array, n_rep: int) -> jax.Array:
    """(B, T, NKV, HS) -> (B, T, NKV*n_rep, HS), kv head g copied to heads g*n_rep .. g*n_rep+n_rep-1."""
    B, T, NKV, HS = x_BTKH.shape
    return jnp.broadcast_to(x_BTKH[:, :, :, None], (B, T, NKV, n_rep, HS)).reshape(B, T, NKV * n_rep, HS)


def gqa_attention_reference(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array) -> jax.Array:
    """Plain jnp: repeat K/V to NH heads, pack as (B, T, 3C), run ops.attention_reference."""
    _check(q_BTNH, k_BTKH, v_BTKH)
    B, T, NH, HS = q_BTNH.shape
    n_rep = NH // k_BTKH.shape[2]
    qkv = jnp.stack([q_BTNH, repeat_kv(k_BTKH, n_rep), repeat_kv(v_BTKH, n_rep)], axis=2)
    return ops.attention_reference(qkv.reshape(B, T, 3 * NH * HS), NH)
