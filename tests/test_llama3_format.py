"""llm.c's Llama 3 files (llama3 branch): model .bin and debug state round trips, the exact byte layout
(built here by hand with struct/numpy), a clear error for each bad input, and uint32 token shards."""
from __future__ import annotations

import dataclasses
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from llmc_jax.formats import llama3_format as l3
from llmc_jax.formats import llmc_format as lf
from llmc_jax.formats.data import DataLoader
from llmc_jax.formats.llmc_format import LLMCFormatError
from llmc_jax.models.llama_config import PRESETS, LlamaConfig

CFG = LlamaConfig(L=2, NH=4, NKV=2, C=32, maxT=16, V=300, multiple_of=16, ffn_dim_multiplier=1.3,
                  norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=False, major=3, minor=2)
LLAMA_V = 128256


def rand_params(cfg: LlamaConfig = CFG, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cfg.param_shapes().items()}


def bias_sizes(cfg: LlamaConfig) -> dict[str, int]:
    """The zero slots llm.c writes, by hand: ln1b, qkvb, attprojb, ln2b (L, C or qkv), fcb (L, 2H), fcprojb, lnfb."""
    L, C = cfg.L, cfg.C
    return {"ln1b": L * C, "qkvb": L * cfg.qkv_channels, "attprojb": L * C, "ln2b": L * C,
            "fcb": L * 2 * cfg.hidden, "fcprojb": L * C, "lnfb": C}


def expected_body(cfg: LlamaConfig, p: dict[str, np.ndarray]) -> np.ndarray:
    """The 16 slots in llm.c's order, written out by hand (slot 1 = lm_head, zeros for every bias)."""
    z = {k: np.zeros(n, np.float32) for k, n in bias_sizes(cfg).items()}
    lm_head = p["wte"] if cfg.tied else p["lm_head"]
    order = [p["wte"], lm_head, p["ln1w"], z["ln1b"], p["qkvw"], z["qkvb"], p["attprojw"], z["attprojb"],
             p["ln2w"], z["ln2b"], p["fcw"], z["fcb"], p["fcprojw"], z["fcprojb"], p["lnfw"], z["lnfb"]]
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in order])


def int_header(cfg: LlamaConfig, version: int = 3) -> bytes:
    ints = [20240803, version, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.NKV, cfg.C, cfg.multiple_of,
            int(cfg.use_scaled_rope), cfg.major, cfg.minor]
    return struct.pack("<256i", *ints, *[0] * 244)


def float_header(mult: float, eps: float, theta: float) -> bytes:
    return struct.pack("<256f", mult, eps, theta, *[0.0] * 253)


NFILE = CFG.num_parameters + sum(bias_sizes(CFG).values())


# ---------------------------------------------------------------- model .bin

def test_sizes():
    # 2/3 of 4*32 = 85, x1.3 = 110 (truncated), rounded up to a multiple of 16 = 112; (4 + 2*2) heads of 8
    assert CFG.hidden == 112 and CFG.qkv_channels == 64
    assert l3.file_num_parameters(CFG) == NFILE


def test_model_roundtrip_fp32_bit_exact_and_layout(tmp_path):
    p = rand_params()
    path = str(tmp_path / "m.bin")
    l3.write_model(path, CFG, p)
    data = open(path, "rb").read()
    assert len(data) == 2048 + 4 * NFILE
    assert data[:1024] == int_header(CFG, 3)
    assert data[1024:2048] == float_header(1.3, 1e-5, 10000.0)
    assert data[2048:] == expected_body(CFG, p).astype("<f4").tobytes()
    cfg, got = l3.read_model(path)
    assert cfg == CFG and not cfg.tied
    assert set(got) == set(CFG.param_shapes())
    for k, v in p.items():
        assert got[k].dtype == np.float32 and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k].view(np.uint32), v.view(np.uint32))
    assert l3.read_model_header(path) == (CFG, 3)


