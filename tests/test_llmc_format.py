"""llm.c binary formats: round trips, exact byte layout, and a clear error for every bad input."""
from __future__ import annotations

import os
import struct

import ml_dtypes
import numpy as np
import pytest

from llmc_jax.formats import llmc_format as lf
from llmc_jax.models.config import PARAM_NAMES, GPTConfig
from llmc_jax.formats.llmc_format import LLMCFormatError

CFG = GPTConfig(L=2, NH=4, C=64, maxT=64, V=250, Vp=256)
N = CFG.num_parameters


def rand_params(seed: int = 0, cfg: GPTConfig = CFG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cfg.param_shapes().items()}


def raw_file(path, ints, body: bytes = b"") -> str:
    """An llm.c-style file written by hand: 256 int32 header (given slots, rest zero) + body."""
    ints = list(ints) + [0] * (256 - len(ints))
    path.write_bytes(struct.pack("<256i", *ints) + body)
    return str(path)


def model_header(version=3, cfg=CFG):
    return [20240326, version, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.C, cfg.Vp]


# ---------------------------------------------------------------- model .bin

def test_param_count_formula():
    L, C = CFG.L, CFG.C
    assert N == CFG.Vp * C + CFG.maxT * C + L * (12 * C * C + 13 * C) + 2 * C


def test_model_roundtrip_fp32(tmp_path):
    params = rand_params()
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, params)
    assert os.path.getsize(path) == 1024 + 4 * N
    assert lf.read_model_header(path) == (CFG, 3)
    cfg, got = lf.read_model(path)
    assert cfg == CFG and list(got) == list(PARAM_NAMES)
    for k in PARAM_NAMES:
        assert got[k].dtype == np.float32 and got[k].shape == params[k].shape
        np.testing.assert_array_equal(got[k], params[k])
    assert not os.path.exists(path + ".tmp")


def test_model_roundtrip_bf16_exact(tmp_path):
    params = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in rand_params(1).items()}
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, params, version=5)
    assert os.path.getsize(path) == 1024 + 2 * N
    assert lf.read_model_header(path) == (CFG, 5)
    _, got = lf.read_model(path)
    for k in PARAM_NAMES:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], params[k])


def test_bf16_rounding_matches_ml_dtypes(tmp_path):
    f32 = np.float32
    edge = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1.0 + 2**-9,
                     np.finfo(f32).max, -np.finfo(f32).max, np.inf, -np.inf, 0.0, -0.0,
                     1e-40, -3e-39, np.finfo(f32).tiny, 3.3895314e38], dtype=f32)
    rng = np.random.default_rng(2)
    x = np.concatenate([edge, rng.standard_normal(5000).astype(f32) * f32(10.0) ** rng.integers(-30, 30, 5000)])
    want = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(lf.to_bf16_bits(x), want.view(np.uint16))
    nan_bits = lf.to_bf16_bits(np.array([np.nan, -np.nan], dtype=f32))
    assert np.isnan(nan_bits.view(ml_dtypes.bfloat16).astype(f32)).all()
    # and through the file: a non-representable value comes back as ml_dtypes rounds it
    params = rand_params(3)
    params["wte"].reshape(-1)[: x.size] = x
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, params, version=5)
    _, got = lf.read_model(path)
    np.testing.assert_array_equal(got["wte"].reshape(-1)[: x.size], want.astype(f32))
    assert got["wte"].reshape(-1)[0] == 1.0  # 1 + 2**-8 is a tie: rounds to even


def test_write_model_accepts_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    params = rand_params(4)
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, {k: jnp.asarray(v) for k, v in params.items()})
    _, got = lf.read_model(path)
    np.testing.assert_array_equal(got["fcw"], params["fcw"])


