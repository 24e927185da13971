"""RoPE and grouped-query attention (Llama 3): custom_vjp ops vs autodiff of their references and
vs float64 NumPy; the Llama 3.1 frequency rule band by band."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import ops
from llmc_jax.nn.gqa_attention import gqa_attention, gqa_attention_reference, repeat_kv
from llmc_jax.nn.rope import rope, rope_angular_frequencies, rope_frequencies, rope_reference
from test_ops import SHAPES, TOL   # the op library's tolerances and (B, T) shapes

HS, THETA, MAXT = 16, 500000.0, 64
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
# HS = 16, theta 5e5: base wavelengths 2*pi/f (llama3-fp8.md 4.2) and their band under the 3.1 rule
WAVELENGTHS = [6, 32, 167, 862, 4443, 22911, 118143, 609226]
BANDS = ["keep"] * 4 + ["smooth"] + ["divide"] * 3


def _normal(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32)).astype(dtype)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _vjp_pair(op, ref, args, cot_seed=7):
    """Outputs and input gradients of op and ref under one random cotangent (one jit: fast on 2 cores)."""
    out = jax.eval_shape(op, *args)
    cot = _normal(out.shape, out.dtype, cot_seed)

    def both(*a):
        return [(y, vjp(cot)) for y, vjp in (jax.vjp(fn, *a) for fn in (op, ref))]
    return (*jax.jit(both)(*args), cot)


# ----------------------------------------------------------------------------------------------
# rope_frequencies

def _llama31_float64(HS, theta):
    """The rule of train_llama3.py apply_scaling, in float64, independently of the float32 code."""
    base = 1.0 / theta ** (np.arange(0, HS, 2) / HS)
    wavelen = 2 * np.pi / base
    smooth = (8192 / wavelen - 1) / (4 - 1)
    blended = (1 - smooth) * base / 8 + smooth * base
    scaled = np.where(wavelen < 2048, base, np.where(wavelen > 8192, base / 8, blended))
    return base, wavelen, scaled


def test_llama31_scaling_exercises_all_three_bands():
    base64, wavelen, scaled64 = _llama31_float64(HS, THETA)
    assert np.round(wavelen).astype(int).tolist() == WAVELENGTHS
    band = np.where(wavelen < 2048, "keep", np.where(wavelen > 8192, "divide", "smooth"))
    assert band.tolist() == BANDS
    base = rope_angular_frequencies(HS, THETA, use_scaled_rope=False)
    f = rope_angular_frequencies(HS, THETA, use_scaled_rope=True)
    assert f.dtype == base.dtype == np.float32 and f.shape == (HS // 2,)
    keep, divide, smooth = (band == "keep"), (band == "divide"), (band == "smooth")
    np.testing.assert_array_equal(f[keep], base[keep])
    np.testing.assert_array_equal(f[divide], base[divide] / np.float32(8))
    assert np.all((base[smooth] / 8 < f[smooth]) & (f[smooth] < base[smooth]))
    np.testing.assert_allclose(base, base64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(f, scaled64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "plain"])
def test_rope_frequency_table(scaled):
    table = rope_frequencies(HS, MAXT, THETA, use_scaled_rope=scaled)
    assert table.shape == (MAXT, HS // 2, 2) and table.dtype == np.float32
    f64 = _llama31_float64(HS, THETA)[2 if scaled else 0]
    angle = np.outer(np.arange(MAXT), f64)
    # float32 frequency (rel <= 1e-6) times t <= 63, plus the product's and cos/sin's roundings
    np.testing.assert_allclose(table[..., 0], np.cos(angle), rtol=0, atol=MAXT * 1e-6)
    np.testing.assert_allclose(table[..., 1], np.sin(angle), rtol=0, atol=MAXT * 1e-6)
    np.testing.assert_array_equal(table[0], np.stack([np.ones(HS // 2), np.zeros(HS // 2)], -1))


def test_plain_table_differs_from_scaled_only_in_the_low_frequencies():
    plain = rope_frequencies(HS, MAXT, THETA, use_scaled_rope=False)
    scaled = rope_frequencies(HS, MAXT, THETA, use_scaled_rope=True)
    kept = np.array(BANDS) == "keep"
    np.testing.assert_array_equal(plain[:, kept], scaled[:, kept])
    assert np.all(plain[1:, ~kept, 1] != scaled[1:, ~kept, 1])     # sin; cos of tiny angles rounds to 1


# ----------------------------------------------------------------------------------------------
# rope

NH_ROPE = 3
TABLE = rope_frequencies(HS, MAXT, THETA, use_scaled_rope=True)


def _rope_numpy(x, pos, transpose=False):
    """Rotate (or rotate back) interleaved pairs in float64 with the table's rows pos..pos+T-1."""
    T = x.shape[1]
    c, s = (TABLE[pos:pos + T, None, :, i].astype(np.float64) for i in (0, 1))
    s = -s if transpose else s
    xr, xi = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = xr * c - xi * s, xr * s + xi * c
    return out


