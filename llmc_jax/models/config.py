"""GPT-2 model configuration and llm.c's model descriptors (`-e d12`, `gpt2:d12`, `gpt3:c768`)."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

GPT2_V = 50257   # GPT-2 BPE vocabulary
GPT2_VP = 50304  # padded to a multiple of 128, as llm.c


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes with llm.c's letters: L layers, NH heads, C channels, maxT positions, V vocab, Vp padded vocab."""

    L: int
    NH: int
    C: int
    maxT: int = 1024
    V: int = GPT2_V
    Vp: int = GPT2_VP

    def __post_init__(self) -> None:
        for name in ("L", "NH", "C", "maxT", "V", "Vp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.C % self.NH:
            raise ValueError(f"GPTConfig: C={self.C} is not divisible by NH={self.NH}")
        if self.Vp < self.V:
            raise ValueError(f"GPTConfig: padded vocab Vp={self.Vp} is smaller than V={self.V}")

    @property
    def HS(self) -> int:
        return self.C // self.NH

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The 16 llm.c tensors in llm.c's order; per-layer tensors stacked on a leading L axis."""
        L, C, Vp, maxT = self.L, self.C, self.Vp, self.maxT
        return {
            "wte": (Vp, C), "wpe": (maxT, C),
            "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
            "attprojw": (L, C, C), "attprojb": (L, C),
            "ln2w": (L, C), "ln2b": (L, C),
            "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
            "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
            "lnfw": (C,), "lnfb": (C,),
        }

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.param_shapes())

    def describe(self) -> str:
        return f"L={self.L} NH={self.NH} C={self.C} maxT={self.maxT} V={self.V} Vp={self.Vp}"

    def flops_per_token(self, T: int) -> int:
        """llm.c's MFU convention: 6N + 6*L*C*T (attention causal-halved, N with padding)."""
        return 6 * self.num_parameters + 6 * self.L * self.C * T


def count_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of values in tensors of these shapes (every model family's num_parameters)."""
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


PARAM_NAMES: tuple[str, ...] = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)

# llm.c's depth descriptors: dN -> (C, NH), L = N
_GPT2_DEPTHS = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25),
                60: (1920, 30), 72: (2880, 30), 84: (3456, 36)}
# llm.c's gpt3:cN descriptors: C -> (L, head size); maxT 2048
_GPT3_WIDTHS = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128),
                2560: (32, 80), 4096: (32, 128), 12288: (96, 128)}

# Small configs for tests and for the no-argument CPU run.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(L=2, NH=4, C=64, maxT=64, V=256, Vp=256),
    "small": GPTConfig(L=4, NH=4, C=128, maxT=64, V=256, Vp=256),     # the no-argument run's model
}


def is_descriptor(spec: str) -> bool:
    return spec in PRESETS or re.fullmatch(r"(gpt2:)?d\d+|gpt3:c\d+", spec) is not None


def from_descriptor(spec: str) -> GPTConfig:
    """Resolve `dN`, `gpt2:dN`, `gpt3:cN` or a preset name (`tiny`) to a GPTConfig."""
    if spec in PRESETS:
        return PRESETS[spec]
    m = re.fullmatch(r"(?:gpt2:)?d(\d+)", spec)
    if m:
        depth = int(m.group(1))
        if depth not in _GPT2_DEPTHS:
            raise ValueError(f"unknown GPT-2 depth descriptor {spec!r}; known: "
                             + ", ".join(f"d{d}" for d in _GPT2_DEPTHS))
        C, NH = _GPT2_DEPTHS[depth]
        return GPTConfig(L=depth, NH=NH, C=C)
    m = re.fullmatch(r"gpt3:c(\d+)", spec)
    if m:
        C = int(m.group(1))
        if C not in _GPT3_WIDTHS:
            raise ValueError(f"unknown GPT-3 descriptor {spec!r}; known: "
                             + ", ".join(f"gpt3:c{c}" for c in _GPT3_WIDTHS))
        L, hs = _GPT3_WIDTHS[C]
        return GPTConfig(L=L, NH=C // hs, C=C, maxT=2048)
    raise ValueError(f"not a model descriptor: {spec!r} (expected dN, gpt2:dN, gpt3:cN, or one of "
                     f"{', '.join(PRESETS)}; or give a path to an llm.c .bin file)")


def load_toml(path: str | Path) -> dict:
    """Read a TOML file; a `[model]` table becomes a GPTConfig or LlamaConfig (its `family`) under 'model'.

    Raises FileNotFoundError, or ValueError naming the file for a directory, bad UTF-8, a TOML
    syntax error or a bad [model] table (so a command can report any of them in one line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file; expected a TOML config file")
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    if "model" in data:
        data["model"] = _model_table(path, data["model"])
    return data


def _model_table(path: Path, table: object):
    """A [model] table as a model config: `family = "gpt2"` (the default; integer L, NH, C, maxT, V, Vp)
    or `family = "llama3"` (LlamaConfig's fields, each of its type), nothing else."""
    from llmc_jax.models.llama_config import LlamaConfig
    if not isinstance(table, dict):
        raise ValueError(f"{path}: model must be a table ([model] with L, NH, C, maxT, V, Vp)")
    table = dict(table)
    family = table.pop("family", "gpt2")
    classes = {"gpt2": GPTConfig, "llama3": LlamaConfig}
    if family not in classes:
        raise ValueError(f"{path}: [model] family = {family!r} must be one of {', '.join(map(repr, classes))}")
    cls = classes[family]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in table.items():
        want = types.get(key, "int")
        if "bool" in want:
            ok, words = isinstance(value, bool), "true or false"
        elif "float" in want:
            ok, words = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, words = isinstance(value, int) and not isinstance(value, bool), "an integer"
        if not ok:
            raise ValueError(f"{path}: [model] {key} = {value!r} must be {words}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad [model] table: {e}") from None
