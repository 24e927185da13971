"""Pallas flash attention (interpret mode on the CPU) against its jnp reference, a float64 NumPy
forward and backward, and llmc_jax.nn.ops.attention_reference on llm.c's packed qkv; grouped-query
attention (k, v with NKV < NH heads) against llmc_jax.nn.gqa_attention and float64 NumPy; plus CUDA
lowering at GPT-2 and Llama 3 sizes and input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import ops
from llmc_jax.nn.gqa_attention import gqa_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from tests.cuda_lowering import triton_calls

BF16 = jnp.bfloat16
# Small tiles so T=100 spans several blocks (100 is no multiple of 16 or 32: masked last tiles),
# with query and key blocks of different sizes both ways so the causal diagonal cuts tiles unevenly.
SMALL = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
SWAPPED = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)

# fp32: kernel, reference and float64 differ only by float32 rounding and summation order.
TOL_F32 = 1e-5
# bf16: p and ds are rounded to bf16 (8-bit mantissa, 2^-9 relative) before their matmuls, at
# different points in the online softmax than in the reference, and outputs are rounded once more:
# a few bf16 ulps (2^-8 = 3.9e-3) of the largest value (5.7e-3 seen here).
TOL_BF16 = 1e-2


def _tol(dtype) -> float:
    return TOL_F32 if dtype == jnp.float32 else TOL_BF16


def _inputs(shape, dtype, seed=0):
    """q, k, v and a cotangent; q is wide enough that some softmax rows are peaked."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(0, s, shape), dtype) for s in (1.5, 1.0, 1.0, 1.0)]