def test_model_roundtrip_bf16_is_rne(tmp_path):
    p = rand_params(seed=1)
    p["wte"][0, :4] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.0]   # ties: round to even
    path = str(tmp_path / "m.bin")
    l3.write_model(path, CFG, p, version=5)
    data = open(path, "rb").read()
    assert len(data) == 2048 + 2 * NFILE and data[:1024] == int_header(CFG, 5)
    want = expected_body(CFG, p).astype(ml_dtypes.bfloat16)
    assert data[2048:] == want.view("<u2").tobytes()
    cfg, got = l3.read_model(path)
    assert cfg == CFG
    for k, v in p.items():
        np.testing.assert_array_equal(got[k], v.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(got["wte"][0, :4], [1.0, 1 + 4 * 2 ** -8, -1.0, 3.0])


def test_tied_config_writes_wte_in_slot_1(tmp_path):
    tied = dataclasses.replace(CFG, tied=True)
    p = rand_params(tied)
    assert "lm_head" not in p
    path = str(tmp_path / "m.bin")
    l3.write_model(path, tied, p)
    assert open(path, "rb").read()[2048:] == expected_body(tied, p).tobytes()
    cfg, got = l3.read_model(path)
    assert cfg == CFG and not cfg.tied      # the file always holds lm_head: it reads back untied
    np.testing.assert_array_equal(got["lm_head"], p["wte"])


def test_header_floats_read_as_their_decimal(tmp_path):
    # 1.3 as float32 is 1.2999999523; with that value int(1.3f * 10) = 12, but train_llama3.py (float64 1.3)
    # gets 13: the reader must recover 1.3, or this valid file would fail its size check
    edge = LlamaConfig(L=1, NH=2, NKV=1, C=4, maxT=8, V=16, multiple_of=1, ffn_dim_multiplier=1.3)
    assert edge.hidden == 13 and dataclasses.replace(edge, ffn_dim_multiplier=float(np.float32(1.3))).hidden == 12
    path = str(tmp_path / "edge.bin")
    l3.write_model(path, edge, rand_params(edge))
    assert l3.read_model(path)[0] == edge
    # no multiplier: written as 1.0 (same hidden size), read back as 1.0
    plain = dataclasses.replace(CFG, ffn_dim_multiplier=None)
    l3.write_model(path, plain, rand_params(plain))
    assert open(path, "rb").read()[1024:1036] == struct.pack("<3f", 1.0, 1e-5, 10000.0)
    cfg = l3.read_model_header(path)[0]
    assert cfg.ffn_dim_multiplier == 1.0 and cfg.hidden == plain.hidden


@pytest.mark.parametrize("name,hidden", [("llama3.1:8B", 14336), ("llama3.2:1B", 8192), ("llama3.2:3B", 8192)])
def test_presets_header_roundtrip(tmp_path, name, hidden):
    """The real sizes through the header (a sparse file of the right length; no weights written)."""
    cfg = PRESETS[name]
    path = tmp_path / "m.bin"
    mult = cfg.ffn_dim_multiplier
    path.write_bytes(int_header(cfg, 5) + float_header(mult, 1e-5, 500000.0))
    os.truncate(path, 2048 + 2 * l3.file_num_parameters(cfg))
    got, version = l3.read_model_header(str(path))
    assert version == 5 and got == cfg and got.hidden == hidden
    assert got.ffn_dim_multiplier == mult and got.norm_eps == 1e-5 and got.rope_theta == 500000.0
    assert dataclasses.replace(cfg, ffn_dim_multiplier=float(np.float32(mult))).hidden == hidden


def test_nonzero_bias_slot_refused(tmp_path):
    path = str(tmp_path / "m.bin")
    l3.write_model(path, CFG, rand_params())
    C, V, L, Q = CFG.C, CFG.V, CFG.L, CFG.qkv_channels
    qkvb = 2 * V * C + L * C + L * C + L * Q * C          # wte, lm_head, ln1w, ln1b, qkvw
    with open(path, "r+b") as f:
        f.seek(2048 + 4 * (qkvb + 7))
        f.write(struct.pack("<f", 0.25))
    with pytest.raises(LLMCFormatError, match=r"m\.bin: model bias slot 5 \(qkvb, shape \(2, 64\)\) holds nonzero "
                                              r"values \(first 0\.25 at flat index 7\); Llama 3 has no biases"):
        l3.read_model(path)
    l3.read_model_header(path)     # the header alone does not read the tensors


@pytest.mark.parametrize("version", [3, 5])
def test_truncated_and_oversized(tmp_path, version):
    path = str(tmp_path / "m.bin")
    l3.write_model(path, CFG, rand_params(), version=version)
    expected = 2048 + (4 if version == 3 else 2) * NFILE
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-6])
    with pytest.raises(LLMCFormatError, match=f"implies {expected} bytes but the file has {expected - 6} "
                                              r"\(truncated by 6 bytes"):
        l3.read_model(path)
    open(path, "wb").write(data + b"xyz")
    with pytest.raises(LLMCFormatError, match=f"has {expected + 3} \\(3 trailing bytes"):
        l3.read_model_header(path)
    open(path, "wb").write(data[:1500])
    with pytest.raises(LLMCFormatError, match="1500 bytes, shorter than the 2048-byte Llama 3 header"):
        l3.read_model_header(path)


