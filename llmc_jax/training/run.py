"""The train command's first phase: the parsed flags resolved into one frozen `Run`.

Everything a run will do is decided here, before any weights are loaded or any step compiled:
defaults that depend on the platform, the kernels, the built-in corpus, the batch geometry and
gradient accumulation, the checkpoint to resume from (verified), the model's config, the data
(every shard's header and token ids checked), the step count and the learning-rate schedule.
Every problem with the flags or the files they name is a UsageError raised here (one line, exit
2), and the parsed flags are never changed afterwards.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import socket
from typing import Any

from llmc_jax.errors import UsageError, describe
from llmc_jax.nn.kernels import Kernels


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One training run, resolved. `flags` are the parsed flags as given (read-only)."""

    flags: Any                      # a namedtuple of the parsed flags
    platform: str
    dtype: str                      # compute dtype
    kernels: Kernels
    train_data: str                 # shard glob the train loaders read (-i, or -j under -a 1)
    val_data: str
    init: str                       # the model: descriptor, .bin file, or the resumed checkpoint's model
    model: Any                      # its config (GPTConfig)
    model_table: Any                # a --config [model] table (random init), or None
    B: int
    T: int
    num_devices: int
    num_processes: int
    process_index: int
    local_ranks: tuple[int, ...]    # the device ranks whose rows this process reads
    total_batch: int
    grad_accum: int
    max_steps: int
    val_batches: int
    resume_step: int | None
    manifest: dict | None           # the verified DONE_N of resume_step
    hellaswag: tuple | None         # the eval examples of -h 1
    mesh: Any                       # the device mesh, None on one device
    fp8_matmuls: tuple[str, ...]    # --fp8-matmuls, parsed (used only under --fp8)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def param_dtype(self) -> str:
        """fp32 master weights unless a bf16 run turned them off (-w 0)."""
        return "float32" if (self.flags.master_weights or self.dtype == "float32") else "bfloat16"

    def step_config(self):
        from llmc_jax.training import train_step
        f = self.flags
        return train_step.StepConfig(model=self.model, dtype=self.dtype, kernels=self.kernels, backward=f.backward,
                                     recompute=f.recompute, grad_clip=f.grad_clip, skip_loss_z=f.skip_loss_z,
                                     skip_grad_z=f.skip_grad_z, beta1=f.beta1, beta2=f.beta2, eps=f.eps,
                                     weight_decay=f.weight_decay, fp8=f.fp8, fp8_history=f.fp8_history,
                                     fp8_margin=f.fp8_margin, fp8_matmuls=self.fp8_matmuls,
                                     param_rounding=f.param_rounding)

    def learning_rate(self, step: int) -> float:
        from llmc_jax.training import optim
        f = self.flags
        return optim.learning_rate(step, schedule=f.lr_scheduler, max_lr=f.learning_rate, warmup=f.warmup_steps,
                                   total_steps=self.max_steps, final_frac=f.final_lr_frac)


def check_flags(args: argparse.Namespace):
    """The checks that need no JAX (so they come before jax.distributed starts): -o, -y, -n, -pn/-pr.
    Returns the resolved process spec."""
    from llmc_jax.multihost import distributed
    if args.resume and not args.output_dir:
        raise UsageError("-y 1 (resume) needs the output dir with the checkpoints: add -o DIR")
    if args.checkpoint_every > 0 and not args.output_dir:
        raise UsageError("-n (checkpoint every N steps) needs an output dir: add -o DIR")
    spec = distributed.resolve_processes(args.num_processes, args.process_rank, args.coordinator)
    _check_output_dir(args)
    return spec


