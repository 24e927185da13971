"""FP8 matmul (llmc_jax.nn.fp8) on the CPU, each check against an independent reference.

The references are NumPy + ml_dtypes (float8_e4m3fn / float8_e5m2 casts, float64 products), never
the module's own helpers. XLA:CPU runs an fp8 dot_general as a float32 matmul of the upcast fp8
values, so the op's only error against a float64 product of the same fp8 values is float32
rounding: the accumulation (a K-term sum, bounded by gamma_{K+3} * sum|terms|, u = 2**-24), the two
scale divisions and the bias add; plus one bf16 rounding (2**-8 relative) when the output is bf16.
"""
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import rel_error
from llmc_jax.nn import fp8, ops
from tests.cuda_lowering import lower_for_cuda

ML = {jnp.dtype(fp8.E4M3): ml_dtypes.float8_e4m3fn, jnp.dtype(fp8.E5M2): ml_dtypes.float8_e5m2}
U32 = 2.0 ** -24        # float32 unit roundoff
UBF16 = 2.0 ** -8       # bfloat16 unit roundoff


def np_max(dtype) -> float:
    return float(ml_dtypes.finfo(ML[jnp.dtype(dtype)]).max)


def np_quantize(v, scale, dtype) -> np.ndarray:
    """clip(v * scale) in float32, cast by ml_dtypes (round to nearest even)."""
    m = np_max(dtype)
    with np.errstate(over="ignore"):
        return np.clip(np.asarray(v, np.float32) * np.float32(scale), -m, m).astype(ML[jnp.dtype(dtype)])


def np_compute_scale(history, fp8_max, margin, prev) -> np.float32:
    """The delayed-scaling rule as the docs state it, in float32 NumPy."""
    prev = np.float32(prev) if np.isfinite(prev) and prev > 0 else np.float32(1.0)
    a = np.max(np.asarray(history, np.float32))
    if not (np.isfinite(a) and a >= np.finfo(np.float32).tiny):
        return prev
    with np.errstate(over="ignore", under="ignore"):
        s = np.float32(np.float32(fp8_max) / a) * np.float32(2.0 ** -margin)
    return s if np.isfinite(s) and s > 0 else prev


# ----------------------------------------------------------------------------------------------
# 1. quantize / dequantize and the scale bookkeeping, bit for bit

SPECIALS = [0.0, -0.0, 448.0, 449.0, 464.0, 465.0, 480.0, 500.0, -1e5, 57344.0, 61439.0, 61440.0, 1e6,
            np.inf, -np.inf, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -10, 2.0 ** -14, 2.0 ** -16,
            2.0 ** -17, 1.5 * 2.0 ** -17, 1e-30, 1e-45, -3e38]


@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_quantize_dequantize_bit_exact_against_ml_dtypes(in_dtype):
    rng = np.random.default_rng(0)
    # magnitudes from 1e-12 to 1e4: underflow to zero, subnormals, normals, saturation
    v = (rng.normal(size=4000) * 10.0 ** rng.uniform(-12, 4, 4000)).astype(np.float32)
    v = np.concatenate([v, np.asarray(SPECIALS, np.float32)])
    v = v.astype(ml_dtypes.bfloat16).astype(np.float32) if in_dtype == jnp.bfloat16 else v
    vj = jnp.asarray(v).astype(in_dtype)
    quant = jax.jit(fp8.quantize, static_argnums=2)
    deq = jax.jit(fp8.dequantize)
    for dtype in (fp8.E4M3, fp8.E5M2):
        m = np_max(dtype)
        tiny = float(ml_dtypes.finfo(ML[jnp.dtype(dtype)]).smallest_subnormal)
        for scale in (1.0, 3.7, 2.0 ** -5, 1000.0):
            got = np.asarray(quant(vj, jnp.float32(scale), dtype))
            want = np_quantize(v, scale, dtype)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
            g = got.astype(np.float32)
            assert not np.any(np.isnan(g)), "overflow must saturate, never NaN"
            with np.errstate(over="ignore"):
                scaled = v * np.float32(scale)
            np.testing.assert_array_equal(g[np.abs(scaled) >= m], np.sign(scaled[np.abs(scaled) >= m]) * m)
            assert np.all(g[(np.abs(scaled) < tiny / 2)] == 0.0)           # below half a subnormal: zero
            sub = (np.abs(scaled) >= tiny) & (np.abs(scaled) < float(ml_dtypes.finfo(ML[jnp.dtype(dtype)]).tiny))
            assert np.any(sub) and np.all(np.abs(g[sub]) > 0)              # the subnormal range is kept
            back = np.asarray(deq(jnp.asarray(got), jnp.float32(scale)))
            np.testing.assert_array_equal(back, got.astype(np.float32) * (np.float32(1.0) / np.float32(scale)))


