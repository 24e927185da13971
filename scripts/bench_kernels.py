"""Time each Pallas kernel, forward and forward+backward, against the other ways to compute the same op.

    python scripts/bench_kernels.py                      # GPT-2 shapes on a GPU, tiny shapes on a CPU
    python scripts/bench_kernels.py --ops attention --json out/kernels.json

Ops and their variants:
  attention            pallas (pallas_kernels.flash_attention), xla (jax.nn.dot_product_attention),
                       cudnn (the same with implementation="cudnn"; GPU, bf16), jax-pallas
                       (jax.experimental.pallas.ops.gpu.attention.mha, where importable)
  layernorm            pallas, xla (llmc_jax.nn.ops.layernorm), jax-pallas (ops.gpu.layer_norm)
  residual_layernorm   pallas (one fused pass), xla (llmc_jax.nn.ops residual then layernorm)
  rmsnorm              pallas (pallas_kernels.rmsnorm), xla (llmc_jax.nn.rmsnorm): Llama's norm
  residual_rmsnorm     pallas (one fused pass), xla (llmc_jax.nn.rmsnorm.residual_rmsnorm)
  matmul_gelu          pallas (fused epilogue and backward), xla (llmc_jax.nn.ops matmul then gelu),
                       xla-jnp (gelu(x @ w.T + b) differentiated by JAX, for XLA's own fusions)
Per row: median and min milliseconds, achieved TFLOP/s (attention, matmul_gelu: causal attention
counts half the T x T work) or GB/s (the layernorms: the bytes a single pass must move), and the
fraction of the device's peak where it is known (H100/H200/A100; not on a CPU, where the kernels run
in Pallas' interpret mode and the figures only show the script works).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.training import cli  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, run_command  # noqa: E402

OPS = ("attention", "layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm", "matmul_gelu")
# (B, T, NH, HS): GPT-2 124M at B*T = 4K and 16K tokens, 350M, 1.6B (HS 64 at every size)
GPU_SHAPES = {"attention": [(4, 1024, 12, 64), (16, 1024, 12, 64), (8, 1024, 16, 64), (8, 1024, 25, 64)],
              # (N, C): B*T rows of the residual stream
              "layernorm": [(4096, 768), (16384, 768), (16384, 1024), (16384, 1600)],
              "residual_layernorm": [(16384, 768), (16384, 1600)],
              # Llama 3.2-1B, 3.1-8B
              "rmsnorm": [(16384, 2048), (16384, 4096)], "residual_rmsnorm": [(16384, 2048), (16384, 4096)],
              # (N, C, OC): the MLP's fc layer, OC = 4C
              "matmul_gelu": [(4096, 768, 3072), (16384, 768, 3072), (8192, 1024, 4096), (8192, 1600, 6400)]}
CPU_SHAPES = {"attention": [(1, 128, 2, 64)], "layernorm": [(256, 128)], "residual_layernorm": [(256, 128)],
              "rmsnorm": [(256, 128)], "residual_rmsnorm": [(256, 128)], "matmul_gelu": [(128, 128, 512)]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shapes", choices=("auto", "gpt2", "tiny"), default="auto",
                   help="gpt2: the GPT-2 shapes; tiny: small ones; auto: gpt2 on a GPU, tiny otherwise")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20 GPU, 3 CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, {"iters": cli.POSITIVE})
    unknown = [o.strip() for o in args.ops.split(",") if o.strip() and o.strip() not in OPS]
    if unknown:
        raise UsageError(f"--ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return args


def time_fn(fn: Callable, args: tuple, iters: int) -> tuple[float, float, float]:
    """(compile+first-call seconds, median ms, min ms) of a jitted fn."""
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times), min(times)


def _fwd_bwd(fn: Callable, args: tuple):
    """A jitted forward + backward of fn against fixed random cotangents (all inputs differentiated)."""
    import jax
    import jax.numpy as jnp
    outs = jax.eval_shape(fn, *args)
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(outs)))
    cts = jax.tree.unflatten(jax.tree.structure(outs), [
        jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype) for k, o in zip(keys, jax.tree.leaves(outs))])

    def step(*a):
        out, vjp = jax.vjp(fn, *a)
        return out, vjp(cts)
    return jax.jit(step)


def attention_cases(shape, dtype, platform):
    """(variant, fn, args, fwd flops) for causal attention on (B, T, NH, HS)."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.flash_attention import flash_attention
    B, T, NH, HS = shape
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) * 0.5
               for key in jax.random.split(jax.random.PRNGKey(0), 3))
    flops = 4 * B * NH * T * T * HS / 2              # QK^T and PV, causal half
    cases = [("pallas", lambda q, k, v: flash_attention(q, k, v, causal=True)),
             ("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))]
    if platform == "gpu" and dtype != jnp.float32:
        cases.append(("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                             implementation="cudnn")))
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_attention
        if T % 128 == 0:
            cases.append(("jax-pallas", lambda q, k, v: jax_attention.mha(
                q, k, v, None, sm_scale=HS ** -0.5, causal=True, interpret=platform != "gpu")))
    except ImportError:
        pass
    return [(name, fn, (q, k, v), flops) for name, fn in cases]


def layernorm_cases(shape, dtype, platform):
    """(variant, fn, args, fwd bytes) for layernorm of (N, C)."""
    import jax
    import jax.numpy as jnp
    from llmc_jax.nn import ops
    from pallas_kernels import layernorm as pallas_ln
    N, C = shape
    kx, kw, kb = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (N, C), jnp.float32).astype(dtype)
    w = 1.0 + 0.1 * jax.random.normal(kw, (C,), jnp.float32)
    b = 0.1 * jax.random.normal(kb, (C,), jnp.float32)
    nbytes = 2 * N * C * jnp.dtype(dtype).itemsize           # read x, write out
    cases = [("pallas", pallas_ln.layernorm), ("xla", ops.layernorm)]
    try:
        from jax.experimental.pallas.ops.gpu import layer_norm as jax_ln
        cases.append(("jax-pallas", lambda x, w, b: jax_ln.layer_norm(
            x[None], w.astype(x.dtype), b.astype(x.dtype), interpret=platform != "gpu")[0]))
    except ImportError:
        pass
    return [(name, fn, (x, w, b), nbytes) for name, fn in cases]


def residual_layernorm_cases(shape, dtype, platform):
    import jax
    import jax.numpy as jnp
    from llmc_jax.nn import ops
    from pallas_kernels import layernorm as pallas_ln
    N, C = shape
    kx, kr = jax.random.split(jax.random.PRNGKey(0))
    x, r = (jax.random.normal(k, (N, C), jnp.float32).astype(dtype) for k in (kx, kr))
    w, b = jnp.ones((C,), jnp.float32), jnp.zeros((C,), jnp.float32)
    nbytes = 4 * N * C * jnp.dtype(dtype).itemsize           # read x, r; write x + r, out

    def xla(x, r, w, b):
        s = ops.residual(x, r)
        return s, ops.layernorm(s, w, b)
    return [(name, fn, (x, r, w, b), nbytes) for name, fn in (("pallas", pallas_ln.residual_layernorm),
                                                               ("xla", xla))]


def rmsnorm_cases(shape, dtype, platform, residual: bool = False):
    """(variant, fn, args, fwd bytes) for (residual +) RMSNorm of (N, C), eps 1e-5 as Llama 3's."""
    import functools
    import jax
    import jax.numpy as jnp
    from llmc_jax.nn import rmsnorm as xla_rms
    from pallas_kernels import rmsnorm as pallas_rms
    N, C = shape
    kx, kr, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x, r = (jax.random.normal(k, (N, C), jnp.float32).astype(dtype) for k in (kx, kr))
    w = 1.0 + 0.1 * jax.random.normal(kw, (C,), jnp.float32)
    size = jnp.dtype(dtype).itemsize
    if residual:    # read x, r; write x + r, out
        return [(name, functools.partial(fn, eps=1e-5), (x, r, w), 4 * N * C * size)
                for name, fn in (("pallas", pallas_rms.residual_rmsnorm), ("xla", xla_rms.residual_rmsnorm))]
    return [(name, functools.partial(fn, eps=1e-5), (x, w), 2 * N * C * size)
            for name, fn in (("pallas", pallas_rms.rmsnorm), ("xla", xla_rms.rmsnorm))]


def residual_rmsnorm_cases(shape, dtype, platform):
    return rmsnorm_cases(shape, dtype, platform, residual=True)


def matmul_gelu_cases(shape, dtype, platform):
    import jax
    import jax.numpy as jnp
    from llmc_jax.nn import ops
    from pallas_kernels.matmul_gelu import matmul_gelu
    N, C, OC = shape
    kx, kw, kb = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (N, C), jnp.float32).astype(dtype)
    w = 0.02 * jax.random.normal(kw, (OC, C), jnp.float32)
    b = 0.02 * jax.random.normal(kb, (OC,), jnp.float32)

    def xla_jnp(x, w, b):
        pre = jnp.einsum("nc,oc->no", x, w.astype(x.dtype), preferred_element_type=jnp.float32) + b
        return jax.nn.gelu(pre, approximate=True).astype(x.dtype)
    cases = [("pallas", matmul_gelu), ("xla", lambda x, w, b: ops.gelu(ops.matmul(x, w, b))), ("xla-jnp", xla_jnp)]
    return [(name, fn, (x, w, b), 2 * N * C * OC) for name, fn in cases]


CASES = {"attention": attention_cases, "layernorm": layernorm_cases,
         "residual_layernorm": residual_layernorm_cases, "rmsnorm": rmsnorm_cases,
         "residual_rmsnorm": residual_rmsnorm_cases, "matmul_gelu": matmul_gelu_cases}
# forward+backward work as a multiple of the forward's: attention's backward does 5 T x T matmuls
# to the forward's 2 (x 3.5 in all); a matmul's backward 2 to 1 (x 3); layernorm's backward reads
# x and dout and writes dx (x 2.5 the forward's 2 passes, counting the tiny dw, db as nothing).
FWD_BWD_FACTOR = {"attention": 3.5, "layernorm": 2.5, "residual_layernorm": 2.0, "rmsnorm": 2.5,
                  "residual_rmsnorm": 2.0, "matmul_gelu": 3.0}
MEMORY_BOUND = ("layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm")


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from llmc_jax.training import mfu
    device = jax.devices()[0]
    platform = device.platform
    dtype = jnp.dtype(args.dtype or ("bfloat16" if platform == "gpu" else "float32"))
    shapes = {"auto": GPU_SHAPES if platform == "gpu" else CPU_SHAPES, "gpt2": GPU_SHAPES,
              "tiny": CPU_SHAPES}[args.shapes]
    iters = args.iters or (20 if platform == "gpu" else 3)
    ops_wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    peak_flops = mfu.device_peak_flops(device.device_kind) if dtype == jnp.bfloat16 else None
    peak_bw = mfu.device_peak_bandwidth(device.device_kind)
    print(f"device {device.platform} {device.device_kind}, jax {jax.__version__}, dtype {dtype.name}"
          + ("" if platform == "gpu" else " (CPU: Pallas kernels run in interpret mode)"))
    print(f"{'op':>18s} | {'shape':>20s} | {'variant':>10s} | {'mode':>7s} | {'ms med':>9s} | {'ms min':>9s} | "
          f"{'rate':>12s} | {'% peak':>6s}")
    rows = []
    for op in ops_wanted:
        for shape in shapes[op]:
            for variant, fn, fargs, work in CASES[op](shape, dtype, platform):
                for mode in ("fwd", "fwd+bwd"):
                    total = work * (1.0 if mode == "fwd" else FWD_BWD_FACTOR[op])
                    try:
                        jitted = jax.jit(fn) if mode == "fwd" else _fwd_bwd(fn, fargs)
                        first_s, med, best = time_fn(jitted, fargs, iters)
                    except Exception as e:              # one variant failing must not hide the others
                        print(f"{op:>18s} | {str(shape):>20s} | {variant:>10s} | {mode:>7s} | failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                        rows.append({"op": op, "shape": shape, "variant": variant, "mode": mode,
                                     "error": f"{type(e).__name__}: {e}"[:500]})
                        continue
                    rate = total / (med / 1e3)
                    peak = peak_bw if op in MEMORY_BOUND else peak_flops
                    if op in MEMORY_BOUND:
                        unit = f"{rate / 1e9:8.1f} GB/s"
                    else:   # GFLOP/s off a GPU, where interpret mode runs at a few GFLOP/s
                        unit = f"{rate / 1e12:6.2f} TFLOP/s" if platform == "gpu" else f"{rate / 1e9:6.2f} GFLOP/s"
                    frac = f"{100 * rate / peak:5.1f}%" if peak else "n/a"
                    print(f"{op:>18s} | {str(shape):>20s} | {variant:>10s} | {mode:>7s} | {med:9.3f} | "
                          f"{best:9.3f} | {unit:>12s} | {frac:>6s}", flush=True)
                    rows.append({"op": op, "shape": shape, "variant": variant, "mode": mode, "ms_median": med,
                                 "ms_min": best, "first_call_s": first_s,
                                 ("bytes" if op in MEMORY_BOUND else "flops"): total,
                                 "rate": rate, "peak_fraction": rate / peak if peak else None})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
                       "dtype": dtype.name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    run_command(main, "use --shapes tiny or fewer --ops")
