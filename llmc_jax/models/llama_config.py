"""Llama 3 sizes as llm.c's train_llama3.py (branch llama3) and Meta compute them, and the `-e` descriptors.

Letters as llm.c: L layers, NH query heads, NKV key/value heads (grouped-query attention, NH/NKV
query heads share one), C channels, HS = C/NH head size, maxT positions (the RoPE table), V vocab
(no padding: Vp = V). The MLP width is derived as Meta does: 2/3 of 4C, times ffn_dim_multiplier,
rounded up to a multiple of multiple_of (Python `int()` truncation at each step, as train_llama3.py).
"""
from __future__ import annotations

import dataclasses
import re

from llmc_jax.models.config import count_parameters
from llmc_jax.nn.rope import RopeScaling

LLAMA3_V = 128256     # 128000 BPE ranks + 256 special tokens


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """One Llama 3 model's sizes and constants (a jit static argument: frozen and hashable)."""

    L: int
    NH: int
    NKV: int
    C: int
    maxT: int = 8192
    V: int = LLAMA3_V
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    # Llama 3.1's RoPE scaling constants (used when use_scaled_rope): train_llama3.py's fixed values;
    # Hugging Face checkpoints of Llama 3.2 bring factor 32
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_maxT: int = 8192
    tied: bool = False           # llm.c's llama3 files always hold a separate lm_head
    major: int = 3               # Llama version, kept for the file header
    minor: int = 1

    def __post_init__(self) -> None:
        for name in ("L", "NH", "NKV", "C", "maxT", "V", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.C % self.NH:
            raise ValueError(f"LlamaConfig: C={self.C} is not divisible by NH={self.NH}")
        if self.NKV > self.NH or self.NH % self.NKV:
            raise ValueError(f"LlamaConfig: NH={self.NH} query heads must be a multiple of NKV={self.NKV} kv heads")
        if self.HS % 2:
            raise ValueError(f"LlamaConfig: head size C/NH={self.HS} must be even (RoPE rotates channel pairs)")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be > 0")
        sc = self.rope_scaling
        if not (sc.factor > 0 and 0 < sc.low_freq_factor < sc.high_freq_factor and sc.original_maxT > 0):
            raise ValueError(f"LlamaConfig: RoPE scaling {tuple(sc)} needs factor > 0, 0 < low_freq_factor < "
                             "high_freq_factor and rope_original_maxT > 0")

    @property
    def rope_scaling(self) -> RopeScaling:
        return RopeScaling(self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_maxT)

    @property
    def Vp(self) -> int:
        return self.V

    @property
    def HS(self) -> int:
        return self.C // self.NH

    @property
    def n_rep(self) -> int:
        return self.NH // self.NKV

    @property
    def qkv_channels(self) -> int:
        """Rows of the fused qkv weight: [q (NH heads) | k (NKV) | v (NKV)]."""
        return (self.NH + 2 * self.NKV) * self.HS

    @property
    def hidden(self) -> int:
        """The SwiGLU width (train_llama3.py's MLP.__init__)."""
        h = int(2 * (4 * self.C) / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The real tensors (no bias slots), per-layer ones stacked on a leading L axis; fcw holds
        [up | gate] rows as llm.c's file does."""
        L, C, V = self.L, self.C, self.V
        shapes = {"wte": (V, C), "lm_head": (V, C), "ln1w": (L, C), "qkvw": (L, self.qkv_channels, C),
                  "attprojw": (L, C, C), "ln2w": (L, C), "fcw": (L, 2 * self.hidden, C),
                  "fcprojw": (L, C, self.hidden), "lnfw": (C,)}
        if self.tied:
            del shapes["lm_head"]
        return shapes

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.param_shapes())

    def flops_per_token(self, T: int) -> int:
        """llm.c's MFU convention: 6N + 6*L*C*T (attention causal-halved)."""
        return 6 * self.num_parameters + 6 * self.L * self.C * T

    def describe(self) -> str:
        return (f"llama{self.major}.{self.minor} L={self.L} NH={self.NH} NKV={self.NKV} C={self.C} "
                f"maxT={self.maxT} V={self.V} hidden={self.hidden}")


# train_llama3.py's MODEL_DICT (block_size 8192, V 128256, NKV 8, multiple_of 1024, theta 500000)
PRESETS: dict[str, LlamaConfig] = {
    "llama3.1:8B": LlamaConfig(L=32, NH=32, NKV=8, C=4096, ffn_dim_multiplier=1.3, major=3, minor=1),
    "llama3.2:1B": LlamaConfig(L=16, NH=32, NKV=8, C=2048, ffn_dim_multiplier=1.4, major=3, minor=2),
    "llama3.2:3B": LlamaConfig(L=28, NH=24, NKV=8, C=3072, ffn_dim_multiplier=1.0, major=3, minor=2),
    # from-scratch sizes on byte data (the built-in corpus): grouped heads, a width that rounds up
    "llama3:tiny": LlamaConfig(L=2, NH=4, NKV=2, C=64, maxT=64, V=256, multiple_of=32, ffn_dim_multiplier=1.3),
    "llama3:small": LlamaConfig(L=4, NH=4, NKV=2, C=128, maxT=64, V=256, multiple_of=64, ffn_dim_multiplier=1.3),
    # GPT-2 d12's depth, width and heads (3 query heads per kv head) on GPT-2's padded vocabulary: the
    # size the CPU benchmarks compare the two families at
    "llama3:d12": LlamaConfig(L=12, NH=12, NKV=4, C=768, maxT=1024, V=50304, multiple_of=256, ffn_dim_multiplier=1.3),
}


def is_descriptor(spec: str) -> bool:
    return re.fullmatch(r"llama3(\.\d)?:\w+", spec) is not None


def from_descriptor(spec: str) -> LlamaConfig:
    if spec not in PRESETS:
        raise ValueError(f"unknown Llama 3 descriptor {spec!r}; known: {', '.join(PRESETS)}")
    return PRESETS[spec]
