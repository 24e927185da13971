"""The op library: one `jax.custom_vjp` per llm.c layer, with the backward derived by hand.

Shaped like llm.c's train_gpt2.c: every layer is a forward/backward pair, and the forward rule
saves exactly the residuals the backward needs (layernorm: mean and rstd; attention: the
log-sum-exp of each score row; classifier: the logits). Each op also has a plain-jnp
`*_reference` that JAX differentiates itself; the tests hold the two against each other.

Mixed precision: the compute dtype is the dtype of the activation input (float32 or bfloat16).
The families' forward reads every parameter in the compute dtype (`compute_copy`: llm.c's bf16
copy of its fp32 master weights), so in a bf16 run the gradients come back in bf16 as llm.c's;
an op given fp32 parameters casts them itself and returns fp32 gradients. Matmuls accumulate in
float32; layernorm statistics, softmax and the loss are computed in float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.common import SAVED_ATTN_STATS, SAVED_NORM_STATS

F32 = jnp.float32
LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)


# The matmul precision policy, in one place: JAX's default, which `jax_default_matmul_precision`
# controls. On a GPU, float32 matmuls then run as TF32, as llm.c's `-f 1` (its default) allows; the
# trainer's `-f 0` and gradcheck set "highest" for exact float32. On the CPU float32 is always exact.
MATMUL_PRECISION: lax.Precision | None = None


def compute_copy(params: dict, dtype) -> dict:
    """The params as the forward reads them: every floating tensor in the compute dtype (round to
    nearest; a no-op for tensors already in it). Training, evaluation and sampling read the same values."""
    dtype = jnp.dtype(dtype)
    return {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtype else v
            for k, v in params.items()}


def _dot(a, b, contract, dtype=None):
    """a . b contracting a's axis contract[0] with b's contract[1] (no batch dims), fp32 accumulation."""
    out = lax.dot_general(a, b, ((contract[0], contract[1]), ((), ())),
                          precision=MATMUL_PRECISION, preferred_element_type=F32)
    return out if dtype is None else out.astype(dtype)


def _sum_leading(x):
    """Sum over every axis but the last, in fp32 (bias and layernorm parameter gradients)."""
    return jnp.sum(x.astype(F32), axis=tuple(range(x.ndim - 1)))


# ----------------------------------------------------------------------------------------------
# encoder: x = wte[idx] + wpe[t]

@jax.custom_vjp
def encoder(wte, wpe, idx_BT, dtype_like):
    """Token plus position embedding; `dtype_like` is a scalar whose dtype is the compute dtype."""
    return _encoder_fwd(wte, wpe, idx_BT, dtype_like)[0]


def _encoder_fwd(wte, wpe, idx_BT, dtype_like):
    T = idx_BT.shape[1]
    x = jnp.take(wte, idx_BT, axis=0) + wpe[:T][None]
    # the tables themselves are not needed; empty arrays carry their dtypes to the backward
    dtypes = (jnp.zeros((0,), wte.dtype), jnp.zeros((0,), wpe.dtype))
    return x.astype(dtype_like.dtype), (idx_BT, wte.shape, wpe.shape, dtypes)


def _scatter_rows(shape, idx_BT, dx_BTC):
    """The table gradient: scatter-add into the rows that were used; every other row's is exactly zero."""
    return jnp.zeros(shape, F32).at[idx_BT.reshape(-1)].add(dx_BTC.astype(F32).reshape(-1, shape[1]))


def _encoder_bwd(res, dx_BTC):
    idx_BT, wte_shape, wpe_shape, (wte_dtype, wpe_dtype) = res
    T = idx_BT.shape[1]
    dx = dx_BTC.astype(F32)
    dwte = _scatter_rows(wte_shape, idx_BT, dx)
    dwpe = jnp.zeros(wpe_shape, F32).at[:T].set(dx.sum(axis=0))
    return dwte.astype(wte_dtype.dtype), dwpe.astype(wpe_dtype.dtype), None, None


encoder.defvjp(_encoder_fwd, _encoder_bwd)


def encoder_reference(wte, wpe, idx_BT, dtype_like):
    T = idx_BT.shape[1]
    return (wte[idx_BT] + wpe[:T][None]).astype(dtype_like.dtype)


# token embedding only (Llama: positions enter through RoPE): x = wte[idx]

@jax.custom_vjp
def token_embedding(wte, idx_BT, dtype_like):
    return _token_embedding_fwd(wte, idx_BT, dtype_like)[0]


