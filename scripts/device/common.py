"""Small helpers every side of device_check shares: text and byte formatting, result files written
atomically (a worker may be killed mid-write), the Skip signal, and the jax queries the parts use.
jax is imported inside the functions only: the parent process must not take the GPU's memory."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Any, Callable, Iterator


def one_line(text: object, limit: int = 300) -> str:
    """text on one line, cut at `limit` characters: for rows, tables and logs."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit] + "..."


def size(nbytes: int | float | None) -> str:
    """Bytes in the unit that reads best: 3.0 MiB, 71.2 GiB."""
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def write_json(path: str, data: Any) -> None:
    """Atomically: a reader (the parent, or a run cut off mid-write) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a worker that never started)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Skip(Exception):
    """An item that cannot run here, with the reason (cuDNN on a CPU, a model that does not fit)."""


@contextlib.contextmanager
def highest_precision() -> Iterator[None]:
    """Exact float32 matmuls (no TF32 on a GPU) inside the block, as gradcheck's fp32 runs use."""
    import jax
    if hasattr(jax, "default_matmul_precision"):
        with jax.default_matmul_precision("highest"):
            yield
        return
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", old)


def platform() -> str:
    """jax's platform of the first device: "gpu" or "cpu"."""
    import jax
    return jax.devices()[0].platform


def memory_stats() -> dict | None:
    """The first device's allocator statistics, or None (CPU devices have none)."""
    import jax
    try:
        return jax.devices()[0].memory_stats() or None
    except Exception:   # noqa: BLE001  (CPU devices have none)
        return None


def timed_median(fn: Callable[[int], Any], reps: int, inner: int) -> tuple[float, float]:
    """(median, min) seconds per call of fn over `reps` device-synchronized repetitions of `inner`
    back-to-back calls each (launch gaps hidden by the queue), after a warm-up."""
    import jax
    jax.block_until_ready(fn(0))
    jax.block_until_ready(fn(1))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(i)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), min(times)


def random_params(cfg: Any, seed: int = 0) -> dict:
    """Device-side random weights (N(0, 0.02), norm weights near 1), drawn by one jitted program:
    fast at any size, unlike llm.c's bit-exact host init. For timing and gradient comparisons."""
    import jax
    import jax.numpy as jnp
    shapes = cfg.param_shapes()

    def draw(key):
        params = {}
        for i, (name, shape) in enumerate(shapes.items()):
            w = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            params[name] = w + 1.0 if name in ("ln1w", "ln2w", "lnfw") else w
        return params
    return jax.jit(draw)(jax.random.PRNGKey(seed))
