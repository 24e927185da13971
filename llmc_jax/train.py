"""python -m llmc_jax.train: llm.c's training loop (train_gpt2.cu), step for step.

Loop order per step s (0-based), as llm.c: validation (at s % v == 0 and at the last step),
sampling (s > 0 and s % s_every == 0, and the last step), checkpoint (s > 0 and s % n == 0, and
the last step), then, unless s is the last step, one optimizer update. So -x N runs N updates
and evaluates once more after the last one. main.log gets llm.c's lines.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import NoReturn

import numpy as np

from llmc_jax import cli
from llmc_jax.errors import UsageError, describe, run_command  # UsageError: also train.UsageError, its old home


_IS_MAIN_PROCESS = True   # False on processes other than 0 of a multi-process run


def _print0(*a, **k):
    if _IS_MAIN_PROCESS:
        print(*a, **k, flush=True)


def _validate_flags(args) -> None:
    if args.resume and not args.output_dir:
        raise UsageError("-y 1 (resume) needs the output dir with the checkpoints: add -o DIR")
    if args.checkpoint_every > 0 and not args.output_dir:
        raise UsageError("-n (checkpoint every N steps) needs an output dir: add -o DIR")
    from llmc_jax import distributed
    problem = distributed.check_args(args)
    if problem:
        raise UsageError(problem)
    from llmc_jax.config import OP_CHOICES
    from llmc_jax.model import kernel_spec
    # one string naming every op's implementation; it is what the model, sampler and evals take
    args.kernels = kernel_spec(args.kernels, **{op: getattr(args, op) for op in OP_CHOICES})


def _resolve_model(args):
    """(GPTConfig, numpy params or None for a resumed run that loads them from the checkpoint)."""
    from llmc_jax import config as cfgmod, llmc_format, model
    if args.model_config is not None:
        cfg = args.model_config
        return cfg, model.init_params(cfg)
    if cfgmod.is_descriptor(args.init):
        cfg = cfgmod.from_descriptor(args.init)
        return cfg, model.init_params(cfg)
    if not os.path.exists(args.init):
        raise UsageError(f"-e {args.init}: no such file, and not a descriptor (dN, gpt2:dN, gpt3:cN, "
                         f"{', '.join(cfgmod.PRESETS)})")
    return llmc_format.read_model(args.init)


def _enable_compilation_cache(jax) -> None:
    """Persistent XLA cache under the llmc_jax cache root, so a second start skips compiling."""
    from llmc_jax.corpus import default_cache_root
    path = os.path.join(default_cache_root(), "jax_compilation_cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return                                # read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _load_hellaswag(args, B: int, T: int, cfg):
    """The eval examples for -h 1, checked before any work (B >= 4, every example fits T)."""
    from llmc_jax import hellaswag
    path = args.hellaswag_file
    if not os.path.exists(path):
        raise UsageError(f"-h 1: no HellaSwag file at {path}; make it with "
                         f"`python scripts/prepare_hellaswag.py -o {path}` or pass --hellaswag-file")
    return hellaswag.load(path, B, T, cfg.V)


def _tokenizer(cfg):
    """Something with decode(list[int]) -> str, or None where no tokenizer fits the vocabulary."""
    from llmc_jax import tokenizer
    name = "byte" if cfg.V == 256 else "gpt2"
    try:
        tok = tokenizer.get_tokenizer(name)
    except Exception as e:   # offline without the BPE files: print token ids, as llm.c does
        print(f"warning: no GPT-2 tokenizer ({type(e).__name__}); samples print token ids", file=sys.stderr)
        return None
    return tok if tok.vocab_size == cfg.V else None


def _config_table(rows: list[tuple[str, object]]) -> str:
    line = "+-----------------------+----------------------------------------------------+"
    out = [line, f"| {'Parameter':<21} | {'Value':<50} |", line]
    out += [f"| {k:<21} | {str(v):<50} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    global _IS_MAIN_PROCESS
    args = cli.parse_args(argv)
    _validate_flags(args)
    _prepare_output_dir(args)

    import jax
    from llmc_jax import distributed
    distributed.maybe_initialize(args)       # before any JAX computation
    nproc, proc = jax.process_count(), jax.process_index()
    _IS_MAIN_PROCESS = proc == 0
    import jax.numpy as jnp
    from llmc_jax import checkpoint, llmc_format, mfu, sample, train_step
    from llmc_jax.data import DataLoader

    _enable_compilation_cache(jax)
    platform = jax.devices()[0].platform
    if args.dtype is None:
        args.dtype = "float32" if platform == "cpu" else "bfloat16"
    if platform == "gpu" and args.dtype == "float32" and not args.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "highest")
    from llmc_jax.model import parse_kernel_spec
    if parse_kernel_spec(args.kernels)["attention"] == "cudnn" and (platform != "gpu" or args.dtype != "bfloat16"):
        raise UsageError("--attention cudnn needs an NVIDIA GPU and --dtype bfloat16 (cuDNN's fused attention); "
                         "use --attention xla or pallas")
    if args.builtin_corpus:
        from llmc_jax.corpus import builtin_corpus
        args.train_data, builtin_val = builtin_corpus()
        args.val_data = args.val_data or builtin_val
    if args.val_data is None:
        args.val_data = args.train_data

    # --- model, batch geometry, data: every check before any heavy work
    # -b is per device, as llm.c's per-GPU -b: D devices read B*T*D tokens per micro-step, laid out
    # as llm.c lays out D ranks (device r's rows start at k*B*T*D + r*B*T)
    B, T, D = args.batch_size, args.seq_len, jax.device_count()
    from llmc_jax import parallel
    mesh = parallel.make_mesh() if D > 1 else None
    local_ranks = _local_ranks(jax, mesh, D)    # the device ranks whose rows this process reads
    tokens_per_fwdbwd = B * T * D
    total_batch = tokens_per_fwdbwd if args.total_batch_size == -1 else args.total_batch_size
    if total_batch <= 0 or total_batch % tokens_per_fwdbwd:
        raise UsageError(f"-d {total_batch} is not a multiple of B*T*devices = {B}*{T}*{D} = "
                         f"{tokens_per_fwdbwd}; pick -d as a multiple of it (or change -b/-t)")
    grad_accum = total_batch // tokens_per_fwdbwd
    resume_step, manifest = _find_checkpoint(args) if args.resume else (None, None)
    if resume_step is not None:
        args.init = checkpoint.paths(args.output_dir, resume_step)["model"]
    try:
        cfg, params_np = _resolve_model(args)
        llmc_format.check_seq_len(cfg, T, args.init)
        train_pattern = args.val_data if args.overfit else args.train_data
        train_loaders = [DataLoader(train_pattern, B, T, r, D, shuffle=bool(args.shuffle) and not args.overfit,
                                    seed=args.seed, vocab_size=cfg.V) for r in local_ranks]
        # unshuffled: rank r's B rows of each val batch, the rows DataLoader(val, B*D, T) reads
        val_loaders = [DataLoader(args.val_data, B, T, r, D, shuffle=False, vocab_size=cfg.V)
                       for r in local_ranks]
        hellaswag_examples = _load_hellaswag(args, B, T, cfg) if args.hellaswag else None
    except (ValueError, OSError) as e:     # files named by -e/-i/-j/--hellaswag-file (LLMCFormatError: ValueError)
        raise UsageError(describe(e)) from None
    max_steps = args.max_steps if args.max_steps > 0 else train_loaders[0].num_tokens // total_batch
    if max_steps <= 0:
        raise UsageError(f"the train data ({train_loaders[0].num_tokens} tokens) holds less than one step of "
                         f"{total_batch} tokens; lower -d/-b/-t or give more data")
    val_per_epoch = val_loaders[0].batches_per_epoch
    val_batches = val_per_epoch if args.val_batches < 0 else args.val_batches
    val_batches = min(val_batches, val_per_epoch)
    try:
        for s in (0, max_steps - 1):
            _learning_rate(args, s, max_steps)
    except ValueError as e:
        raise UsageError(f"learning-rate schedule: {e} (check -k, -u against -x)") from None

    sc = train_step.StepConfig(model=cfg, dtype=args.dtype, kernels=args.kernels, backward=args.backward,
                               recompute=args.recompute, grad_clip=args.grad_clip,
                               skip_loss_z=args.skip_loss_z, skip_grad_z=args.skip_grad_z,
                               beta1=args.beta1, beta2=args.beta2, eps=args.eps, weight_decay=args.weight_decay)

    device = jax.devices()[0]
    _print0(_config_table([
        ("train data pattern", train_pattern), ("val data pattern", args.val_data),
        ("output log dir", args.output_dir or "NULL"), ("checkpoint_every", args.checkpoint_every),
        ("resume", args.resume), ("micro batch size B", B), ("sequence length T", T),
        ("total batch size", total_batch), ("LR scheduler", args.lr_scheduler),
        ("learning rate (LR)", f"{args.learning_rate:e}"), ("warmup iterations", args.warmup_steps),
        ("final LR fraction", f"{args.final_lr_frac:e}"), ("weight decay", f"{args.weight_decay:e}"),
        ("skip update lossz", args.skip_loss_z), ("skip update gradz", args.skip_grad_z),
        ("max_steps", max_steps), ("val_loss_every", args.val_every), ("val_max_steps", val_batches),
        ("sample_every", args.sample_every), ("genT", args.gen_tokens), ("overfit_single_batch", args.overfit),
        ("use_master_weights", args.master_weights), ("recompute", args.recompute),
        ("dtype", args.dtype), ("kernels", args.kernels), ("backward", args.backward),
        ("device", f"{device.platform} {device.device_kind} x{jax.device_count()}"),
        ("jax", jax.__version__),
        ("model", f"{args.init} L={cfg.L} NH={cfg.NH} C={cfg.C} maxT={cfg.maxT} V={cfg.V} Vp={cfg.Vp}"),
        ("num_parameters", f"{cfg.num_parameters:,}"),
        ("train_num_batches", max_steps), ("val_num_batches", val_batches),
        ("num_processes", nproc), ("num_devices", D), ("zero_stage", args.zero_stage),
        ("run hellaswag", "yes" if hellaswag_examples else "no"),
    ]))
    _print0(f"batch_size B={B} * seq_len T={T} * num_devices={D} and total_batch_size={total_batch}")
    _print0(f"=> setting grad_accum_steps={grad_accum}")
    if nproc > 1 and args.sample_every > 0:
        _print0(f"note: {nproc} processes: every process gathers the params to sample (-s); "
                "only process 0 prints")

    # --- state: fresh, or restored exactly from the newest complete checkpoint
    pdtype = jnp.float32 if (args.master_weights or args.dtype == "float32") else jnp.bfloat16
    params = {k: jnp.asarray(v, pdtype) for k, v in params_np.items()}
    del params_np
    state = train_step.init_train_state(params, sc)
    shardings = parallel.make_shardings(state, mesh, args.zero_stage) if D > 1 else None
    start_step = 0
    if resume_step is not None:
        state, note = _resume_state(args, manifest, state, shardings, cfg, max_steps,
                                    train_loaders, val_loaders, local_ranks, D)
        if note:
            _print0(note)
        start_step = resume_step
        _print0(f"resumed from step {resume_step} of {args.output_dir}")
    if shardings is not None:
        state = parallel.shard_state(state, shardings)
    log = _open_log(args, resume_step) if args.output_dir and proc == 0 else None
    last_good = resume_step     # the newest checkpoint this run can name as its resume point

    step_fn = train_step.make_train_step(sc, shardings)
    eval_fn = train_step.make_eval_step(sc)
    tokenizer = _tokenizer(cfg)
    # the tokenizer's EOT; a model with another vocabulary starts from its last token instead
    eot = tokenizer.eot if tokenizer else min(50256, cfg.V - 1)
    flops_per_step = cfg.flops_per_token(T) * total_batch
    ema_tok_s, total_time, timed_steps = 0.0, 0.0, 0

    for step in range(start_step, max_steps + 1):
        last = step == max_steps
        resumed_here = step == resume_step     # its val and sample happened before its checkpoint
        if args.val_every > 0 and (step % args.val_every == 0 or last) and not resumed_here:
            for loader in val_loaders:
                loader.reset()
            val_loss = 0.0
            for _ in range(val_batches):
                x, y = (a[0] for a in _next_batches(val_loaders, 1))     # (B*D, T), ranks in order
                if nproc > 1:     # (B*D, T) global array; this process gives its ranks' rows
                    x, y = _global_rows(jax, x, mesh, D), _global_rows(jax, y, mesh, D)
                val_loss += float(eval_fn(state.params, x, y))
            val_loss /= max(val_batches, 1)
            _print0(f"val loss {val_loss:.6f}")
            _write_log(log, f"s:{step} tel:{val_loss:.4f}", step)
        if (hellaswag_examples and args.val_every > 0 and ((step > 0 and step % args.val_every == 0) or last)
                and not resumed_here):
            from llmc_jax import hellaswag
            correct, total = hellaswag.score(distributed.gather_params(state.params), cfg, hellaswag_examples, B=B, T=T,
                                             dtype=args.dtype, kernels=args.kernels)
            _print0(f"HellaSwag: {correct}/{total} = {correct / total:f}")
            _write_log(log, f"s:{step} eval:{correct / total:.4f}", step)
        if (args.sample_every > 0 and ((step > 0 and step % args.sample_every == 0) or last)
                and not resumed_here):
            toks = sample.generate(distributed.gather_params(state.params), cfg, args.gen_tokens, eot, dtype=jnp.dtype(args.dtype),
                                   kernels=args.kernels)
            text = tokenizer.decode(toks[1:]) if tokenizer else " ".join(map(str, toks[1:]))
            _print0(f"generating:\n---\n{text}\n---")
        if _checkpoint_due(args, step, last) and not resumed_here:
            _save_checkpoint(args, step, cfg, state,
                             {r: loader.state_dict() for r, loader in zip(local_ranks, train_loaders)},
                             _data_record(train_loaders, val_loaders), last_good, D, nproc)
            last_good = step
        if last:
            break

        t0 = time.perf_counter()
        if args.overfit:
            for loader in train_loaders:
                loader.reset()
        x, y = _next_batches(train_loaders, grad_accum)
        if nproc > 1:
            x, y = _global_rows(jax, x, mesh, D, axis=1), _global_rows(jax, y, mesh, D, axis=1)
        elif shardings is not None:
            x, y = parallel.shard_batch(x, shardings), parallel.shard_batch(y, shardings)
        lr = _learning_rate(args, step, max_steps)
        state, metrics = step_fn(state, x, y, np.float32(lr), np.int32(step))
        loss, norm, lz, nz, skipped, finite = (float(metrics.loss), float(metrics.norm), float(metrics.loss_z),
                                               float(metrics.norm_z), bool(metrics.skipped), bool(metrics.finite))
        dt = time.perf_counter() - t0
        tok_s = total_batch / dt
        if step > start_step:
            total_time += dt
            timed_steps += 1
            ema_tok_s = 0.95 * ema_tok_s + 0.05 * tok_s
            tok_s = ema_tok_s / (1 - 0.95 ** timed_steps)
        util = mfu.mfu(flops_per_step, dt, jax.device_count(), device.device_kind)
        util_s = f"{100 * util:.1f}% bf16 MFU" if util is not None else "n/a MFU"
        if skipped:
            _print0(f"skipping update due to loss z-score of {lz:.2f} / grad z-score of {nz:.2f}")
        _print0(f"step {step + 1:4d}/{max_steps} | loss {loss:7.6f} ({lz:+.2f}z)| norm {norm:6.4f} "
                f"({nz:+.2f}z)| lr {lr:.2e} | {1000 * dt:.2f} ms | {util_s} | {tok_s:.0f} tok/s")
        _write_log(log, f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}", step)
        _step_is_finite(finite, step + 1, loss, norm, last_good)     # numbered as the line above

    if timed_steps:
        _print0(f"total average iteration time: {1000 * total_time / timed_steps:f} ms")
    if log:
        log.close()
    return 0


def _local_ranks(jax, mesh, D: int) -> list[int]:
    """The data ranks (positions on the mesh's data axis) of this process's devices, in order.

    One process: all of 0..D-1. Several: they must be contiguous, as
    jax.make_array_from_process_local_data lays a process's rows out on one contiguous block."""
    if jax.process_count() == 1:
        return list(range(D))
    me = jax.process_index()
    ranks = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not ranks or ranks != list(range(ranks[0], ranks[0] + len(ranks))):
        raise RuntimeError(f"process {me}: its devices sit at data ranks {ranks} of the mesh, "
                           "not one contiguous block")
    return ranks


def _global_rows(jax, local, mesh, D: int, axis: int = 0):
    """The global array whose rows (along `axis`) this process holds part of: `local` are the rows
    of this process's ranks, in rank order; the global batch has D/len(ranks) times as many."""
    from llmc_jax import parallel
    spec = parallel.batch_sharding(mesh) if axis == 1 else parallel.NamedSharding(mesh, parallel.P(parallel.DATA_AXIS))
    shape = list(np.shape(local))
    shape[axis] = shape[axis] * D // jax.local_device_count()
    return jax.make_array_from_process_local_data(spec, local, tuple(shape))


def _next_batches(loaders, grad_accum: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B*D, T) inputs and targets: per micro-step, each device rank's B rows in rank order."""
    xs, ys = [], []
    for _ in range(grad_accum):
        rows = [loader.next_batch() for loader in loaders]
        xs.append(np.concatenate([r[0] for r in rows]))
        ys.append(np.concatenate([r[1] for r in rows]))
    return np.stack(xs), np.stack(ys)


def _stop(message: str) -> NoReturn:
    """End a run that failed while running: one `error:` line (process 0) and exit status 1."""
    raise SystemExit(f"error: {message}" if _IS_MAIN_PROCESS else 1)


def _prepare_output_dir(args) -> None:
    """-o checked before any work: created if missing (not for -y 1, which needs it to exist) and
    probed with a file write, so an unwritable dir is one line at start, not a failure at step N."""
    out_dir = args.output_dir
    if not out_dir:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir}: exists and is not a directory; give a directory for the log and checkpoints")
    if args.resume and not os.path.isdir(out_dir):
        return                         # -y 1 says there is no checkpoint there
    probe = os.path.join(out_dir, f".write_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"-o {out_dir}: cannot write there ({e.strerror or e}); give a writable directory") from None


def _find_checkpoint(args) -> tuple[int, dict]:
    """The newest marked step of -o and its manifest, verified file by file before anything is
    read from it (a collective where there are several processes)."""
    from llmc_jax import checkpoint
    try:
        step = checkpoint.latest_step(args.output_dir)     # the same on every process
    except ValueError as e:
        raise UsageError(f"-y 1: {e}") from None
    if step is None:
        raise UsageError(f"-y 1: no complete checkpoint (DONE_*) in {args.output_dir}; start without -y or point -o "
                         "at the run's output dir")
    try:
        return step, checkpoint.verify(args.output_dir, step)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"-y 1: refusing checkpoint {e}") from None


