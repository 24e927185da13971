"""The one GPU check: correctness and speed of everything CPU CI cannot run, in one call of a few minutes.

    set -o pipefail; PYTHONUNBUFFERED=1 python scripts/device_check.py --out $OUT 2>&1 | tee $OUT/console.txt
    python scripts/device_check.py --smoke --out /tmp/dc     # CPU rehearsal: tiny shapes, interpret mode

Sections, in this order, each a list of parts. On a GPU the parts run in three worker processes
(GPU_GROUPS: env to bench; the d12 steps; llama and d48), the PyTorch peer after them with the GPU
free; a part that crashes, hangs or overruns is killed and the rest of its group goes on in a fresh
process, so one failure never takes the next parts with it. --smoke runs every jax part in one process.
  1 environment  device kind, driver/CUDA/cuDNN versions, jax/jaxlib/torch/triton/Python; the two
                 ceilings measured there: a bf16 matmul's TFLOP/s (8192^3) and a device copy's GB/s.
  2 correctness  every Pallas kernel compiled (interpret=False on a GPU), forward and backward, at
                 GPT-2 124M/1.6B and Llama 3.2-1B/3.1-8B shapes (and a ragged T / row count) on fresh
                 random inputs, against float64 NumPy, with the device's free memory filled with NaN
                 before each run (a canary kernel that writes half its output proves the NaN shows);
                 then the model's gradients in bf16 with --kernels pallas and with cuDNN attention
                 against the fp32 XLA path (d12 and llama3:d12), and llmc_jax.gradcheck's main.
  3 kernels      scripts/bench_kernels.py's rows at GPT-2 shapes (Pallas vs XLA, cuDNN, jax's Pallas ops).
  4 train        the real training step (scripts/bench_train.py's machinery): d12 at T=1024 in bf16 for
                 each kernel choice (xla, cudnn attention, pallas) at -r 1 and 0, micro-batch 16, 32, 8:
                 ms/step, tok/s, MFU by llm.c's formula, peak memory, compile and first-step time; d48
                 at the largest -b that fits; llama3.2:1B and llama3:d12 at a small -b.
  5 torch        scripts/bench_torch_gpt2.py (the PyTorch peer) at the d12 step's shapes.

Time: --budget-s (default 450) for the whole run; each part gets a share of what is left in proportion
to its nominal time (PARTS), items that would not fit are skipped with the reason "budget", and a
part still running at its end is killed (the item it was on is recorded as a timeout).

Output, in --out (default $OUT when set, else ./device_check_out), rewritten after every item:
  1_environment.json .. 5_torch.json   one per section: status, and per part its rows
  device_check.log                     everything printed, the workers' tracebacks included
  summary.txt                          the table printed last
Exit status: 0 when every row passed or was skipped for a stated reason, 1 when any row failed,
errored or timed out, 2 for a usage error (this is a GPU script: on a CPU it needs --smoke).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))
from llmc_jax.errors import ArgumentParser, UsageError, describe, is_out_of_memory, run_command  # noqa: E402

SECTIONS = ("environment", "correctness", "kernels", "train", "torch")
SECTION_FILE = {name: f"{i}_{name}.json" for i, name in enumerate(SECTIONS, 1)}
LOG_FILE, SUMMARY_FILE = "device_check.log", "summary.txt"

# (part, section, nominal seconds on a GPU, nominal seconds with --smoke or None: not run there).
# A part's share of the time left is its nominal over the nominals of the parts still to run.
PARTS = [
    ("env", "environment", 15, 6),
    ("kernels", "correctness", 65, 14),
    ("model", "correctness", 65, 24),
    ("bench", "kernels", 40, 10),
    ("train-d12-b16", "train", 90, 16),        # the d12 parts share one process: the device's
    ("train-d12-b32", "train", 25, None),      # running peak-memory counter is exact for a row that
    ("train-d12-b8", "train", 15, None),       # raised it, an upper bound for the others
    ("train-llama", "train", 30, 8),
    ("train-d48", "train", 45, 8),
    ("torch", "torch", 70, 12),
]
# Parts that share a worker process on a GPU (a process start costs jax's import and CUDA's init):
# a part that crashes or overruns is killed and the rest of its group goes on in a fresh process.
# With --smoke every jax part shares one process.
GPU_GROUPS = [["env", "kernels", "model", "bench"], ["train-d12-b16", "train-d12-b32", "train-d12-b8"],
              ["train-llama", "train-d48"]]
TORCH_COMPILE_MIN_S = 70     # less time left than this: the PyTorch peer runs eager (--compile 0)
TORCH_EAGER_MIN_S = 25       # less than this: it is skipped
KILL_GRACE_S = 15          # a part past its share gets this long before it is killed
HARD_STOP_GRACE_S = 20     # the whole run stops at --budget-s plus this

# Relative tolerances, max |got - truth| / max |truth| (the CPU tests' measure, tests/conftest.py
# rel_error), per kernel and activation dtype: the CPU tests' own constants (tests/test_device_check.py
# checks that they still agree):
#   attention    tests/test_pallas_flash_attention.py  TOL_F32 1e-5, TOL_BF16 1e-2
#   layernorm    tests/test_pallas_layernorm.py        TOL_F32 1e-5, TOL_BF16 2^-7 (out, dx),
#                                                      TOL_PARAM_F32 1e-5 (fp32 dw, db of a bf16 run)
#   rmsnorm      tests/test_pallas_rmsnorm.py          TOL_F32 1e-5 (also the fp32 dw), TOL_BF16 2^-7
#   matmul_gelu  tests/test_pallas_matmul_gelu.py      FP32_TOL 1e-5, BF16_TOL 1e-2 (dw, db too)
TOLERANCES = {
    "attention": {"float32": 1e-5, "bfloat16": 1e-2},
    "layernorm": {"float32": 1e-5, "bfloat16": 2 ** -7, "param_float32": 1e-5},
    "rmsnorm": {"float32": 1e-5, "bfloat16": 2 ** -7, "param_float32": 1e-5},
    "matmul_gelu": {"float32": 1e-5, "bfloat16": 1e-2, "param_float32": 1e-2},
}
EPS = 1e-5      # llm.c's layernorm epsilon; the RMSNorm cases use the same

# ---------------------------------------------------------------------------------------------
# What each part runs: the GPU plan, and the smoke plan (tiny shapes, fewest compiles).

# kernel correctness cases: (kernel, label, shape, dtype). attention shape (B, T, NH, NKV, HS); the
# norms (N rows, C); matmul_gelu (N, C, OC). Most valuable first: the budget may cut the tail.
GPU_KERNEL_CASES = [
    ("canary", "half-written output", (4096, 256), "float32"),
    ("attention", "gpt2-124M", (4, 1024, 12, 12, 64), "bfloat16"),
    ("attention", "llama3.2-1B", (2, 1024, 32, 8, 64), "bfloat16"),
    ("layernorm", "gpt2-124M", (8192, 768), "bfloat16"),
    ("residual_layernorm", "gpt2-124M", (8192, 768), "bfloat16"),
    ("matmul_gelu", "gpt2-124M", (8192, 768, 3072), "bfloat16"),
    ("rmsnorm", "llama3.2-1B", (4096, 2048), "bfloat16"),
    ("residual_rmsnorm", "llama3.2-1B", (4096, 2048), "bfloat16"),
    ("attention", "gpt2-1.6B", (2, 1024, 25, 25, 64), "bfloat16"),
    ("attention", "llama3.1-8B", (1, 1024, 32, 8, 128), "bfloat16"),
    ("layernorm", "gpt2-1.6B", (4096, 1600), "bfloat16"),
    ("residual_layernorm", "gpt2-1.6B", (4096, 1600), "bfloat16"),
    ("matmul_gelu", "gpt2-1.6B", (4096, 1600, 6400), "bfloat16"),
    ("rmsnorm", "llama3.1-8B", (2048, 4096), "bfloat16"),
    ("residual_rmsnorm", "llama3.1-8B", (2048, 4096), "bfloat16"),
    ("attention", "gpt2-124M ragged T=1000", (2, 1000, 12, 12, 64), "bfloat16"),
    ("attention", "llama3.2-1B ragged T=1000", (1, 1000, 32, 8, 64), "bfloat16"),
    ("layernorm", "gpt2-124M ragged N=3001", (3001, 768), "bfloat16"),
    ("rmsnorm", "llama3.2-1B ragged N=3001", (3001, 2048), "bfloat16"),
    ("matmul_gelu", "gpt2-124M ragged N=3001", (3001, 768, 3072), "bfloat16"),
    # fp32 activations under jax.default_matmul_precision("highest"), held to the tests' 1e-5: a
    # failure of the dot kernels here says Triton ran their float32 dots in TF32.
    ("attention", "gpt2-124M fp32", (2, 1024, 12, 12, 64), "float32"),
    ("layernorm", "gpt2-124M fp32", (8192, 768), "float32"),
    ("rmsnorm", "llama3.2-1B fp32", (4096, 2048), "float32"),
    ("matmul_gelu", "gpt2-124M fp32", (8192, 768, 3072), "float32"),
]
SMOKE_KERNEL_CASES = [
    ("canary", "half-written output", (64, 128), "float32"),
    ("attention", "tiny GQA ragged T=40", (1, 40, 4, 2, 16), "bfloat16"),
    ("layernorm", "tiny ragged", (37, 96), "bfloat16"),
    ("residual_layernorm", "tiny ragged", (37, 96), "bfloat16"),
    ("rmsnorm", "tiny ragged", (37, 96), "bfloat16"),
    ("residual_rmsnorm", "tiny ragged", (37, 96), "bfloat16"),
    ("matmul_gelu", "tiny ragged", (37, 64, 256), "bfloat16"),
]

PLANS = {
    "gpu": {
        "matmul_n": 8192, "copy_bytes": 2 ** 30, "ceiling_reps": 15, "ceiling_inner": 10,
        "kernel_cases": GPU_KERNEL_CASES,
        # model gradients: bf16 variants vs fp32 XLA, then gradcheck's main (manual vs autodiff)
        "model_models": ["d12", "llama3:d12"], "model_B": 2, "model_T": 256,
        "model_variants": ["pallas", "cudnn", "xla"], "gradcheck_main": ["d12", "llama3:d12"],
        "gradcheck_kernels": "pallas",
        "bench_shapes": "gpt2", "bench_iters": 20, "bench_variants": None, "bench_ops": None,
        "bench_modes": ("fwd", "fwd+bwd"),
        "train_T": 1024, "train_kernels": ["xla", "cudnn", "pallas"], "train_recompute": [1, 0],
        "train_steps": 20, "train_warmup": 3,
        "train_parts": {"train-d12-b16": ("d12", 16), "train-d12-b32": ("d12", 32), "train-d12-b8": ("d12", 8)},
        "d48": "d48", "d48_batches": [64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1], "d48_steps": 10, "d48_warmup": 2,
        "llama": [("llama3.2:1B", 4), ("llama3:d12", 8)], "llama_kernels": ["cudnn", "pallas", "xla"],
        "llama_steps": 10, "llama_warmup": 2,
        "torch_batches": [16, 32, 8], "torch_steps": 20, "torch_warmup": 3,
        "default_est_s": {"kernels": 8, "model": 25, "gradcheck": 35, "bench": 3, "train": 30},
    },
    "smoke": {
        "matmul_n": 256, "copy_bytes": 2 ** 22, "ceiling_reps": 3, "ceiling_inner": 2,
        "kernel_cases": SMOKE_KERNEL_CASES,
        # one of each thing the script does (the kernels' and models' own CPU tests cover the rest)
        "model_models": ["tiny"], "model_B": 2, "model_T": 32,
        "model_variants": ["pallas", "cudnn"], "gradcheck_main": ["llama3:tiny"], "gradcheck_kernels": "xla",
        "bench_shapes": "tiny", "bench_iters": 1, "bench_variants": ("pallas", "xla"),
        "bench_ops": ("attention", "matmul_gelu"), "bench_modes": ("fwd+bwd",),
        "train_T": 32, "train_kernels": ["xla", "cudnn"], "train_recompute": [1],
        "train_steps": 2, "train_warmup": 0,
        "train_parts": {"train-d12-b16": ("tiny", 2)},
        # d48's descent on the tiny model: -b 8 is over SMOKE_MEMORY_LIMIT, -b 2 fits
        "d48": "tiny", "d48_batches": [8, 2], "d48_steps": 1, "d48_warmup": 0,
        "llama": [("llama3:tiny", 2)], "llama_kernels": ["xla", "cudnn"],
        "llama_steps": 1, "llama_warmup": 0,
        "torch_batches": [None], "torch_steps": None, "torch_warmup": None,
        "default_est_s": {"kernels": 3, "model": 6, "gradcheck": 8, "bench": 1, "train": 6},
    },
}
# --smoke has no device memory statistics: the d48 descent treats this as the device's free memory
# (the tiny model's step at T=32 needs ~5.6 MB at -b 8 and ~3.0 MB at -b 2 on XLA:CPU, jax 0.10.2).
SMOKE_MEMORY_LIMIT = 9 * 2 ** 19


# ---------------------------------------------------------------------------------------------
# small shared helpers

def one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit] + "..."


def size(nbytes) -> str:
    """Bytes in the unit that reads best: 3.0 MiB, 71.2 GiB."""
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def write_json(path: str, data) -> None:
    """Atomically: a reader (the parent, or a run cut off mid-write) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