def test_master_lossy_header_refused(tmp_path):
    """llm.c master's write_model: one int header, ffn_dim_multiplier 1.3 -> 1, norm_eps 1e-5 -> 0, then
    rope_theta, use_scaled_rope, max_gen_batch_size, major, minor; tensors with lm_head last (bf16)."""
    cfg = CFG
    ints = [20240803, 5, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.NKV, cfg.C, 1, cfg.multiple_of, 0, 500000, 1, 4, 3, 1]
    path = tmp_path / "llama3.1_8B_bf16.bin"
    path.write_bytes(struct.pack("<256i", *ints, *[0] * 240) + b"\0" * (2 * cfg.num_parameters))
    with pytest.raises(LLMCFormatError, match=r"llama3\.1_8B_bf16\.bin: this is llm\.c master's lossy Llama 3 header"
                                              r".*re-export it with the llama3 branch's train_llama3\.py"):
        l3.read_model(str(path))


def test_other_headers_refused(tmp_path):
    body = float_header(1.3, 1e-5, 1e4) + b"\0" * 64
    ints = list(struct.unpack("<256i", int_header(CFG)))
    # PR #803's header (slot 10 tied, 11/12 major/minor)
    pr803 = ints[:10] + [1, 3, 2] + ints[13:]
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("<256i", *pr803) + body)
    with pytest.raises(LLMCFormatError, match=r"int header slot 12 is 2, but the llama3 branch's .* zeros in slots "
                                              r"12\.\.255 \(PR #803"):
        l3.read_model_header(str(path))
    # a debug state given as the model, and a model given as the debug state
    state = str(tmp_path / "state.bin")
    write_state(state, steps=2)
    with pytest.raises(LLMCFormatError, match=r"looks like a Llama 3 debug state .* not a model"):
        l3.read_model(state)
    for version in (3, 5):
        model = str(tmp_path / f"m{version}.bin")
        l3.write_model(model, CFG, rand_params(), version=version)
        with pytest.raises(LLMCFormatError, match=r"slot 5 is 4, .* looks like a Llama 3 model \.bin .* not a debug"):
            l3.read_debug_state(model, CFG)
    # nonsense values
    for slots, floats, msg in [({6: 3}, (1.3, 1e-5, 1e4), r"nonsense sizes .*NKV=3.*multiple of NKV"),
                               ({9: 2}, (1.3, 1e-5, 1e4), r"nonsense sizes .*use_scaled_rope must be 0 or 1"),
                               ({}, (1.3, 0.0, 1e4), r"float header has nonsense values .*norm_eps=0\.0"),
                               ({}, (float("nan"), 1e-5, 1e4), r"ffn_dim_multiplier=nan")]:
        bad = list(ints)
        for k, v in slots.items():
            bad[k] = v
        path.write_bytes(struct.pack("<256i", *bad) + float_header(*floats))
        with pytest.raises(LLMCFormatError, match=msg):
            l3.read_model_header(str(path))
    path.write_bytes(struct.pack("<256i", *ints[:1], 4, *ints[2:]) + body)
    with pytest.raises(LLMCFormatError, match="unsupported version 4 of an llm.c Llama 3 model .*supported: 3, 5"):
        l3.read_model_header(str(path))
    with pytest.raises(LLMCFormatError, match=r"m\.bin: file not found; expected an llm\.c Llama 3 model"):
        l3.read_model(str(tmp_path / "nope" / "m.bin"))


