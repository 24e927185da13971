"""`python -m llmc_jax.train <train flags> --target h100x8 --compile-only`: the step that run would
execute, compiled for GPUs that are not here, and what it needs of each one.

Nothing real is touched: the weights are abstract shapes (a model of any size plans on a small
machine), no data is read and nothing is written but the report (--compile-report). The train
step (with its mesh, -z stage, kernels, -r, dtype, FP8, gradient accumulation) and the validation
step are compiled by XLA's GPU compiler from the target's spec; their memory is XLA's buffer
assignment, their collectives and kernels are read from the optimized HLO (hlo_stats).
Exit status: 0 fits, 1 does not fit (or does not compile), 2 usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any

from llmc_jax.errors import UsageError, describe
from llmc_jax.planning import hlo_stats, llmc_alloc
from llmc_jax.planning.targets import GPU_MEMORY_FRACTION, Target, parse_target, prepare_jax, topology_mesh

GiB = 1024 ** 3


@dataclasses.dataclass
class Compiled:
    """One compiled program's memory (XLA's buffer assignment, bytes per GPU) and HLO."""

    seconds: float
    argument: int
    output: int
    alias: int
    temp: int
    hlo: str

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to a donated argument + temporaries."""
        return self.argument + self.output - self.alias + self.temp


def main(args: argparse.Namespace) -> int:
    """The planning branch of the train command (train.main hands over when --target is given)."""
    if not args.target:
        raise UsageError("--compile-only, --compile-report and --find-batch need --target GPU[xN[xH]] "
                         "(e.g. --target h100x8): the GPUs to plan for")
    target = parse_target(args.target, args.target_config)
    prepare_jax()
    mesh = topology_mesh(target)
    if args.find_batch:
        best = find_batch(args, target, mesh)
        if best == 0:
            print(f"find-batch: not even -b 1 fits one {target.description} at these flags")
            return 1
        print(f"find-batch: the largest -b that fits is {best} (at -t {args.seq_len}, {target.name})")
        args = _with_batch(args, best)
    report = plan(args, target, mesh)
    print(format_report(report))
    if args.compile_report:
        _write_json(args.compile_report, report)
    return 0 if report["fits"] else 1


def resolve(args: argparse.Namespace, target: Target, mesh) -> Any:
    """The Run the flags describe on the target: the GPU's defaults, no data, no weights."""
    from llmc_jax.formats import llmc_format
    from llmc_jax.training import run as run_mod
    dtype, kernels, fp8_matmuls = run_mod.resolve_numerics(args, "gpu")
    try:
        model = run_mod._model_config(args, args.init)
        llmc_format.check_seq_len(model, args.seq_len, args.init)
    except (ValueError, OSError) as e:
        raise UsageError(describe(e)) from None
    D = target.devices
    total_batch, grad_accum = run_mod.batch_geometry(args, D)
    not_read = "(not read: planning)"
    return run_mod.Run(
        flags=run_mod._frozen(args), platform="gpu", dtype=dtype, kernels=kernels,
        train_data=args.train_data or not_read, val_data=args.val_data or not_read, init=args.init, model=model,
        model_table=args.model_config, B=args.batch_size, T=args.seq_len, num_devices=D,
        num_processes=target.hosts, process_index=0, local_ranks=tuple(range(D)), total_batch=total_batch,
        grad_accum=grad_accum, max_steps=max(args.max_steps, 1), val_batches=1, resume_step=None, manifest=None,
        hellaswag=None, mesh=mesh if D > 1 else None, fp8_matmuls=fp8_matmuls)