EXIT_NOT_GPU = 3     # a worker's status when jax found no GPU on a run without --smoke


class Skip(Exception):
    """An item that cannot run here, with the reason (cuDNN on a CPU, a model that does not fit)."""


# ---------------------------------------------------------------------------------------------
# the worker side: items with a time check, results rewritten after each

class Recorder:
    """One part's rows, written to `path` after every item; `running` names the item in progress
    so that the parent can record it as a timeout if it has to kill this process."""

    def __init__(self, path: str, part: str, deadline: float):
        self.path, self.part, self.deadline = path, part, deadline
        self.rows: list[dict] = []
        self.info: dict = {}
        self.running = None
        self.t0 = time.time()
        self.est: dict[str, float] = {}
        self.save()

    def save(self, done: bool = False) -> None:
        write_json(self.path, {"part": self.part, "rows": self.rows, "info": self.info, "running": self.running,
                               "done": done, "elapsed_s": time.time() - self.t0})

    def left(self) -> float:
        return self.deadline - time.time()

    def item(self, name: str, kind: str, default_est: float, fn, **meta) -> dict:
        """Run fn() -> dict of results unless the estimate for `kind` (the last such item's time, or
        default_est) would overrun the part's deadline. Exceptions become the row's error."""
        est = self.est.get(kind, default_est)
        oom_is_skip = meta.pop("oom_is_skip", False)     # out of memory = "does not fit", not an error
        row = {"name": name, **meta}
        if est > self.left():
            row.update(status="skipped", reason=f"budget: ~{est:.0f} s needed, {max(0.0, self.left()):.0f} s left")
            print(f"[{self.part}] {name}: skipped ({row['reason']})", flush=True)
            self.rows.append(row)
            self.save()
            return row
        self.running = name
        self.save()
        print(f"[{self.part}] {name} ...", flush=True)
        t0 = time.time()
        try:
            res = fn() or {}
            row.update(res)
            row.setdefault("status", "ok")
        except Skip as e:
            row.update(status="skipped", reason=one_line(e))
        except Exception as e:     # noqa: BLE001  (recorded; the next item still runs)
            oom = is_out_of_memory(e)
            row.update(status="skipped" if oom and oom_is_skip else "error",
                       error=f"{type(e).__name__}: {one_line(describe(e), 400)}")
            if oom and oom_is_skip:
                row["reason"] = "does not fit: out of device memory"
            print(f"[{self.part}] {name}: {type(e).__name__}: {one_line(describe(e), 400)}", flush=True)
            traceback.print_exc(file=sys.stdout)
        finally:
            gc.collect()              # a failed step's device buffers go before the next item
        row["elapsed_s"] = round(time.time() - t0, 3)
        if row["status"] != "skipped":
            self.est[kind] = row["elapsed_s"]
        self.running = None
        self.rows.append(row)
        self.save()
        status = row["status"] + (f" ({row.get('reason') or row.get('error')})" if row["status"] != "ok" else "")
        print(f"[{self.part}] {name}: {status} in {row['elapsed_s']:.1f} s", flush=True)
        return row


def _jax():
    import jax
    return jax


@contextlib.contextmanager
def highest_precision():
    """Exact float32 matmuls (no TF32 on a GPU) inside the block, as gradcheck's fp32 runs use."""
    jax = _jax()
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
    return _jax().devices()[0].platform


def memory_stats() -> dict | None:
    try:
        return _jax().devices()[0].memory_stats() or None
    except Exception:   # noqa: BLE001  (CPU devices have none)
        return None


def timed_median(fn, reps: int, inner: int) -> tuple[float, float]:
    """(median, min) seconds per call of fn over `reps` device-synchronized repetitions of `inner`
    back-to-back calls each (launch gaps hidden by the queue), after a warm-up."""
    jax = _jax()
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


# ---------------------------------------------------------------------------------------------
# 1. environment

def _versions() -> dict:
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