def test_gpt2_reader_names_a_llama_file(tmp_path):
    path = str(tmp_path / "m.bin")
    l3.write_model(path, CFG, rand_params())
    with pytest.raises(LLMCFormatError, match=r"wrong magic 20240803: this is an llm\.c Llama 3 model checkpoint"):
        lf.read_model(path)
    lf.write_shard(str(tmp_path / "s.bin"), [1, 2])
    with pytest.raises(LLMCFormatError, match="wrong magic 20240520: this is a GPT-2 token data shard"):
        l3.read_model(str(tmp_path / "s.bin"))


def test_write_model_checks(tmp_path):
    p = rand_params()
    with pytest.raises(LLMCFormatError, match="lacks tensor 'lm_head'"):
        l3.write_model(str(tmp_path / "m.bin"), CFG, {k: v for k, v in p.items() if k != "lm_head"})
    p["fcw"] = p["fcw"][:, :10]
    with pytest.raises(LLMCFormatError, match=r"'fcw' has shape \(2, 10, 32\), expected \(2, 224, 32\)"):
        l3.write_model(str(tmp_path / "m.bin"), CFG, p)
    with pytest.raises(LLMCFormatError, match="cannot write model version 4"):
        l3.write_model(str(tmp_path / "m.bin"), CFG, rand_params(), version=4)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- debug state

B, T = 2, 5


def state_parts(steps: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.V, (B, T))
    y = rng.integers(0, CFG.V, (B, T))
    logits = rng.standard_normal((B, T, CFG.V)).astype(np.float32)
    grads = rand_params(seed=seed + 1)
    losses = rng.random(steps).astype(np.float32) + 5
    norms = rng.random(steps).astype(np.float32)
    return x, y, logits, 5.75, grads, losses, norms


def write_state(path, steps: int) -> tuple:
    parts = state_parts(steps)
    l3.write_debug_state(path, CFG, *parts)
    return parts


@pytest.mark.parametrize("steps", [0, 3])
def test_debug_state_roundtrip_with_history(tmp_path, steps):
    path = str(tmp_path / "state.bin")
    x, y, logits, loss, grads, losses, norms = write_state(path, steps)
    data = open(path, "rb").read()
    assert data[:1024] == struct.pack("<256i", 20240803, 3, B, T, steps, *[0] * 251)
    want = b"".join([x.astype("<i4").tobytes(), y.astype("<i4").tobytes(), logits.tobytes(),
                     struct.pack("<f", loss), expected_body(CFG, grads).tobytes(),
                     losses.tobytes(), norms.tobytes()])
    assert data[1024:] == want
    st = l3.read_debug_state(path, CFG)
    assert st.x.dtype == st.y.dtype == np.int32 and st.x.shape == st.y.shape == (B, T)
    np.testing.assert_array_equal(st.x, x)
    np.testing.assert_array_equal(st.y, y)
    assert st.logits.dtype == np.float32 and st.logits.shape == (B, T, CFG.V)
    np.testing.assert_array_equal(st.logits, logits)
    assert st.loss == 5.75
    assert set(st.grads) == set(CFG.param_shapes())
    for k, g in grads.items():
        np.testing.assert_array_equal(st.grads[k], g)
    assert st.losses.shape == st.grad_norms.shape == (steps,)
    np.testing.assert_array_equal(st.losses, losses)
    np.testing.assert_array_equal(st.grad_norms, norms)
    # a tied config gives the same layout (the file always holds the lm_head gradient)
    np.testing.assert_array_equal(l3.read_debug_state(path, dataclasses.replace(CFG, tied=True)).grads["lm_head"],
                                  grads["lm_head"])