def test_compute_scale_edge_cases():
    z = np.zeros(4, np.float32)
    one = lambda i, v: np.where(np.arange(4) == i, np.float32(v), z)
    # (history, fp8_max, margin, prev) -> expected scale
    cases = [
        (z, 448.0, 0.0, 1.0, 1.0),                              # nothing observed: 1.0
        (z, 448.0, 0.0, 7.5, 7.5),                              # all zero: keep the previous scale
        (one(2, np.inf) + one(0, 3.0), 448.0, 0.0, 7.5, 7.5),   # non-finite: keep
        (one(2, np.nan) + one(0, 3.0), 448.0, 0.0, 7.5, 7.5),
        (z, 448.0, 0.0, 0.0, 1.0), (z, 448.0, 0.0, -2.0, 1.0),  # never a bad scale out
        (z, 448.0, 0.0, np.inf, 1.0), (z, 448.0, 0.0, np.nan, 1.0),
        (one(0, 1e-40), 448.0, 0.0, 7.5, 7.5),                  # subnormal amax (448/1e-40 = inf): keep
        (one(0, 2.0), 448.0, 200.0, 7.5, 7.5),                  # 2**-200 = 0 in float32: keep
        (one(1, 3.5), 448.0, 0.0, 7.5, np.float32(448.0) / np.float32(3.5)),
        (one(1, 3.5) + one(3, 7.0), 57344.0, 2.0, 7.5, np.float32(57344.0) / np.float32(7.0) / 4),
    ]
    h, fmax, margin, prev, want = (np.asarray(c, np.float32) for c in zip(*cases))
    got = np.asarray(jax.jit(jax.vmap(fp8.compute_scale))(h, fmax, margin, prev))
    np.testing.assert_array_equal(got, want)
    for c, g in zip(cases, got):
        assert g == np_compute_scale(*c[:4])


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2], ids=["e4m3", "e5m2"])
def test_update_meta_history_and_scale_bit_exact(dtype):
    """30 steps of update_meta on two stacked metas (shape (2,)) vs a NumPy list model: rolling
    past H = 8, margins 0 and 3, zeros, inf/NaN observations, a spike, a subnormal amax."""
    H, fmax = 8, np_max(dtype)
    rng = np.random.default_rng(1)
    seq = rng.uniform(0.5, 4.0, (30, 2)).astype(np.float32)
    seq[0:2, 0] = 0.0                      # nothing yet: the scale stays 1.0
    seq[5, 0], seq[6, 0], seq[7, 0] = np.inf, np.nan, 1e4     # non-finite, then a spike
    seq[12:22, 0] = 0.0                    # all-zero tensors long enough for the spike to roll off
    seq[3, 1], seq[4, 1] = 1e-40, -1.0     # subnormal amax (scale would be inf) and a negative one
    for margin in (0.0, 3.0):
        run = jax.jit(lambda m, a: jax.lax.scan(
            lambda mm, aa: (lambda n: (n, n))(fp8.update_meta(mm, aa, fmax, margin)), m, a))
        _, metas = run(fp8.init_meta(H, shape=(2,)), jnp.asarray(seq))
        scales, hists = np.asarray(metas.scale), np.asarray(metas.amax_history)
        for j in range(2):
            hist, scale = [np.float32(0.0)] * H, np.float32(1.0)
            for t in range(len(seq)):
                a = seq[t, j]
                a = np.float32(a) if np.isfinite(a) and a >= np.finfo(np.float32).tiny else np.float32(0.0)
                hist = [a] + hist[:-1]
                scale = np_compute_scale(hist, fmax, margin, scale)
                np.testing.assert_array_equal(hists[t, j], np.asarray(hist, np.float32))
                assert scales[t, j] == scale, (margin, j, t)
                assert np.isfinite(scale) and scale > 0
        # the spike (step 7) leaves the window 8 steps later; an all-zero step keeps the scale
        assert scales[8, 0] == np.float32(np.float32(fmax) / np.float32(1e4)) * np.float32(2.0 ** -margin)
        assert scales[14, 0] == scales[8, 0] != scales[15, 0]       # (window max before/after it)
        assert scales[21, 0] == scales[19, 0] == scales[18, 0]      # an all-zero window keeps the last scale