def _data_record(train_loaders, val_loaders) -> dict:
    """Path and size of every shard the run reads, as the checkpoint manifest records them."""
    from llmc_jax import checkpoint
    return {"train": checkpoint.data_files(train_loaders[0].shard_paths),
            "val": checkpoint.data_files(val_loaders[0].shard_paths)}


def _resume_state(args, manifest: dict, state, shardings, cfg, max_steps: int,
                  train_loaders, val_loaders, local_ranks: list[int], D: int):
    """The checkpoint's train state, with this run's -x, model, data and loaders checked against it
    first; (state, note about another device count or None). Every refusal is one UsageError line."""
    from llmc_jax import checkpoint
    step, out_dir = manifest["step"], args.output_dir
    if max_steps <= step:
        raise UsageError(f"-y 1: the checkpoint in {out_dir} is already at step {step}, and this run ends at "
                         f"step {max_steps} (-x); give -x above {step} to train on from it")
    where = f"-y 1: cannot resume from step {step} of {out_dir}"
    try:
        checkpoint.check_run(manifest, cfg, _data_record(train_loaders, val_loaders))
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{where}: {e}") from None
    try:     # loader states first (cheap checks), then the state straight onto this run's shardings
        loader_states, note = checkpoint.loader_states(checkpoint.load_meta(out_dir, step), local_ranks, D)
        for loader, loader_state in zip(train_loaders, loader_states):
            loader.load_state_dict(loader_state)
    except ValueError as e:        # another batch geometry or data than the checkpoint's
        raise UsageError(f"{where}: {e}; resume with the flags of the run that wrote it") from None
    try:
        state = checkpoint.load_state(out_dir, step, state, shardings.state if shardings is not None else None)
        checkpoint.check_restored(manifest, state, out_dir)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{where}: {e}") from None
    return state, note


