"""Sampling: llm.c's xorshift RNG, the KV-cache decoder against full forwards, the CLI."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmc_jax import sample
from llmc_jax.evals import generate
from llmc_jax.formats import llmc_format
from llmc_jax.models import gpt2
from llmc_jax.nn.kernels import ModelOptions
from llmc_jax.models.config import GPTConfig
from conftest import TEST_CONFIG, random_params

BYTE_CONFIG = GPTConfig(L=2, NH=4, C=64, maxT=64, V=256, Vp=256)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_jax(params):
    return {k: jnp.asarray(v) for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def _forward(config, dtype=jnp.float32):
    return jax.jit(lambda p, x: gpt2.logits(p, x, config, ModelOptions(dtype=dtype)))


def _full_logits(params, config, idx, dtype=jnp.float32):
    return np.asarray(_forward(config, dtype)(params, jnp.asarray(idx)))


def generate_full_forward(params, config, num_tokens, eot, *, seed=1337, prompt=None, temperature=1.0,
                          top_k=None):
    """The reference: llm.c's way, a full forward over the window for every new token."""
    tokens = list(prompt) if prompt else [eot]
    window = min(config.maxT, max(num_tokens, len(tokens)))
    forward = _forward(config)
    rng = generate.XorShiftRNG(seed)
    while len(tokens) < num_tokens:
        ctx = tokens[-window:]
        buf = np.full((1, window), eot, np.int32)
        buf[0, :len(ctx)] = ctx
        row = np.asarray(forward(params, buf)[0, len(ctx) - 1, :config.V], np.float32)
        tokens.append(generate.sample_index(row, rng.f32(), temperature, top_k))
    return tokens


# ------------------------------------------------------------------------------ RNG and sampler

def _xorshift_by_hand(seed, n):
    """llm.c's random_u32 / random_f32 written out again with numpy's wrapping uint64."""
    s = np.uint64(seed)
    u32s, f32s = [], []
    with np.errstate(over="ignore"):
        for _ in range(n):
            s ^= s >> np.uint64(12)
            s ^= s << np.uint64(25)
            s ^= s >> np.uint64(27)
            u = int((s * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32))
            u32s.append(u)
            f32s.append(float(np.float32(u >> 8) / np.float32(16777216.0)))
    return u32s, f32s


def test_xorshift_matches_llmc_algorithm():
    u_ref, f_ref = _xorshift_by_hand(1337, 50)
    rng = generate.XorShiftRNG(1337)
    assert [rng.u32() for _ in range(50)] == u_ref
    rng = generate.XorShiftRNG(1337)
    assert [rng.f32() for _ in range(50)] == f_ref
    assert all(0.0 <= f < 1.0 for f in f_ref)
    # the first draw from 1337, by hand: 1337 >> 12 = 0, so s = 1337; 1337 << 25 = 44,862,275,584,
    # s = 44,862,275,584 | 1337 = 44,862,276,921; s >> 27 = 334 and 1337 ^ 334 = 1143 in the low bits,
    # s = 44,862,276,727; out = (s * 0x2545F4914F6CDD1D mod 2^64) >> 32 = 989,205,090
    rng = generate.XorShiftRNG(1337)
    assert rng.u32() == 989205090 and rng.state == 44862276727
    assert generate.XorShiftRNG(1337).f32() == (989205090 >> 8) / 16777216 == 0.23031723499298096


def test_sample_index_is_llmc_inverse_cdf():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    p = np.exp(logits.astype(np.float64))
    cdf = np.cumsum(p) / p.sum()
    for coin in (0.0, 0.1, 0.5, 0.9, 0.999999):
        # llm.c: the first i with coin < cdf[i]
        assert generate.sample_index(logits, coin) == int(np.argmax(coin < cdf))
        assert generate.sample_index(logits, coin, 1.0, None) == generate.sample_index(logits, coin)