@DTYPES
@pytest.mark.parametrize("pos", [0, 3])
@pytest.mark.parametrize("B,T", SHAPES)
def test_rope_against_reference_and_float64(B, T, pos, dtype):
    x = _normal((B, T, NH_ROPE, HS), dtype, seed=T)
    (out, (dx,)), (out_r, (dx_r,)), cot = _vjp_pair(lambda a: rope(a, TABLE, pos),
                                                     lambda a: rope_reference(a, TABLE, pos), (x,))
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == x.shape
    tol = TOL[dtype]
    assert rel_error(out, out_r) < tol and rel_error(dx, dx_r) < tol
    assert rel_error(out, _rope_numpy(_f64(x), pos)) < tol
    assert rel_error(dx, _rope_numpy(_f64(cot), pos, transpose=True)) < tol


def test_rope_preserves_each_pair_norm_and_its_transpose_undoes_it():
    x = _normal((2, 37, NH_ROPE, HS), jnp.float32, seed=1)
    y, vjp = jax.vjp(lambda a: rope(a, TABLE, 5), x)
    pair_norm = lambda a: np.linalg.norm(_f64(a).reshape(*a.shape[:-1], -1, 2), axis=-1)
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-6)
    assert rel_error(vjp(y)[0], x) < 1e-6      # R^T R = I: the backward is the inverse rotation


def test_rope_traced_position_under_jit():
    x = _normal((2, 1, NH_ROPE, HS), jnp.float32, seed=2)
    step = jax.jit(rope)
    for pos in (0, 7, MAXT - 1):                  # one decoded token at a time, as with a KV cache
        # not bit-equal: XLA's CPU compiler contracts xr*c - xi*s into a fused multiply-add under jit
        assert rel_error(step(x, TABLE, jnp.int32(pos)), rope(x, TABLE, pos)) < 1e-6
        assert rel_error(step(x, TABLE, jnp.int32(pos)), _rope_numpy(_f64(x), pos)) < 1e-6
    g = jax.jit(jax.grad(lambda a, p: jnp.sum(rope(a, TABLE, p) ** 2)))(x, jnp.int32(9))
    assert rel_error(g, 2 * x) < 1e-6             # |R x|^2 = |x|^2


def test_rope_table_gets_no_gradient_and_bad_positions_are_refused():
    x = _normal((1, 5, 2, HS), jnp.float32, seed=3)
    g = jax.grad(lambda t: jnp.sum(rope(x, t, 0)))(jnp.asarray(TABLE))
    assert not np.any(np.asarray(g))
    with pytest.raises(ValueError):
        rope(x, TABLE, MAXT - 4)
    with pytest.raises(ValueError):
        rope(x[..., :8], TABLE)


# ----------------------------------------------------------------------------------------------
# gqa_attention