def abstract_state(run, mesh):
    """(state of ShapeDtypeStructs placed on the mesh, parallel.Shardings or None on one GPU)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmc_jax.models.family import family_of
    from llmc_jax.training import parallel, train_step
    sc = run.step_config()
    shapes = {k: jax.ShapeDtypeStruct(s, run.param_dtype) for k, s in run.model.param_shapes().items()}
    state = jax.eval_shape(lambda p: train_step.init_train_state(p, sc), shapes)
    if run.mesh is None:
        shardings, state_sh = None, jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    else:
        shardings = parallel.make_shardings(state, run.mesh, run.flags.zero_stage, family_of(run.model).LAYER_PARAMS,
                                             run.dtype)
        state_sh = shardings.state
    placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh)
    return placed, shardings


def compile_train_step(run, mesh, state, shardings, xla_options: dict | None = None) -> Compiled:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmc_jax.training import parallel, train_step
    batch_sh = NamedSharding(mesh, P()) if shardings is None else parallel.batch_sharding(mesh)
    rep = NamedSharding(mesh, P())
    xy = jax.ShapeDtypeStruct((run.grad_accum, run.B * run.num_devices, run.T), jnp.int32, sharding=batch_sh)
    step = train_step.make_train_step(run.step_config(), shardings, deterministic=True)
    return _compile(step, state, xy, xy, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), xla_options=xla_options)


def compile_eval_step(run, mesh, state, shardings) -> Compiled:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmc_jax.training import train_step
    from llmc_jax.training.parallel import DATA_AXIS
    spec = P() if run.mesh is None else P(DATA_AXIS)
    xy = jax.ShapeDtypeStruct((run.B * run.num_devices, run.T), jnp.int32, sharding=NamedSharding(mesh, spec))
    fn = train_step.make_eval_step(run.step_config(), deterministic=True, shardings=shardings)
    return _compile(fn, state.params, xy, xy, state.fp8)


def compile_for_gpu(jitted, *args, xla_options: dict | None = None):
    """`jitted` (a jax.jit function) traced as for a GPU (Pallas through Triton, cuDNN allowed) and
    compiled by XLA's GPU compiler for the GPU the args' shardings place it on (`xla_options` are
    added to the jit's compiler options)."""
    from pallas_kernels.common import compiling_for
    with compiling_for("gpu"):
        traced = jitted.trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).compile(xla_options)


def _compile(fn, *args, xla_options: dict | None = None) -> Compiled:
    t0 = time.perf_counter()
    try:
        compiled = compile_for_gpu(fn, *args, xla_options=xla_options)
    except Exception as e:      # e.g. a Pallas kernel over the SM's shared memory
        raise SystemExit(f"error: XLA could not compile the step for the target: {describe(e, 400)}") from None
    m = compiled.memory_analysis()
    return Compiled(time.perf_counter() - t0, m.argument_size_in_bytes, m.output_size_in_bytes,
                    m.alias_size_in_bytes, m.temp_size_in_bytes, compiled.as_text())


def _device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of placed ShapeDtypeStructs."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def plan(args: argparse.Namespace, target: Target, mesh, *, eval_step: bool = True,
         fp8_cublas: bool = True) -> dict:
    """Compile the run's steps for the target and report what one GPU must hold (the validation
    step too with eval_step; under --fp8 with fp8_cublas, the train step again with cuBLAS GEMMs)."""
    run = resolve(args, target, mesh)
    state, shardings = abstract_state(run, mesh)
    train = compile_train_step(run, mesh, state, shardings)
    evaluation = compile_eval_step(run, mesh, state, shardings) if eval_step else None
    report = build_report(run, target, state, shardings, train, evaluation)
    if fp8_cublas and run.flags.fp8 != "off":
        report["fp8_gemms"] = fp8_gemms(run, mesh, state, shardings, report["kernels"])
    return report


# XLA's GEMMs as cuBLAS/cuBLASLt calls, as its autotuner may pick them on a GPU (deviceless, with no
# autotuning, every dot stays a Triton fusion)
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def fp8_gemms(run, mesh, state, shardings, kernels: dict) -> dict:
    """The step's FP8 GEMMs as compiled (Triton) and with cuBLAS GEMMs, beside the 3 per FP8 matmul
    per layer per micro-batch (forward, dX, dW) the flags ask for. The second count shows XLA's
    GEMM rewriter finds cuBLASLt's FP8 pattern (scaled FP8 operands) in ours."""
    cublas = compile_train_step(run, mesh, state, shardings, CUBLAS_GEMMS)
    as_cublas = hlo_stats.analyze(cublas.hlo, run.num_devices)["kernels"]
    return {"matmuls": list(run.fp8_matmuls), "expected": 3 * run.model.L * len(run.fp8_matmuls) * run.grad_accum,
            "compiled": fp8_gemm_count(kernels), "cublaslt_fp8": as_cublas.get(hlo_stats.CUBLASLT_FP8, 0),
            "compile_seconds": round(cublas.seconds, 2)}


def fp8_gemm_count(kernels: dict) -> int:
    """The FP8 GEMMs among a report's kernels (Triton fusions or cuBLASLt calls)."""
    return sum(n for name, n in kernels.items() if "FP8" in name)


def plan_flags(flags: list[str], target_name: str, *, eval_step: bool = True, fp8_cublas: bool = True) -> dict:
    """plan() of train flags as given on the command line, for `target_name` (h100x8, ...)."""
    from llmc_jax.training import cli
    prepare_jax()
    target = parse_target(target_name)
    return plan(cli.parse_args(flags), target, topology_mesh(target), eval_step=eval_step, fp8_cublas=fp8_cublas)


