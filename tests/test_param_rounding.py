"""Stochastic rounding of bf16 params (llmc_jax/training/rounding.py) against a NumPy implementation
of the same rule, written here from llm.c's cuda_utils.cuh: SquirrelNoise5, its 16 low bits as the
threshold, round up when the fp32 word's 16 low bits exceed it. The NumPy side computes the bf16
result as the truncated upper half plus one (not llm.c's fill-and-round-to-nearest), so the two
agree only if both formulations are right. -z 0..3 on 8 devices: tests/test_parallel.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llmc_jax.training import rounding, train_step
from conftest import TEST_CONFIG, random_params

MASK = np.uint64(0xFFFFFFFF)


def np_squirrel5(position, seed) -> np.ndarray:
    """SquirrelNoise5 in uint64 arithmetic, reduced mod 2**32 after every step."""
    m = np.asarray(position, np.uint64) & MASK
    m = (m * np.uint64(0xD2A80A3F)) & MASK
    m = (m + np.uint64(seed)) & MASK
    m ^= m >> np.uint64(9)
    m = (m + np.uint64(0xA884F197)) & MASK
    m ^= m >> np.uint64(11)
    m = (m * np.uint64(0x6C736F4B)) & MASK
    m ^= m >> np.uint64(13)
    m = (m + np.uint64(0xB79F3ABB)) & MASK
    m ^= m >> np.uint64(15)
    m = (m * np.uint64(0x1B56C4F5)) & MASK
    m ^= m >> np.uint64(17)
    return m


def np_stochastic_round(x: np.ndarray, step: int, tensor: int) -> np.ndarray:
    """bf16 bits of llm.c's rounding of x, with the seed of (step, tensor) and row-major positions."""
    seed = np_squirrel5(tensor, np_squirrel5(step, rounding.BASE_SEED))
    threshold = np_squirrel5(np.arange(x.size, dtype=np.uint64), seed) & np.uint64(0xFFFF)
    bits = x.astype(np.float32).ravel().view(np.uint32).astype(np.uint64)
    up = (bits & np.uint64(0xFFFF)) > threshold
    return ((bits >> np.uint64(16)) + up).astype(np.uint16).reshape(x.shape)


def jax_bits(x_bf16) -> np.ndarray:
    return np.asarray(x_bf16).view(np.uint16)


def wide_values(shape, seed=0) -> np.ndarray:
    """Signs, exponents from 1e-40 (subnormal) to 1e30, zeros, and values a bf16 holds exactly."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-40, 30, shape)
    x = x.astype(np.float32)
    flat = x.ravel()
    flat[:3] = [0.0, -0.0, 1.0]
    return x


@pytest.mark.parametrize("shape,step,tensor", [((7,), 0, 0), ((3, 5, 33), 1, 7), ((2, 64, 48), 123457, 3),
                                               ((4097,), 2**31 + 5, 15)])
def test_bit_exact_against_numpy(shape, step, tensor):
    x = wide_values(shape, seed=step % 1000)
    got = jax.jit(lambda v: rounding.stochastic_round_bf16(v, rounding.tensor_seed(step, tensor)))(x)
    assert got.dtype == jnp.bfloat16 and got.shape == shape
    np.testing.assert_array_equal(jax_bits(got), np_stochastic_round(x, step, tensor))


def test_hash_against_numpy_and_spreads_its_bits():
    pos = np.arange(100_000, dtype=np.uint32)
    got = np.asarray(rounding.squirrel_noise5(jnp.asarray(pos), jnp.uint32(99)))
    np.testing.assert_array_equal(got, np_squirrel5(pos, 99).astype(np.uint32))
    low = got & 0xFFFF    # the thresholds: uniform on [0, 2**16), mean 32767.5, sd 18919 / sqrt(n)
    assert abs(low.mean() - 32767.5) < 5 * 18919 / np.sqrt(low.size)


def test_each_step_and_tensor_rounds_differently():
    x = np.full((4096,), 1.0 + 2.0 ** -9, np.float32)    # a quarter of a bf16 ulp above 1.0
    runs = [jax_bits(rounding.stochastic_round_bf16(jnp.asarray(x), rounding.tensor_seed(s, t)))
            for s, t in ((0, 0), (1, 0), (0, 1))]
    assert all((runs[i] != runs[j]).any() for i in range(3) for j in range(i + 1, 3))


@pytest.mark.parametrize("value", [1.0 + 2.0 ** -9, -0.02131, 3.0e-5, 1.0 - 2.0 ** -20])
def test_unbiased(value):
    """The mean of N roundings of one value is the value, within 5 standard deviations of a mean of
    N Bernoulli(p) ulps, p the value's fraction of the ulp above its truncation."""
    N = 1 << 18
    x = np.float32(value)
    got = np.asarray(rounding.stochastic_round_bf16(jnp.full((N,), x), rounding.tensor_seed(7, 2)), np.float64)
    bits = int(np.array([x], np.float32).view(np.uint32)[0])
    as_float = lambda b: float(np.array([b], np.uint32).view(np.float32)[0])  # noqa: E731
    down, up = as_float(bits & 0xFFFF0000), as_float((bits & 0xFFFF0000) + 0x10000)
    p = (bits & 0xFFFF) / 65536
    assert set(np.unique(got)) <= {down, up}
    sigma = abs(up - down) * np.sqrt(p * (1 - p) / N)
    assert abs(got.mean() - float(x)) < 5 * sigma, (got.mean(), float(x), sigma)
    # rounding to nearest is biased here by up to half an ulp
    nearest = float(np.float32(x).astype(ml_dtypes.bfloat16))
    assert abs(nearest - float(x)) > 5 * sigma