def test_debug_state_errors(tmp_path):
    path = str(tmp_path / "state.bin")
    write_state(path, steps=2)
    data = open(path, "rb").read()
    BT, V = B * T, CFG.V
    # nonzero gradient in a bias slot (lnfb is the last slot before the history)
    at = 1024 + 4 * (2 * BT + BT * V + 1 + NFILE - 1)
    open(path, "wb").write(data[:at] + struct.pack("<f", -1.5) + data[at + 4:])
    with pytest.raises(LLMCFormatError, match=r"gradient bias slot 15 \(lnfb, shape \(32,\)\) holds nonzero"):
        l3.read_debug_state(path, CFG)
    # another model (one layer fewer) and a truncated file
    open(path, "wb").write(data)
    with pytest.raises(LLMCFormatError, match="debug state of another model"):
        l3.read_debug_state(path, dataclasses.replace(CFG, L=1))
    open(path, "wb").write(data[:-4])
    with pytest.raises(LLMCFormatError, match=f"implies {len(data)} bytes .*truncated by 4"):
        l3.read_debug_state(path, CFG)
    # master's write_state: [magic, B, T], no version
    raw = tmp_path / "master.bin"
    raw.write_bytes(struct.pack("<256i", 20240803, 4, 64, *[0] * 253))
    with pytest.raises(LLMCFormatError, match=r"unsupported version 4 .*master's write_state had no version"):
        l3.read_debug_state(str(raw), CFG)
    raw.write_bytes(struct.pack("<256i", 20240803, 3, 0, 5, *[0] * 252))
    with pytest.raises(LLMCFormatError, match="nonsense sizes B=0, T=5"):
        l3.read_debug_state(str(raw), CFG)
    # a token outside the vocabulary
    x, y, logits, loss, grads, losses, norms = state_parts(1)
    y[1, 2] = CFG.V
    l3.write_debug_state(path, CFG, x, y, logits, loss, grads, losses, norms)
    with pytest.raises(LLMCFormatError, match=f"y holds token id {CFG.V} at position {T + 2}"):
        l3.read_debug_state(path, CFG)
    with pytest.raises(LLMCFormatError, match="losses and grad_norms must be 1-D of one length"):
        l3.write_debug_state(path, CFG, x, y, logits, loss, grads, losses, [])
    with pytest.raises(LLMCFormatError, match=r"logits have shape \(2, 5, 299\)"):
        l3.write_debug_state(path, CFG, x, y, logits[..., :-1], loss, grads)


# ---------------------------------------------------------------- uint32 token shards

def test_uint32_shard_roundtrip_and_layout(tmp_path):
    tokens = np.random.default_rng(5).integers(0, LLAMA_V, 1001)
    tokens[:4] = [128000, 128255, 0, 2**32 - 1]
    path = str(tmp_path / "s.bin")
    lf.write_shard(path, tokens, token_bytes=4)
    data = open(path, "rb").read()
    assert len(data) == 1024 + 4 * tokens.size
    assert data[:1024] == struct.pack("<256i", 20240801, 7, tokens.size, *[0] * 253)
    assert data[1024:] == tokens.astype("<u4").tobytes()
    assert lf.read_shard_header(path) == tokens.size and lf.shard_info(path) == (tokens.size, 4)
    got = lf.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint32 and not got.flags.writeable
    np.testing.assert_array_equal(got, tokens)
    with pytest.raises(LLMCFormatError, match=r"token id 4294967295 at position 3 is outside the vocabulary"):
        lf.read_shard(path, vocab_size=LLAMA_V)
    lf.write_shard(path, [], token_bytes=4)
    assert lf.shard_info(path) == (0, 4) and lf.read_shard(path, vocab_size=10).dtype == np.uint32
    # by hand, and GPT-2's shards unchanged
    raw = tmp_path / "h.bin"
    raw.write_bytes(struct.pack("<256i", 20240801, 7, 3, *[0] * 253) + struct.pack("<3I", 128000, 7, 128255))
    assert lf.read_shard(str(raw), vocab_size=LLAMA_V).tolist() == [128000, 7, 128255]
    lf.write_shard(path, [1, 65535])
    assert lf.shard_info(path) == (2, 2) and lf.read_shard(path).dtype == np.uint16


