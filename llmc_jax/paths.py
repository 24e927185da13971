"""Where llmc_jax keeps what it can rebuild: the built-in corpus, cached inits, the XLA compilation cache."""
from __future__ import annotations

import os

CACHE_ENV = "LLMC_JAX_CACHE"


def cache_root() -> str:
    """$LLMC_JAX_CACHE, else ~/.cache/llmc_jax."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llmc_jax")