def test_sample_index_top_k_and_temperature():
    logits = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    picks = {generate.sample_index(logits, c, top_k=2) for c in np.linspace(0, 0.999, 200)}
    assert picks == {1, 3}
    assert generate.sample_index(logits, 0.7, top_k=1) == 1
    assert generate.sample_index(logits, 0.3, temperature=0.0) == 1
    # low temperature concentrates on the argmax; high temperature flattens toward uniform
    assert {generate.sample_index(logits, c, temperature=1e-3) for c in np.linspace(0, 0.999, 50)} == {1}
    hot = [generate.sample_index(logits, c, temperature=1e3) for c in np.linspace(0, 0.999, 100)]
    assert set(hot) == {0, 1, 2, 3, 4}
    # temperature divides the logits before the softmax
    z = logits / 0.5
    cdf = np.cumsum(np.exp(z - z.max()))
    cdf /= cdf[-1]
    for coin in (0.05, 0.5, 0.95):
        assert generate.sample_index(logits, coin, temperature=0.5) == int(np.argmax(coin < cdf))


# ------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_logits_equal_model_logits(prompt_len):
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg, seed=3))
    T = 40
    idx = np.random.default_rng(1).integers(0, cfg.V, size=(2, T)).astype(np.int32)
    ref = _full_logits(params, cfg, idx)
    logits, cache = generate.prefill(params, cfg, idx[:, :prompt_len], cache_len=T)
    assert cache.k.shape == cache.v.shape == (cfg.L, 2, T, cfg.NH, cfg.HS)
    assert logits.shape == (2, cfg.Vp)
    np.testing.assert_allclose(np.asarray(logits), ref[:, prompt_len - 1], atol=1e-5, rtol=0)
    for pos in range(prompt_len, T):
        logits, cache = generate.decode_step(params, cfg, cache, idx[:, pos], pos)
        np.testing.assert_allclose(np.asarray(logits), ref[:, pos], atol=1e-5, rtol=0)


def test_prefill_matches_model_at_every_length():
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg, seed=4))
    idx = np.random.default_rng(2).integers(0, cfg.V, size=(1, cfg.maxT)).astype(np.int32)
    ref = _full_logits(params, cfg, idx)
    for P in (1, 2, 17, cfg.maxT):
        logits, _ = generate.prefill(params, cfg, idx[0, :P])      # cache_len defaults to maxT
        np.testing.assert_allclose(np.asarray(logits)[0], ref[0, P - 1], atol=1e-5, rtol=0)


def test_decode_step_compiles_once():
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg, seed=5))
    _, cache = generate.prefill(params, cfg, [1, 2, 3], cache_len=16)
    generate._decode_jit.clear_cache()
    for pos in range(3, 10):
        _, cache = generate.decode_step(params, cfg, cache, [pos], pos)
    assert generate._decode_jit._cache_size() == 1


def test_cached_logits_bf16_close_to_model():
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg, seed=6))
    idx = np.random.default_rng(3).integers(0, cfg.V, size=(1, 24)).astype(np.int32)
    ref = _full_logits(params, cfg, idx, dtype=jnp.bfloat16).astype(np.float32)
    logits, cache = generate.prefill(params, cfg, idx[:, :4], cache_len=24, dtype=jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
    for pos in range(4, 24):
        logits, cache = generate.decode_step(params, cfg, cache, idx[:, pos], pos)
        np.testing.assert_allclose(np.asarray(logits).astype(np.float32), ref[:, pos], atol=2e-2, rtol=0)


def test_bad_positions_and_lengths_raise():
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg))
    with pytest.raises(ValueError, match="cache_len"):
        generate.prefill(params, cfg, list(range(10)), cache_len=5)
    with pytest.raises(ValueError, match="maxT"):
        generate.prefill(params, cfg, [1], cache_len=cfg.maxT + 1)
    _, cache = generate.prefill(params, cfg, [1], cache_len=8)
    with pytest.raises(ValueError, match="outside the cache"):
        generate.decode_step(params, cfg, cache, [1], 8)