def _independent_body(fmt: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """Parameter bytes laid out by hand (shapes written out here, not taken from GPTConfig)."""
    L, C, Vp, maxT = 2, 64, 256, 64
    shapes = [("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
              ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
              ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
              ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]
    body, expect = b"", {}
    for k, (name, shape) in enumerate(shapes):
        n = int(np.prod(shape))
        vals = [k + (i % 61) / 4 for i in range(n)]  # exact in bf16 too (<= 8 significant bits)
        if fmt == "f":
            body += struct.pack(f"<{n}f", *vals)
        else:  # bf16 = the top 16 bits of the float32 pattern
            body += struct.pack(f"<{n}H", *(struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in vals))
        expect[name] = np.array(vals, dtype=np.float32).reshape(shape)  # C order = row-major
    return body, expect


@pytest.mark.parametrize("version,fmt", [(3, "f"), (5, "H")])
def test_layout_matches_llmc_bytes(tmp_path, version, fmt):
    body, expect = _independent_body(fmt)
    path = raw_file(tmp_path / "ref.bin", [20240326, version, 64, 250, 2, 4, 64, 256], body)
    cfg, got = lf.read_model(path)
    assert cfg == CFG
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(got[name], expect[name], err_msg=name)
    # spot-check row-major indexing of a stacked tensor: qkvw[l, r, c] = flat[l*3C*C + r*C + c]
    flat = np.concatenate([expect[k].reshape(-1) for k in PARAM_NAMES])
    off = sum(expect[k].size for k in PARAM_NAMES[:4])
    assert got["qkvw"][1, 5, 7] == flat[off + 1 * 192 * 64 + 5 * 64 + 7]
    # and our writer produces exactly these bytes
    mine = str(tmp_path / "mine.bin")
    lf.write_model(mine, CFG, got, version=version)
    assert open(mine, "rb").read() == open(path, "rb").read()


def test_d12_header_size(tmp_path):
    """The GPT-2 124M sizes from llm.c: 124,475,904 params, 497,904,640 bytes fp32 (sparse file)."""
    path = raw_file(tmp_path / "d12.bin", [20240326, 3, 1024, 50257, 12, 12, 768, 50304])
    with open(path, "r+b") as f:
        f.truncate(497_904_640)
    cfg, version = lf.read_model_header(path)
    assert version == 3 and cfg.num_parameters == 124_475_904 and (cfg.L, cfg.NH, cfg.C) == (12, 12, 768)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, rand_params(5))
    before = open(path, "rb").read()

    def boom(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        lf.write_model(path, CFG, rand_params(6))
    assert open(path, "rb").read() == before and not os.path.exists(path + ".tmp")


# ---------------------------------------------------------------- debug state

@pytest.mark.parametrize("padded", [True, False])
def test_debug_state_roundtrip(tmp_path, padded):
    B, T = 3, 8
    rng = np.random.default_rng(7)
    x = rng.integers(0, CFG.V, (B, T))
    y = rng.integers(0, CFG.V, (B, T))
    logits = rng.standard_normal((B, T, CFG.Vp if padded else CFG.V)).astype(np.float32)
    grads = rand_params(8)
    path = str(tmp_path / "dbg.bin")
    lf.write_debug_state(path, CFG, x, y, logits, 2.5, grads)
    assert os.path.getsize(path) == 1024 + 4 * (2 * B * T + B * T * CFG.V + 1 + N)
    st = lf.read_debug_state(path, CFG)
    assert st.x.dtype == np.int32 and st.x.shape == (B, T)
    np.testing.assert_array_equal(st.x, x)
    np.testing.assert_array_equal(st.y, y)
    assert st.logits.shape == (B, T, CFG.V)
    np.testing.assert_array_equal(st.logits, logits[..., : CFG.V])
    assert st.loss == 2.5
    for k in PARAM_NAMES:
        np.testing.assert_array_equal(st.grads[k], grads[k])


def test_debug_state_layout_by_hand(tmp_path):
    B, T, V = 1, 2, CFG.V
    body = struct.pack("<2i", 5, 6) + struct.pack("<2i", 6, 7)
    body += struct.pack(f"<{B * T * V}f", *range(B * T * V)) + struct.pack("<f", 1.25)
    body += struct.pack(f"<{N}f", *([0.5] * N))
    path = raw_file(tmp_path / "dbg.bin", [20240327, 2, B, T], body)
    st = lf.read_debug_state(path, CFG)
    assert st.x.tolist() == [[5, 6]] and st.y.tolist() == [[6, 7]] and st.loss == 1.25
    assert st.logits[0, 1, 3] == V + 3 and (st.grads["wte"] == 0.5).all()


def test_debug_state_bad_inputs(tmp_path):
    path = str(tmp_path / "dbg.bin")
    x = np.zeros((2, 4), np.int32)
    with pytest.raises(LLMCFormatError, match="logits have shape"):
        lf.write_debug_state(path, CFG, x, x, np.zeros((2, 4, 100)), 0.0, rand_params())
    with pytest.raises(LLMCFormatError, match="lacks tensor 'lnfb'"):
        lf.write_debug_state(path, CFG, x, x, np.zeros((2, 4, 250)), 0.0,
                             {k: v for k, v in rand_params().items() if k != "lnfb"})
    old = raw_file(tmp_path / "old.bin", [20240327, 1, 2, 4])
    with pytest.raises(LLMCFormatError, match="unsupported version 1.*predates vocab padding"):
        lf.read_debug_state(old, CFG)
    short = raw_file(tmp_path / "short.bin", [20240327, 2, 2, 4], b"\0" * 100)
    with pytest.raises(LLMCFormatError, match="truncated"):
        lf.read_debug_state(short, CFG)
    with pytest.raises(LLMCFormatError, match="not found"):
        lf.read_debug_state(str(tmp_path / "nope.bin"), CFG)


# ---------------------------------------------------------------- data shards

def test_shard_roundtrip(tmp_path):
    tokens = np.random.default_rng(9).integers(0, 65536, 1001)
    tokens[:2] = [0, 65535]
    path = str(tmp_path / "s.bin")
    lf.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * tokens.size
    assert lf.read_shard_header(path) == tokens.size
    got = lf.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16 and not got.flags.writeable
    np.testing.assert_array_equal(got, tokens)
    with pytest.raises(ValueError):
        got[0] = 1
    lf.write_shard(path, [])
    assert lf.read_shard_header(path) == 0 and lf.read_shard(path, vocab_size=10).size == 0


def test_shard_layout_by_hand(tmp_path):
    path = raw_file(tmp_path / "s.bin", [20240520, 1, 3], struct.pack("<3H", 50256, 7, 65535))
    assert lf.read_shard(path).tolist() == [50256, 7, 65535]


def test_shard_token_outside_vocab(tmp_path):
    path = str(tmp_path / "s.bin")
    lf.write_shard(path, [1, 2, 150, 3, 200])
    assert lf.read_shard(path, vocab_size=201).tolist() == [1, 2, 150, 3, 200]
    with pytest.raises(LLMCFormatError, match=r"token id 150 at position 2 is outside the vocabulary"):
        lf.read_shard(path, vocab_size=100)


@pytest.mark.parametrize("tokens,msg", [([1, 70000], r"70000 at position 1 is outside \[0, 65535\]"),
                                         ([-1], r"-1 at position 0 is outside \[0, 65535\]"),
                                         ([1.5], "integer"), ([[1, 2]], "1-D")])
def test_write_shard_rejects(tmp_path, tokens, msg):
    path = str(tmp_path / "s.bin")
    with pytest.raises(LLMCFormatError, match=msg):
        lf.write_shard(path, tokens)
    assert not os.path.exists(path)


# ---------------------------------------------------------------- errors common to all formats

READERS = {"model": lf.read_model, "header": lf.read_model_header, "shard": lf.read_shard,
           "shard_header": lf.read_shard_header, "debug": lambda p: lf.read_debug_state(p, CFG)}


@pytest.mark.parametrize("reader", list(READERS))
def test_missing_and_short_files(tmp_path, reader):
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(LLMCFormatError, match=r"missing\.bin: file not found"):
        READERS[reader](missing)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 1000)
    with pytest.raises(LLMCFormatError, match=r"short\.bin: file is 1000 bytes, shorter than the 1024-byte"):
        READERS[reader](str(short))
    with pytest.raises(LLMCFormatError, match="not a regular file"):
        READERS[reader](str(tmp_path))


@pytest.mark.parametrize("magic,words", [(20240327, "debug state"), (20240328, "tokenizer"),
                                         (20240520, "GPT-2 token data shard"), (20240801, "LLaMA-3"),
                                         (20240522, "HellaSwag"), (20240527, "training state")])
def test_model_reader_names_other_file_types(tmp_path, magic, words):
    path = raw_file(tmp_path / "x.bin", [magic, 1, 10])
    with pytest.raises(LLMCFormatError, match=f"wrong magic {magic}: this is .*{words}.*not an llm.c model"):
        lf.read_model(path)


def test_shard_reader_given_a_model(tmp_path):
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, rand_params())
    with pytest.raises(LLMCFormatError, match=r"model checkpoint, not a GPT-2 token data shard.*-e"):
        lf.read_shard(path)
    junk = raw_file(tmp_path / "junk.bin", [12345, 1])
    with pytest.raises(LLMCFormatError, match="bad magic number 12345, expected 20240520"):
        lf.read_shard(junk)