def _open_log(args, resume_step: int | None):
    """main.log of -o, opened for appending after a resume (cut back to the checkpoint), else anew."""
    log_path = os.path.join(args.output_dir, "main.log")
    dropped = _truncate_log(log_path, resume_step) if resume_step is not None else 0
    if dropped:
        _print0(f"note: dropped {dropped} malformed line(s) from {log_path} (not s:STEP ...)")
    try:
        return open(log_path, "a" if resume_step is not None else "w")
    except OSError as e:
        raise UsageError(f"cannot write {log_path}: {e.strerror or e}") from None


def _write_log(log, line: str, step: int) -> None:
    """One main.log line, flushed; a write error ends the run with one line naming the file."""
    if log is None:
        return
    try:
        log.write(line + "\n")
        log.flush()
    except OSError as e:
        with contextlib.suppress(OSError):
            log.close()          # else closing it at exit tries the write again, and reports that
        _stop(f"cannot write {log.name} at step {step}: {e.strerror or e}")


def _save_checkpoint(args, step: int, cfg, state, loaders_by_rank: dict, data: dict,
                     last_good: int | None, D: int, nproc: int) -> None:
    """Write (and prune after) the checkpoint of `step`; a NaN/Inf state or a failed write ends the
    run (exit 1) with one line, leaving `last_good` the newest resumable checkpoint."""
    from llmc_jax import checkpoint
    meta = {"step": step, "num_devices": D, "num_processes": nproc, "args": _jsonable(vars(args))}
    keep = _resume_point(last_good)
    try:
        checkpoint.save(args.output_dir, step, cfg, state, loaders_by_rank, meta,
                        model_version=3 if args.dtype == "float32" else 5, data=data)
    except checkpoint.NonFiniteStateError as e:
        _stop(f"{e}; not writing a checkpoint of it; {keep} (lower -l, or check the data)")
    except OSError as e:                 # CheckpointWriteError
        _stop(f"cannot write checkpoint step {step} to {args.output_dir}: {e.strerror or e}; {keep}")
    _print0(f"checkpoint step {step} -> {checkpoint.paths(args.output_dir, step)['model']} "
            f"(with state, meta and DONE_{step:08d}: resume with -y 1)")
    try:
        checkpoint.prune(args.output_dir, step, args.checkpoint_every, args.checkpoint_keep,
                         args.checkpoint_major)
    except OSError as e:
        _stop(f"checkpoint step {step} was written to {args.output_dir} (the resume point), but deleting "
              f"an older one (-nk) failed: {e.strerror or e}")


