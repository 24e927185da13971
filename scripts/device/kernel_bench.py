"""Section 3, kernels: scripts/bench_kernels.py's cases and timing at GPT-2 shapes (Pallas vs XLA,
cuDNN, jax's Pallas ops), row by row under the part's budget, each rate also read against the two
ceilings section 1 measured."""
from __future__ import annotations

from .common import one_line
from .recorder import Recorder

def _time_case(op: str, fn, fargs, work: float, mode: str, iters: int, peak_flops: float | None,
               peak_bw: float | None, ctx: dict) -> dict:
    """One bench_kernels case timed in one mode: ms, rate, and the rate against the table peak and
    against the ceiling measured in section 1 (the copy for memory-bound ops, else the matmul)."""
    import jax
    import bench_kernels as bk
    total = work * (1.0 if mode == "fwd" else bk.FWD_BWD_FACTOR[op])
    jitted = jax.jit(fn) if mode == "fwd" else bk._fwd_bwd(fn, fargs)
    first_s, med, best = bk.time_fn(jitted, fargs, iters)
    rate = total / (med / 1e3)
    mem_bound = op in bk.MEMORY_BOUND
    peak = peak_bw if mem_bound else peak_flops
    measured = ctx.get("copy_gbps", 0) * 1e9 if mem_bound else ctx.get("matmul_tflops", 0) * 1e12
    return {"ms_median": med, "ms_min": best, "first_call_s": first_s,
            ("bytes" if mem_bound else "flops"): total, "rate": rate,
            "unit": "B/s" if mem_bound else "FLOP/s",
            "peak_fraction": rate / peak if peak else None,
            "measured_ceiling_fraction": rate / measured if measured else None}


def part_bench(rec: Recorder, plan: dict, ctx: dict) -> None:
    """bench_kernels' rows, the 16K-token GPT-2 124M shapes first; jax's caches cleared per shape."""
    import jax
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
                rec.item(f"{op} {tuple(shape)} {variant} {mode}", "bench", plan["default_est_s"]["bench"],
                         lambda o=op, f=fn, a=fargs, w=work, m=mode:
                         _time_case(o, f, a, w, m, plan["bench_iters"], peak_flops, peak_bw, ctx),
                         op=op, shape=list(shape), variant=variant, mode=mode)
        jax.clear_caches()