# ----------------------------------------------------------------------------------------------
# 2. the op against a float64 NumPy FP8 reference

B, T, C, OC = 2, 5, 64, 96


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    w = (rng.normal(size=(OC, C)) * 0.05).astype(np.float32)
    b = (rng.normal(size=OC) * 0.1).astype(np.float32)
    cot = (rng.normal(size=(B, T, OC)) * 1e-3).astype(np.float32)
    if dtype == jnp.bfloat16:      # the op sees bf16 activations: the reference starts from the same values
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        cot = cot.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x, w, b, cot


def _metas(sx, sw, sd, H=4):
    """Metas holding these scales and a history that has observed something (as after a step), so
    that delayed scaling casts with exactly these scales."""
    return fp8.MatmulMetas(*(fp8.Fp8Meta(jnp.float32(s), jnp.zeros(H, jnp.float32).at[0].set(1.0))
                             for s in (sx, sw, sd)))


@functools.partial(jax.jit, static_argnames=("recipe", "margin"))
def _op_and_grads(x, w, b, metas, cot, recipe, margin):
    out, vjp = jax.vjp(functools.partial(fp8.fp8_matmul, recipe=recipe, margin=margin), x, w, b, metas)
    return out, vjp(cot)


def _within(got, want, bound, what):
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.max(err - bound)
    assert worst <= 0, f"{what}: error exceeds the float32 bound by {worst:.3g} (max err {err.max():.3g})"


@pytest.mark.parametrize("recipe", ["delayed", "current"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_fp8_matmul_against_float64_numpy(dtype, recipe):
    x, w, b, cot = _data(dtype)
    ax, aw, ad = (np.max(np.abs(a)) for a in (x, w, cot))
    margin = 1.0
    if recipe == "delayed":
        # scales as a history would leave them: x from a larger past amax, w exact, and dout's from
        # half of this step's amax, so its largest values saturate (clipped in both implementations)
        sx, sw, sd = (np.float32(np.float32(m) / np.float32(a)) for m, a in
                      ((448.0, 1.3 * ax), (448.0, aw), (57344.0, 0.5 * ad)))
    else:
        sx, sw, sd = (np.float32(np.float32(m) / a) * np.float32(2.0 ** -margin)
                      for m, a in ((448.0, ax), (448.0, aw), (57344.0, ad)))
    metas = _metas(sx, sw, sd) if recipe == "delayed" else _metas(1.0, 1.0, 1.0)
    out, (dx, dw, db, gm) = _op_and_grads(jnp.asarray(x).astype(dtype), jnp.asarray(w), jnp.asarray(b), metas,
                                          jnp.asarray(cot).astype(dtype), recipe=recipe, margin=margin)
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == jnp.float32 and db.dtype == jnp.float32

    xq = np_quantize(x, sx, fp8.E4M3).astype(np.float64)
    wq = np_quantize(w, sw, fp8.E4M3).astype(np.float64)
    dq = np_quantize(cot, sd, fp8.E5M2).astype(np.float64)
    if recipe == "delayed":
        assert np.any(np.abs(dq) == 57344.0), "the delayed dout scale was meant to saturate"
    rnd = UBF16 if dtype == jnp.bfloat16 else 0.0       # the final cast of a bf16 output

    def bound(absdot, scale, K, want, extra=0.0):
        e = (K + 3) * U32 * absdot / scale + 4 * U32 * (np.abs(want) + extra)
        return e * (1 + rnd) + rnd * np.abs(want)

    want = xq @ wq.T / (float(sx) * float(sw)) + b
    _within(out, want, bound(np.abs(xq) @ np.abs(wq).T, float(sx) * float(sw), C, want, np.abs(b)), "out")
    want = dq @ wq / (float(sd) * float(sw))
    _within(dx, want, bound(np.abs(dq) @ np.abs(wq), float(sd) * float(sw), OC, want), "dx")
    dq2, xq2 = dq.reshape(-1, OC), xq.reshape(-1, C)
    want = dq2.T @ xq2 / (float(sd) * float(sx))
    _within(dw, want, bound(np.abs(dq2).T @ np.abs(xq2), float(sd) * float(sx), B * T, want), "dw")
    want = cot.astype(np.float64).reshape(-1, OC).sum(0)
    _within(db, want, (B * T + 1) * U32 * np.abs(cot).reshape(-1, OC).sum(0), "db")

    # the "gradient" of the metas: the amaxes observed this step, bit for bit, and nothing else
    for g, a in zip(gm, (ax, aw, np.max(np.abs(cot)))):
        assert float(fp8.observed_amax(g)) == np.float32(a)
        assert float(g.scale) == 0.0 and np.all(np.asarray(g.amax_history)[1:] == 0.0)


def test_fp8_matmul_reference_is_the_gradient_oracle():
    """With a cotangent that is exactly representable in e5m2 at a power-of-two scale, the op's
    e5m2 rounding of dout is exact, so its dx, dw, db equal jax.vjp of the plain-jnp reference
    (straight-through over the same quantization) up to float32 rounding; so do the forwards."""
    x, w, b, _ = _data(jnp.float32, seed=2)
    rng = np.random.default_rng(3)
    sd = 256.0
    cot = (rng.normal(size=(B, T, OC)) * 100).astype(ml_dtypes.float8_e5m2).astype(np.float32) / np.float32(sd)
    metas = _metas(np.float32(448.0 / np.abs(x).max()), np.float32(300.0 / np.abs(w).max()), sd)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), metas)
    out, grads = _op_and_grads(*args, jnp.asarray(cot), recipe="delayed", margin=0.0)
    ref, ref_grads = jax.jit(lambda x, w, b, m, c: (lambda o, vjp: (o, vjp(c)))(
        *jax.vjp(lambda x, w, b: fp8.fp8_matmul_reference(x, w, b, m), x, w, b)))(*args, jnp.asarray(cot))
    assert rel_error(out, ref) < 1e-6
    for name, g, r in zip(("dx", "dw", "db"), grads[:3], ref_grads):
        assert rel_error(g, r) < 1e-6, name


