"""llmc-jax: llm.c's trainer in JAX. The names below are the library's public surface; they load on
first use, so `import llmc_jax` (and every numpy-only module under it) does not import JAX.

    from llmc_jax import load_model, family_of, ModelOptions, generate
    config, params = load_model("d12")                  # a descriptor, an llm.c .bin, ...
    logits = family_of(config).logits(params, idx_BT, config, ModelOptions())
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any


def _configure_jax() -> None:
    """Before JAX starts (set only where the user has not):
    - a machine with jax's CUDA plugin but no NVIDIA driver (the plugin comes with the dev extra, to
      compile for GPUs that are not here) runs on the CPU without the plugin's traceback;
    - on a GPU, XLA's allocator may take 95% of the memory (JAX's default is 75%), the capacity
      every --target plan is held to (planning/targets.py: GPU_MEMORY_FRACTION)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if "JAX_PLATFORMS" in os.environ or not any(
            importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        os.environ["JAX_PLATFORMS"] = "cpu"


_configure_jax()

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