def part_env(rec: Recorder, plan: dict, ctx: dict) -> None:
    jax = _jax()
    import jax.numpy as jnp
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

    def matmul():
        n = plan["matmul_n"]
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        mats = [jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in keys]   # random, not zeros
        f = jax.jit(lambda a, b: a @ b)
        med, best = timed_median(lambda i: f(mats[i % 2], mats[2 + i % 2]), plan["ceiling_reps"], plan["ceiling_inner"])
        flops = 2 * n ** 3
        peak = mfu.device_peak_flops(dev.device_kind)
        return {"shape": [n, n, n], "dtype": "bfloat16", "ms_median": med * 1e3, "ms_min": best * 1e3,
                "tflops_median": flops / med / 1e12, "tflops_max": flops / best / 1e12,
                "of_table_peak": flops / med / peak if peak else None}

    def copy():
        n = plan["copy_bytes"] // 4
        xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.float32) for i in range(2)]
        f = jax.jit(lambda x: x + 1.0)         # one read and one write of every byte
        med, best = timed_median(lambda i: f(xs[i % 2]), plan["ceiling_reps"], plan["ceiling_inner"])
        moved = 2 * 4 * n
        peak = mfu.device_peak_bandwidth(dev.device_kind)
        return {"bytes_read_plus_written": moved, "ms_median": med * 1e3, "ms_min": best * 1e3,
                "gbps_median": moved / med / 1e9, "gbps_max": moved / best / 1e9,
                "of_table_peak": moved / med / peak if peak else None}

    r = rec.item("matmul bf16 ceiling", "ceiling", 5, matmul)
    if r["status"] == "ok":
        ctx["matmul_tflops"] = r["tflops_median"]
    r = rec.item("device copy ceiling", "ceiling", 5, copy)
    if r["status"] == "ok":
        ctx["copy_gbps"] = r["gbps_median"]


# ---------------------------------------------------------------------------------------------
# 2a. kernel correctness: float64 NumPy truth, NaN-filled free memory, fresh random inputs

def _rounded(a, dtype: str):
    """a (float64) as the device will hold it in dtype, back in float64."""
    import ml_dtypes
    import numpy as np
    return a.astype(ml_dtypes.bfloat16).astype(np.float64) if dtype == "bfloat16" else a.astype(np.float32).astype(
        np.float64)


def np_attention(q, k, v, do, scale):
    """float64 causal attention forward and its hand-derived backward (the formulas of
    tests/test_pallas_flash_attention.py), q (B, T, NH, HS), k and v (B, T, NKV, HS)."""
    import numpy as np
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    rep = NH // NKV
    qh, doh = q.transpose(0, 2, 1, 3), do.transpose(0, 2, 1, 3)                  # (B, NH, T, HS)
    kh, vh = (np.repeat(a, rep, axis=2).transpose(0, 2, 1, 3) for a in (k, v))     # head h <- kv head h // rep
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    del s
    out = np.matmul(p, vh)
    dv = np.matmul(p.transpose(0, 1, 3, 2), doh)
    dp = np.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * scale
    del dp, p
    dq = np.matmul(ds, kh)
    dk = np.matmul(ds.transpose(0, 1, 3, 2), qh)
    group = lambda g: g.reshape(B, NKV, rep, T, HS).sum(axis=2).transpose(0, 2, 1, 3)   # sum each kv head's group
    return out.transpose(0, 2, 1, 3), dq.transpose(0, 2, 1, 3), group(dk), group(dv)


def np_layernorm(x, w, b, dout):
    """(out, dx, dw, db) in float64 (tests/test_pallas_layernorm.py's np_layernorm and _bwd)."""
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / ((((x - mean) ** 2).mean(-1, keepdims=True) + EPS) ** 0.5)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True))
    return norm * w + b, dx, (dout * norm).sum(0), dout.sum(0)


def np_rmsnorm(x, w, dout):
    """(out, dx, dw) in float64 (tests/test_pallas_rmsnorm.py's np_rmsnorm and _bwd)."""
    rstd = 1 / (((x * x).mean(-1, keepdims=True) + EPS) ** 0.5)
    xhat, g = x * rstd, dout * w
    return xhat * w, rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dout * xhat).sum(0)


def np_matmul_gelu(x, w, b, g):
    """(out, dx, dw, db) in float64 (tests/test_pallas_matmul_gelu.py's float64_truth); w as the
    kernel sees it (rounded to the activation dtype)."""
    import numpy as np
    s = math.sqrt(2.0 / math.pi)
    pre = x @ w.T + b
    t = np.tanh(s * (pre + 0.044715 * pre ** 3))
    dpre = g * (0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * pre ** 2))
    return 0.5 * pre * (1.0 + t), dpre @ w, dpre.T @ x, dpre.sum(axis=0)


def _kernel_problem(kernel: str, shape, dtype: str, rng):
    """(fn, device args, device cotangents, float64 truth [(name, array, tol)], expected out dtypes).
    Inputs as the CPU tests draw them; fp32 master weights (llm.c's mixed precision)."""
    import jax.numpy as jnp
    import numpy as np
    import pallas_kernels.flash_attention as fa
    import pallas_kernels.layernorm as pln
    import pallas_kernels.matmul_gelu as pmg
    import pallas_kernels.rmsnorm as prms
    act = jnp.dtype(dtype)
    put = lambda a, dt=act: jnp.asarray(a, dt)
    f64 = lambda a, dt=dtype: _rounded(a, dt)
    fam = "layernorm" if "layernorm" in kernel else "rmsnorm" if "rmsnorm" in kernel else kernel
    tol = TOLERANCES[fam][dtype]
    ptol = TOLERANCES[fam].get("param_float32", tol)
    if kernel == "attention":
        B, T, NH, NKV, HS = shape
        q, k, v, do = (rng.normal(0, s, sh) for s, sh in ((1.5, (B, T, NH, HS)), (1.0, (B, T, NKV, HS)),
                                                          (1.0, (B, T, NKV, HS)), (1.0, (B, T, NH, HS))))
        truth = np_attention(f64(q), f64(k), f64(v), f64(do), HS ** -0.5)
        fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=True)
        return (fn, [put(q), put(k), put(v)], put(do),
                list(zip(("out", "dq", "dk", "dv"), truth, [tol] * 4)), [act] * 4)
    if kernel in ("layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm"):
        N, C = shape
        x, r = rng.normal(1, 2, (N, C)), rng.normal(0, 1, (N, C))
        w, b = 1 + rng.normal(0, 0.1, C), rng.normal(0, 0.1, C)
        ct_s, ct_o = rng.normal(0, 1, (N, C)), rng.normal(0, 1, (N, C))
        w32, b32 = f64(w, "float32"), f64(b, "float32")
        residual = kernel.startswith("residual")
        # the fused ops normalise the sum x + r rounded to the activation dtype, and return that sum
        s64 = f64(f64(x) + f64(r)) if residual else f64(x)
        if fam == "layernorm":
            out, dx, dw, db = np_layernorm(s64, w32, b32, f64(ct_o))
            params = [put(w, jnp.float32), put(b, jnp.float32)]
            grads = [("dw", dw, ptol), ("db", db, ptol)]
            fn = pln.residual_layernorm if residual else pln.layernorm
        else:
            out, dx, dw = np_rmsnorm(s64, w32, f64(ct_o))
            params = [put(w, jnp.float32)]
            grads = [("dw", dw, ptol)]
            op = prms.residual_rmsnorm if residual else prms.rmsnorm
            fn = (lambda x, r, w: op(x, r, w, EPS)) if residual else (lambda x, w: op(x, w, EPS))
        if residual:
            dx = dx + f64(ct_s)
            return (fn, [put(x), put(r)] + params, (put(ct_s), put(ct_o)),
                    [("sum", s64, tol), ("out", out, tol), ("dx", dx, tol), ("dr", dx, tol)] + grads,
                    [act, act, act, act] + [jnp.float32] * len(grads))
        return (fn, [put(x)] + params, put(ct_o), [("out", out, tol), ("dx", dx, tol)] + grads,
                [act, act] + [jnp.float32] * len(grads))
    if kernel == "matmul_gelu":
        N, C, OC = shape
        x, w = rng.normal(0, 1, (N, C)), rng.normal(0, 1, (OC, C)) / math.sqrt(C)
        b, g = rng.normal(0, 0.5, OC), rng.normal(0, 1, (N, OC))
        truth = np_matmul_gelu(f64(x), f64(f64(w, "float32")), f64(b, "float32"), f64(g))
        return (pmg.matmul_gelu, [put(x), put(w, jnp.float32), put(b, jnp.float32)], put(g),
                list(zip(("out", "dx", "dw", "db"), truth, [tol, tol, ptol, ptol])),
                [act, act, jnp.float32, jnp.float32])
    raise ValueError(f"unknown kernel {kernel!r}")


_FILLS: dict = {}