def build_report(run, target: Target, state, shardings, train: Compiled, evaluation: Compiled | None) -> dict:
    params, opt, whole = _device_bytes(state.params), _device_bytes(state.opt_state), _device_bytes(state)
    grads = _grad_bytes(state, shardings)
    copy, local_grads = _compute_copy_bytes(run, state, shardings)
    within = grads + copy + local_grads
    # validation runs while the whole train state stays resident: state + its batch + its temporaries
    eval_peak = 0 if evaluation is None else (whole + evaluation.argument - params - _device_bytes(state.fp8)
                                              + evaluation.output + evaluation.temp)
    per_device = max(train.peak, eval_peak)
    stats = hlo_stats.analyze(train.hlo, target.devices)
    breakdown = {"parameters": params, "optimizer state": opt, "detectors, FP8 metas": whole - params - opt,
                 "batch (x, y), lr, step": train.argument - whole,
                 "gradients (reduced, fp32, within temporaries)": min(grads, train.temp),
                 f"params' {run.dtype} copy (within temporaries)": copy,
                 f"unreduced gradients, {run.dtype} (within temporaries)": local_grads,
                 ACTIVATIONS: max(train.temp - within, 0),
                 "outputs not donated": train.output - train.alias, "train step": train.peak,
                 "validation step": eval_peak}
    from llmc_jax.models.config import GPTConfig
    from llmc_jax.models.family import family_of
    m = run.model
    report = {
        "target": target.name, "gpu": target.description, "devices": target.devices, "hosts": target.hosts,
        "model": f"{run.init} {m.describe()}", "num_parameters": m.num_parameters,
        "flags": {"B": run.B, "T": run.T, "grad_accum": run.grad_accum, "zero_stage": run.flags.zero_stage,
                  "recompute": run.flags.recompute, "dtype": run.dtype, "param_dtype": run.param_dtype,
                  "kernels": run.kernels.describe(family_of(m).KERNEL_OPS), "fp8": run.flags.fp8},
        "per_device_bytes": per_device, "capacity_bytes": target.capacity_bytes,
        "memory_bytes": target.memory_bytes, "fits": per_device <= target.capacity_bytes, "breakdown": breakdown,
        "collectives": stats["collectives"], "kernels": stats["kernels"],
        "determinism": {"xla_gpu_exclude_nondeterministic_ops": True, "scatters": stats["scatters"],
                        "sorts": stats["sorts"]},
        "compile_seconds": {"train": round(train.seconds, 2),
                            "validation": None if evaluation is None else round(evaluation.seconds, 2)},
    }
    if isinstance(m, GPTConfig):        # llm.c's train_gpt2.cu: GPT-2 only
        report["llmc"] = llmc_alloc.allocation(m, run.B, run.T, run.flags.recompute, target.devices,
                                               run.flags.zero_stage, bool(run.flags.master_weights))
    return report


ACTIVATIONS = "activations, scratch (temporaries - the above)"


def _compute_copy_bytes(run, state, shardings) -> tuple[int, int]:
    """(the forward's compute-dtype copy of master weights of another dtype, the gradients each GPU
    computes before they are reduced): both whole on every GPU below -z 3 (llm.c's bf16 params and
    grads); at -z 3 a layer at a time (not counted)."""
    import jax
    import numpy as np
    if shardings is not None and shardings.zero_stage >= 3:
        return 0, 0
    itemsize = np.dtype(run.dtype).itemsize
    leaves = jax.tree.leaves(state.params)
    whole = sum(math.prod(x.shape) for x in leaves) * itemsize
    copy = sum(math.prod(x.shape) for x in leaves if np.dtype(x.dtype) != np.dtype(run.dtype)) * itemsize
    # one device in fp32: the gradients it computes are the fp32 ones counted as reduced
    local = whole if shardings is not None or itemsize != 4 else 0
    return copy, local


def _grad_bytes(state, shardings) -> int:
    """The reduced fp32 gradients one device holds: sharded like the AdamW state from -z 1 on (each
    device's own gradients, in the compute dtype, are reduce-scattered into them), whole at -z 0."""
    import jax
    leaves = jax.tree.leaves(state.params)
    if shardings is None:
        return sum(math.prod(x.shape) * 4 for x in leaves)
    return sum(math.prod(sh.shard_shape(x.shape)) * 4 for x, sh in zip(leaves, jax.tree.leaves(shardings.grads)))