def test_metas_stacked_on_layers_through_a_scan():
    """The integration shape: metas stacked on L and scanned with the layer weights; each layer's
    meta gradient holds that layer's own amaxes; micro-batches combine by max."""
    L, C2 = 3, 32
    rng = np.random.default_rng(5)
    ws = jnp.asarray(rng.normal(size=(L, C2, C2)) * np.array([0.1, 0.2, 0.05])[:, None, None], jnp.float32)
    metas = fp8.init_matmul_metas(history_len=4, shape=(L,))

    @jax.jit
    def meta_grads(x, ws, metas, cot):
        def f(ws, metas):
            body = lambda h, lw: (fp8.fp8_matmul(h, lw[0], None, lw[1]), None)
            return jnp.sum(jax.lax.scan(body, x, (ws, metas))[0] * cot)
        return jax.grad(f, argnums=1)(ws, metas)

    xs = [jnp.asarray(rng.normal(size=(4, C2)) * s, jnp.float32) for s in (1.0, 3.0)]
    cot = jnp.asarray(rng.normal(size=(4, C2)), jnp.float32)
    g1, g2 = (meta_grads(x, ws, metas, cot) for x in xs)
    assert g1.x.amax_history.shape == (L, 4) and g1.x.scale.shape == (L,)
    np.testing.assert_array_equal(np.asarray(fp8.observed_amax(g1.w)), np.abs(np.asarray(ws)).max(axis=(1, 2)))
    assert float(fp8.observed_amax(g1.x)[0]) == np.abs(np.asarray(xs[0])).max()
    assert float(fp8.observed_amax(g1.dout)[-1]) == np.abs(np.asarray(cot)).max()
    new, both = jax.jit(lambda m, a, b: (lambda ab: (fp8.update_matmul_metas(m, ab), ab))(
        fp8.combine_amax_grads(a, b)))(metas, g1, g2)
    want = np.maximum(np.asarray(g1.x.amax_history), np.asarray(g2.x.amax_history))
    np.testing.assert_array_equal(np.asarray(both.x.amax_history), want)
    np.testing.assert_array_equal(np.asarray(new.x.scale), np.float32(448.0) / want[:, 0])