def test_an_update_below_half_an_ulp_moves_the_weight_in_expectation():
    """AdamW steps of -1e-3 on weights of 1.0 (bf16 ulp 2**-7: half is 3.9e-3): rounding to nearest
    never moves them; stochastic rounding moves their mean by -1e-3 a step, within 5 sigma."""
    N, steps, delta = 1 << 16, 10, -1e-3
    params = {"w": jnp.ones((N,), jnp.bfloat16)}
    updates = {"w": jnp.full((N,), delta, jnp.float32)}
    apply = jax.jit(rounding.apply_updates, static_argnums=2)
    nearest, stochastic = params, params
    for step in range(steps):
        nearest = apply(nearest, updates, "nearest", step)
        stochastic = apply(stochastic, updates, "stochastic", step)
    assert (np.asarray(nearest["w"], np.float32) == 1.0).all()
    mean = np.asarray(stochastic["w"], np.float64).mean()
    # each step's rounding adds an independent error of sd <= ulp/2 per element (below 1.0 the ulp is 2**-8)
    sigma = 2.0 ** -8 / 2 * np.sqrt(steps / N)
    assert abs(mean - (1.0 + steps * delta)) < 5 * sigma, mean


def test_fp32_params_and_nearest_are_plain_adds():
    params = {k: jnp.asarray(v) for k, v in random_params(TEST_CONFIG).items()}
    rng = np.random.default_rng(3)
    updates = {k: jnp.asarray(rng.normal(0, 1e-3, v.shape).astype(np.float32)) for k, v in params.items()}
    out = rounding.apply_updates(params, updates, "stochastic", 5)
    for k in params:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(params[k]) + np.asarray(updates[k]))
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in params.items()}
    out = rounding.apply_updates(bf16, updates, "nearest", 5)
    for k in params:
        want = (np.asarray(bf16[k], np.float32) + np.asarray(updates[k])).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(jax_bits(out[k]), want.view(np.uint16))
    with pytest.raises(ValueError, match="param rounding"):
        rounding.apply_updates(bf16, updates, "up", 0)


def test_train_step_writes_bf16_params_by_the_numpy_rule():
    """The whole jitted step at -w 0: each bf16 param it writes is, bit for bit, the NumPy rounding of
    the fp32 value AdamW computed (recomputed here from the step's own moments; tensor i = the i-th
    sorted name). Rounding to nearest differs from it in 30% of the elements.

    The fp32 value is recomputed, not read: XLA's arithmetic (FMAs, its pow and division) may differ
    from NumPy's in the last bits of p and lr * update, and where the two nearly cancel that moves
    the value across the rounding threshold. So an element whose rounding changes within 8 ulps of
    p and of lr * update may be either rounding of that range (at most 1% of a tensor's elements);
    every other element must be exact."""
    params = {k: np.asarray(v, ml_dtypes.bfloat16) for k, v in random_params(TEST_CONFIG).items()}
    sc = train_step.StepConfig(model=TEST_CONFIG, dtype="bfloat16", weight_decay=0.1)
    state = train_step.init_train_state({k: jnp.asarray(v) for k, v in params.items()}, sc)   # donated
    rng = np.random.default_rng(0)
    x = rng.integers(0, TEST_CONFIG.V, (1, 2, 16)).astype(np.int32)
    step, lr = 9, np.float32(3e-3)
    new, _ = train_step.make_train_step(sc)(state, x, x, lr, step)
    t = np.float32(step + 1)
    c1, c2 = 1 - np.float32(0.9) ** t, 1 - np.float32(0.95) ** t
    for i, name in enumerate(sorted(params)):
        m, v = np.asarray(new.opt_state.mu[name]), np.asarray(new.opt_state.nu[name])
        p = params[name].astype(np.float32)
        upd = (m / c1) / (np.sqrt(v / c2) + np.float32(1e-8))
        if name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
            upd = upd + np.float32(0.1) * p
        fp32 = p - lr * upd
        err = 8 * (np.spacing(np.abs(p)) + np.spacing(np.abs(lr * upd))) * (fp32 != 0)   # exact zeros: wte's padding
        want, low, high = (np_stochastic_round(x, step, i) for x in (fp32, fp32 - err, fp32 + err))
        got = jax_bits(new.params[name])
        ambiguous = (low != want) | (high != want)
        assert np.count_nonzero(ambiguous) <= 0.01 * got.size, name
        np.testing.assert_array_equal(got[~ambiguous], want[~ambiguous], err_msg=name)
        assert np.all((got == want) | (got == low) | (got == high)), name