def _checkpoint_due(args, step: int, last: bool) -> bool:
    """With -o: at the last step unless -n -1 (llm.c's -n 0 writes none; here the final model is
    never lost), and every -n steps when -n > 0."""
    every = args.checkpoint_every
    if not args.output_dir or every < 0:
        return False
    return last or (every > 0 and step > 0 and step % every == 0)


def _resume_point(last_good: int | None) -> str:
    if last_good is None:
        return "no checkpoint of this run was written before it"
    return f"the last good checkpoint (step {last_good}) stays the resume point"


def _step_is_finite(finite: bool, step: int, loss: float, norm: float, last_good: int | None) -> None:
    """Stop at the first step whose loss or grad norm is NaN/Inf, before a checkpoint could hold it."""
    if finite:
        return
    keep = _resume_point(last_good)
    _stop(f"step {step}: loss/grad norm is not finite (loss {loss}, grad norm {norm}); stopping; {keep} "
          "(lower -l, or check the data and model)")


def _log_step(line: str) -> int | None:
    """The step of a main.log line ("s:N ..."); None for a line that is not one (malformed or foreign)."""
    head = line.split(maxsplit=1)[0] if line.strip() else ""
    if not head.startswith("s:") or not head[2:].isdigit():
        return None
    return int(head[2:])