def _numpy_attention(q, k, v, do, causal, scale):
    """float64 forward and hand-derived backward of softmax(q k^T * scale) v, (B, T, NH, HS)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    T = q.shape[1]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * scale    # softmax backward, then the scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q)
    return out, (dq, dk, dv)


def _value_and_vjp(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


CASES = [   # B, T, NH, HS, causal, sm_scale, blocks, dtype
    pytest.param(2, 100, 2, 16, True, None, SMALL, jnp.float32, id="causal-T100-fp32"),
    pytest.param(2, 100, 2, 16, True, None, SMALL, BF16, id="causal-T100-bf16"),
    pytest.param(1, 77, 3, 32, False, 0.3, SWAPPED, jnp.float32, id="full-T77-fp32-scale0.3"),
    pytest.param(1, 77, 3, 32, False, None, SMALL, BF16, id="full-T77-bf16"),
    pytest.param(2, 96, 12, 64, True, None, SWAPPED, jnp.float32, id="causal-NH12-HS64-fp32"),
    pytest.param(1, 1, 1, 16, True, None, None, jnp.float32, id="causal-T1"),
]


@pytest.mark.parametrize("B,T,NH,HS,causal,sm_scale,blocks,dtype", CASES)
def test_forward_and_gradients(B, T, NH, HS, causal, sm_scale, blocks, dtype):
    q, k, v, do = _inputs((B, T, NH, HS), dtype)
    kw = dict(causal=causal, sm_scale=sm_scale)
    pallas = jax.jit(lambda *a: _value_and_vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, **kw), *a))
    ref = jax.jit(lambda *a: _value_and_vjp(lambda q, k, v: flash_attention_reference(q, k, v, **kw), *a))
    out, grads = pallas(q, k, v, do)
    out_ref, grads_ref = ref(q, k, v, do)
    scale = HS ** -0.5 if sm_scale is None else sm_scale
    out64, grads64 = _numpy_attention(q, k, v, do, causal, scale)   # from the same (bf16-rounded) inputs

    tol = _tol(dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, out_ref) < tol and rel_error(out, out64) < tol
    g_scale = max(float(np.max(np.abs(g64))) for g64 in grads64)      # dv is never all zero
    for name, g, g_ref, g64, x in zip("qkv", grads, grads_ref, grads64, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        if not np.any(g64):   # exactly zero (T=1: softmax over one key has no slope): rounding noise only
            for got in (g, g_ref):
                assert float(np.max(np.abs(np.asarray(got, np.float64)))) / g_scale < tol, (name, "not ~0")
            continue
        assert rel_error(g, g_ref) < tol, (name, rel_error(g, g_ref))
        assert rel_error(g, g64) < tol, (name, rel_error(g, g64))


def test_matches_ops_attention_on_packed_qkv():
    """The model's call: q, k, v split from llm.c's (B, T, 3C) qkv, output reshaped to (B, T, C)."""
    B, T, NH, C = 2, 37, 4, 64
    rng = np.random.default_rng(3)
    qkv = jnp.asarray(rng.normal(0, 1, (B, T, 3 * C)), jnp.float32)
    dout = jnp.asarray(rng.normal(0, 1, (B, T, C)), jnp.float32)

    def via_flash(qkv_BT3C):
        q, k, v = (qkv_BT3C.reshape(B, T, 3, NH, C // NH)[:, :, i] for i in range(3))
        return flash_attention(q, k, v, block_sizes=SMALL).reshape(B, T, C)

    out, (dqkv,) = jax.jit(lambda x, d: _vjp1(via_flash, x, d))(qkv, dout)
    out_ref, (dqkv_ref,) = _vjp1(lambda x: ops.attention_reference(x, NH), qkv, dout)
    assert rel_error(out, out_ref) < TOL_F32
    assert rel_error(dqkv, dqkv_ref) < TOL_F32


def _vjp1(fn, x, ct):
    out, vjp = jax.vjp(fn, x)
    return out, vjp(ct)


def test_vmap_non_causal_T_below_one_block():
    """vmap adds a grid axis to each pallas_call. T=10 in one 16-row tile, non-causal: the 6 padded
    keys must get zero probability."""
    q, k, v, do = _inputs((2, 1, 10, 2, 16), jnp.float32)
    pallas = jax.jit(jax.vmap(lambda *a: _value_and_vjp(
        lambda q, k, v: flash_attention(q, k, v, causal=False), *a)))
    out, grads = pallas(q, k, v, do)
    for n in range(2):
        out64, grads64 = _numpy_attention(q[n], k[n], v[n], do[n], False, 0.25)
        assert rel_error(out[n], out64) < TOL_F32
        for g, g64 in zip(grads, grads64):
            assert rel_error(g[n], g64) < TOL_F32


# ---- grouped-query attention (Llama 3) -------------------------------------------------------------

def _numpy_gqa(q, k, v, do, scale):
    """float64 truth: K/V replicated to NH heads (llm.c's repkv), multi-head attention, and the
    replicated heads' dk/dv summed back onto their kv head."""
    NH, NKV = q.shape[2], k.shape[2]
    rep = lambda x: np.repeat(np.asarray(x, np.float64), NH // NKV, axis=2)   # head h <- kv head h // n_rep
    out, (dq, dk, dv) = _numpy_attention(q, rep(k), rep(v), do, True, scale)
    group = lambda g: g.reshape(g.shape[:2] + (NKV, NH // NKV, g.shape[3])).sum(axis=3)
    return out, (dq, group(dk), group(dv))


@pytest.mark.parametrize("B,T,NH,NKV,blocks", [
    pytest.param(2, 37, 4, 2, SMALL, id="T37-nrep2"),     # 37: ragged in every block size
    pytest.param(1, 50, 8, 2, SWAPPED, id="T50-nrep4"),
])
def test_grouped_query_forward_and_gradients(B, T, NH, NKV, blocks):
    """Causal GQA, fp32: dk/dv come back (B, T, NKV, HS), each the sum over its n_rep query heads
    (the dk/dv kernel's loop over the group); same TOL_F32 as the multi-head cases."""
    HS = 16
    q, _, _, do = _inputs((B, T, NH, HS), jnp.float32, seed=1)
    _, k, v, _ = _inputs((B, T, NKV, HS), jnp.float32, seed=2)
    pallas = jax.jit(lambda *a: _value_and_vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks), *a))
    out, grads = pallas(q, k, v, do)
    out_x, grads_x = jax.jit(_value_and_vjp, static_argnums=0)(gqa_attention, q, k, v, do.reshape(B, T, NH * HS))
    out64, grads64 = _numpy_gqa(q, k, v, do, HS ** -0.5)

    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_error(out.reshape(B, T, NH * HS), out_x) < TOL_F32
    assert rel_error(out, out64) < TOL_F32
    for name, g, g_x, g64, x in zip("qkv", grads, grads_x, grads64, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_error(g, g_x) < TOL_F32, (name, rel_error(g, g_x))
        assert rel_error(g, g64) < TOL_F32, (name, rel_error(g, g64))


# GPT-2 124M attention (B=4, T=1024, NH=12, HS=64) with the default (H100) blocks, and a T that
# is no block multiple, non-causal; lowering only, nothing runs.
@pytest.mark.parametrize("T,causal,dtype", [(1024, True, jnp.float32), (1024, True, BF16), (1000, False, BF16)],
                         ids=["T1024-causal-fp32", "T1024-causal-bf16", "T1000-full-bf16"])
def test_lowers_to_triton_for_cuda(T, causal, dtype):
    x = jax.ShapeDtypeStruct((4, T, 12, 64), dtype)
    fwd = lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    assert triton_calls(fwd, x, x, x) >= 1
    # the forward again (its residuals), then the dk/dv and dq kernels
    assert triton_calls(jax.grad(loss, argnums=(0, 1, 2)), x, x, x) >= 3


# Llama 3.2-1B (C=2048, NH=32, NKV=8, HS=64) and Llama 3.1-8B (C=4096, NH=32, NKV=8, HS=128)
# attention with the default blocks, small B and T (the kernels' shapes do not depend on them).
@pytest.mark.parametrize("HS", [64, 128], ids=["llama3.2-1B", "llama3.1-8B"])
def test_grouped_query_lowers_to_triton_for_cuda(HS):
    q = jax.ShapeDtypeStruct((2, 256, 32, HS), BF16)
    kv = jax.ShapeDtypeStruct((2, 256, 8, HS), BF16)
    fwd = lambda q, k, v: flash_attention(q, k, v, interpret=False)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    assert triton_calls(fwd, q, kv, kv) >= 1
    assert triton_calls(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv) >= 3


@pytest.mark.parametrize("shapes,dtypes,blocks,error,match", [
    ([(2, 8, 2, 24)] * 3, [jnp.float32] * 3, None, ValueError, "power of two"),
    ([(2, 8, 2, 8)] * 3, [jnp.float32] * 3, None, ValueError, "power of two >= 16"),
    ([(2, 8, 2, 16), (2, 9, 2, 16), (2, 8, 2, 16)], [jnp.float32] * 3, None, ValueError, "share one"),
    ([(2, 8, 6, 16), (2, 8, 4, 16), (2, 8, 4, 16)], [jnp.float32] * 3, None, ValueError, "NKV dividing NH"),
    ([(2, 8, 4, 16), (2, 8, 2, 16), (2, 8, 1, 16)], [jnp.float32] * 3, None, ValueError, "share one"),
    ([(16, 32)] * 3, [jnp.float32] * 3, None, ValueError, "B, T, NH, HS"),
    ([(2, 8, 2, 16)] * 3, [jnp.float16] * 3, None, TypeError, "float32 or bfloat16"),
    ([(2, 8, 2, 16)] * 3, [jnp.float32, BF16, jnp.float32], None, TypeError, "one dtype"),
    ([(2, 8, 2, 16)] * 3, [jnp.float32] * 3, BlockSizes(block_k=48), ValueError, "block_k=48"),
    ([(2, 8, 2, 16)] * 3, [jnp.float32] * 3, BlockSizes(block_q_dq=8), ValueError, "block_q_dq=8"),
], ids=["HS24", "HS8", "shape-mismatch", "NKV-not-dividing-NH", "k-v-heads-differ", "ndim", "float16",
        "mixed-dtype", "block48", "block8"])
def test_bad_input_errors(shapes, dtypes, blocks, error, match):
    q, k, v = (jnp.zeros(s, d) for s, d in zip(shapes, dtypes))
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, block_sizes=blocks)