def _token_embedding_fwd(wte, idx_BT, dtype_like):
    x = jnp.take(wte, idx_BT, axis=0).astype(dtype_like.dtype)
    return x, (idx_BT, wte.shape, jnp.zeros((0,), wte.dtype))


def _token_embedding_bwd(res, dx_BTC):
    idx_BT, wte_shape, wte_dtype = res
    return _scatter_rows(wte_shape, idx_BT, dx_BTC).astype(wte_dtype.dtype), None, None


token_embedding.defvjp(_token_embedding_fwd, _token_embedding_bwd)


def token_embedding_reference(wte, idx_BT, dtype_like):
    return wte[idx_BT].astype(dtype_like.dtype)


# ----------------------------------------------------------------------------------------------
# layernorm over the last axis, eps 1e-5, biased variance

@jax.custom_vjp
def layernorm(x, w, b):
    return _layernorm_fwd(x, w, b)[0]


def _layernorm_stats(x):
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    rstd = lax.rsqrt(var + LN_EPS)
    return x32, mean, rstd


def _layernorm_fwd(x, w, b):
    x32, mean, rstd = _layernorm_stats(x)
    out = ((x32 - mean) * rstd * w + b).astype(x.dtype)
    return out, (x, w, checkpoint_name(mean, SAVED_NORM_STATS), checkpoint_name(rstd, SAVED_NORM_STATS))


def _layernorm_bwd(res, dout):
    x, w, mean, rstd = res
    norm = (x.astype(F32) - mean) * rstd
    dout32 = dout.astype(F32)
    dnorm = dout32 * w
    # dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    dx = rstd * (dnorm - jnp.mean(dnorm, axis=-1, keepdims=True)
                 - norm * jnp.mean(dnorm * norm, axis=-1, keepdims=True))
    return dx.astype(x.dtype), _sum_leading(dout32 * norm).astype(w.dtype), _sum_leading(dout32).astype(w.dtype)


layernorm.defvjp(_layernorm_fwd, _layernorm_bwd)


def layernorm_reference(x, w, b):
    x32 = x.astype(F32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) / jnp.sqrt(var + LN_EPS) * w + b).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# matmul with bias: out = x @ w.T + b, w in llm.c's (OC, C) layout; b None: no bias (Llama)

@jax.custom_vjp
def matmul(x, w, b):
    return _matmul_fwd(x, w, b)[0]


def _matmul_fwd(x, w, b):
    out = _dot(x, w.astype(x.dtype), ((x.ndim - 1,), (1,)))
    out = (out if b is None else out + b).astype(x.dtype)
    return out, (x, w, b)


def _matmul_bwd(res, dout):
    x, w, b = res
    OC, C = w.shape
    dx = _dot(dout, w.astype(x.dtype), ((dout.ndim - 1,), (0,)), x.dtype)
    dw = _dot(dout.reshape(-1, OC), x.reshape(-1, C), ((0,), (0,)))
    # the bias gradient reads dout as the matmuls do: fused into its producer (GELU's backward), the
    # reduction made XLA keep the producer's float32 intermediates whole (768 MiB at d12 -b 64)
    db = None if b is None else _sum_leading(lax.optimization_barrier(dout)).astype(b.dtype)
    return dx, dw.astype(w.dtype), db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul_reference(x, w, b):
    y = jnp.einsum("...c,oc->...o", x, w.astype(x.dtype), precision=MATMUL_PRECISION,
                   preferred_element_type=F32)
    return (y if b is None else y + b).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation

def _gelu32(x32):
    return 0.5 * x32 * (1.0 + jnp.tanh(GELU_SCALE * (x32 + 0.044715 * x32 ** 3)))


@jax.custom_vjp
def gelu(x):
    return _gelu32(x.astype(F32)).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dout):
    x32 = x.astype(F32)
    tanh_out = jnp.tanh(GELU_SCALE * (x32 + 0.044715 * x32 ** 3))
    sech2 = 1.0 - tanh_out * tanh_out
    local_grad = 0.5 * (1.0 + tanh_out) + x32 * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x32 * x32)
    return ((dout.astype(F32) * local_grad).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_reference(x):
    return jax.nn.gelu(x.astype(F32), approximate=True).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# residual: out = a + b (the gradient flows unchanged into both branches)

@jax.custom_vjp
def residual(a, b):
    return a + b


residual.defvjp(lambda a, b: (a + b, None), lambda _, dout: (dout, dout))


def residual_reference(a, b):
    return a + b


# ----------------------------------------------------------------------------------------------
# causal self-attention on the packed (B, T, 3C) qkv activation, scale 1/sqrt(HS)

def split_heads(qkv_BT3C, NH):
    B, T, C3 = qkv_BT3C.shape
    HS = C3 // (3 * NH)
    qkv = qkv_BT3C.reshape(B, T, 3, NH, HS)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]   # each (B, T, NH, HS)