def _truncate_log(path: str, resume_step: int) -> int:
    """Keep what the run had logged up to its checkpoint at `resume_step`: every line of earlier
    steps and the eval lines of that step (logged before the checkpoint was written); a run that
    went on past its last checkpoint before it died leaves no duplicate lines behind. Malformed
    lines (a run killed mid-write, an edit) are dropped and counted (the return value); an
    unreadable log is one UsageError line."""
    if not os.path.exists(path):
        return 0
    try:
        with open(path, errors="surrogateescape") as f:
            lines = f.read().splitlines()
        steps = [_log_step(line) for line in lines]
        kept = [line + "\n" for line, s in zip(lines, steps)
                if s is not None and (s < resume_step or (s == resume_step and "trl:" not in line))]
        with open(path + ".tmp", "w", errors="surrogateescape") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise UsageError(f"-y 1: cannot rewrite {path} up to step {resume_step} ({e.strerror or e}); "
                         "move it away to resume with a new log") from None
    return sum(1 for line, s in zip(lines, steps) if s is None and line.strip())


def _learning_rate(args, step: int, max_steps: int) -> float:
    from llmc_jax import optim
    return optim.learning_rate(step, schedule=args.lr_scheduler, max_lr=args.learning_rate,
                               warmup=args.warmup_steps, total_steps=max_steps, final_frac=args.final_lr_frac)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}


OOM_HINT = ("lower -b (micro-batch; -d keeps the total batch by accumulating) or -t, or use -r 1/2 "
            "(recompute), -z 1..3 (ZeRO, several devices), --dtype bfloat16")

if __name__ == "__main__":
    from llmc_jax.launch import watch_launcher
    watch_launcher()             # started by python -m llmc_jax.launch: stop when it dies
    run_command(main, OOM_HINT)
