"""Tests for llmc_jax.training.optim against hand-written formulas and a float64 numpy AdamW."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmc_jax.training import optim
from llmc_jax.training.optim import learning_rate


# ---------------------------------------------------------------- LR schedules

def _lr(step, schedule, lr=6e-4, W=10, N=100, q=0.1):
    return learning_rate(step, schedule=schedule, max_lr=lr, warmup=W, total_steps=N, final_frac=q)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup(schedule):
    for step in (0, 1, 5, 9):
        assert _lr(step, schedule) == pytest.approx(6e-4 * (step + 1) / 10, rel=1e-6)
    assert _lr(9, schedule) == pytest.approx(6e-4, rel=1e-6)  # last warmup step reaches max lr


def test_cosine():
    lr, mn = 6e-4, 6e-5
    for step in (10, 11, 50, 99, 100):
        r = (step - 10) / 90
        want = mn + 0.5 * (1 + math.cos(math.pi * r)) * (lr - mn)
        assert _lr(step, "cosine") == pytest.approx(want, rel=1e-6)
    assert _lr(10, "cosine") == pytest.approx(lr, rel=1e-7)
    assert _lr(99, "cosine") > mn * 1.0001  # the last update (step N-1) is not yet at the floor
    assert _lr(100, "cosine") == pytest.approx(mn, rel=1e-6)


def test_linear():
    lr, mn = 6e-4, 6e-5
    for step in (10, 40, 99, 100):
        r = (step - 10) / 90
        assert _lr(step, "linear") == pytest.approx(lr - r * (lr - mn), rel=1e-6)


def test_constant_ignores_warmup():
    for step in (0, 3, 99, 500):
        assert _lr(step, "constant") == pytest.approx(6e-4, rel=1e-7)


def test_wsd():
    lr, mn, N, W = 1e-3, 0.0, 97, 5
    dp = math.floor(0.8 * N)  # 77
    f = lambda s: learning_rate(s, schedule="wsd", max_lr=lr, warmup=W, total_steps=N, final_frac=0.0)
    assert f(0) == pytest.approx(lr / W, rel=1e-6)
    assert f(4) == pytest.approx(lr, rel=1e-6)
    assert f(5) == pytest.approx(lr, rel=1e-7)
    assert f(dp - 1) == pytest.approx(lr, rel=1e-7)
    for step in (dp, dp + 1, N - 1, N):
        r = (step - dp) / (N - dp)
        assert f(step) == pytest.approx(mn + (1 - math.sqrt(r)) * (lr - mn), rel=1e-6, abs=1e-12)
    assert f(dp) == pytest.approx(lr, rel=1e-7)  # decay starts at 1 - sqrt(0)
    assert f(N) == 0.0
    # decay point is floor(0.8 N) with float32 0.8: N = 10 -> 8, N = 5 -> 4
    g = lambda s, n: learning_rate(s, schedule="wsd", max_lr=1.0, warmup=0, total_steps=n, final_frac=0.0)
    assert g(7, 10) == 1.0 and g(8, 10) == 1.0 and g(9, 10) < 1.0
    assert g(3, 5) == 1.0 and g(4, 5) == 1.0 and g(5, 5) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="cosine, linear, constant, wsd"):
        _lr(0, "exponential")
    with pytest.raises(ValueError):
        _lr(101, "cosine")  # llm.c asserts decay_ratio <= 1
    with pytest.raises(ValueError):
        _lr(-1, "linear")
    with pytest.raises(ValueError):  # N == W: 0/0 decay ratio
        learning_rate(5, schedule="cosine", max_lr=1.0, warmup=5, total_steps=5, final_frac=0.0)
    assert _lr(500, "constant") == pytest.approx(6e-4)


def test_float32_semantics():
    # llm.c computes in float: the result must be a float32 value
    v = _lr(37, "cosine")
    assert float(np.float32(v)) == v


# ---------------------------------------------------------------- weight decay mask

def test_weight_decay_mask():
    from llmc_jax.models.config import PARAM_NAMES
    mask = optim.weight_decay_mask({n: None for n in PARAM_NAMES})
    assert [n for n in PARAM_NAMES if mask[n]] == ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]


# ---------------------------------------------------------------- AdamW

def _numpy_adamw(params, grads_seq, lrs, steps, b1, b2, eps, wd):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for g, lr, step in zip(grads_seq, lrs, steps):
        t = step + 1
        for k in p:
            gk = g[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            d = wd if k in optim.WEIGHT_DECAY_PARAMS else 0.0
            p[k] = p[k] - lr * (mh / (np.sqrt(vh) + eps) + d * p[k])
    return p


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {"wte": rng.normal(size=(8, 4)), "qkvw": rng.normal(size=(2, 12, 4)),
              "ln1w": 1.0 + 0.1 * rng.normal(size=(2, 4)), "qkvb": rng.normal(size=(2, 12))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("steps", [(0, 1, 2), (0, 3, 4)])  # (0, 3, 4): steps 1 and 2 were skipped
def test_adamw_matches_numpy(steps):
    params, grads = _setup()
    lrs = [1e-2, 3e-2, 5e-3]
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    opt = optim.make_optimizer(beta1=b1, beta2=b2, eps=eps, weight_decay=wd)

    @jax.jit
    def step_fn(p, s, g, lr, step):
        s = optim.set_step(optim.set_learning_rate(s, lr), step)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.asarray, params)
    s = opt.init(p)
    for g, lr, step in zip(grads, lrs, steps):
        p, s = step_fn(p, s, g, jnp.float32(lr), jnp.int32(step))
    assert step_fn._cache_size() == 1  # lr and step are traced: one compile
    want = _numpy_adamw(params, grads, lrs, steps, b1, b2, eps, wd)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-6, atol=1e-7)
    # decay really applied to 2-D tensors only: with zero grads only decayed tensors move
    s0 = optim.set_learning_rate(opt.init(p), 0.5)
    u, _ = opt.update(jax.tree.map(jnp.zeros_like, p), s0, p)
    assert float(jnp.abs(u["wte"]).max()) > 0 and float(jnp.abs(u["ln1w"]).max()) == 0


def test_adamw_state_fp32_for_bf16_params():
    opt = optim.make_optimizer(weight_decay=0.1)
    p = {"wte": jnp.ones((4, 4), jnp.bfloat16), "lnfw": jnp.ones((4,), jnp.bfloat16)}
    s = opt.init(p)
    for leaf in jax.tree.leaves((s.mu, s.nu)):
        assert leaf.dtype == jnp.float32
    s = optim.set_learning_rate(s, 1e-3)
    u, s = opt.update(jax.tree.map(lambda x: x * 0.5, p), s, p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
    assert s.learning_rate.dtype == jnp.float32


# ---------------------------------------------------------------- global norm and clipping

def test_global_norm_and_clip():
    g = {"a": jnp.full((3, 4), 2.0, jnp.bfloat16), "b": jnp.array([3.0, -4.0])}
    norm = optim.global_norm(g)
    want = math.sqrt(12 * 4 + 9 + 16)
    assert norm.dtype == jnp.float32 and float(norm) == pytest.approx(want, rel=1e-6)
    clipped = optim.clip_by_global_norm(g, norm, 1.0)
    assert float(optim.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["b"]), np.array([3.0, -4.0]) / want, rtol=1e-6)
    same = optim.clip_by_global_norm(g, norm, 100.0)  # norm <= max: untouched
    np.testing.assert_array_equal(np.asarray(same["b"]), [3.0, -4.0])
    off = optim.clip_by_global_norm(g, norm, 0.0)  # 0 disables
    np.testing.assert_array_equal(np.asarray(off["a"]), np.full((3, 4), 2.0))
    # exactly at the threshold: no scaling (strict >)
    at = optim.clip_by_global_norm({"b": jnp.array([3.0, 4.0])}, jnp.float32(5.0), 5.0)
    np.testing.assert_array_equal(np.asarray(at["b"]), [3.0, 4.0])
    jitted = jax.jit(lambda g: optim.clip_by_global_norm(g, optim.global_norm(g), 1.0))(g)
    np.testing.assert_allclose(np.asarray(jitted["b"]), np.asarray(clipped["b"]), rtol=1e-6)


# ---------------------------------------------------------------- outlier detector

def test_outlier_detector_matches_numpy():
    """z of each new value against the last 128 values including itself; NaN until the window is full."""
    rng = np.random.default_rng(2)
    xs = (5.0 + 0.3 * rng.normal(size=300)).astype(np.float32)
    xs[250] = 50.0   # an outlier
    state = optim.detector_init(128)
    upd = jax.jit(optim.detector_update)
    for i, x in enumerate(xs):
        state, z = upd(state, jnp.float32(x))
        if i < 128:
            assert math.isnan(float(z))
        else:
            w = xs[i - 127:i + 1].astype(np.float64)
            assert float(z) == pytest.approx((xs[i] - w.mean()) / w.std(), rel=1e-4, abs=1e-4)
        if i == 250:
            assert float(z) > 10
    zs = [float(optim.detector_update(optim.detector_init(4), jnp.float32(2.0))[1])]
    const = optim.detector_init(4)
    for _ in range(6):   # a constant series has std 0: z is 0, not NaN, once the window is full
        const, z = upd(const, jnp.float32(2.0))
    assert float(z) == 0.0 and math.isnan(zs[0])