def test_uint32_shard_errors(tmp_path):
    raw = tmp_path / "h.bin"
    raw.write_bytes(struct.pack("<256i", 20240801, 7, 3, *[0] * 253) + b"\0" * 10)
    with pytest.raises(LLMCFormatError, match=r"3 uint32 tokens\) implies 1036 bytes but the file has 1034 "
                                              r"\(truncated by 2"):
        lf.read_shard(str(raw))
    raw.write_bytes(struct.pack("<256i", 20240801, 1, 0, *[0] * 253))
    with pytest.raises(LLMCFormatError, match=r"unsupported version 1 of a LLaMA-3 token data shard .*supported: 7"):
        lf.read_shard(str(raw))
    raw.write_bytes(struct.pack("<256i", 12345, 7, 0, *[0] * 253))
    with pytest.raises(LLMCFormatError, match=r"bad magic number 12345, expected 20240520 \(a GPT-2 token data "
                                              r"shard\) or 20240801 \(a LLaMA-3"):
        lf.read_shard_header(str(raw))
    path = str(tmp_path / "s.bin")
    with pytest.raises(LLMCFormatError, match=r"128255 at position 1 is outside \[0, 65535\] .*token_bytes=4"):
        lf.write_shard(path, [1, 128255])
    with pytest.raises(LLMCFormatError, match=r"4294967296 at position 0 is outside \[0, 4294967295\] .*uint32"):
        lf.write_shard(path, [2**32], token_bytes=4)
    with pytest.raises(LLMCFormatError, match=r"-1 at position 0 is outside \[0, 4294967295\]"):
        lf.write_shard(path, [-1], token_bytes=4)
    with pytest.raises(LLMCFormatError, match="token_bytes=3; use 2 .* or 4"):
        lf.write_shard(path, [1], token_bytes=3)
    assert not os.path.exists(path)


def make_shards(d, width: int, base: int, ntoks=(101, 70, 135)) -> list[str]:
    paths = []
    for s, n in enumerate(ntoks):
        p = os.path.join(d, f"shard_{s:04d}.bin")
        lf.write_shard(p, base + (s * 965 + np.arange(n)) % 2000, token_bytes=width)
        paths.append(p)
    return paths


def test_dataloader_over_uint32_shards(tmp_path):
    d32, d16 = tmp_path / "u32", tmp_path / "u16"
    d32.mkdir(), d16.mkdir()
    make_shards(d32, 4, base=LLAMA_V - 2000)         # ids 126256 .. 128255 (shard 2 holds both ends)
    make_shards(d16, 2, base=0)
    loader = DataLoader(str(d32 / "*.bin"), 2, 4, shuffle=True, vocab_size=LLAMA_V)
    same = DataLoader(str(d16 / "*.bin"), 2, 4, shuffle=True)     # the same positions, ids 2000 lower
    assert loader.token_bytes == 4 and same.token_bytes == 2
    seen = set()
    for _ in range(2 * loader.batches_per_epoch + 3):
        x, y = loader.next_batch()
        x16, y16 = same.next_batch()
        assert x.dtype == y.dtype == np.int32 and x.shape == (2, 4)
        np.testing.assert_array_equal(x, x16 + LLAMA_V - 2000)
        np.testing.assert_array_equal(y, y16 + LLAMA_V - 2000)
        seen.update(x.reshape(-1).tolist())
    assert max(seen) == LLAMA_V - 1 and min(seen) == LLAMA_V - 2000
    with pytest.raises(LLMCFormatError, match=r"shard_0002\.bin: token id 128186 at position 0 .*vocab size 128000"):
        DataLoader(str(d32 / "*.bin"), 2, 4, vocab_size=128000)
    with pytest.raises(ValueError, match=r"vocab_size=128256 must be in \[1, 65536\] for uint16 .*uint32 shards"):
        DataLoader(str(d16 / "*.bin"), 2, 4, vocab_size=LLAMA_V)


def test_dataloader_refuses_mixed_widths(tmp_path):
    make_shards(tmp_path, 2, base=0, ntoks=(50, 50))
    p = str(tmp_path / "shard_0009.bin")
    lf.write_shard(p, np.arange(50), token_bytes=4)
    with pytest.raises(LLMCFormatError) as e:
        DataLoader(str(tmp_path / "*.bin"), 2, 4)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(p)
    assert "holds uint32 (LLaMA-3 format, magic 20240801) tokens but the first shard" in msg
    assert "shard_0000.bin holds uint16 (GPT-2 format, magic 20240520)" in msg


def test_dataloader_unchecked_uint32_id_beyond_int32(tmp_path):
    p = str(tmp_path / "s.bin")
    toks = np.arange(20)
    toks[3] = 2**31
    lf.write_shard(p, toks, token_bytes=4)
    loader = DataLoader(p, 2, 4, shuffle=False)    # no vocab_size: ids not scanned up front
    with pytest.raises(LLMCFormatError, match=r"token id 2147483648 does not fit int32"):
        loader.next_batch()
