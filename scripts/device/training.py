"""Section 4, train: the real training step (scripts/bench_train.py's machinery) for each kernel
choice and -r at d12's micro-batches, the largest -b of d48 that fits, and the Llama models: ms/step,
tok/s, MFU by llm.c's formula, peak memory, compile and first-step time."""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

from .common import Skip, memory_stats, platform, random_params, size
from .plan import SMOKE_MEMORY_LIMIT
from .recorder import Recorder

def _compile_step(model: str, kernels: str, ns: argparse.Namespace, dtype: str,
                  memory_limit: int | None, fp8: str = "off") -> tuple:
    """(cfg, compiled step, row): the trainer's step compiled on abstract inputs, the row holding its
    memory as XLA accounts it against the free device memory, and skipped when it would not fit."""
    import bench_train
    from llmc_jax.models.family import from_descriptor
    cfg = from_descriptor(model)
    sc, step, abstract = bench_train.step_inputs(_variant(kernels, fp8), cfg, ns, dtype)
    t0 = time.perf_counter()
    compiled = step.lower(*abstract).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    get = lambda k: getattr(mem, k, None)
    need = sum(get(k) or 0 for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")) - (
        get("alias_size_in_bytes") or 0)
    stats = memory_stats()
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if stats and "bytes_limit" in stats else memory_limit
    row = {"model": model, "params": cfg.num_parameters, "B": ns.batch_size, "T": ns.seq_len, "r": ns.recompute,
           "kernels": kernels, "kernels_resolved": str(sc.kernels), "dtype": dtype, "fp8": fp8, "compile_s": compile_s,
           "temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
           "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
           "needed_bytes": need, "free_bytes": free}
    if fp8 != "off":
        row.update(fp8_gemms(compiled.as_text()))
    if free is not None and need > 0.97 * free:
        row.update(status="skipped", reason=f"does not fit: the step needs {size(need)}, {size(free)} free")
    return cfg, compiled, row


def _variant(kernels: str, fp8: str) -> str:
    return f"manual-{kernels}" + ("" if fp8 == "off" else f"+fp8-{fp8}")


def fp8_gemms(compiled_hlo: str) -> dict:
    """What XLA made of the FP8 dots: cuBLASLt FP8 GEMM calls (the rewrite Hopper needs) and dots
    still on fp8 operands (not rewritten: XLA would run them upcast)."""
    lines = compiled_hlo.splitlines()
    lt = sum("__cublas$lt$matmul$f8" in ln for ln in lines)
    left = sum((" dot(" in ln) and ("f8e4m3fn" in ln or "f8e5m2" in ln) for ln in lines)
    return {"fp8_cublaslt_calls": lt, "fp8_dots_not_rewritten": left}


def _time_steps(compiled, cfg, kernels: str, ns: argparse.Namespace, dtype: str, steps: int,
                warmup: int, fp8: str = "off") -> tuple:
    """(first-step s, first loss, last loss, step seconds, memory stats after): the compiled step run
    on device-side random weights; its state is dropped before returning."""
    import bench_train
    params = random_params(cfg)
    _, _, (state, x, y, lr, s0) = bench_train.step_inputs(_variant(kernels, fp8), cfg, ns, dtype, params)
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
    del state, m, x, y
    return first_s, first_loss, last_loss, times, after


