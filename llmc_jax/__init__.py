"""llmc-jax: llm.c's trainer in JAX. The names below are the library's public surface; they load on
first use, so `import llmc_jax` (and every numpy-only module under it) does not import JAX.

    from llmc_jax import load_model, family_of, ModelOptions, generate
    config, params = load_model("d12")                  # a descriptor, an llm.c .bin, ...
    logits = family_of(config).logits(params, idx_BT, config, ModelOptions())
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "GPTConfig": "llmc_jax.models.config",
    "load_model": "llmc_jax.models.family",
    "family_of": "llmc_jax.models.family",
    "Kernels": "llmc_jax.nn.kernels",
    "ModelOptions": "llmc_jax.nn.kernels",
    "KVCache": "llmc_jax.nn.kv_cache",
    "generate": "llmc_jax.evals.generate",
    "DataLoader": "llmc_jax.formats.data",
    "StepConfig": "llmc_jax.training.train_step",
    "init_train_state": "llmc_jax.training.train_step",
    "make_train_step": "llmc_jax.training.train_step",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'llmc_jax' has no attribute {name!r}")