HEADS = pytest.mark.parametrize("NH,NKV", [(4, 2), (4, 1), (4, 4)], ids=["nrep2", "nrep4", "mha"])


def _qkv(B, T, NH, NKV, dtype, seed=0):
    return (_normal((B, T, NH, HS), dtype, seed), _normal((B, T, NKV, HS), dtype, seed + 1),
            _normal((B, T, NKV, HS), dtype, seed + 2))


def _gqa_numpy(q, k, v, dout):
    """float64: replicate K/V, multi-head causal attention forward and backward, group-sum dK/dV."""
    B, T, NH, _ = q.shape
    R = NH // k.shape[2]
    kr, vr = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)     # head h reads kv head h // R
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(HS)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    do = dout.reshape(q.shape)
    dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True)) / math.sqrt(HS)
    group = lambda g: g.reshape(B, T, -1, R, HS).sum(3)
    return (np.einsum("bhqk,bkhd->bqhd", p, vr).reshape(B, T, -1), np.einsum("bhqk,bkhd->bqhd", ds, kr),
            group(np.einsum("bhqk,bqhd->bkhd", ds, q)), group(np.einsum("bhqk,bqhd->bkhd", p, do)))


def test_numpy_oracle_gradients_by_central_differences():
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(1, 6, 4, HS)), rng.normal(size=(1, 6, 2, HS)), rng.normal(size=(1, 6, 2, HS))
    dout = rng.normal(size=(1, 6, 4 * HS))
    loss = lambda *a: np.sum(_gqa_numpy(*a, dout)[0] * dout)
    grads = _gqa_numpy(q, k, v, dout)[1:]
    h = 1e-6
    for i, g in enumerate(grads):
        d = rng.normal(size=g.shape)
        plus = [a + h * d if j == i else a for j, a in enumerate((q, k, v))]
        minus = [a - h * d if j == i else a for j, a in enumerate((q, k, v))]
        assert abs((loss(*plus) - loss(*minus)) / (2 * h) - np.sum(g * d)) < 1e-6 * np.abs(g * d).sum()


@DTYPES
@HEADS
@pytest.mark.parametrize("B,T", SHAPES)
def test_gqa_against_reference_and_float64(B, T, NH, NKV, dtype):
    args = _qkv(B, T, NH, NKV, dtype, seed=T)
    (out, grads), (out_r, grads_r), cot = _vjp_pair(gqa_attention, gqa_attention_reference, args)
    assert out.shape == (B, T, NH * HS) and out.dtype == dtype
    tol = TOL[dtype]
    assert rel_error(out, out_r) < tol
    want = _gqa_numpy(*map(_f64, args), _f64(cot))
    assert rel_error(out, want[0]) < tol
    for name, a, g, g_r, w in zip("qkv", args, grads, grads_r, want[1:]):
        assert g.shape == a.shape and g.dtype == dtype, f"d{name}: {g.shape} {g.dtype}"
        assert rel_error(g, g_r) < tol, f"d{name} vs reference: {rel_error(g, g_r)}"
        assert rel_error(g, w) < tol, f"d{name} vs float64: {rel_error(g, w)}"


@pytest.mark.parametrize("B,T", SHAPES)
def test_gqa_with_nkv_equal_nh_is_ops_attention(B, T):
    q, k, v = _qkv(B, T, 4, 4, jnp.float32, seed=11)
    cot = _normal((B, T, 4 * HS), jnp.float32, 12)

    @jax.jit
    def both(q, k, v):
        out, vjp = jax.vjp(gqa_attention, q, k, v)
        qkv = jnp.stack([q, k, v], axis=2).reshape(B, T, -1)      # ops' packed layout [q | k | v]
        out_a, vjp_a = jax.vjp(lambda a: ops.attention(a, 4), qkv)
        return out, jnp.stack(vjp(cot), axis=2).reshape(B, T, -1), out_a, vjp_a(cot)[0]

    out, dqkv, out_a, dqkv_a = both(q, k, v)
    assert rel_error(out, out_a) < 1e-6 and rel_error(dqkv, dqkv_a) < 1e-6


