"""Llama 3 sizes against Meta's published counts and llm.c's train_llama3.py rules."""
import dataclasses

import pytest

from llmc_jax.models.llama_config import PRESETS, LlamaConfig, from_descriptor, is_descriptor


@pytest.mark.parametrize("name, hidden, qkv, untied, tied", [
    # hidden/qkv by train_llama3.py's rules; parameter counts as Meta publishes them (8.03B, 3.21B, 1.24B tied)
    ("llama3.1:8B", 14336, 6144, 8_030_261_248, None),
    ("llama3.2:3B", 8192, 5120, 3_606_752_256, 3_212_749_824),
    ("llama3.2:1B", 8192, 3072, 1_498_482_688, 1_235_814_400),
])
def test_presets_match_meta(name, hidden, qkv, untied, tied):
    cfg = from_descriptor(name)
    assert (cfg.hidden, cfg.qkv_channels, cfg.num_parameters) == (hidden, qkv, untied)
    assert cfg.V == cfg.Vp == 128256 and cfg.maxT == 8192 and cfg.NKV == 8 and cfg.n_rep == cfg.NH // 8
    if tied is not None:
        assert dataclasses.replace(cfg, tied=True).num_parameters == tied


def test_small_sizes_exercise_grouped_heads_and_rounding():
    tiny = from_descriptor("llama3:tiny")
    # 2/3 of 4*64 = 170, x1.3 = 221, rounded up to a multiple of 32 = 224
    assert (tiny.n_rep, tiny.hidden, tiny.HS) == (2, 224, 16)
    assert tiny.param_shapes()["fcw"] == (2, 448, 64) and tiny.param_shapes()["qkvw"] == (2, 128, 64)
    assert "lm_head" not in dataclasses.replace(tiny, tied=True).param_shapes()


def test_descriptors_and_bad_sizes():
    assert all(is_descriptor(n) for n in PRESETS) and not is_descriptor("d12")
    with pytest.raises(ValueError, match="unknown Llama 3 descriptor"):
        from_descriptor("llama3:huge")
    with pytest.raises(ValueError, match="multiple of NKV"):
        LlamaConfig(L=1, NH=4, NKV=3, C=64)
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(L=1, NH=4, NKV=4, C=36)