def poison_free_memory() -> str:
    """Fill the device's free memory with NaN and free it again, so that buffers the next program
    allocates (its outputs and temporaries) start as NaN: an element a kernel never writes then
    fails the check (NaN never passes). XLA's allocator hands out freed memory, so filling what is
    free in descending chunk sizes and dropping it covers every free chunk down to 256 KiB. On a
    CPU the kernels run in Pallas' interpret mode, which starts every output as NaN itself."""
    jax = _jax()
    import jax.numpy as jnp
    stats = memory_stats()
    if platform() == "cpu" or not stats or "bytes_limit" not in stats:
        return "interpret mode: outputs start as NaN"
    held, filled = [], 0
    margin = 64 * 2 ** 20
    for size in (2 ** 30, 2 ** 26, 2 ** 22, 2 ** 18):
        if size not in _FILLS:
            _FILLS[size] = jax.jit(lambda n=size: jnp.full((n // 4,), jnp.nan, jnp.float32))
        while True:
            stats = memory_stats() or {}
            if stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0) - margin < size:
                break
            try:
                held.append(_FILLS[size]())
            except Exception:   # noqa: BLE001  (fragmented: try the next, smaller size)
                break
            filled += size
    jax.block_until_ready(held)
    del held
    return f"{filled / 2 ** 30:.1f} GiB of free device memory filled with NaN"


def _canary_case(shape):
    """A Pallas kernel that writes only the first half of its output's row blocks: a harness whose
    NaN fill works sees NaN in every element of the second half."""
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels.common import compiler_params, pl, resolve_interpret
    N, C = shape
    block = 16

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def half(x):
        return pl.pallas_call(kernel, grid=(N // block // 2,),
                              in_specs=[pl.BlockSpec((block, C), lambda i: (i, 0))],
                              out_specs=pl.BlockSpec((block, C), lambda i: (i, 0)),
                              out_shape=jax.ShapeDtypeStruct((N, C), x.dtype),
                              compiler_params=compiler_params(num_warps=4, num_stages=1),
                              interpret=resolve_interpret(None), name="device_check_canary")(x)

    x = np.random.default_rng().normal(0, 1, (N, C)).astype(np.float32)
    compiled = jax.jit(half).lower(jnp.asarray(x)).compile()
    xd = jnp.asarray(x)
    how = poison_free_memory()
    out = np.asarray(compiled(xd))
    written_ok = bool(np.allclose(out[:N // 2], 2 * x[:N // 2]))
    nan_rows = int(np.isnan(out[N // 2:]).all(axis=1).sum())
    detected = nan_rows == N // 2
    return {"poison": how, "first_half_correct": written_ok, "unwritten_rows_nan": nan_rows, "unwritten_rows": N // 2,
            "status": "ok" if written_ok and detected else "fail",
            **({} if detected else {"reason": "NaN fill ineffective: unwritten output elements read finite values, "
                                              "so the kernel rows below cannot prove every element is written"})}


def kernel_case(kernel: str, label: str, shape, dtype: str) -> dict:
    jax = _jax()
    import numpy as np
    if kernel == "canary":
        return _canary_case(shape)
    rng = np.random.default_rng()                # fresh inputs every run
    precision = highest_precision() if dtype == "float32" else contextlib.nullcontext()
    with precision:
        fn, args, cts, truth, out_dtypes = _kernel_problem(kernel, shape, dtype, rng)

        def run(*a):
            out, vjp = jax.vjp(fn, *a)
            return (*(out if isinstance(out, tuple) else (out,)), *vjp(cts))
        t0 = time.time()
        compiled = jax.jit(run).lower(*args).compile()
        compile_s = time.time() - t0
        how = poison_free_memory()
        got = jax.block_until_ready(compiled(*args))
    checks, ok = [], True
    for (name, ref, tol), g, want_dtype in zip(truth, got, out_dtypes):
        g64 = np.asarray(g.astype("float32"), np.float64)
        bad = int(g64.size - np.count_nonzero(np.isfinite(g64)))
        rel = float(np.max(np.abs(g64 - ref)) / max(float(np.max(np.abs(ref))), 1e-30)) if not bad else float("nan")
        good = bad == 0 and rel < tol and g.dtype == want_dtype and g.shape == ref.shape
        ok &= good
        checks.append({"name": name, "rel_error": rel, "tol": tol, "nonfinite": bad, "dtype": str(g.dtype),
                       "shape": list(g.shape), "ok": good})
    worst = max(checks, key=lambda c: (not c["ok"], c["rel_error"] / c["tol"] if c["rel_error"] == c["rel_error"]
                                       else float("inf")))
    return {"status": "ok" if ok else "fail", "compile_s": compile_s, "poison": how, "checks": checks,
            "worst": f"{worst['name']} {worst['rel_error']:.2e} / tol {worst['tol']:.1e}",
            "worst_ratio": worst["rel_error"] / worst["tol"] if worst["rel_error"] == worst["rel_error"] else None}


def part_kernels(rec: Recorder, plan: dict, ctx: dict) -> None:
    est = plan["default_est_s"]["kernels"]
    for kernel, label, shape, dtype in plan["kernel_cases"]:
        rec.item(f"{kernel} {label} {dtype}", "kernel", est,
                 lambda k=kernel, lb=label, s=shape, d=dtype: kernel_case(k, lb, s, d),
                 kernel=kernel, label=label, shape=list(shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# 2b. model gradients: bf16 with the GPU kernels vs the fp32 XLA path; llmc_jax.gradcheck's main

def random_params(cfg, seed: int = 0) -> dict:
    """Device-side random weights (N(0, 0.02), norm weights near 1), drawn by one jitted program:
    fast at any size, unlike llm.c's bit-exact host init. For timing and gradient comparisons."""
    jax = _jax()
    import jax.numpy as jnp
    shapes = cfg.param_shapes()

    def draw(key):
        params = {}
        for i, (name, shape) in enumerate(shapes.items()):
            w = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            params[name] = w + 1.0 if name in ("ln1w", "ln2w", "lnfw") else w
        return params
    return jax.jit(draw)(jax.random.PRNGKey(seed))


def _variant_kernels(variant: str, recompute: int = 0):
    import bench_train
    return bench_train.resolve_kernels(variant, recompute)


def part_model(rec: Recorder, plan: dict, ctx: dict) -> None:
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np
    from llmc_jax import gradcheck
    from llmc_jax.models.family import family_of, from_descriptor
    from llmc_jax.nn.kernels import XLA, ModelOptions
    tol = gradcheck.TOLERANCE["bfloat16"]
    B, T = plan["model_B"], plan["model_T"]
    refs: dict = {}
    on_gpu = platform() == "gpu"

    def reference(model):
        if model not in refs:
            cfg = from_descriptor(model)
            params = random_params(cfg)
            tok = np.random.default_rng(0).integers(0, cfg.V, (B, T + 1)).astype(np.int32)
            x, y = jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:])
            with highest_precision():                           # exact fp32 matmuls (no TF32)
                loss, grads = jax.jit(family_of(cfg).value_and_grad(cfg, ModelOptions(jnp.float32, XLA)))(params, x, y)
            refs[model] = cfg, params, x, y, float(loss), {k: np.asarray(v) for k, v in grads.items()}
        return refs[model]

    def compare(model, variant):
        if variant == "cudnn" and not on_gpu:
            raise Skip("cuDNN attention needs an NVIDIA GPU")
        cfg, params, x, y, loss32, g32 = reference(model)
        kernels = _variant_kernels(variant)
        opts = ModelOptions(jnp.bfloat16, kernels)
        loss, grads = jax.jit(family_of(cfg).value_and_grad(cfg, opts))(params, x, y)
        errs = {k: gradcheck.relative_error(np.asarray(grads[k], np.float32), g32[k])[1] for k in g32}
        bad = sorted(k for k, e in errs.items() if not e <= tol)
        worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        return {"status": "fail" if bad else "ok", "kernels": str(kernels), "loss_bf16": float(loss),
                "loss_fp32": loss32, "tol": tol, "worst": f"{worst} {errs[worst]:.2e}", "worst_rel": errs[worst],
                "failed_tensors": bad, "rel_errors": errs}

    est = plan["default_est_s"]["model"]
    for variant in plan["model_variants"]:          # each kernel choice on both models before the next
        for model in plan["model_models"]:
            rec.item(f"{model} bf16 {variant} vs fp32 xla", "model", est,
                     lambda m=model, v=variant: compare(m, v), model=model, variant=variant, B=B, T=T,
                     check="grads vs fp32 XLA")
    refs.clear()

    def gradcheck_main(model):
        argv = ["-e", model, "-b", str(B), "-t", str(T), "--dtype", "bfloat16", "--kernels", plan["gradcheck_kernels"]]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                rc = gradcheck.main(argv)
            except UsageError as e:
                rc = f"usage: {e.message}"
        text = buf.getvalue()
        print(text, flush=True)
        failing = [ln.strip() for ln in text.splitlines() if "NOT OK" in ln]
        return {"status": "ok" if rc == 0 else "fail", "rc": rc, "argv": " ".join(argv),
                "worst": "all OK" if rc == 0 else f"exit {rc}; NOT OK: {', '.join(ln.split()[0] for ln in failing)}",
                "not_ok_rows": failing[:20]}

    for model in plan["gradcheck_main"]:
        rec.item(f"gradcheck {model} bf16 --kernels {plan['gradcheck_kernels']} (manual vs autodiff)", "gradcheck",
                 plan["default_est_s"]["gradcheck"], lambda m=model: gradcheck_main(m), model=model,
                 check="llmc_jax.gradcheck main")


# ---------------------------------------------------------------------------------------------
# 3. kernel benchmarks (scripts/bench_kernels.py's cases and timing, row by row under the budget)

def part_bench(rec: Recorder, plan: dict, ctx: dict) -> None:
    jax = _jax()
    import jax.numpy as jnp
    import bench_kernels as bk
    from llmc_jax.training import mfu
    dev = jax.devices()[0]
    plat = dev.platform
    dtype = jnp.dtype("bfloat16" if plat == "gpu" else "float32")
    shapes = {"gpt2": bk.GPU_SHAPES, "tiny": bk.CPU_SHAPES}[plan["bench_shapes"]]
    peak_flops = mfu.device_peak_flops(dev.device_kind) if dtype == jnp.bfloat16 else None
    peak_bw = mfu.device_peak_bandwidth(dev.device_kind)
    rec.info.update(device=f"{plat} {dev.device_kind}", dtype=dtype.name, iters=plan["bench_iters"],
                    measured_matmul_tflops=ctx.get("matmul_tflops"), measured_copy_gbps=ctx.get("copy_gbps"))
    # the 16K-token GPT-2 124M shapes first, then the rest in bench_kernels' order
    primary = lambda op, s: (s[0] == 16 and s[2] == 12) if op == "attention" else (s[0] == 16384 and s[1] == 768)
    ops = [op for op in bk.OPS if not plan["bench_ops"] or op in plan["bench_ops"]]
    order = [(op, s) for op in ops for s in shapes[op] if primary(op, s)]
    order += [(op, s) for op in ops for s in shapes[op] if not primary(op, s)]
    for op, shape in order:
        try:
            cases = bk.CASES[op](shape, dtype, plat)
        except Exception as e:   # noqa: BLE001
            rec.rows.append({"name": f"{op} {shape}", "status": "error", "error": one_line(e)})
            continue
        for variant, fn, fargs, work in cases:
            if plan["bench_variants"] and variant not in plan["bench_variants"]:
                continue
            for mode in plan["bench_modes"]:
                def bench(fn=fn, fargs=fargs, work=work, mode=mode):
                    total = work * (1.0 if mode == "fwd" else bk.FWD_BWD_FACTOR[op])
                    jitted = jax.jit(fn) if mode == "fwd" else bk._fwd_bwd(fn, fargs)
                    first_s, med, best = bk.time_fn(jitted, fargs, plan["bench_iters"])
                    rate = total / (med / 1e3)
                    mem_bound = op in bk.MEMORY_BOUND
                    peak = peak_bw if mem_bound else peak_flops
                    measured = ctx.get("copy_gbps", 0) * 1e9 if mem_bound else ctx.get("matmul_tflops", 0) * 1e12
                    return {"ms_median": med, "ms_min": best, "first_call_s": first_s,
                            ("bytes" if mem_bound else "flops"): total, "rate": rate,
                            "unit": "B/s" if mem_bound else "FLOP/s",
                            "peak_fraction": rate / peak if peak else None,
                            "measured_ceiling_fraction": rate / measured if measured else None}
                rec.item(f"{op} {tuple(shape)} {variant} {mode}", "bench", plan["default_est_s"]["bench"], bench,
                         op=op, shape=list(shape), variant=variant, mode=mode)
        jax.clear_caches()


# ---------------------------------------------------------------------------------------------
# 4. the training step

def train_variant(model: str, B: int, T: int, kernels: str, recompute: int, steps: int, warmup: int,
                  ctx: dict, memory_limit: int | None = None) -> dict:
    """Compile the trainer's step for (model, B, T, kernels, -r) on abstract inputs, check that it
    fits the free device memory, then run it on device-side random weights: compile and first-step
    seconds, median/min ms per step over `steps` synchronized steps, tok/s, MFU (llm.c's formula,
    llmc_jax.training.mfu) and the fraction of the matmul ceiling measured in section 1, the compiled
    step's memory and the device's peak memory."""
    jax = _jax()
    import bench_train
    from llmc_jax.models.family import from_descriptor
    from llmc_jax.training import mfu
    dev = jax.devices()[0]
    if kernels == "cudnn" and dev.platform != "gpu":
        raise Skip("cuDNN attention needs an NVIDIA GPU")
    cfg = from_descriptor(model)
    dtype = "bfloat16" if dev.platform == "gpu" else "float32"
    ns = argparse.Namespace(batch_size=B, seq_len=T, grad_accum=1, recompute=recompute)
    name = f"manual-{kernels}"
    sc, step, abstract = bench_train.step_inputs(name, cfg, ns, dtype)
    t0 = time.perf_counter()
    compiled = step.lower(*abstract).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    get = lambda k: getattr(mem, k, None)
    need = sum(get(k) or 0 for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")) - (
        get("alias_size_in_bytes") or 0)
    stats = memory_stats()
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if stats and "bytes_limit" in stats else memory_limit
    row = {"model": model, "params": cfg.num_parameters, "B": B, "T": T, "r": recompute, "kernels": kernels,
           "kernels_resolved": str(sc.kernels), "dtype": dtype, "compile_s": compile_s,
           "temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
           "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
           "needed_bytes": need, "free_bytes": free}
    if free is not None and need > 0.97 * free:
        row.update(status="skipped", reason=f"does not fit: the step needs {size(need)}, {size(free)} free")
        return row
    del abstract
    before = memory_stats() or {}
    params = random_params(cfg)
    _, _, (state, x, y, lr, s0) = bench_train.step_inputs(name, cfg, ns, dtype, params)
    del params
    t0 = time.perf_counter()
    state, m = compiled(state, x, y, lr, s0)
    first_loss = float(m.loss)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, x, y, lr, s0)
        float(m.loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, x, y, lr, s0)
        last_loss = float(m.loss)                 # the host waits for the step: device-synchronized
        times.append(time.perf_counter() - t0)
    after = memory_stats() or {}
    del state, m, x, y, compiled
    gc.collect()
    med = statistics.median(times)
    tokens = B * T
    flops = cfg.flops_per_token(T) * tokens
    peak_before, peak_after = before.get("peak_bytes_in_use"), after.get("peak_bytes_in_use")
    measured = ctx.get("matmul_tflops")
    row.update(first_step_s=first_s, to_first_step_s=compile_s + first_s, step_ms_median=med * 1e3,
               step_ms_min=min(times) * 1e3, step_ms_all=[t * 1e3 for t in times], tok_per_s=tokens / med,
               tflops=flops / med / 1e12, mfu=mfu.mfu(flops, med, 1, dev.device_kind),
               of_measured_matmul=(flops / med / 1e12 / measured) if measured else None,
               first_loss=first_loss, last_loss=last_loss,
               # the device's peak is a running maximum: exact for this variant when it rose here
               peak_bytes=peak_after if peak_after is not None and peak_after != peak_before else None,
               peak_bytes_upper_bound=peak_after)
    if not (math.isfinite(first_loss) and math.isfinite(last_loss)):
        row.update(status="fail", reason=f"non-finite loss {first_loss} -> {last_loss}")
    return row


def _train_items(rec, plan, ctx, items, est):
    for model, B, kernels, r, steps, warmup in items:
        rec.item(f"{model} -b {B} -t {plan['train_T']} {kernels} -r {r}", "train", est,
                 lambda m=model, b=B, k=kernels, rr=r, s=steps, w=warmup:
                 train_variant(m, b, plan["train_T"], k, rr, s, w, ctx),
                 model=model, B=B, T=plan["train_T"], kernels=kernels, r=r, oom_is_skip=True)


def part_train_d12(rec: Recorder, plan: dict, ctx: dict) -> None:
    model, B = plan["train_parts"][rec.part]
    items = [(model, B, k, r, plan["train_steps"], plan["train_warmup"])
             for r in plan["train_recompute"] for k in plan["train_kernels"]]
    _train_items(rec, plan, ctx, items, plan["default_est_s"]["train"])


def part_train_d48(rec: Recorder, plan: dict, ctx: dict) -> None:
    """The largest -b that fits, with the kernel choice that was fastest on d12, at -r 1. Each try is
    a compile (tens of seconds on a GPU), so the first -b is the largest a rough estimate allows (fp32
    weights, gradients and AdamW moments; ~30 bytes per channel, token and layer of bf16 activations
    under -r 1), and after a try that does not fit, the next is the largest that XLA's own accounting
    of that try (argument bytes + the rest per sequence) says fits."""
    from llmc_jax.models.family import from_descriptor
    kernels = ctx.get("best_d12_kernels") or ("cudnn" if platform() == "gpu" else "xla")
    stats = memory_stats()
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if stats and "bytes_limit" in stats else None
    limit = SMOKE_MEMORY_LIMIT if free is None else None
    free = free or limit
    cfg, T = from_descriptor(plan["d48"]), plan["train_T"]
    guess = lambda b: 16 * cfg.num_parameters + 30 * b * T * cfg.L * cfg.C
    sizes = sorted(plan["d48_batches"], reverse=True)
    fits = [b for b in sizes if guess(b) <= 0.9 * free]
    todo = sizes[sizes.index(fits[0]):] if fits else sizes[-1:]
    rec.info.update(kernels=kernels, free_bytes=free, tried_from=todo[0])
    tried, upward = set(), True

    def fitting(row, B, among):
        """The sizes among `among` that XLA's accounting of the try at B says fit, largest first."""
        if not (row.get("needed_bytes") and row.get("argument_bytes")):
            return []
        per_seq = (row["needed_bytes"] - row["argument_bytes"]) / B
        return [b for b in among if row["argument_bytes"] + b * per_seq <= 0.95 * free]

    while todo:
        B = todo.pop(0)
        tried.add(B)
        row = rec.item(f"{plan['d48']} -b {B} -t {T} {kernels} -r 1", "train-d48", plan["default_est_s"]["train"],
                       lambda b=B: train_variant(plan["d48"], b, T, kernels, 1, plan["d48_steps"],
                                                 plan["d48_warmup"], ctx, memory_limit=limit),
                       model=plan["d48"], B=B, T=T, kernels=kernels, r=1, oom_is_skip=True)
        if row["status"] == "ok":
            rec.info["largest_b"] = max(B, rec.info.get("largest_b", 0))
            larger = fitting(row, B, [b for b in sizes if b > B and b not in tried]) if upward else []
            todo, upward = larger[:1], False       # once: the largest the measured step says fits
            continue
        if row["status"] != "skipped" or row.get("reason", "").startswith("budget"):
            break          # an error, or no time: a smaller -b would not tell more
        if "largest_b" in rec.info:
            break          # the upward try did not fit
        ok = fitting(row, B, todo)
        todo = todo[todo.index(ok[0]):] if ok else todo[-1:]


def part_train_llama(rec: Recorder, plan: dict, ctx: dict) -> None:
    items = [(model, B, k, 1, plan["llama_steps"], plan["llama_warmup"])
             for model, B in plan["llama"] for k in plan["llama_kernels"]]
    _train_items(rec, plan, ctx, items, plan["default_est_s"]["train"])


PART_FUNCS = {"env": part_env, "kernels": part_kernels, "model": part_model, "bench": part_bench,
              "train-d48": part_train_d48, "train-llama": part_train_llama}


def worker_main(args) -> int:
    """Run the named parts in this process, each against its own deadline."""
    import warnings
    warnings.filterwarnings("once", category=DeprecationWarning)    # Pallas' Triton backend warns per call
    plan = PLANS["smoke" if args.smoke else "gpu"]
    ctx = json.loads(args.hint) if args.hint else {}
    parts = args.worker.split(",")
    nominal = {p: (s if args.smoke else g) for p, _, g, s in PARTS}
    for i, part in enumerate(parts):
        now = time.time()
        left = args.deadline - now
        share = left * nominal[part] / sum(nominal[p] for p in parts[i:])
        rec = Recorder(os.path.join(args.result_dir, f"{part}.json"), part, now + share)
        rec.info.update(deadline=rec.deadline, started=rec.t0)
        rec.save()
        print(f"[{part}] start: {share:.0f} s of {left:.0f} s left", flush=True)
        fn = PART_FUNCS.get(part) or (part_train_d12 if part.startswith("train-d12") else None)
        try:
            fn(rec, plan, ctx)
        except Exception as e:      # noqa: BLE001
            rec.info["error"] = f"{type(e).__name__}: {one_line(describe(e), 400)}"
            print(f"[{part}] part error: {rec.info['error']}", flush=True)
            traceback.print_exc(file=sys.stdout)
        if part.startswith("train-d12"):
            ctx.update(_best_kernels([rec.rows], ctx))
        rec.save(done=True)
        if part == "env" and rec.info.get("platform") != "gpu" and not (args.smoke or args.allow_cpu):
            return EXIT_NOT_GPU
    return 0


def _best_kernels(row_lists, ctx) -> dict:
    """The kernel choice with the most tok/s among the d12 rows that ran (for d48)."""
    best = (ctx.get("best_d12_tok_s", 0), ctx.get("best_d12_kernels"))
    for rows in row_lists:
        for r in rows:
            if r.get("status") == "ok" and r.get("tok_per_s", 0) > best[0]:
                best = (r["tok_per_s"], r["kernels"])
    return {"best_d12_tok_s": best[0], "best_d12_kernels": best[1]} if best[1] else {}


# ---------------------------------------------------------------------------------------------
# the parent: runs the parts as processes, merges results, runs the PyTorch peer, prints the table

class Run:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.plan = PLANS["smoke" if args.smoke else "gpu"]
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.log_f = open(os.path.join(self.out, LOG_FILE), "w")
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.end = self.t0 + args.budget_s
        self.hard_end = self.end + HARD_STOP_GRACE_S
        self.tmp = tempfile.mkdtemp(prefix="device_check_")
        self.parts: dict[str, dict] = {}         # part -> {"status", "rows", "info", ...}
        self.platform = None
        self.device = None
        self.sections = {s for s in SECTIONS if self._wanted(s)}

    def _wanted(self, section: str) -> bool:
        want = self.args.sections
        return want is None or section in want

    def log(self, msg: str) -> None:
        with self.lock:
            print(msg, flush=True)
            self.log_f.write(msg + "\n")
            self.log_f.flush()

    # ---- results

    def section_data(self, section: str) -> dict:
        parts = {p: self.parts[p] for p, s, _, _ in PARTS if s == section and p in self.parts}
        return {"section": section, "status": section_status(parts.values()) if parts else "not run",
                "device": self.device, "elapsed_s": sum(p.get("elapsed_s", 0) for p in parts.values()),
                "parts": parts}

    def write_sections(self) -> None:
        for section in SECTIONS:
            if section in self.sections:
                write_json(os.path.join(self.out, SECTION_FILE[section]), self.section_data(section))

    def merge(self, part: str, final: bool, rc=None, killed=False) -> None:
        data = read_json(os.path.join(self.tmp, f"{part}.json"))
        if data is None:
            if not final:
                return
            data = {"rows": [], "info": {}}
        entry = {"rows": list(data.get("rows", [])), "info": data.get("info", {}),
                 "elapsed_s": data.get("elapsed_s", 0)}
        if final:
            if data.get("running"):
                entry["rows"].append({"name": data["running"], "status": "timeout",
                                      "error": "killed: the part ran past its time" if killed else
                                      f"the worker died (exit {rc}) during this item"})
            if not data.get("done"):
                entry["error"] = ("killed at the end of its time" if killed else
                                  f"worker exited with status {rc} before finishing")
                if entry["info"].get("started"):
                    entry["elapsed_s"] = time.time() - entry["info"]["started"]
            if entry["info"].get("error"):
                entry["error"] = entry["info"]["error"]
        entry["status"] = part_status(entry) if final or data.get("done") else "running"
        self.parts[part] = entry
        if part == "env" and entry["info"].get("platform"):
            self.platform = entry["info"]["platform"]
            self.device = f"{self.platform} {entry['info'].get('device_kind')}"
        self.write_sections()

    # ---- running parts

    def hint(self) -> str:
        ctx = {}
        env_rows = self.parts.get("env", {}).get("rows", [])
        for r in env_rows:
            if r.get("status") == "ok" and "tflops_median" in r:
                ctx["matmul_tflops"] = r["tflops_median"]
            if r.get("status") == "ok" and "gbps_median" in r:
                ctx["copy_gbps"] = r["gbps_median"]
        ctx.update(_best_kernels([self.parts[p]["rows"] for p in self.parts if p.startswith("train-d12")], {}))
        return json.dumps(ctx)

    def _launch(self, parts: list[str], deadline: float, extra_env: dict):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(parts), "--result-dir", self.tmp,
               "--deadline", repr(deadline), "--hint", self.hint()]
        cmd += (["--smoke"] if self.smoke else []) + (["--allow-cpu"] if self.args.allow_cpu else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        # its own process group (to kill it with anything it started), but not its own session: a
        # command cut off by the device tool's timeout takes the workers with it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                process_group=0)
        self.last_line = ""

        def relay():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.strip():
                    self.last_line = line
                self.log(line)
        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        return proc, reader

    def run_group(self, group: list[str], deadline: float, extra_env: dict) -> int | None:
        """Run the parts of one group in a worker process; kill it when the part it is on is past its
        deadline; go on with the group's remaining parts in a fresh process after a crash or a kill.
        Returns the last worker's exit status."""
        todo = list(group)
        rc = None
        while todo:
            proc, reader = self._launch(todo, deadline, extra_env)
            killed = False
            while True:
                try:
                    proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                for p in todo:
                    self.merge(p, final=False)
                current = next((d for d in (read_json(os.path.join(self.tmp, f"{p}.json")) for p in todo)
                                if d and not d.get("done")), None)
                part_end = (current or {}).get("info", {}).get("deadline", deadline)
                if time.time() > min(part_end + KILL_GRACE_S, self.hard_end):
                    self.log(f"[device_check] {current['part'] if current else ','.join(todo)}: past its time, "
                             f"killing its worker (pid {proc.pid})")
                    try:
                        os.killpg(proc.pid, 9)
                    except OSError:
                        proc.kill()
                    proc.wait()
                    killed = True
                    break
            reader.join(timeout=5)
            rc = proc.returncode
            states = {p: read_json(os.path.join(self.tmp, f"{p}.json")) for p in todo}
            finished = [p for p in todo if states[p] and states[p].get("done")]
            broken = [p for p in todo if states[p] and not states[p].get("done")]
            for p in finished + broken:
                self.merge(p, final=True, rc=rc, killed=killed)
            todo = [p for p in todo if not states[p]]
            if rc == EXIT_NOT_GPU:
                break
            if todo and not finished and not broken:      # died before its first part began
                for p in todo:
                    self.parts[p] = {"rows": [], "info": {}, "status": "failed",
                                     "error": f"worker exited with status {rc}: {one_line(self.last_line, 300)}"}
                self.write_sections()
                break
            if todo and deadline - time.time() < 3:
                for p in todo:
                    self.parts[p] = {"rows": [], "info": {}, "status": "partial",
                                     "reason": "budget: no time left after the part before it stopped"}
                self.write_sections()
                break
        return rc

    def run_torch(self, deadline: float) -> None:
        plan = PLANS["smoke" if self.smoke else "gpu"]
        rows: list[dict] = []
        entry = {"rows": rows, "info": {}, "elapsed_s": 0}
        self.parts["torch"] = entry
        t_start = time.time()
        script = os.path.join(REPO, "scripts", "bench_torch_gpt2.py")
        gpu = self.platform == "gpu"
        if not os.path.exists(script):
            rows.append({"name": "bench_torch_gpt2.py", "status": "skipped",
                         "reason": "scripts/bench_torch_gpt2.py is not in this checkout"})
        for B in plan["torch_batches"] if os.path.exists(script) else []:
            name = f"torch d12 -b {B} -t 1024" if B else "torch --smoke"
            left = deadline - time.time()
            if left < (TORCH_EAGER_MIN_S if gpu else 5):
                rows.append({"name": name, "status": "skipped", "reason": f"budget: {max(0, left):.0f} s left"})
                continue
            out = os.path.join(self.tmp, f"torch_{B}.json")
            cmd = [sys.executable, script]
            cmd += (["--model", "d12", "-b", str(B), "-t", "1024", "--steps", str(plan["torch_steps"]),
                     "--warmup", str(plan["torch_warmup"])] if B else ["--smoke"]) + ["--json", out]
            if gpu and left < TORCH_COMPILE_MIN_S:
                cmd += ["--compile", "0"]         # too little time for torch.compile: the eager model
            self.log(f"[torch] {' '.join(cmd[1:])} (timeout {left:.0f} s)")
            row = {"name": name, "B": B, "T": 1024 if B else None, "cmd": " ".join(cmd[1:])}
            t0 = time.time()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=REPO,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
                for line in (p.stdout + p.stderr).splitlines():
                    self.log(f"[torch] {line}")
                last = ((p.stderr.strip() or p.stdout.strip()).splitlines() or [""])[-1]
                data = read_json(out) if p.returncode == 0 else None
                if p.returncode == 2 and "PyTorch" in (p.stdout + p.stderr):
                    row.update(status="skipped", reason=one_line(last))
                elif data is None:
                    row.update(status="error", error=f"exit {p.returncode}: {one_line(last)}")
                else:
                    (vname, res), = data["variants"].items()
                    row.update(status="ok", variant=vname, device=data.get("device"),
                               model=(data.get("model") or {}).get("name", "d12"),
                               B=B or data["config"].get("batch_size"),
                               torch=data.get("torch") or data.get("versions", {}).get("torch"), **res)
                    row.pop("step_ms_all", None)
            except subprocess.TimeoutExpired:
                row.update(status="timeout", error=f"no result within {left:.0f} s")
            row["elapsed_s"] = time.time() - t0
            rows.append(row)
            entry["elapsed_s"] = time.time() - t_start
            entry["status"] = part_status(entry)
            self.write_sections()
        entry["elapsed_s"] = time.time() - t_start
        entry["status"] = part_status(entry)
        self.write_sections()

    def main(self) -> int:
        kind = "smoke (CPU rehearsal)" if self.smoke else "GPU"
        self.log(f"[device_check] {kind} run, budget {self.args.budget_s:.0f} s, out {self.out}")
        plan_parts = [(p, s, smoke if self.smoke else gpu) for p, s, gpu, smoke in PARTS
                      if s in self.sections and (smoke if self.smoke else gpu) is not None]
        if "environment" not in self.sections:     # the platform check still needs it
            plan_parts.insert(0, ("env", "environment", 6))
            self.sections.add("environment")
        extra = {}
        if not self.args.no_compile_cache:
            # shared by the parts (a fresh folder each run): XLA's autotuning results, the same matmul
            # shapes in many programs; and a program compiled twice (--smoke: d48's stand-in at -b 2
            # is the d12 stand-in's step) compiles once
            extra["JAX_COMPILATION_CACHE_DIR"] = os.path.join(self.tmp, "jax_cache")
        wanted = [p for p, s, _ in plan_parts if s != "torch"]
        groups = [wanted] if self.smoke else [[p for p in g if p in wanted] for g in GPU_GROUPS]
        nominal = {p: n for p, _, n in plan_parts}
        done: list[str] = []
        for group in groups:
            if not group:
                continue
            now = time.time()
            todo = [p for p, _, _ in plan_parts if p not in done]
            left = self.end - now
            share = left * sum(nominal[p] for p in group) / sum(nominal[p] for p in todo)
            if share < 3:
                for p in group:
                    self.parts[p] = {"rows": [], "info": {}, "status": "partial",
                                     "reason": f"budget: {max(0.0, share):.0f} s share of {max(0.0, left):.0f} s left"}
                    done.append(p)
                self.write_sections()
                continue
            env = dict(extra)
            if group[0].startswith("train") and not self.smoke:
                # more of the card for the largest -b (default .75); cuDNN/cuBLAS workspaces are inside
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ".90")
            self.log(f"[device_check] {','.join(group)}: {share:.0f} s of {left:.0f} s left")
            rc = self.run_group(group, now + share, env)
            done.extend(group)
            if rc == EXIT_NOT_GPU:
                why = self.parts.get("env", {}).get("error")
                self.log(f"[device_check] jax runs on {self.platform or 'no known platform'} here"
                         + (f" ({why})" if why else "") + ": device_check.py is a GPU script "
                         "(use --smoke for the CPU rehearsal)")
                self.finish()
                return 2
        if "torch" in self.sections:
            now = time.time()
            todo = [p for p, _, _ in plan_parts if p not in done]
            share = (self.end - now) * nominal["torch"] / max(1, sum(nominal[p] for p in todo))
            self.run_torch(now + max(share, 0))
        return self.finish()

    def finish(self) -> int:
        self.write_sections()
        try:
            table = summary_table(self)
        except Exception as e:      # noqa: BLE001  (the section files hold everything anyway)
            table = f"== device_check summary failed: {type(e).__name__}: {one_line(e)} ==\n" + traceback.format_exc()
        with open(os.path.join(self.out, SUMMARY_FILE), "w") as f:
            f.write(table + "\n")
        self.log(table)
        self.log_f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        bad = any(r.get("status") in ("fail", "error", "timeout") for p in self.parts.values() for r in p["rows"])
        bad |= any(p.get("error") for p in self.parts.values())
        return 1 if bad else 0


def part_status(entry: dict) -> str:
    rows = entry.get("rows", [])
    if entry.get("error") or any(r.get("status") in ("fail", "error", "timeout") for r in rows):
        return "failed"
    if any(r.get("status") == "skipped" and str(r.get("reason", "")).startswith("budget") for r in rows):
        return "partial"
    if rows and all(r.get("status") == "skipped" for r in rows):
        return "skipped"
    return "ok" if rows else entry.get("status", "empty")


def section_status(parts) -> str:
    statuses = [p.get("status", "empty") for p in parts]
    for s in ("failed", "running", "partial"):
        if s in statuses:
            return s
    if statuses and all(s == "skipped" for s in statuses):
        return "skipped"
    if "ok" in statuses:
        return "ok" if all(s in ("ok", "skipped") for s in statuses) else "partial"
    return statuses[0] if statuses else "not run"


# ---------------------------------------------------------------------------------------------
# the summary table (printed last: the tail of a device call's output)

def _f(v, fmt, none="-"):
    return none if v is None else format(v, fmt)


def summary_table(run: Run) -> str:
    P = run.parts
    rows = lambda part: P.get(part, {}).get("rows", [])
    lines = [f"== device_check summary: {run.device or 'unknown device'}, "
             f"{time.time() - run.t0:.0f} s of {run.args.budget_s:.0f} s budget, results in {run.out} =="]
    env = P.get("env", {}).get("info", {})
    v = env.get("versions", {})
    if env:
        lines.append(f"versions: python {v.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
                     f"torch {v.get('torch', '-')}, triton {v.get('triton', '-')}; cuda {env.get('cuda') or '-'}")
    lines.append(f"{'section':<12} {'status':<8} {'time s':>6}  notes")
    notes = {}
    mm = next((r for r in rows("env") if r.get("name", "").startswith("matmul")), {})
    cp = next((r for r in rows("env") if r.get("name", "").startswith("device copy")), {})
    tf = mm.get("tflops_median")
    rate = "-" if tf is None else f"{tf:.1f} TFLOP/s" if tf >= 1 else f"{tf * 1e3:.1f} GFLOP/s"
    notes["environment"] = (f"matmul {mm.get('shape', ['?'])[0]}^3 bf16 {rate}"
                            f" ({_f(mm.get('of_table_peak') and 100 * mm['of_table_peak'], '.0f')}% of table); "
                            f"copy {_f(cp.get('gbps_median'), '.0f')} GB/s"
                            f" ({_f(cp.get('of_table_peak') and 100 * cp['of_table_peak'], '.0f')}% of table)")
    kr = [r for r in rows("kernels") if r.get("kernel") != "canary"]
    canary = next((r for r in rows("kernels") if r.get("kernel") == "canary"), {})
    mr = rows("model")
    n_ok = lambda rs: sum(r.get("status") == "ok" for r in rs)
    n_skip = lambda rs: sum(r.get("status") == "skipped" for r in rs)
    count = lambda rs: f"{n_ok(rs)}/{len(rs)} ok" + (f" ({n_skip(rs)} skipped)" if n_skip(rs) else "")
    worst = max((r for r in kr if r.get("worst_ratio") is not None), key=lambda r: r["worst_ratio"], default=None)
    notes["correctness"] = (f"kernels {count(kr)}" + (f", closest to its tolerance: {worst['worst_ratio']:.2f}x"
                                                      if worst else "")
                            + f"; model grads {count(mr)}; NaN canary {canary.get('status', '-')}")
    br = rows("bench")
    notes["kernels"] = f"rows {count(br)}"
    tr = [r for p in P if p.startswith("train") for r in rows(p)]
    d48 = P.get("train-d48", {}).get("info", {})
    notes["train"] = (f"variants {count(tr)}; {run.plan['d48']} largest -b "
                      f"{d48.get('largest_b', '-')} ({d48.get('kernels', '-')})")
    to = rows("torch")
    notes["torch"] = f"runs {count(to)}" + (f" ({to[0].get('reason')})" if to and to[0].get("reason") else "")
    for section in SECTIONS:
        if section in run.sections:
            d = run.section_data(section)
            lines.append(f"{section:<12} {d['status']:<8} {d['elapsed_s']:>6.0f}  {notes.get(section, '')}")

    bad = [(p, r) for p in P for r in rows(p) if r.get("status") in ("fail", "error", "timeout")]
    bad += [(p, {"name": "(part)", "status": "error", "error": P[p]["error"]}) for p in P if P[p].get("error")]
    if bad:
        lines.append("problems:")
        for p, r in bad[:12]:
            why = r.get("error") or r.get("reason") or r.get("worst") or ""
            if r.get("failed_tensors"):
                why = f"tensors {', '.join(r['failed_tensors'][:5])}; worst {r.get('worst')}"
            lines.append(f"  [{p}] {r.get('name')}: {r.get('status')} {one_line(why, 160)}")
        if len(bad) > 12:
            lines.append(f"  ... and {len(bad) - 12} more (see the section files)")

    if kr or mr:
        lines.append("correctness (rel error / tolerance of the worst output):")
        for r in kr + mr:
            what = (r.get("worst", "") if r.get("status") in ("ok", "fail")
                    else (r.get("reason") or r.get("error") or ""))
            lines.append(f"  {r.get('status', '?'):<7} {r.get('name', '')[:58]:<58} {one_line(what, 60)}")

    timed = [r for r in br if r.get("op") and r.get("variant")]
    if timed:
        lines.append("kernels, fwd+bwd ms (median):")
        variants = []
        for r in timed:
            if r["variant"] not in variants:
                variants.append(r["variant"])
        lines.append(f"  {'op':<18} {'shape':<22} " + " ".join(f"{v:>10}" for v in variants))
        seen = []
        for r in timed:
            key = (r["op"], tuple(r.get("shape") or ()))
            if key in seen:
                continue
            seen.append(key)
            cells = []
            for vname in variants:
                m = next((x for x in timed if (x.get("op"), tuple(x.get("shape") or ())) == key
                          and x.get("variant") == vname and x.get("mode") == "fwd+bwd"), None)
                cells.append(f"{_f(m and m.get('ms_median'), '.3f', '-' if m is None else m.get('status')):>10}")
            lines.append(f"  {key[0]:<18} {str(key[1]):<22} " + " ".join(cells))

    if tr or to:
        lines.append("training step (bf16 on GPU; torch = bench_torch_gpt2.py at the same shape):")
        lines.append(f"  {'model':<12} {'-b':>3} {'-r':>2} {'kernels':<7} {'ms/step':>8} {'tok/s':>9} {'MFU':>6} "
                     f"{'of mm':>6} {'peak GiB':>8} {'1st s':>6}  status")
        lines.append("  (MFU: llm.c's formula vs the table peak; of mm: vs the matmul measured above; peak with <:"
                     " an upper bound; 1st s: compile + first step)")
        for r in tr:
            peak = r.get("peak_bytes") or r.get("peak_bytes_upper_bound")
            peak_s = _f(peak and peak / 2 ** 30, ".1f") + ("" if r.get("peak_bytes") or not peak else "<")
            status = r.get("status", "?") + (f" ({one_line(r.get('reason') or r.get('error'), 50)})"
                                             if r.get("status") != "ok" else "")
            lines.append(f"  {str(r.get('model')):<12} {_f(r.get('B'), 'd'):>3} {_f(r.get('r'), 'd'):>2} "
                         f"{str(r.get('kernels')):<7} {_f(r.get('step_ms_median'), '.1f'):>8} "
                         f"{_f(r.get('tok_per_s'), '.0f'):>9} {_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>6} "
                         f"{_f(r.get('of_measured_matmul') and 100 * r['of_measured_matmul'], '.1f'):>6} "
                         f"{peak_s:>8} {_f(r.get('to_first_step_s'), '.1f'):>6}  {status}")
        for r in to:
            peak = r.get("peak_mem_bytes")
            status = r.get("status", "?") + (f" ({one_line(r.get('reason') or r.get('error'), 50)})"
                                             if r.get("status") != "ok" else f" ({r.get('variant')})")
            lines.append(f"  {'torch ' + str(r.get('model', 'd12')):<12} {_f(r.get('B'), 'd'):>3} {'':>2} {'sdpa':<7} "
                         f"{_f(r.get('step_ms_median'), '.1f'):>8} {_f(r.get('tok_per_s'), '.0f'):>9} "
                         f"{_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>6} {'':>6} "
                         f"{_f(peak and peak / 2 ** 30, '.1f'):>8} "
                         f"{_f(r.get('first_step_s'), '.1f'):>6}  {status}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "device_check_out",
                   help="results folder (default $OUT when set, else ./device_check_out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time, seconds (default 450)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU rehearsal: tiny shapes, Pallas interpret mode, every section exercised")
    p.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default all; the environment "
                                      "section always runs)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not share XLA's compilation and autotuning cache between the parts")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)   # developing the GPU plan on a CPU
    # the worker side (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--hint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be > 0, got {args.budget_s:g}")
    if args.sections is not None:
        want = {s.strip() for s in args.sections.split(",") if s.strip()}
        unknown = sorted(want - set(SECTIONS))
        if unknown or not want:
            raise UsageError(f"--sections {args.sections}: {', '.join(unknown) or 'empty'}; "
                             f"choose from {', '.join(SECTIONS)}")
        args.sections = want
    return args


def _has_gpu() -> bool:
    """Whether jax will find a GPU, without importing jax here (which would take the GPU's memory in
    this process): JAX not forced onto the CPU, and an NVIDIA device node or nvidia-smi; failing
    those, jax asked in a short subprocess that takes no GPU memory."""
    import glob
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
        return True
    try:
        p = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
        return p.stdout.strip().splitlines()[-1:] == ["gpu"]
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not (args.smoke or args.allow_cpu or _has_gpu()):
        raise UsageError("device_check.py is a GPU script and this machine has no NVIDIA GPU (or JAX_PLATFORMS=cpu); "
                         "run it with --smoke for the CPU rehearsal")
    return Run(args).main()


if __name__ == "__main__":
    run_command(main, "")