def resolve(args: argparse.Namespace) -> Run:
    """The Run the flags describe (jax.distributed already started)."""
    import jax

    from llmc_jax.training import parallel
    platform = jax.devices()[0].platform
    dtype, kernels, fp8_matmuls = resolve_numerics(args, platform)
    train_data, val_data = args.train_data, args.val_data
    if args.builtin_corpus:
        from llmc_jax.formats.corpus import builtin_corpus
        train_data, builtin_val = builtin_corpus()
        val_data = val_data or builtin_val
    val_data = val_data or train_data

    # -b is per device, as llm.c's per-GPU -b: D devices read B*T*D tokens per micro-step, laid out
    # as llm.c lays out D ranks (device r's rows start at k*B*T*D + r*B*T)
    B, T, D = args.batch_size, args.seq_len, jax.device_count()
    mesh = parallel.make_mesh() if D > 1 else None
    total_batch, grad_accum = batch_geometry(args, D)
    resume_step, manifest = _find_checkpoint(args) if args.resume else (None, None)
    init = args.init
    if resume_step is not None:
        from llmc_jax.training import checkpoint
        init = checkpoint.paths(args.output_dir, resume_step)["model"]
    train_pattern = val_data if args.overfit else train_data
    try:
        model = _model_config(args, init)
        from llmc_jax.formats import llmc_format
        llmc_format.check_seq_len(model, T, init)
        train_tokens, val_per_epoch = _measure_data(train_pattern, val_data, B, T, D, model.V)
        hellaswag = _load_hellaswag(args, B, T, model) if args.hellaswag else None
    except (ValueError, OSError) as e:     # files named by -e/-i/-j/--hellaswag-file (LLMCFormatError: ValueError)
        raise UsageError(describe(e)) from None
    max_steps = args.max_steps if args.max_steps > 0 else train_tokens // total_batch
    if max_steps <= 0:
        raise UsageError(f"the train data ({train_tokens} tokens) holds less than one step of "
                         f"{total_batch} tokens; lower -d/-b/-t or give more data")
    val_batches = min(val_per_epoch if args.val_batches < 0 else args.val_batches, val_per_epoch)
    run = Run(flags=_frozen(args), platform=platform, dtype=dtype, kernels=kernels, train_data=train_pattern,
              val_data=val_data, init=init, model=model, model_table=args.model_config, B=B, T=T, num_devices=D,
              num_processes=jax.process_count(), process_index=jax.process_index(),
              local_ranks=tuple(parallel.local_ranks(mesh, D)), total_batch=total_batch,
              grad_accum=grad_accum, max_steps=max_steps, val_batches=val_batches,
              resume_step=resume_step, manifest=manifest, hellaswag=hellaswag, mesh=mesh, fp8_matmuls=fp8_matmuls)
    try:
        for s in (0, max_steps - 1):
            run.learning_rate(s)
    except ValueError as e:
        raise UsageError(f"learning-rate schedule: {e} (check -k, -u against -x)") from None
    _create_output_dir(args)
    return run


def resolve_numerics(args: argparse.Namespace, platform: str) -> tuple[str, Kernels, tuple[str, ...]]:
    """(compute dtype, kernels, FP8 matmuls) of the flags on `platform` (the local one, or a plan's
    target): the platform's default dtype, the kernels resolved (cuDNN checked) with the FP8 fallback."""
    from llmc_jax.nn.kernels import default_dtype
    from llmc_jax.training import cli
    dtype = args.dtype or default_dtype(platform)
    kernels = cli.resolve_kernels(args, recompute=args.recompute, platform=platform, dtype=dtype)
    fp8_matmuls = _check_fp8(args)
    return dtype, _fp8_kernels(args, kernels, fp8_matmuls), fp8_matmuls


def batch_geometry(args: argparse.Namespace, D: int) -> tuple[int, int]:
    """(tokens per step, gradient accumulation steps) of -b, -t, -d on D devices; -d must divide."""
    tokens_per_fwdbwd = args.batch_size * args.seq_len * D
    total_batch = tokens_per_fwdbwd if args.total_batch_size == -1 else args.total_batch_size
    if total_batch <= 0 or total_batch % tokens_per_fwdbwd:
        raise UsageError(f"-d {total_batch} is not a multiple of B*T*devices = {args.batch_size}*{args.seq_len}*{D} = "
                         f"{tokens_per_fwdbwd}; pick -d as a multiple of it (or change -b/-t)")
    return total_batch, total_batch // tokens_per_fwdbwd


