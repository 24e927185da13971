"""Every op: forward vs its plain-jnp reference, hand-written backward vs jax.vjp of the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import ops

# fp32: manual and reference differ only in summation order. bf16: activations are rounded to
# 8 mantissa bits at different places (e.g. dlogits), so outputs agree to a few bf16 ulps.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SHAPES = [(2, 16), (1, 37), (3, 5)]   # (B, T), T not always a power of two
C, NH, V, VP = 64, 4, 250, 256


def _inputs(name, B, T, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(0, scale, s).astype(np.float32))
    act = lambda *s: f(*s).astype(dtype)
    if name == "encoder":
        idx = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
        return (f(VP, C, scale=0.02), f(64, C, scale=0.02), idx, jnp.zeros((), dtype)), (0, 1)
    if name == "token_embedding":
        idx = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
        return (f(VP, C, scale=0.02), idx, jnp.zeros((), dtype)), (0,)
    if name == "layernorm":
        return (act(B, T, C) * 3 + 1, 1 + f(C, scale=0.1), f(C, scale=0.1)), (0, 1, 2)
    if name == "matmul":
        return (act(B, T, C), f(3 * C, C, scale=0.05), f(3 * C, scale=0.1)), (0, 1, 2)
    if name == "matmul_nobias":
        return (act(B, T, C), f(3 * C, C, scale=0.05), None), (0, 1)
    if name == "gelu":
        return (act(B, T, 4 * C) * 2,), (0,)
    if name == "residual":
        return (act(B, T, C), act(B, T, C)), (0, 1)
    if name == "attention":
        return (act(B, T, 3 * C), NH), (0,)
    if name == "classifier":
        wte = np.array(f(VP, C, scale=0.5))
        wte[V:] = 0.0
        targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
        return (act(B, T, C), jnp.asarray(wte), targets, V), (0, 1)
    raise KeyError(name)


OPS = {
    "encoder": (ops.encoder, ops.encoder_reference),
    "layernorm": (ops.layernorm, ops.layernorm_reference),
    "matmul": (ops.matmul, ops.matmul_reference),
    "matmul_nobias": (ops.matmul, ops.matmul_reference),
    "token_embedding": (ops.token_embedding, ops.token_embedding_reference),
    "gelu": (ops.gelu, ops.gelu_reference),
    "residual": (ops.residual, ops.residual_reference),
    "attention": (ops.attention, ops.attention_reference),
    "classifier": (ops.fused_classifier, ops.classifier_reference),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("name", list(OPS))
def test_op_forward_and_backward(name, B, T, dtype):
    op, ref = OPS[name]
    args, diff_argnums = _inputs(name, B, T, dtype)

    def split(fn):
        # a function of the differentiable args only, the others closed over
        def g(*diff):
            full = list(args)
            for i, a in zip(diff_argnums, diff):
                full[i] = a
            return fn(*full)
        return g

    diff_args = [args[i] for i in diff_argnums]
    out_m, vjp_m = jax.vjp(split(op), *diff_args)
    out_r, vjp_r = jax.vjp(split(ref), *diff_args)
    assert out_m.dtype == out_r.dtype and out_m.shape == out_r.shape
    tol = TOL[dtype]
    assert rel_error(out_m, out_r) < tol, f"{name} forward"
    cot = jnp.asarray(np.random.default_rng(7).normal(size=out_m.shape).astype(np.float32)).astype(out_m.dtype)
    for i, (gm, gr) in enumerate(zip(vjp_m(cot), vjp_r(cot))):
        assert gm.dtype == gr.dtype, f"{name} grad {i} dtype"
        assert rel_error(gm, gr) < tol, f"{name} grad of arg {diff_argnums[i]}: {rel_error(gm, gr)}"


def test_classifier_padded_columns_get_exactly_zero_gradient():
    (x, wte, targets, _), _ = _inputs("classifier", 2, 9, jnp.float32)
    wte = wte.at[V:].set(3.0)   # even non-zero padded rows never enter the softmax
    loss, (dx, dwte) = jax.value_and_grad(ops.fused_classifier, argnums=(0, 1))(x, wte, targets, V)
    assert np.all(np.asarray(dwte)[V:] == 0.0)
    assert np.isclose(float(loss), float(ops.classifier_reference(x, wte, targets, V)), rtol=1e-6)


def test_encoder_backward_scatters_into_used_rows_only():
    (wte, wpe, idx, dt), _ = _inputs("encoder", 2, 7, jnp.float32)
    idx = jnp.asarray([[3, 3, 5, 9, 3, 0, 1], [5, 5, 5, 5, 2, 2, 2]], jnp.int32)
    dout = jnp.ones((2, 7, C))
    _, vjp = jax.vjp(lambda a, b: ops.encoder(a, b, idx, dt), wte, wpe)
    dwte, dwpe = vjp(dout)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=VP)
    np.testing.assert_array_equal(np.asarray(dwte)[:, 0], counts)   # each use adds its row once
    np.testing.assert_array_equal(np.asarray(dwpe)[:7, 0], 2.0)     # summed over B
    assert np.all(np.asarray(dwpe)[7:] == 0.0)


def test_ops_against_float64_numpy():
    """Independent check of the op math itself (not only op vs reference)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, C))
    w, b = 1 + 0.1 * rng.normal(size=C), 0.1 * rng.normal(size=C)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * w + b
    got = ops.layernorm(*(jnp.asarray(a, jnp.float32) for a in (x, w, b)))
    assert rel_error(got, want) < 1e-5
    g = ops.gelu(jnp.asarray(x, jnp.float32))
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    assert rel_error(g, want) < 1e-5
    # d gelu / dx by central differences in float64
    h = 1e-5
    f = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    numeric = (f(x + h) - f(x - h)) / (2 * h)
    _, vjp = jax.vjp(ops.gelu, jnp.asarray(x, jnp.float32))
    assert rel_error(vjp(jnp.ones_like(jnp.asarray(x, jnp.float32)))[0], numeric) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_classifier_in_chunks_equals_the_one_pass_classifier(dtype, monkeypatch):
    """Past CLASSIFIER_CHUNK_ELEMENTS the classifier runs in T-chunks with the gradients taken in its
    forward: the same loss bit for bit (one mean over the same row losses), gradients within the
    reference tolerance, a scaled upstream gradient honoured, and no (B, T, Vp) array in the program."""
    B, T = 2, 144                        # B*T >= 2C: where chunking saves memory
    (x, wte, targets, _), _ = _inputs("classifier", B, T, dtype)
    Vp = wte.shape[0]
    monkeypatch.setattr(ops, "CLASSIFIER_CHUNK_ELEMENTS", B * 48 * Vp)     # 3 chunks of T=48
    assert ops.classifier_chunks(B, T, Vp) == 3
    loss_fn = lambda x, w: 3.0 * ops.fused_classifier(x, w, targets, V)
    whole_fn = lambda x, w: 3.0 * ops._classifier_whole(x, w, targets, V)
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(x, wte)
    loss_w, grads_w = jax.value_and_grad(whole_fn, argnums=(0, 1))(x, wte)
    assert float(loss) == float(loss_w)
    # the primal (no grads), jitted: XLA fuses the two programs' softmax differently (seen: 1 ulp in
    # fp32, 2e-7 relative in bf16 where it may also elide the logits' rounding)
    primal, primal_w = float(jax.jit(loss_fn)(x, wte)), float(jax.jit(whole_fn)(x, wte))
    assert abs(primal - primal_w) <= 1e-6 * abs(primal_w)
    for g, gw in zip(grads, grads_w):
        assert g.dtype == gw.dtype and rel_error(g, gw) < TOL[dtype]
    hlo = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(x, wte).as_text()
    assert f"{B}x{T}x{Vp}x" not in hlo and f"{B}x48x{Vp}x" in hlo     # only chunk-sized logits


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_in_batch_chunks_equals_the_whole_batch(dtype, monkeypatch):
    """Past ATTENTION_CHUNK_ELEMENTS XLA's attention runs one batch chunk after another (lax.map),
    forward and backward: each row's arithmetic is unchanged, so the output and the gradient equal
    the whole batch's to float32 rounding (XLA:CPU fuses the loop body differently: measured 1e-7
    relative in fp32, bit for bit in bf16; bound 1e-6 and one bf16 ulp); only chunk-sized
    (Bc, NH, T, T) scores are in the program."""
    B, T, NH, C = 6, 16, 4, 32
    qkv = jax.random.normal(jax.random.PRNGKey(0), (B, T, 3 * C), jnp.float32).astype(dtype)
    dout = jax.random.normal(jax.random.PRNGKey(1), (B, T, C), jnp.float32).astype(dtype)

    def out_and_grad(qkv, dout):     # a new function per use: jit must trace it again once patched
        out, vjp = jax.vjp(lambda a: ops.attention(a, NH), qkv)
        return out, vjp(dout)[0]
    whole = jax.jit(lambda *a: out_and_grad(*a))(qkv, dout)
    monkeypatch.setattr(ops, "ATTENTION_CHUNK_ELEMENTS", 2 * NH * T * T)     # 3 chunks of 2 rows
    assert ops.attention_chunks(B, NH, T) == 3
    chunked_fn = jax.jit(lambda *a: out_and_grad(*a))
    hlo = chunked_fn.lower(qkv, dout).as_text()
    assert f"{B}x{NH}x{T}x{T}x" not in hlo and f"2x{NH}x{T}x{T}x" in hlo
    for c, w in zip(chunked_fn(qkv, dout), whole):
        assert c.dtype == w.dtype and rel_error(c, w) < (1e-6 if dtype == jnp.float32 else 2**-8)