def find_batch(args: argparse.Namespace, target: Target, mesh) -> int:
    """The largest -b (no accumulation) whose train step fits: doubling, then bisection."""
    def fits(b: int) -> bool:
        ok = plan(_with_batch(args, b), target, mesh, eval_step=False, fp8_cublas=False)["fits"]
        print(f"find-batch: -b {b} {'fits' if ok else 'does not fit'}", flush=True)
        return ok
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _with_batch(args: argparse.Namespace, B: int) -> argparse.Namespace:
    """The flags with -b B and no accumulation (-d B*T*devices), as --find-batch tries them."""
    return argparse.Namespace(**{**vars(args), "batch_size": B, "total_batch_size": -1})


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def format_report(r: dict) -> str:
    f = r["flags"]
    lines = [f"plan: {r['model']}, {r['num_parameters']:,} parameters",
             f"      on {r['target']}: {r['devices']} x {r['gpu']} ({r['hosts']} host{'s' * (r['hosts'] > 1)})",
             f"      -b {f['B']} -t {f['T']} (grad accum {f['grad_accum']}) -z {f['zero_stage']} -r {f['recompute']} "
             f"{f['dtype']} (params {f['param_dtype']}) kernels {f['kernels']}"
             + (f" fp8 {f['fp8']}" if f["fp8"] != "off" else "")]
    llmc = r.get("llmc")
    head = f"{'per GPU':<56}{'llmc-jax':>13}" + (f"{'llm.c':>13}" if llmc else "")
    lines += ["", head, "-" * len(head)]
    for name, n in r["breakdown"].items():
        lines.append(f"{name:<56}{_gib(n)}")
    total = f"{'total (the larger step, with the state)':<56}{_gib(r['per_device_bytes'])}"
    if llmc:
        lines += [f"{'  llm.c ' + k:<56}{'':>13}{_gib(v)}" for k, v in llmc.items() if k != "total"]
        total += f"{_gib(llmc['total'])}   ({r['per_device_bytes'] / llmc['total']:.2f}x llm.c)"
    capacity = f"capacity ({GPU_MEMORY_FRACTION:.0%} of {r['memory_bytes'] / GiB:.1f} GiB)"
    lines += [total, f"{capacity:<56}{_gib(r['capacity_bytes'])}", ""]
    headroom = r["capacity_bytes"] - r["per_device_bytes"]
    lines.append(f"fits: {r['per_device_bytes'] / GiB:.2f} GiB of {r['capacity_bytes'] / GiB:.2f} GiB, "
                 f"{headroom / GiB:.2f} GiB headroom" if r["fits"] else
                 f"does not fit: needs {r['per_device_bytes'] / GiB:.2f} GiB per GPU, {-headroom / GiB:.2f} GiB over "
                 f"the {r['capacity_bytes'] / GiB:.2f} GiB of one {r['gpu']}; lower -b (-d keeps the total batch), "
                 "or use -r 1/2, -z 1..3, more GPUs (--find-batch finds the largest -b)")
    coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / GiB:.2f} GiB)" for k, v in r["collectives"].items())
    lines.append(f"collectives per step: {coll or 'none'}")
    lines.append("kernels per step: " + (", ".join(f"{k} {v}" for k, v in r["kernels"].items()) or "none"))
    d = r["determinism"]
    lines.append(f"determinism: compiled with xla_gpu_exclude_nondeterministic_ops ({d['scatters']} scatter-adds, "
                 f"{d['sorts']} sorts)")
    if "fp8_gemms" in r:
        g = r["fp8_gemms"]
        lines.append(f"FP8 GEMMs: {g['compiled']} for the {g['expected']} of --fp8-matmuls {','.join(g['matmuls'])} "
                     f"(forward, dX, dW per layer); with cuBLAS GEMMs (Triton GEMMs off, as XLA's autotuner may "
                     f"pick on a GPU): {g['cublaslt_fp8']} cuBLASLt FP8 GEMMs ({g['compile_seconds']:.1f} s)")
    c = r["compile_seconds"]
    lines.append(f"compile: train step {c['train']:.1f} s" + ("" if c["validation"] is None else
                                                              f", validation step {c['validation']:.1f} s"))
    return "\n".join(lines)


def _write_json(path: str, report: dict) -> None:
    import numpy as np

    from llmc_jax.formats.llmc_format import atomic_write
    data = np.frombuffer(json.dumps(report, indent=1).encode(), np.uint8)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, [data])
    except OSError as e:
        raise UsageError(f"--compile-report {path}: cannot write it ({e.strerror or e})") from None