def _fp8_kernels(args: argparse.Namespace, kernels: Kernels, fp8_matmuls: tuple[str, ...]) -> Kernels:
    """Under --fp8 the MLP runs fp8_matmul then GELU: the fused Pallas matmul_gelu has no FP8 path, so
    the --kernels pallas family falls back to xla there (as under -r 1/2); naming it is an error."""
    if args.fp8 == "off" or kernels.matmul_gelu != "pallas" or "fc" not in fp8_matmuls:
        return kernels
    if args.matmul_gelu == "pallas":
        raise UsageError(f"--matmul-gelu pallas has no FP8 path: with --fp8 {args.fp8} the fc matmul runs in "
                         "FP8 and GELU after it; use --matmul-gelu xla (or leave it to --kernels)")
    return dataclasses.replace(kernels, matmul_gelu="xla")


def _check_fp8(args: argparse.Namespace) -> tuple[str, ...]:
    """The parsed --fp8-matmuls (both families have all four layer matmuls); --fp8 needs the
    hand-written backward (the reference models have no FP8 path)."""
    from llmc_jax.nn import fp8
    try:
        matmuls = fp8.parse_matmuls(args.fp8_matmuls)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.fp8 != "off" and args.backward != "manual":
        raise UsageError(f"--fp8 {args.fp8} needs --backward manual (the reference models have no FP8 path)")
    return matmuls


def _frozen(args: argparse.Namespace):
    fields = vars(args)
    return collections.namedtuple("Flags", fields)(**fields)


def _model_config(args: argparse.Namespace, init: str):
    """The config of the model the run starts from (its weights are read later, by start)."""
    from llmc_jax.models.family import model_config
    if args.model_config is not None and not args.resume:
        return args.model_config
    return model_config(init)


def _measure_data(train_pattern: str, val_pattern: str, B: int, T: int, D: int, V: int) -> tuple[int, int]:
    """(train tokens, val batches per epoch), every shard's header and token ids checked (once)."""
    from llmc_jax.formats.data import DataLoader
    train = DataLoader(train_pattern, B, T, 0, D, shuffle=False, vocab_size=V)
    val = DataLoader(val_pattern, B, T, 0, D, shuffle=False, vocab_size=V)
    return train.num_tokens, val.batches_per_epoch


def _load_hellaswag(args: argparse.Namespace, B: int, T: int, model) -> tuple:
    """The eval examples for -h 1, checked before any work (B >= 4, every example fits T)."""
    from llmc_jax.evals import hellaswag
    path = args.hellaswag_file
    if not os.path.exists(path):
        raise UsageError(f"-h 1: no HellaSwag file at {path}; make it with "
                         f"`python scripts/prepare_hellaswag.py -o {path}` or pass --hellaswag-file")
    return tuple(hellaswag.load(path, B, T, model.V))