@pytest.mark.parametrize("policy", ["everything_saveable", "dots_saveable", "nothing_saveable"])
def test_rematerialized_fp8_matmul_equals_the_plain_one(policy):
    """Under jax.checkpoint the loss and every gradient equal the un-checkpointed ones exactly, with
    operands that reach e4m3's top (448). jax.checkpoint rounds the floating residuals it saves with
    an IEEE reduce_precision, which made every e4m3 residual above 240 inf and the loss NaN under
    everything_saveable (fp8_matmul now keeps its e4m3 residuals as bytes)."""
    L, C2 = 2, 32
    rng = np.random.default_rng(7)
    ws = jnp.asarray(rng.normal(size=(L, C2, C2)) * 0.2, jnp.float32)
    metas = fp8.init_matmul_metas(shape=(L,))
    x = jnp.asarray(rng.normal(size=(4, 8, C2)), jnp.float32)

    def loss(ws, metas, remat):
        body = lambda h, lw: (fp8.fp8_matmul(h, lw[0], None, lw[1], recipe="current"), None)
        body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, policy)) if remat else body
        return jnp.sum(jax.lax.scan(body, x, (ws, metas))[0] ** 2)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (want, want_g), (got, got_g) = grad(ws, metas, False), grad(ws, metas, True)
    assert np.isfinite(float(want)) and float(got) == float(want)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# 3. the program holds fp8 dots, not f32 dots of dequantized values

DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>")


def _dots(text: str) -> list[tuple[str, str, str]]:
    return sorted(DOT.search(line).groups() for line in text.splitlines() if "stablehlo.dot_general" in line)


def test_lowered_program_has_fp8_dots():
    x, w, b, cot = (jnp.asarray(a) for a in _data(jnp.float32))
    x, cot = x.astype(jnp.bfloat16), cot.astype(jnp.bfloat16)
    leaves, tree = jax.tree.flatten(_metas(1.0, 1.0, 1.0))

    def grads(x, w, b, cot, *meta_leaves):       # flat arrays, as lower_for_cuda takes them
        m = jax.tree.unflatten(tree, meta_leaves)
        return jax.value_and_grad(lambda x, w, b, m: jnp.sum((fp8.fp8_matmul(x, w, b, m) * cot).astype(jnp.float32)),
                                  argnums=(0, 1, 2, 3))(x, w, b, m)

    fwd = jax.jit(lambda x, w, b, *ml: fp8.fp8_matmul(x, w, b, jax.tree.unflatten(tree, ml)))
    assert _dots(fwd.lower(x, w, b, *leaves).as_text()) == [("f8E4M3FN", "f8E4M3FN", "f32")]
    want = [("f8E4M3FN", "f8E4M3FN", "f32"), ("f8E5M2", "f8E4M3FN", "f32"), ("f8E5M2", "f8E4M3FN", "f32")]
    assert _dots(jax.jit(grads).lower(x, w, b, cot, *leaves).as_text()) == want
    assert _dots(lower_for_cuda(grads, x, w, b, cot, *leaves)) == want


# ----------------------------------------------------------------------------------------------
# 4. amax spikes and all-zero tensors: never NaN or Inf, in outputs, gradients or metas

@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_spike_and_zeros_stay_finite(recipe):
    x0, w0, b, cot0 = (jnp.asarray(a) for a in _data(jnp.bfloat16, seed=4))
    x0, cot0 = x0.astype(jnp.bfloat16), cot0.astype(jnp.bfloat16)

    @jax.jit
    def step(x, w, cot, metas):
        out, (dx, dw, db, gm) = _op_and_grads(x, w, b, metas, cot, recipe=recipe, margin=0.0)
        return out, dx, dw, db, fp8.update_matmul_metas(metas, gm)

    metas = fp8.init_matmul_metas(history_len=4)
    scales = []
    for t in range(8):
        k = {2: 1000.0, 4: 0.0}.get(t, 1.0)      # step 2: every tensor 1000x; step 4: all zero
        x, w, cot = (x0 * k).astype(jnp.bfloat16), w0 * (1000.0 if t == 2 else 1.0), (cot0 * k).astype(jnp.bfloat16)
        out, dx, dw, db, metas = step(x, w, cot, metas)
        for name, a in (("out", out), ("dx", dx), ("dw", dw), ("db", db), *(
                (f"meta {f}", l) for f, l in zip(("x.scale", "x.hist", "w.scale", "w.hist", "d.scale", "d.hist"),
                                                  jax.tree.leaves(metas)))):
            assert np.all(np.isfinite(np.asarray(a, np.float32))), f"step {t}: {name} not finite"
        assert all(float(m.scale) > 0 for m in metas)
        if t == 4:
            assert not np.any(np.asarray(out.astype(jnp.float32)) - np.asarray(b, np.float32).astype(
                ml_dtypes.bfloat16).astype(np.float32)) and not np.any(np.asarray(dw))
        scales.append([float(m.scale) for m in metas])
    if recipe == "delayed":
        assert scales[2][0] < scales[1][0] / 500      # the spike entered the window...
        assert scales[5] != scales[1] and scales[6] == scales[1]   # ...and left it after 4 steps