def _causal_scores(q, k, spec: str = "bqhd,bkhd->bhqk"):
    """Scaled, causally masked scores (B, NH, T, T) in fp32 (q, k as the einsum spec lays them out)."""
    HS = dict(zip(spec.split(",")[0], q.shape))["d"]
    s = jnp.einsum(spec, q, k, precision=MATMUL_PRECISION, preferred_element_type=F32) * (1.0 / math.sqrt(HS))
    T = s.shape[-1]
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    return jnp.where(mask, s, -jnp.inf)


# The fp32 (B, NH, T, T) scores of a batch chunk stay within this many elements (256 MiB): XLA's
# attention holds several such arrays at once in the backward (d12 -b 64: 3 GiB each, whole).
ATTENTION_CHUNK_ELEMENTS = 2**26


def attention_chunks(B: int, NH: int, T: int, limit: int | None = None) -> int:
    """How many batch chunks keep each chunk's scores within the limit: the smallest divisor of B that
    does. The batch is the device's own rows (every sharded step runs per device in shard_map)."""
    limit = ATTENTION_CHUNK_ELEMENTS if limit is None else limit
    return next(n for n in range(1, B + 1) if B % n == 0 and (B // n) * NH * T * T <= limit or n == B)


def over_batch_chunks(fn, chunks: int, *xs):
    """fn on the batch (leading axis of every x and of fn's outputs) whole, or one chunk after
    another (lax.map): XLA's multi-head (here) and grouped-query (gqa_attention) attention."""
    if chunks == 1:
        return fn(*xs)
    split = [x.reshape(chunks, x.shape[0] // chunks, *x.shape[1:]) for x in xs]
    out = lax.map(lambda c: fn(*c), split)
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)


def attention(qkv_BT3C, NH: int):
    """Causal multi-head attention on the packed qkv: (B, T, C)."""
    return attention_B3CT(jnp.swapaxes(qkv_BT3C, 1, 2), NH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention_B3CT(qkv_B3CT, NH: int):
    """attention() on qkv with T last: each head's (HS, T) block is an operand of the score and output
    dots as it is, and the backward keeps its input in that layout (what XLA's layouts want)."""
    return _attention_fwd(qkv_B3CT, NH)[0]


def _heads_T(qkv_B3CT, NH):
    B, C3, T = qkv_B3CT.shape
    qkv = qkv_B3CT.reshape(B, 3, NH, C3 // (3 * NH), T)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]      # each (B, NH, HS, T)


def _attention_fwd(qkv_B3CT, NH):
    B, _, T = qkv_B3CT.shape
    out, lse = over_batch_chunks(functools.partial(_attention_forward, NH=NH), attention_chunks(B, NH, T), qkv_B3CT)
    return out, (qkv_B3CT, checkpoint_name(lse, SAVED_ATTN_STATS))


def _attention_forward(qkv_B3CT, NH):
    """(out (B, T, C), lse (B, NH, T, 1))."""
    q, k, v = _heads_T(qkv_B3CT, NH)
    s = _causal_scores(q, k, "bhdq,bhdk->bhqk")
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse).astype(v.dtype)
    out = jnp.einsum("bhqk,bhdk->bqhd", p, v, precision=MATMUL_PRECISION, preferred_element_type=F32)
    B, _, T = qkv_B3CT.shape
    return out.reshape(B, T, -1).astype(qkv_B3CT.dtype), lse


def _attention_bwd(NH, res, dout_BTC):
    qkv_B3CT, lse = res
    B, _, T = qkv_B3CT.shape
    return (over_batch_chunks(functools.partial(_attention_backward, NH=NH), attention_chunks(B, NH, T),
                               qkv_B3CT, lse, dout_BTC),)


def _attention_backward(qkv_B3CT, lse, dout_BTC, NH):
    q, k, v = _heads_T(qkv_B3CT, NH)
    B, C3, T = qkv_B3CT.shape
    HS = C3 // (3 * NH)
    dt = qkv_B3CT.dtype
    prec = MATMUL_PRECISION
    p = jnp.exp(_causal_scores(q, k, "bhdq,bhdk->bhqk") - lse)        # recomputed from the saved lse
    do = dout_BTC.reshape(B, T, NH, HS)
    dv = jnp.einsum("bhqk,bqhd->bhdk", p.astype(dt), do, precision=prec, preferred_element_type=F32)
    dp = jnp.einsum("bqhd,bhdk->bhqk", do, v, precision=prec, preferred_element_type=F32)
    # softmax backward: ds = p * (dp - sum_k p * dp); then the 1/sqrt(HS) scale
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * (1.0 / math.sqrt(HS))).astype(dt)
    dq = jnp.einsum("bhqk,bhdk->bhdq", ds, k, precision=prec, preferred_element_type=F32)
    dk = jnp.einsum("bhqk,bhdq->bhdk", ds, q, precision=prec, preferred_element_type=F32)
    dqkv = jnp.stack([dq, dk, dv], axis=1).reshape(B, C3, T)
    return dqkv.astype(dt)


attention_B3CT.defvjp(_attention_fwd, _attention_bwd)


def attention_reference(qkv_BT3C, NH: int):
    q, k, v = split_heads(qkv_BT3C, NH)
    p = jax.nn.softmax(_causal_scores(q, k), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=MATMUL_PRECISION, preferred_element_type=F32)
    B, T = qkv_BT3C.shape[:2]
    return out.reshape(B, T, -1).astype(qkv_BT3C.dtype)


# ----------------------------------------------------------------------------------------------
# fused classifier: logits = x @ wte.T over Vp columns, softmax over the first V, mean cross-entropy

def logits(x_BTC, wte):
    """The (B, T, Vp) logits of the tied classifier (x_BTC @ wte.T), in the compute dtype."""
    return _dot(x_BTC, wte.astype(x_BTC.dtype), ((2,), (1,)), x_BTC.dtype)    # (B, T, Vp)


def _classifier_lse(logits_BTV, V):
    # a mask rather than a slice: no copy of the first V columns is materialized
    z = jnp.where(jnp.arange(logits_BTV.shape[-1]) < V, logits_BTV.astype(F32), -jnp.inf)
    return jax.nn.logsumexp(z, axis=-1)


# Logits past this many elements (256 MiB in fp32) are never materialized whole: the classifier runs
# in chunks along T (Llama 3's V = 128256 at B*T = 8192 would be 4 GiB of fp32 logits).
CLASSIFIER_CHUNK_ELEMENTS = 2**26


def fused_classifier(x_BTC, wte, targets_BT, V: int):
    """Mean cross-entropy of the tied-embedding logits; the padded columns V..Vp never contribute.

    Small logits: one pass that saves them for the backward (llm.c's layout). Large ones: chunks
    along T (see classifier_chunks), gradients computed in the forward as llm.c's fused classifier
    does, so no (B, T, Vp) array ever exists and nothing is recomputed."""
    B, T, C = x_BTC.shape
    # the chunked path holds two fp32 (Vp, C) buffers more (dwte as a residual and as the scan's
    # carry): it saves memory only once the rows outnumber them (measured, XLA:CPU, Llama 3.2-1B at
    # T=1024, -r 1: B=1 8.6 -> 10.5 GB of temps, B=2 11.6 -> 12.4, B=4 17.6 -> 16.8, B=8 30.3 -> 26.6)
    chunks = classifier_chunks(B, T, wte.shape[0]) if B * T >= 2 * C else 1
    if chunks == 1:
        return _classifier_whole(x_BTC, wte, targets_BT, V)
    return _classifier_chunked(x_BTC, wte, targets_BT, V, chunks)


def classifier_chunks(B: int, T: int, Vp: int, limit: int | None = None) -> int:
    """How many T-chunks keep each chunk's logits within the limit: the smallest divisor of T that
    does (chunks along T keep B, the data-parallel axis, whole in every chunk)."""
    limit = CLASSIFIER_CHUNK_ELEMENTS if limit is None else limit
    for n in range(1, T + 1):
        if T % n == 0 and B * (T // n) * Vp <= limit:
            return n
    return T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _classifier_whole(x_BTC, wte, targets_BT, V: int):
    return _classifier_fwd(x_BTC, wte, targets_BT, V)[0]


def _classifier_fwd(x_BTC, wte, targets_BT, V):
    logits_BTV = logits(x_BTC, wte)
    lse = _classifier_lse(logits_BTV, V)
    target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(F32)
    loss = jnp.mean(lse - target_logit)
    return loss, (x_BTC, wte, targets_BT, logits_BTV, lse)


def _classifier_bwd(V, res, dloss):
    x_BTC, wte, targets_BT, logits_BTV, lse = res
    B, T, C = x_BTC.shape
    Vp = logits_BTV.shape[-1]
    scale = dloss / (B * T)
    # dlogits = (softmax - onehot(target)) * dloss / (B*T), written directly; padded columns are 0
    col = jnp.arange(Vp)
    probs = jnp.where(col < V, jnp.exp(logits_BTV.astype(F32) - lse[..., None]), 0.0)
    dlogits = ((probs - (col == targets_BT[..., None])) * scale).astype(x_BTC.dtype)
    dx = _dot(dlogits, wte.astype(x_BTC.dtype), ((2,), (0,)), x_BTC.dtype)
    dwte = _dot(dlogits.reshape(-1, Vp), x_BTC.reshape(-1, C), ((0,), (0,)))
    return dx, dwte.astype(wte.dtype), None


_classifier_whole.defvjp(_classifier_fwd, _classifier_bwd)


def _chunk_step(wte, V, n_rows, grads: bool):
    """One T-chunk: its rows' losses and, with grads, dx and dwte += dlogits^T x for dloss = 1 / n_rows."""
    def step(dwte, xs):
        x, targets = xs                                               # (B, Tc, C), (B, Tc)
        lg = logits(x, wte)
        lse = _classifier_lse(lg, V)
        target_logit = jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0].astype(F32)
        row_loss = lse - target_logit
        if not grads:
            return dwte, (row_loss, None)
        col = jnp.arange(lg.shape[-1])
        probs = jnp.where(col < V, jnp.exp(lg.astype(F32) - lse[..., None]), 0.0)
        dlogits = ((probs - (col == targets[..., None])) / n_rows).astype(x.dtype)
        dx = _dot(dlogits, wte.astype(x.dtype), ((2,), (0,)), x.dtype)
        dwte = dwte + _dot(dlogits.reshape(-1, lg.shape[-1]), x.reshape(-1, x.shape[-1]), ((0,), (0,)))
        return dwte, (row_loss, dx)
    return step


def _classifier_scan(x_BTC, wte, targets_BT, V, chunks, grads: bool):
    B, T, C = x_BTC.shape
    Tc = T // chunks
    xs = (x_BTC.reshape(B, chunks, Tc, C).swapaxes(0, 1), targets_BT.reshape(B, chunks, Tc).swapaxes(0, 1))
    dwte0 = jnp.zeros(wte.shape, F32) if grads else jnp.zeros((), F32)
    dwte, (row_loss, dx) = lax.scan(_chunk_step(wte, V, B * T, grads), dwte0, xs)
    loss = jnp.mean(row_loss.swapaxes(0, 1).reshape(B, T))        # the same reduction as the one-pass path
    if not grads:
        return loss, None, None
    return loss, dx.swapaxes(0, 1).reshape(B, T, C), dwte.astype(wte.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _classifier_chunked(x_BTC, wte, targets_BT, V: int, chunks: int):
    return _classifier_scan(x_BTC, wte, targets_BT, V, chunks, grads=False)[0]


def _classifier_chunked_fwd(x_BTC, wte, targets_BT, V, chunks):
    loss, dx, dwte = _classifier_scan(x_BTC, wte, targets_BT, V, chunks, grads=True)
    return loss, (dx, dwte)


def _classifier_chunked_bwd(V, chunks, res, dloss):
    dx, dwte = res
    # the gradients were taken for dloss = 1 (training: the loss is the last op), exact there
    return (dx * dloss).astype(dx.dtype), (dwte * dloss).astype(dwte.dtype), None


_classifier_chunked.defvjp(_classifier_chunked_fwd, _classifier_chunked_bwd)


def classifier_reference(x_BTC, wte, targets_BT, V: int):
    logits_BTV = jnp.einsum("btc,vc->btv", x_BTC, wte.astype(x_BTC.dtype), precision=MATMUL_PRECISION,
                            preferred_element_type=F32).astype(x_BTC.dtype)
    logp = jax.nn.log_softmax(logits_BTV[..., :V].astype(F32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], axis=-1))