def _check_output_dir(args: argparse.Namespace) -> None:
    """-o checked before any work, without creating anything (a refused run leaves no folder): an
    existing dir is probed with a file write, a missing one needs a writable nearest existing parent;
    so an unwritable dir is one line at start, not a failure at step N."""
    out_dir = args.output_dir
    if not out_dir:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir}: exists and is not a directory; give a directory for the log and checkpoints")
    if args.resume and not os.path.isdir(out_dir):
        return                         # -y 1 says there is no checkpoint there
    if not os.path.isdir(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
            raise UsageError(f"-o {out_dir}: cannot create it ({parent} is not a writable directory); "
                             "give a writable directory")
        return
    probe = os.path.join(out_dir, f".write_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"-o {out_dir}: cannot write there ({e.strerror or e}); give a writable directory") from None


def _create_output_dir(args: argparse.Namespace) -> None:
    """-o made once every check has passed."""
    if args.output_dir:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"-o {args.output_dir}: cannot create it ({e.strerror or e}); "
                             "give a writable directory") from None


def _find_checkpoint(args: argparse.Namespace) -> tuple[int, dict]:
    """The newest marked step of -o and its manifest, verified file by file before anything is
    read from it (a collective where there are several processes)."""
    from llmc_jax.training import checkpoint, checkpoint_manifest
    try:
        step = checkpoint.latest_step(args.output_dir)     # the same on every process
    except ValueError as e:
        raise UsageError(f"-y 1: {e}") from None
    if step is None:
        raise UsageError(f"-y 1: no complete checkpoint (DONE_*) in {args.output_dir}; start without -y or point -o "
                         "at the run's output dir")
    try:
        return step, checkpoint_manifest.verify(args.output_dir, step)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"-y 1: refusing checkpoint {e}") from None


def describe_run(run: Run, device: Any, jax_version: str) -> list[tuple[str, object]]:
    """The config table's rows, as llm.c prints them, plus llmc-jax's own (kernels resolved)."""
    from llmc_jax.models.family import family_of
    f, m = run.flags, run.model
    return [
        ("train data pattern", run.train_data), ("val data pattern", run.val_data),
        ("output log dir", f.output_dir or "NULL"), ("checkpoint_every", f.checkpoint_every),
        ("resume", f.resume), ("micro batch size B", run.B), ("sequence length T", run.T),
        ("total batch size", run.total_batch), ("LR scheduler", f.lr_scheduler),
        ("learning rate (LR)", f"{f.learning_rate:e}"), ("warmup iterations", f.warmup_steps),
        ("final LR fraction", f"{f.final_lr_frac:e}"), ("weight decay", f"{f.weight_decay:e}"),
        ("skip update lossz", f.skip_loss_z), ("skip update gradz", f.skip_grad_z),
        ("max_steps", run.max_steps), ("val_loss_every", f.val_every), ("val_max_steps", run.val_batches),
        ("sample_every", f.sample_every), ("genT", f.gen_tokens), ("overfit_single_batch", f.overfit),
        ("use_master_weights", f.master_weights), *_rounding_rows(run), ("recompute", f.recompute),
        ("dtype", run.dtype), ("kernels", run.kernels.describe(family_of(m).KERNEL_OPS)), ("backward", f.backward),
        *_fp8_rows(f),
        ("device", f"{device.platform} {device.device_kind} x{run.num_devices}"),
        ("jax", jax_version),
        ("model", f"{_model_source(run)} {m.describe()}"),
        ("num_parameters", f"{m.num_parameters:,}"),
        ("train_num_batches", run.max_steps), ("val_num_batches", run.val_batches),
        ("num_processes", run.num_processes), ("num_devices", run.num_devices), ("zero_stage", f.zero_stage),
        ("run hellaswag", "yes" if run.hellaswag else "no"),
    ]


def _model_source(run: Run) -> str:
    """Where the model came from: -e, the resumed checkpoint's model, or --config's [model] table."""
    source = getattr(run.flags, "model_source", None)
    return source if source and run.model_table is not None and run.resume_step is None else run.init


def _rounding_rows(run: Run) -> list[tuple[str, object]]:
    """The param-rounding row, only where params are stored in bf16 (-w 0 in a bf16 run)."""
    return [("param rounding", run.flags.param_rounding)] if run.param_dtype == "bfloat16" else []


def _fp8_rows(f: Any) -> list[tuple[str, object]]:
    """The config table's FP8 row, only for an FP8 run (an --fp8 off table stays as it was)."""
    if f.fp8 == "off":
        return []
    return [("fp8", f"{f.fp8}: {f.fp8_matmuls} (H {f.fp8_history}, margin {f.fp8_margin:g})")]