def test_unsupported_versions(tmp_path):
    with pytest.raises(LLMCFormatError, match=r"unsupported version 4 .*supported: 3, 5"):
        lf.read_model(raw_file(tmp_path / "m.bin", model_header(version=4)))
    with pytest.raises(LLMCFormatError, match="unsupported version 7"):
        lf.read_shard(raw_file(tmp_path / "s.bin", [20240520, 7, 0]))
    with pytest.raises(LLMCFormatError, match="cannot write model version 4"):
        lf.write_model(str(tmp_path / "w.bin"), CFG, rand_params(), version=4)


@pytest.mark.parametrize("version", [3, 5])
def test_model_size_mismatch(tmp_path, version):
    path = str(tmp_path / "m.bin")
    lf.write_model(path, CFG, rand_params(), version=version)
    expected = 1024 + (4 if version == 3 else 2) * N
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-6])
    with pytest.raises(LLMCFormatError, match=f"implies {expected} bytes but the file has {expected - 6} "
                                              r"\(truncated by 6 bytes"):
        lf.read_model(path)
    open(path, "wb").write(data + b"xyz")
    with pytest.raises(LLMCFormatError, match=f"has {expected + 3} \\(3 trailing bytes"):
        lf.read_model_header(path)


def test_shard_size_mismatch(tmp_path):
    with pytest.raises(LLMCFormatError, match=r"implies 1030 bytes but the file has 1028 \(truncated by 2"):
        lf.read_shard(raw_file(tmp_path / "a.bin", [20240520, 1, 3], b"\0" * 4))
    with pytest.raises(LLMCFormatError, match="2 trailing bytes"):
        lf.read_shard_header(raw_file(tmp_path / "b.bin", [20240520, 1, 3], b"\0" * 8))
    with pytest.raises(LLMCFormatError, match="negative token count"):
        lf.read_shard_header(raw_file(tmp_path / "c.bin", [20240520, 1, -5]))


