"""Section 1, environment: what the device and the software stack are (device kind, driver, CUDA,
cuDNN, package versions), and the two ceilings measured on it, a bf16 matmul's FLOP/s and a device
copy's bytes/s, which the later sections' rates are read against."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .common import memory_stats, one_line, timed_median
from .recorder import Recorder


def _versions() -> dict:
    """Python's and the installed packages' versions (those absent are left out)."""
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                "numpy", "ml_dtypes", "torch", "triton", "pytorch-triton", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cuda_versions() -> dict:
    """The CUDA, cuDNN, cuBLAS... versions jaxlib reports (empty on a CPU build)."""
    out = {}
    try:
        from jax._src.lib import cuda_versions
    except Exception:   # noqa: BLE001
        return out
    if cuda_versions is None:
        return out
    for name in sorted(dir(cuda_versions)):
        if name.endswith("_version") and not name.startswith("_"):
            try:
                out[name] = getattr(cuda_versions, name)()
            except Exception:   # noqa: BLE001  (some take a device, some are absent in a build)
                pass
    return out


def _nvidia_smi() -> str | None:
    """Read-only query of the card's state (nothing is changed)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                               "clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu",
                               "--format=csv"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:   # noqa: BLE001
        return f"failed: {one_line(e)}"


def _matmul_ceiling(plan: dict, device_kind: str) -> dict:
    """A bf16 (n, n) @ (n, n) matmul's FLOP/s: the rate the training step's MFU is read against."""
    import jax
    import jax.numpy as jnp
    from llmc_jax.training import mfu
    n = plan["matmul_n"]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    mats = [jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in keys]   # random, not zeros
    f = jax.jit(lambda a, b: a @ b)
    med, best = timed_median(lambda i: f(mats[i % 2], mats[2 + i % 2]), plan["ceiling_reps"], plan["ceiling_inner"])
    flops = 2 * n ** 3
    peak = mfu.device_peak_flops(device_kind)
    return {"shape": [n, n, n], "dtype": "bfloat16", "ms_median": med * 1e3, "ms_min": best * 1e3,
            "tflops_median": flops / med / 1e12, "tflops_max": flops / best / 1e12,
            "of_table_peak": flops / med / peak if peak else None}


def _copy_ceiling(plan: dict, device_kind: str) -> dict:
    """A device copy's bytes/s: the rate the memory-bound kernels are read against."""
    import jax
    import jax.numpy as jnp
    from llmc_jax.training import mfu
    n = plan["copy_bytes"] // 4
    xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.float32) for i in range(2)]
    f = jax.jit(lambda x: x + 1.0)         # one read and one write of every byte
    med, best = timed_median(lambda i: f(xs[i % 2]), plan["ceiling_reps"], plan["ceiling_inner"])
    moved = 2 * 4 * n
    peak = mfu.device_peak_bandwidth(device_kind)
    return {"bytes_read_plus_written": moved, "ms_median": med * 1e3, "ms_min": best * 1e3,
            "gbps_median": moved / med / 1e9, "gbps_max": moved / best / 1e9,
            "of_table_peak": moved / med / peak if peak else None}


def part_env(rec: Recorder, plan: dict, ctx: dict) -> None:
    """The device and versions into rec.info (the parent reads the platform from there), then the two
    ceilings as rows; their rates go into ctx for the later parts of this process."""
    import jax
    from llmc_jax.training import mfu
    dev = jax.devices()[0]
    info = rec.info
    info.update(platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count(),
                compute_capability=getattr(dev, "compute_capability", None), versions=_versions(),
                cuda=_cuda_versions(), nvidia_smi=_nvidia_smi(),
                peak_bf16_flops_table=mfu.device_peak_flops(dev.device_kind),
                peak_hbm_bytes_table=mfu.device_peak_bandwidth(dev.device_kind),
                memory_stats=memory_stats(),
                env={k: v for k, v in os.environ.items()
                     if k.startswith(("XLA_", "JAX_", "CUDA_", "NVIDIA_", "TF_", "LLMC_"))})
    rec.save()
    try:
        print(jax.print_environment_info(return_string=True), flush=True)
    except Exception:   # noqa: BLE001
        pass

    r = rec.item("matmul bf16 ceiling", "ceiling", 5, lambda: _matmul_ceiling(plan, dev.device_kind))
    if r["status"] == "ok":
        ctx["matmul_tflops"] = r["tflops_median"]
    r = rec.item("device copy ceiling", "ceiling", 5, lambda: _copy_ceiling(plan, dev.device_kind))
    if r["status"] == "ok":
        ctx["copy_gbps"] = r["gbps_median"]