def train_variant(model: str, B: int, T: int, kernels: str, recompute: int, steps: int, warmup: int,
                  ctx: dict, memory_limit: int | None = None, fp8: str = "off") -> dict:
    """Compile the trainer's step for (model, B, T, kernels, -r) on abstract inputs, check that it
    fits the free device memory, then run it on device-side random weights: compile and first-step
    seconds, median/min ms per step over `steps` synchronized steps, tok/s, MFU (llm.c's formula,
    llmc_jax.training.mfu) and the fraction of the matmul ceiling measured in section 1, the compiled
    step's memory and the device's peak memory."""
    import jax
    from llmc_jax.training import mfu
    dev = jax.devices()[0]
    if kernels == "cudnn" and dev.platform != "gpu":
        raise Skip("cuDNN attention needs an NVIDIA GPU")
    dtype = "bfloat16" if dev.platform == "gpu" else "float32"
    ns = argparse.Namespace(batch_size=B, seq_len=T, grad_accum=1, recompute=recompute)
    cfg, compiled, row = _compile_step(model, kernels, ns, dtype, memory_limit, fp8)
    if row.get("status") == "skipped":
        return row
    before = memory_stats() or {}
    first_s, first_loss, last_loss, times, after = _time_steps(compiled, cfg, kernels, ns, dtype, steps, warmup, fp8)
    del compiled
    gc.collect()
    med = statistics.median(times)
    tokens = B * T
    flops = cfg.flops_per_token(T) * tokens
    peak_before, peak_after = before.get("peak_bytes_in_use"), after.get("peak_bytes_in_use")
    measured = ctx.get("matmul_tflops")
    row.update(first_step_s=first_s, to_first_step_s=row["compile_s"] + first_s, step_ms_median=med * 1e3,
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


def _train_items(rec: Recorder, plan: dict, ctx: dict, items: list[tuple], est: float) -> None:
    for model, B, kernels, r, steps, warmup in items:
        rec.item(f"{model} -b {B} -t {plan['train_T']} {kernels} -r {r}", "train", est,
                 lambda m=model, b=B, k=kernels, rr=r, s=steps, w=warmup:
                 train_variant(m, b, plan["train_T"], k, rr, s, w, ctx),
                 model=model, B=B, T=plan["train_T"], kernels=kernels, r=r, oom_is_skip=True)


def part_train_d12(rec: Recorder, plan: dict, ctx: dict) -> None:
    """d12 at this part's micro-batch: every kernel choice at each -r."""
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
    """The Llama models at a small -b, each kernel choice, -r 1."""
    items = [(model, B, k, 1, plan["llama_steps"], plan["llama_warmup"])
             for model, B in plan["llama"] for k in plan["llama_kernels"]]
    _train_items(rec, plan, ctx, items, plan["default_est_s"]["train"])


def best_kernels(row_lists: list[list[dict]], ctx: dict) -> dict:
    """The kernel choice with the most tok/s among the d12 rows that ran (for d48)."""
    best = (ctx.get("best_d12_tok_s", 0), ctx.get("best_d12_kernels"))
    for rows in row_lists:
        for r in rows:
            if r.get("status") == "ok" and r.get("tok_per_s", 0) > best[0]:
                best = (r["tok_per_s"], r["kernels"])
    return {"best_d12_tok_s": best[0], "best_d12_kernels": best[1]} if best[1] else {}



def fp8_loss_vs_cpu(model: str, B: int, T: int, steps: int) -> dict:
    """The --fp8 delayed bf16 step, `steps` updates on one batch from the same weights, on this
    device and on the host's CPU backend (XLA:CPU runs fp8 dots as f32 matmuls of the upcast values:
    the ideal-accumulation reference): the largest relative loss difference, and the same for
    --fp8 off for scale."""
    import jax
    import numpy as np
    import bench_train
    from llmc_jax.models.family import from_descriptor
    cfg = from_descriptor(model)
    ns = argparse.Namespace(batch_size=B, seq_len=T, grad_accum=1, recompute=1)
    params = random_params(cfg)
    params = {k: np.asarray(v) for k, v in params.items()}
    losses = {}
    for fp8 in ("off", "delayed"):
        for where, dev in (("device", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
            with jax.default_device(dev):
                _, step, (state, x, y, lr, s0) = bench_train.step_inputs(_variant("xla", fp8), cfg, ns, "bfloat16", params)
                run = []
                for _ in range(steps):
                    state, m = step(state, x, y, lr, s0)
                    run.append(float(m.loss))
            losses[(fp8, where)] = np.asarray(run)
    rel = lambda f: float(np.max(np.abs(losses[(f, "device")] - losses[(f, "cpu")]) / np.abs(losses[(f, "cpu")])))
    row = {"check": "fp8 loss vs cpu", "model": model, "B": B, "T": T, "steps": steps,
           "max_rel_fp8": rel("delayed"), "max_rel_off": rel("off"),
           "losses": {f"{f}/{w}": v.tolist() for (f, w), v in losses.items()}}
    if not all(np.all(np.isfinite(v)) for v in losses.values()):
        row.update(status="fail", reason="non-finite loss")
    return row


def part_train_fp8(rec: Recorder, plan: dict, ctx: dict) -> None:
    """d12 bf16 with --fp8 off and delayed at the same shape (the speed table, and whether XLA rewrote
    the fp8 dots to cuBLASLt FP8 GEMMs), then the FP8 loss on this device against the CPU backend."""
    model, B = plan["fp8_train"]
    kernels = ctx.get("best_d12_kernels") or "xla"
    est = plan["default_est_s"]["train"]
    for fp8 in ("delayed", "off"):
        rec.item(f"{model} -b {B} -t {plan['train_T']} {kernels} -r 1 --fp8 {fp8}", "train-fp8", est,
                 lambda f=fp8: train_variant(model, B, plan["train_T"], kernels, 1, plan["train_steps"],
                                             plan["train_warmup"], ctx, fp8=f),
                 model=model, B=B, T=plan["train_T"], kernels=kernels, r=1, fp8=fp8, oom_is_skip=True)
    cpu_model, cpu_B, cpu_T, cpu_steps = plan["fp8_vs_cpu"]
    rec.item(f"{cpu_model} fp8 loss on the device vs the CPU", "fp8-vs-cpu", est,
             lambda: fp8_loss_vs_cpu(cpu_model, cpu_B, cpu_T, cpu_steps), model=cpu_model)