# ----------------------------------------------------------------------------------------------
# 5. a 2-layer MLP trained with SGD: FP8 (delayed scaling) tracks bf16

def _train_mlp(mode: str, steps: int = 30, lr: float = 8.0):
    """x (256, 64) -> matmul (128) -> GELU -> matmul (64), MSE against a random tanh teacher; weights
    N(0, 0.02) (llm.c's init scale), bf16 activations. mode: bf16 (ops.matmul), fp8 (delayed
    scaling from fresh metas), unscaled (fp8 casts with every scale fixed at 1.0: the control)."""
    N, D, H, O = 256, 64, 128, 64
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    t1 = rng.normal(size=(H, D)).astype(np.float32) / np.sqrt(D)
    t2 = rng.normal(size=(O, H)).astype(np.float32) / np.sqrt(H)
    y = jnp.asarray(np.tanh(x @ t1.T) @ t2.T, jnp.float32)
    params = dict(w1=rng.normal(size=(H, D)).astype(np.float32) * np.float32(0.02), b1=np.zeros(H, np.float32),
                  w2=rng.normal(size=(O, H)).astype(np.float32) * np.float32(0.02), b2=np.zeros(O, np.float32))
    xb = jnp.asarray(x).astype(jnp.bfloat16)

    def loss_fn(p, metas):
        mm = ops.matmul if mode == "bf16" else lambda a, w, b, m: fp8.fp8_matmul(a, w, b, m)
        args = ((), ()) if mode == "bf16" else ((metas[0],), (metas[1],))
        o = mm(ops.gelu(mm(xb, p["w1"], p["b1"], *args[0])), p["w2"], p["b2"], *args[1])
        return jnp.mean(jnp.square(o.astype(jnp.float32) - y))

    def step(carry, _):
        p, metas = carry
        loss, (gp, gm) = jax.value_and_grad(loss_fn, argnums=(0, 1))(p, metas)
        p = jax.tree.map(lambda a, g: a - lr * g, p, gp)
        if mode == "fp8":
            metas = tuple(fp8.update_matmul_metas(m, g) for m, g in zip(metas, gm))
        return (p, metas), loss

    metas0 = (fp8.init_matmul_metas(), fp8.init_matmul_metas())
    if mode == "unscaled":     # scale 1.0 in a meta that has "observed" something, never updated
        metas0 = (_metas(1.0, 1.0, 1.0, H=32), _metas(1.0, 1.0, 1.0, H=32))
    (_, metas), losses = jax.jit(lambda p, m: jax.lax.scan(step, (p, m), None, length=steps))(params, metas0)
    return np.asarray(losses, np.float64), metas


def test_mlp_fp8_loss_curve_tracks_bf16():
    """Measured (jax 0.10.2, CPU): loss 0.4060 -> 0.0482 (bf16) / 0.0490 (fp8); largest per-step
    relative distance fp8 vs bf16 0.0174, at step 28 (fp32 vs bf16: 0.0002); the unscaled control
    0.0541. Bound 0.035: 2x the measured fp8 distance and below the control, which must also sit
    >= 1.5x further from bf16 than the delayed-scaled run (measured 3.1x): the bound notices
    missing scaling. docs/fp8.md has the curves and the reasoning."""
    bf16, _ = _train_mlp("bf16")
    fp8_losses, metas = _train_mlp("fp8")
    control, _ = _train_mlp("unscaled")
    dist = lambda a: float(np.max(np.abs(a - bf16) / bf16))
    assert bf16[-1] < 0.2 * bf16[0] and fp8_losses[-1] < 0.2 * fp8_losses[0]      # both learn
    assert dist(fp8_losses) < 0.035, dist(fp8_losses)
    assert dist(control) > 1.5 * dist(fp8_losses), (dist(control), dist(fp8_losses))
    for m in jax.tree.leaves(metas):
        assert bool(jnp.all(jnp.isfinite(m)))
    assert all(float(mm.scale) != 1.0 and float(mm.amax_history[0]) > 0 for pair in metas for mm in pair)
