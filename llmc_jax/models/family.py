"""The model-family interface, the registry from config type to family, and the one model loader.

A model family is a module with the functions below; GPT-2 (`llmc_jax.models.gpt2`) is the first. The
trainer, sampler, evals, checkpoints and sharding reach a model only through `family_of(config)`,
so a second family adds a module and a registry entry, not a branch in each of them.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Protocol

import numpy as np

from llmc_jax.errors import UsageError, user_files


class ModelConfig(Protocol):
    """What the shared code reads from a family's config (a frozen, hashable dataclass)."""

    L: int
    maxT: int
    V: int                 # the vocabulary; V..Vp-1 are padding rows
    Vp: int
    num_parameters: int

    def describe(self) -> str: ...

    def flops_per_token(self, T: int) -> int: ...


class ModelFamily(Protocol):
    """What every model family module provides (config: its frozen, hashable config dataclass)."""

    LAYER_PARAMS: tuple[str, ...]   # params stacked on a leading L axis: the layer scan's; never sharded on it
    KERNEL_OPS: tuple[str, ...]     # the Kernels choices (nn.kernels.OP_CHOICES) its forward uses

    def forward(self, params: dict, idx_BT: Any, config: Any, opts: Any = ..., *, cache: Any = None,
                pos: Any = 0, fp8_metas: Any = None) -> tuple[Any, Any]:
        """(final hidden states (B, T, C), cache): training, eval, prefill and decode alike; the
        layer matmuls opts.fp8 names run in FP8 with fp8_metas (stacked on L)."""

    def head(self, params: dict, h_BTC: Any) -> Any:
        """(B, T, Vp) logits of the hidden states."""

    def logits(self, params: dict, idx_BT: Any, config: Any, opts: Any = ...) -> Any: ...

    def loss(self, params: dict, idx_BT: Any, targets_BT: Any, config: Any, opts: Any = ...,
             fp8_metas: Any = None) -> Any:
        """Mean cross-entropy over the B*T positions, through the hand-derived backward."""

    def value_and_grad(self, config: Any, opts: Any = ...) -> Callable:
        """nn.kernels.loss_value_and_grad of loss: the metas differentiated too under opts.fp8."""

    def empty_cache(self, config: Any, B: int, S: int, dtype: Any) -> Any: ...

    def check_params(self, params: dict, config: Any) -> None: ...

    def init_params(self, config: Any) -> dict[str, np.ndarray]:
        """A from-scratch init (numpy, float32)."""

    def read_model(self, path: str) -> tuple[Any, dict[str, np.ndarray]]: ...

    def write_model(self, path: str, config: Any, params: dict, version: int) -> None: ...

    def read_debug_state(self, path: str, config: Any) -> Any:
        """llm.c's debug state (x, y, logits, loss, grads) for gradcheck."""

    def config_record(self, config: Any) -> dict:
        """The config as JSON, as the checkpoint manifest records and compares it."""


def family_of(config: Any) -> ModelFamily:
    """The family module of a model config."""
    from llmc_jax.models.config import GPTConfig
    from llmc_jax.models.llama_config import LlamaConfig
    if isinstance(config, GPTConfig):
        from llmc_jax.models import gpt2
        return gpt2
    if isinstance(config, LlamaConfig):
        from llmc_jax.models import llama
        return llama
    raise TypeError(f"no model family for a config of type {type(config).__name__}")


def reference_of(config: Any):
    """The family's autodiff oracle: the same model in plain jnp (value_and_grad, loss)."""
    import importlib
    family = family_of(config)
    return importlib.import_module(f"{family.__name__}_reference")     # models/gpt2_reference.py, ...


def is_descriptor(init: str) -> bool:
    from llmc_jax.models import config as cfgmod, llama_config
    return cfgmod.is_descriptor(init) or llama_config.is_descriptor(init)


def from_descriptor(init: str) -> Any:
    """The config a descriptor names: GPT-2's (d12, gpt2:d24, gpt3:c768, tiny) or Llama 3's (llama3.2:1B)."""
    from llmc_jax.models import config as cfgmod, llama_config
    return (llama_config if llama_config.is_descriptor(init) else cfgmod).from_descriptor(init)


def model_config(init: str) -> Any:
    """The config of `-e`: a descriptor's, or a model file's header (the weights are not read)."""
    with user_files():
        if is_descriptor(init):
            return from_descriptor(init)
        _check_exists(init)
        return read_model_header(init)[0]


def _file_format(path: str):
    """The reader module of a model file, by the magic number it starts with: llm.c's Llama 3 .bin
    (20240803) or anything else for GPT-2's reader, whose errors name what the file is; a directory
    is a Hugging Face checkpoint (config.json + safetensors) of either family."""
    from llmc_jax.formats import hf_checkpoint, llama3_format, llmc_format
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UsageError(f"-e {path}: not a regular file (a model .bin), and without config.json not a "
                             "Hugging Face checkpoint directory")
        return hf_checkpoint
    try:
        with open(path, "rb") as f:
            magic = int.from_bytes(f.read(4), "little")
    except OSError:
        magic = None                     # the GPT-2 reader reports the problem with the file
    return llama3_format if magic == llama3_format.MAGIC else llmc_format


def read_model_header(path: str) -> tuple[Any, int]:
    """(config, format version; 0 for a Hugging Face directory) of a model file, the weights unread."""
    return _file_format(path).read_model_header(path)


def read_model(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """(config, numpy params) of a model file."""
    return _file_format(path).read_model(path)


def _check_exists(init: str) -> None:
    from llmc_jax.models import config as cfgmod
    if not os.path.exists(init):
        raise UsageError(f"-e {init}: no such file, and not a model descriptor (dN, gpt2:dN, gpt3:cN, "
                         f"{', '.join(cfgmod.PRESETS)}, llama3.2:1B, llama3:tiny, ...) nor a Hugging Face checkpoint directory")


def load_model(init: str, model_table: Any = None, *, check_finite: bool = True) -> tuple[Any, dict[str, np.ndarray]]:
    """(config, numpy params) from a model table (a TOML [model]: a random init), a descriptor
    (d12, gpt3:c768, tiny: a random init) or a model file. Every command that takes -e loads here;
    a missing or bad file, an unknown descriptor or (check_finite) NaN/Inf weights are one UsageError
    line. The trainer reads without that check: its checkpoints refuse a non-finite state instead."""
    with user_files():
        if model_table is not None:
            return model_table, family_of(model_table).init_params(model_table)
        if is_descriptor(init):
            cfg = from_descriptor(init)
            return cfg, family_of(cfg).init_params(cfg)
        _check_exists(init)
        cfg, params = read_model(init)
    if check_finite:
        _check_finite(init, params)
    return cfg, params


def _check_finite(init: str, params: dict[str, np.ndarray]) -> None:
    """A model file with NaN/Inf weights (a diverged run's, or damaged) is refused, not used."""
    for name, w in params.items():
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        if bad:
            raise UsageError(f"-e {init}: tensor {name} holds {bad} NaN/Inf value(s); the file is damaged "
                             "or comes from a run that diverged")