def _broadcasts_of(jaxpr, shapes):
    """broadcast_in_dim equations (in every nested jaxpr) whose operand has one of the given shapes."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "broadcast_in_dim" and tuple(eqn.invars[0].aval.shape) in shapes:
            found.append(eqn)
        for sub in _params_jaxprs(eqn):
            found += _broadcasts_of(sub, shapes)
    return found


def _params_jaxprs(eqn):
    for p in eqn.params.values():
        for item in p if isinstance(p, (tuple, list)) else (p,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner


def test_gqa_never_replicates_k_or_v():
    B, T, NH, NKV = 2, 16, 4, 1
    q, k, v = _qkv(B, T, NH, NKV, jnp.float32)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)
    kv_shapes = {(B, T, NKV, HS), (B, T, NKV, 1, HS)}
    grad_op = jax.make_jaxpr(jax.grad(loss(gqa_attention), argnums=(0, 1, 2)))(q, k, v)
    grad_ref = jax.make_jaxpr(jax.grad(loss(gqa_attention_reference), argnums=(0, 1, 2)))(q, k, v)
    assert _broadcasts_of(grad_ref.jaxpr, kv_shapes)            # the check sees the oracle's repeat_kv
    assert not _broadcasts_of(grad_op.jaxpr, kv_shapes)
    dq, dk, dv = jax.grad(loss(gqa_attention), argnums=(0, 1, 2))(q, k, v)
    assert dk.shape == dv.shape == (B, T, NKV, HS) and dq.shape == q.shape


def test_gqa_under_jit_and_repeat_kv_order():
    q, k, v = _qkv(2, 9, 4, 2, jnp.bfloat16)
    f = lambda *a: jnp.sum(gqa_attention(*a).astype(jnp.float32) ** 2)
    eager = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert rel_error(a, b) < TOL[jnp.bfloat16]
    kr = np.asarray(repeat_kv(k, 2).astype(jnp.float32))
    for h in range(4):
        np.testing.assert_array_equal(kr[:, :, h], np.asarray(k[:, :, h // 2].astype(jnp.float32)))


def test_gqa_in_batch_chunks_equals_the_whole_batch(monkeypatch):
    """Past ops.ATTENTION_CHUNK_ELEMENTS the grouped-query attention runs one batch chunk after
    another, forward and backward, as ops.attention does: the output and the gradients equal the
    whole batch's to float32 rounding (bound 1e-6), and only chunk-sized scores are in the program."""
    B, T, NH, NKV, HS = 4, 16, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, T, NH, HS), jnp.float32)
    k, v = (jax.random.normal(key, (B, T, NKV, HS), jnp.float32) for key in keys[1:3])
    dout = jax.random.normal(keys[3], (B, T, NH * HS), jnp.float32)

    def out_and_grads(q, k, v, dout):     # a new function per use: jit must trace it again once patched
        out, vjp = jax.vjp(gqa_attention, q, k, v)
        return out, *vjp(dout)
    whole = jax.jit(lambda *a: out_and_grads(*a))(q, k, v, dout)
    monkeypatch.setattr(ops, "ATTENTION_CHUNK_ELEMENTS", 2 * NH * T * T)     # 2 chunks of 2 rows
    chunked_fn = jax.jit(lambda *a: out_and_grads(*a))
    hlo = chunked_fn.lower(q, k, v, dout).as_text()
    assert f"{B}x{NKV}x{NH // NKV}x{T}x{T}x" not in hlo and f"2x{NKV}x{NH // NKV}x{T}x{T}x" in hlo
    for c, w in zip(chunked_fn(q, k, v, dout), whole):
        assert rel_error(c, w) < 1e-6