@pytest.mark.parametrize("slots", [{6: 0}, {6: 65}, {4: -1}, {7: 100}, {2: 0}])
def test_model_header_nonsense_sizes(tmp_path, slots):
    ints = model_header()
    for i, v in slots.items():
        ints[i] = v
    with pytest.raises(LLMCFormatError, match="nonsense sizes"):
        lf.read_model_header(raw_file(tmp_path / "m.bin", ints))


def test_write_model_checks_params(tmp_path):
    params = rand_params()
    with pytest.raises(LLMCFormatError, match="lacks tensor 'wpe'"):
        lf.write_model(str(tmp_path / "m.bin"), CFG, {k: v for k, v in params.items() if k != "wpe"})
    params["qkvw"] = params["qkvw"][:, :10]
    with pytest.raises(LLMCFormatError, match=r"'qkvw' has shape \(2, 10, 64\), expected \(2, 192, 64\)"):
        lf.write_model(str(tmp_path / "m.bin"), CFG, params)


def test_check_seq_len():
    lf.check_seq_len(CFG, 64, "m.bin")
    with pytest.raises(LLMCFormatError, match=r"m\.bin: sequence length T=65 exceeds the model's maxT=64"):
        lf.check_seq_len(CFG, 65, "m.bin")
    with pytest.raises(LLMCFormatError, match="must be positive"):
        lf.check_seq_len(CFG, 0, "m.bin")


def test_error_is_a_value_error():
    assert issubclass(LLMCFormatError, ValueError)