# ------------------------------------------------------------------------------ generate

@pytest.mark.parametrize("prompt,num_tokens,temperature,top_k", [
    (None, 32, 1.0, None),                 # llm.c's trainer sampling: from EOT, T=1, no top-k
    ([5, 17, 99, 3], 32, 1.0, None),
    (None, 32, 0.7, None),
    ([250 - 1, 0, 1], 32, 1.0, 10),
    ([42], 32, 1.5, 40),
])
def test_generate_equals_full_forward_sampling(prompt, num_tokens, temperature, top_k):
    cfg = TEST_CONFIG
    params = _as_jax(random_params(cfg, seed=7))
    eot = cfg.V - 1
    ref = generate_full_forward(params, cfg, num_tokens, eot, prompt=prompt, temperature=temperature,
                                top_k=top_k)
    got = generate.generate(params, cfg, num_tokens, eot, prompt=prompt, temperature=temperature, top_k=top_k)
    assert got == ref
    assert len(got) == num_tokens and got[:len(prompt or [eot])] == (prompt or [eot])
    assert all(0 <= t < cfg.V for t in got)


def test_generate_slides_past_maxT():
    cfg = GPTConfig(L=1, NH=2, C=32, maxT=16, V=64, Vp=64)
    params = _as_jax(random_params(cfg, seed=8))
    for prompt in (None, list(range(1, 21))):          # the second starts longer than maxT
        ref = generate_full_forward(params, cfg, 40, 0, prompt=prompt)
        assert generate.generate(params, cfg, 40, 0, prompt=prompt) == ref


def test_generate_seed_and_defaults():
    cfg = TEST_CONFIG
    params = random_params(cfg, seed=9)                     # numpy params are accepted too
    a = generate.generate(params, cfg, 20, 0)
    assert a == generate.generate(params, cfg, 20, 0, seed=1337, temperature=1.0, top_k=None)
    assert a != generate.generate(params, cfg, 20, 0, seed=1)
    assert generate.generate(params, cfg, 3, 0, prompt=[1, 2, 3, 4]) == [1, 2, 3, 4]
    assert len(set(generate.generate(params, cfg, 20, 0, temperature=0.0)[1:])) >= 1


# ------------------------------------------------------------------------------ CLI

@pytest.fixture
def byte_model(tmp_path):
    params = random_params(BYTE_CONFIG, seed=11)
    path = tmp_path / "tiny.bin"
    llmc_format.write_model(path, BYTE_CONFIG, params)
    return path, params


def test_cli_end_to_end(byte_model, capsys):
    path, params = byte_model
    assert sample.main(["-e", str(path), "--prompt", "Hello", "-g", "12", "--seed", "5",
                        "--temperature", "0.8", "--top-k", "20"]) == 0
    out = capsys.readouterr().out
    prompt = [0] + list(b"Hello")
    toks = generate_full_forward(_as_jax(params), BYTE_CONFIG, len(prompt) + 12, 0, seed=5, prompt=prompt,
                                 temperature=0.8, top_k=20)
    from llmc_jax.formats.corpus import ByteTokenizer
    assert out == ByteTokenizer().decode(toks[len(prompt):]) + "\n"


def test_cli_subprocess(byte_model):
    path, _ = byte_model
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "llmc_jax.sample", "-e", str(path), "-g", "8", "--tokenizer", "byte"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "8 tokens in" in r.stderr
    assert len(r.stdout) > 0


def test_cli_rejects_out_of_vocab_prompt(tmp_path, capsys):
    cfg = GPTConfig(L=1, NH=2, C=32, maxT=16, V=100, Vp=128)
    path = tmp_path / "v100.bin"
    llmc_format.write_model(path, cfg, random_params(cfg))
    with pytest.raises(SystemExit, match="outside the model's vocabulary"):
        sample.main(["-e", str(path), "--tokenizer", "byte", "--prompt", "z~", "-g", "2"])
