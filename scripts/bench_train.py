"""Time the real jitted training step of llmc_jax.train, variant by variant.

    python scripts/bench_train.py -e d12 -b 4 -t 64 --backward manual,autodiff --steps 10

For each variant (backward-kernels): compile seconds, first-step seconds, median and min of the
steady steps, tokens/s, achieved GFLOP/s by llm.c's formula (6N + 6LCT per token), MFU where the
device's peak is known, the fraction of a matmul peak measured in the same run at the model's
largest matmul shape, and the compiled step's memory. `--json FILE` writes the same for machines.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.training import cli  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, run_command, user_files  # noqa: E402

# the --kernels choices: the two families, and "cudnn" = the xla family with cuDNN's fused attention
KERNEL_CHOICES = ("xla", "pallas", "cudnn")
BOUNDS = {"batch_size": cli.POSITIVE, "seq_len": cli.POSITIVE, "grad_accum": cli.POSITIVE, "steps": cli.POSITIVE,
          "warmup": cli.NONNEG}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", default="d12", help="descriptor or llm.c .bin (default d12)")
    p.add_argument("-b", "--batch-size", type=int, default=4)
    p.add_argument("-t", "--seq-len", type=int, default=64)
    p.add_argument("-a", "--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("-r", "--recompute", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--backward", default="manual,autodiff", help="comma list of manual, autodiff")
    p.add_argument("--kernels", default="xla",
                   help="comma list of xla, pallas, cudnn (XLA's ops with cuDNN's fused attention: GPU, bfloat16)")
    p.add_argument("--fp8", default="off",
                   help="comma list of off, delayed, current (llmc_jax.train's --fp8; manual backward only)")
    p.add_argument("--compile-only", action="store_true",
                   help="lower and compile each variant on abstract inputs (nothing allocated) and stop")
    p.add_argument("--update", action="store_true",
                   help="time only the AdamW update, bf16 params (-w 0) rounded to nearest and stochastically "
                        "and fp32 params (-w 1), with the whole bf16 step's compiled memory for each")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    for flag, value, allowed in (("--backward", args.backward, ("manual", "autodiff")),
                                 ("--kernels", args.kernels, KERNEL_CHOICES),
                                 ("--fp8", args.fp8, ("off", "delayed", "current"))):
        bad = [v.strip() for v in value.split(",") if v.strip() not in allowed]
        if bad:
            raise UsageError(f"{flag} {value}: {', '.join(bad) or 'an empty item'} is not one of {', '.join(allowed)}")
    return args


def matmul_peak_gflops(M: int, K: int, N: int, dtype, repeats: int = 10) -> float:
    """Best GFLOP/s of one (M, K) x (K, N) matmul on this device: the ceiling for this model."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((M, K), dtype)
    b = jnp.ones((K, N), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * M * K * N / best / 1e9


def variants(args) -> list[str]:
    """backward-kernels, with +fp8-RECIPE for an FP8 variant (manual backward only)."""
    split = lambda v: [x.strip() for x in v.split(",")]
    return [f"{b}-{k}" + ("" if f == "off" else f"+fp8-{f}")
            for b in split(args.backward) for k in split(args.kernels) for f in split(getattr(args, "fp8", "off"))
            if f == "off" or b == "manual"]


def parse_variant(name: str) -> tuple[str, str, str]:
    """"manual-xla+fp8-delayed" -> ("manual", "xla", "delayed"); no suffix: fp8 "off"."""
    base, _, fp8 = name.partition("+fp8-")
    backward, kernels = base.split("-", 1)
    return backward, kernels, fp8 or "off"


def resolve_kernels(kernels: str, recompute: int):
    """The Kernels one --kernels choice names (see KERNEL_CHOICES), under -r `recompute`."""
    from llmc_jax.nn.kernels import Kernels
    if kernels == "cudnn":
        return Kernels.resolve("xla", recompute=recompute, attention="cudnn")
    return Kernels.resolve(kernels, recompute=recompute)


def step_inputs(name: str, cfg, args, dtype: str, params=None):
    """(step config, jitted trainer step, its arguments): abstract ShapeDtypeStructs without params."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llmc_jax.training import train_step

    backward, kernels, fp8 = parse_variant(name)
    sc = train_step.StepConfig(model=cfg, dtype=dtype, kernels=resolve_kernels(kernels, args.recompute),
                               backward=backward, recompute=args.recompute, fp8=fp8)
    A, B, T = args.grad_accum, args.batch_size, args.seq_len
    if params is None:
        shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in cfg.param_shapes().items()}
        state = jax.eval_shape(lambda p: train_step.init_train_state(p, sc), shapes)
        xy = jax.ShapeDtypeStruct((A, B, T), jnp.int32)
        return sc, train_step.make_train_step(sc), (state, xy, xy, jax.ShapeDtypeStruct((), jnp.float32),
                                                     jax.ShapeDtypeStruct((), jnp.int32))
    tok = np.random.default_rng(0).integers(0, cfg.V, size=(A, B, T + 1)).astype(np.int32)
    state = train_step.init_train_state({k: jnp.asarray(v) for k, v in params.items()}, sc)
    return sc, train_step.make_train_step(sc), (state, jnp.asarray(tok[..., :-1]), jnp.asarray(tok[..., 1:]),
                                                 np.float32(1e-4), np.int32(0))


# --update's variants: name -> (param dtype, rounding of the bf16 params AdamW writes)
UPDATE_VARIANTS = {"w1": ("float32", "nearest"), "w0-nearest": ("bfloat16", "nearest"),
                   "w0-stochastic": ("bfloat16", "stochastic")}


def bench_update(cfg, params_np, args) -> dict:
    """Per UPDATE_VARIANTS entry: the AdamW update alone (train_step.make_update, params and moments
    donated as in the step), median and min ms over interleaved rounds, and the whole bf16 training
    step's compiled memory with params of that dtype and rounding."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llmc_jax.training import train_step

    runs, results = {}, {}
    A, B, T = args.grad_accum, args.batch_size, args.seq_len
    for name, (param_dtype, rounding) in UPDATE_VARIANTS.items():
        sc = train_step.StepConfig(model=cfg, dtype="bfloat16", recompute=args.recompute, weight_decay=0.1,
                                   param_rounding=rounding)
        state = train_step.init_train_state({k: jnp.asarray(v, param_dtype) for k, v in params_np.items()}, sc)
        grads = {k: jnp.full(v.shape, 1e-3, jnp.float32) for k, v in params_np.items()}
        update = jax.jit(train_step.make_update(sc), donate_argnums=(0, 1))
        xy = jax.ShapeDtypeStruct((A, B, T), jnp.int32)
        step_mem = train_step.make_train_step(sc).lower(jax.eval_shape(lambda: state), xy, xy, np.float32(1e-4),
                                                        np.int32(0)).compile().memory_analysis()
        runs[name] = [update, [state.params, state.opt_state], grads, []]
        results[name] = {"step_temp_bytes": step_mem.temp_size_in_bytes,
                         "step_argument_bytes": step_mem.argument_size_in_bytes}
    rounds = max(1, min(args.steps, 5))
    for r in range(args.warmup + rounds):          # take turns, a few updates each
        for update, pv, grads, times in runs.values():
            for i in range(args.steps // rounds + (1 if r - args.warmup < args.steps % rounds else 0)):
                t0 = time.perf_counter()
                pv[0], pv[1] = update(pv[0], pv[1], grads, np.float32(1e-4), np.int32(i))
                jax.block_until_ready(pv[0])
                if r >= args.warmup:
                    times.append(time.perf_counter() - t0)
    for name, (_, _, _, times) in runs.items():
        results[name].update(update_ms_median=1000 * statistics.median(times), update_ms_min=1000 * min(times))
    return results


def compile_only(name: str, cfg, args, dtype: str) -> dict:
    _, step, abstract = step_inputs(name, cfg, args, dtype)
    t0 = time.perf_counter()
    compiled = step.lower(*abstract).compile()
    mem = compiled.memory_analysis()
    return {"compile_s": time.perf_counter() - t0, "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "argument_bytes": getattr(mem, "argument_size_in_bytes", None)}


class Variant:
    """One compiled step with its own state, timed a few steps at a time so that the variants
    can take turns: on a noisy machine, interleaving keeps their comparison fair."""

    def __init__(self, name: str, cfg, params_np, args, dtype: str):
        _, step, (self.state, self.x, self.y, self.lr, self.s0) = step_inputs(name, cfg, args, dtype, params_np)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, self.x, self.y, self.lr, self.s0).compile()
        self.compile_s = time.perf_counter() - t0
        self.mem = self.compiled.memory_analysis()
        t0 = time.perf_counter()
        self.first_loss = float(self._step())
        self.first_s = time.perf_counter() - t0
        self.times: list[float] = []

    def _step(self):
        self.state, m = self.compiled(self.state, self.x, self.y, self.lr, self.s0)
        return m.loss

    def run(self, n: int, timed: bool = True) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            float(self._step())
            if timed:
                self.times.append(time.perf_counter() - t0)

    def result(self, cfg, tokens: int, T: int) -> dict:
        med = statistics.median(self.times)
        return {"compile_s": self.compile_s, "first_step_s": self.first_s, "step_ms_median": 1000 * med,
                "step_ms_min": 1000 * min(self.times), "tok_per_s": tokens / med,
                "gflops": cfg.flops_per_token(T) * tokens / med / 1e9,
                "temp_bytes": getattr(self.mem, "temp_size_in_bytes", None),
                "argument_bytes": getattr(self.mem, "argument_size_in_bytes", None),
                "first_loss": self.first_loss}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from llmc_jax.training import mfu
    from llmc_jax.models.family import load_model

    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    if args.compile_only:
        from llmc_jax.formats import llmc_format
        from llmc_jax.models import config as cfgmod
        with user_files():        # a bad -e is a usage error, as in load_model
            cfg = (cfgmod.from_descriptor(args.init) if cfgmod.is_descriptor(args.init)
                   else llmc_format.read_model_header(args.init)[0])
        print(f"compile only: model {args.init} ({cfg.num_parameters:,} params), B={args.batch_size} "
              f"T={args.seq_len} {dtype}, jax {jax.__version__}, {device.platform}")
        results = {}
        for name in variants(args):
            r = results[name] = compile_only(name, cfg, args, dtype)
            print(f"{name:>16} | compile {r['compile_s']:.2f} s | temp {r['temp_bytes'] / 2**20:.1f} MB | "
                  f"args {r['argument_bytes'] / 2**20:.1f} MB", flush=True)
        _write_json(args, device, results)
        return 0
    cfg, params_np = load_model(args.init)
    if args.update:
        print(f"AdamW update only: device {device.platform} {device.device_kind}, jax {jax.__version__}, model "
              f"{args.init} ({cfg.num_parameters:,} params); step memory: bf16 B={args.batch_size} "
              f"T={args.seq_len} -r {args.recompute}")
        print(f"{'params':>14} | {'update ms median':>16} | {'min ms':>8} | {'step temp MB':>12} | {'step args MB':>12}")
        results = bench_update(cfg, params_np, args)
        for name, r in results.items():
            print(f"{name:>14} | {r['update_ms_median']:16.1f} | {r['update_ms_min']:8.1f} | "
                  f"{r['step_temp_bytes'] / 2**20:12.1f} | {r['step_argument_bytes'] / 2**20:12.1f}", flush=True)
        _write_json(args, device, results)
        return 0
    tokens = args.batch_size * args.seq_len
    peak = matmul_peak_gflops(tokens, cfg.C, 4 * cfg.C, jnp.dtype(dtype))
    print(f"device {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"model {args.init} ({cfg.num_parameters:,} params), B={args.batch_size} T={args.seq_len} "
          f"A={args.grad_accum} {dtype} -r {args.recompute}")
    print(f"matmul peak at ({tokens}, {cfg.C}) x ({cfg.C}, {4 * cfg.C}): {peak:.0f} GFLOP/s")
    results = {}
    header = (f"{'variant':>16} | {'compile s':>9} | {'first s':>7} | {'median ms':>9} | {'min ms':>8} | "
              f"{'tok/s':>8} | {'GFLOP/s':>7} | {'of peak':>7} | {'MFU':>6} | {'temp MB':>8} | {'args MB':>8}")
    print(header)
    runs = {name: Variant(name, cfg, params_np, args, dtype) for name in variants(args)}
    for v in runs.values():
        v.run(args.warmup, timed=False)
    rounds = max(1, min(args.steps, 5))
    for r in range(rounds):                      # take turns, a few steps each
        for v in runs.values():
            v.run(args.steps // rounds + (1 if r < args.steps % rounds else 0))
    for name, v in runs.items():
        r = results[name] = v.result(cfg, tokens * args.grad_accum, args.seq_len)
        r["matmul_peak_gflops"] = peak
        util = mfu.mfu(r["gflops"] * 1e9, 1.0, jax.device_count(), device.device_kind)
        r["mfu"] = util
        mb = lambda v: f"{v / 2**20:8.1f}" if v is not None else f"{'n/a':>8}"
        print(f"{name:>16} | {r['compile_s']:9.2f} | {r['first_step_s']:7.2f} | {r['step_ms_median']:9.1f} | "
              f"{r['step_ms_min']:8.1f} | {r['tok_per_s']:8.0f} | {r['gflops']:7.1f} | "
              f"{r['gflops'] / peak:7.1%} | {'n/a' if util is None else f'{util:.1%}':>6} | "
              f"{mb(r['temp_bytes'])} | {mb(r['argument_bytes'])}", flush=True)
    _write_json(args, device, results)
    return 0


def _write_json(args, device, results: dict) -> None:
    import jax
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
                       "config": vars(args), "variants": results}, f, indent=1)


if __name__ == "__main__":
    run_command(main, "lower -b or -t, or use -r 1/2, --dtype bfloat16")
