"""The train command's flags: llm.c's short flags with llm.c's meanings and defaults, each also a
long option, plus llmc-jax's own; a TOML file (--config) whose keys are the long names supplies
defaults that the command line overrides."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

from llmc_jax.models import config as cfgmod
from llmc_jax.nn import kernels
from llmc_jax.errors import ArgumentParser, UsageError, user_files

# (short, long, type, default, help). A default of None is resolved later: for the built-in
# corpus run (no -i) to a small model that trains in minutes on a CPU, otherwise to llm.c's default.
FLAGS: list[tuple[str | None, str, type, object, str]] = [
    ("-i", "--train-data", str, None, "train shard glob (llm.c format); default: the built-in corpus"),
    ("-j", "--val-data", str, None, "val shard glob; default: the built-in corpus' val split"),
    ("-e", "--init", str, None, "model: llm.c .bin file, Hugging Face directory or descriptor (d12, gpt2:d24, "
                                "gpt3:c768, tiny, small, llama3:tiny, llama3:small, llama3.2:1B, ...); "
                                "default d12 (with -i) or small (built-in corpus)"),
    ("-o", "--output-dir", str, None, "output dir for main.log and checkpoints (default: none; "
                                      "out/builtin for the built-in corpus run)"),
    ("-n", "--checkpoint-every", int, 0, "with -o, a checkpoint every N steps and at the end; 0 (default) = at the end only (llm.c: never), -1 = never"),
    ("-nk", "--checkpoint-keep", int, 0, "keep only the last N checkpoints (0 = all)"),
    ("-nm", "--checkpoint-major", int, 0, "checkpoints at multiples of N are never deleted"),
    ("-y", "--resume", int, 0, "1 = resume from the newest complete checkpoint in -o"),
    ("-b", "--batch-size", int, None, "micro-batch size B per device (default 4; 32 for the built-in run)"),
    ("-t", "--seq-len", int, None, "sequence length T (default 1024; 64 for the built-in run)"),
    ("-d", "--total-batch-size", int, -1, "tokens per optimizer step; gradient accumulation is derived "
                                          "(default B*T*processes: no accumulation)"),
    ("-x", "--max-steps", int, None, "optimizer steps (default -1 = one epoch of the train data; "
                                     "1400 for the built-in run)"),
    ("-k", "--lr-scheduler", str, "cosine", "cosine, linear, constant or wsd"),
    ("-l", "--learning-rate", float, None, "peak learning rate (default 3e-4; 2e-3 for the built-in run)"),
    ("-u", "--warmup-steps", int, None, "linear warmup steps (default 0; 50 for the built-in run)"),
    ("-q", "--final-lr-frac", float, None, "final LR as a fraction of the peak (default 1.0; 0.1 built-in)"),
    ("-c", "--weight-decay", float, 0.0, "AdamW weight decay on the 2-D tensors"),
    ("-sl", "--skip-loss-z", float, 0.0, "skip updates whose loss z-score exceeds this (0 = off)"),
    ("-sg", "--skip-grad-z", float, 0.0, "skip updates whose grad-norm z-score exceeds this (0 = off)"),
    ("-v", "--val-every", int, None, "val loss every N steps (default 20; 200 for the built-in run)"),
    ("-m", "--val-batches", int, None, "val batches per evaluation, -1 = all (default 20)"),
    ("-s", "--sample-every", int, None, "sample text every N steps, 0 = never (default 20; 700 built-in)"),
    ("-g", "--gen-tokens", int, None, "tokens to generate per sample (default 64; 256 built-in)"),
    ("-h", "--hellaswag", int, 0, "1 = HellaSwag eval at every val step (needs B >= 4 and T >= the longest example)"),
    (None, "--hellaswag-file", str, "data/hellaswag/hellaswag_val.bin", "llm.c eval file for -h 1 "
                                                                      "(make it with scripts/prepare_hellaswag.py)"),
    ("-a", "--overfit", int, 0, "1 = overfit a single batch (the first val batch), for debugging"),
    ("-f", "--allow-tf32", int, 1, "1 = allow TF32 matmuls in float32 runs on GPU"),
    ("-w", "--master-weights", int, 1, "1 = keep fp32 master weights in bfloat16 runs"),
    (None, "--param-rounding", str, "stochastic", "how bf16 params are written after AdamW (-w 0): "
                                                  "stochastic (llm.c) or nearest"),
    ("-z", "--zero-stage", int, 0, "ZeRO stage: 0 replicated, 1 optimizer state, 2 + gradients, 3 + params"),
    ("-r", "--recompute", int, 1, "recompute in the backward: 0 nothing, 1 GELU (SwiGLU), 2 also the layernorms (RMSNorms)"),
    ("-pn", "--num-processes", int, None, "number of processes (multi-host; default: the task count under "
                                            "SLURM or Open MPI, else 1)"),
    ("-pr", "--process-rank", int, 0, "rank of this process (multi-host)"),
    (None, "--dtype", str, None, "float32 or bfloat16 (default: bfloat16 on GPU, float32 on CPU)"),
    (None, "--beta1", float, 0.9, "AdamW beta1"),
    (None, "--beta2", float, 0.95, "AdamW beta2 (llm.c's CUDA trainer: 0.95; its CPU trainer: 0.999)"),
    (None, "--eps", float, 1e-8, "AdamW epsilon"),
    (None, "--grad-clip", float, 1.0, "clip the global grad norm to this (0 = off)"),
    (None, "--shuffle", int, 1, "1 = permute shards and samples each epoch (llm.c's loader); 0 = sequential"),
    (None, "--seed", int, 42, "data shuffling seed (llm.c: 42 + rank)"),
    (None, "--kernels", str, "xla", "op kernels: xla (portable) or pallas (GPU kernels)"),
    (None, "--attention", str, None, "attention: xla, pallas (flash attention) or cudnn (GPU, bf16); "
                                     "default: as --kernels"),
    (None, "--layernorm", str, None, "the norm fused with the residual add (GPT-2 layernorm, Llama RMSNorm): xla or pallas; default: as --kernels"),
    (None, "--matmul-gelu", str, None, "the MLP's matmul + bias + GELU: xla or pallas (fused; -r 0 only: "
                                       "under -r 1/2 --kernels pallas falls back to xla here); default: as --kernels"),
    (None, "--backward", str, "manual", "manual (hand-derived custom_vjp ops) or autodiff (jax.grad of the "
                                        "plain reference model)"),
    (None, "--coordinator", str, None, "HOST:PORT of the jax.distributed coordinator (with -pn/-pr)"),
    (None, "--fp8", str, "off", "FP8 layer matmuls (llm.c PR #760): off, delayed (per-tensor scales from an amax "
                                "history) or current (scales from this step's amaxes)"),
    (None, "--fp8-matmuls", str, "qkv,fc,fcproj", "which layer matmuls run in FP8 under --fp8: a subset of "
                                                  "qkv,attproj,fc,fcproj (Llama's fc: the fused [up|gate])"),
    (None, "--fp8-history", int, 32, "FP8 amax history length (steps)"),
    (None, "--fp8-margin", float, 0.0, "FP8 scale headroom: the largest amax maps to fp8_max / 2**margin "
                                       "(0.807 = llm.c's 256/32768 targets)"),
]

CHOICES = {"lr_scheduler": ("cosine", "linear", "constant", "wsd"), "dtype": ("float32", "bfloat16"),
           "kernels": kernels.FAMILIES, **kernels.OP_CHOICES,
           "backward": ("manual", "autodiff"), "recompute": (0, 1, 2), "zero_stage": (0, 1, 2, 3),
           "fp8": ("off", "delayed", "current"), "param_rounding": ("stochastic", "nearest")}


class Bound(NamedTuple):
    """The values a numeric flag may take, in words (for the message) and as a test."""

    allowed: str
    ok: Callable[[float], bool]


NONNEG = Bound(">= 0", lambda v: v >= 0)
POSITIVE = Bound(">= 1", lambda v: v >= 1)
ABOVE_ZERO = Bound("> 0", lambda v: v > 0)
SWITCH = Bound("0 or 1", lambda v: v in (0, 1))
ALL_OR_POSITIVE = Bound("-1 (all) or >= 1", lambda v: v == -1 or v >= 1)
NEVER_OR_NONNEG = Bound("-1 (never) or >= 0", lambda v: v >= -1)
UNIT = Bound("in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN = Bound("in [0, 1)", lambda v: 0 <= v < 1)

# llm.c's meanings bound these; checked right after parsing (command line and --config alike).
# Every float flag must also be finite. -pn/-pr are checked by distributed.resolve_processes.
BOUNDS: dict[str, Bound] = {
    "learning_rate": NONNEG, "warmup_steps": NONNEG, "final_lr_frac": UNIT, "weight_decay": NONNEG,
    "skip_loss_z": NONNEG, "skip_grad_z": NONNEG, "eps": ABOVE_ZERO, "grad_clip": NONNEG,
    "beta1": UNIT_OPEN, "beta2": UNIT_OPEN, "batch_size": POSITIVE, "seq_len": POSITIVE,
    "total_batch_size": ALL_OR_POSITIVE, "max_steps": ALL_OR_POSITIVE, "val_batches": ALL_OR_POSITIVE,
    "val_every": NONNEG, "sample_every": NONNEG, "gen_tokens": POSITIVE, "checkpoint_every": NEVER_OR_NONNEG,
    "checkpoint_keep": NONNEG, "checkpoint_major": NONNEG, "seed": NONNEG,
    "resume": SWITCH, "hellaswag": SWITCH, "overfit": SWITCH, "allow_tf32": SWITCH,
    "master_weights": SWITCH, "shuffle": SWITCH, "fp8_history": POSITIVE, "fp8_margin": NONNEG,
}

# The built-in corpus run: a small byte-level GPT-2 that learns visibly in a few CPU minutes.
# Chosen by measurement on the 2-core CPU (docs/benchmarks.md, "The no-argument run"): at the same
# tokens, 32 rows of 64 bytes beat 16 of 128 and 8 of 256; 2e-3 beat 1e-3 and 4e-3.
BUILTIN_DEFAULTS = {"init": "small", "batch_size": 32, "seq_len": 64, "max_steps": 1400, "learning_rate": 2e-3,
                    "warmup_steps": 50, "final_lr_frac": 0.1, "val_every": 200, "val_batches": 20,
                    "sample_every": 700, "gen_tokens": 256, "output_dir": "out/builtin"}
LLMC_DEFAULTS = {"init": "d12", "batch_size": 4, "seq_len": 1024, "max_steps": -1, "learning_rate": 3e-4,
                 "warmup_steps": 0, "final_lr_frac": 1.0, "val_every": 20, "val_batches": 20,
                 "sample_every": 20, "gen_tokens": 64}


KERNEL_FLAGS = ("kernels", *kernels.OP_CHOICES)     # shared by every command that runs a model


def _add_flag(p: argparse.ArgumentParser, short: str | None, long: str, typ: type, default: object,
              help_: str) -> None:
    dest = long[2:].replace("-", "_")
    kwargs = dict(type=typ, default=default, help=help_, dest=dest)
    if dest in CHOICES:
        kwargs["choices"] = CHOICES[dest]
    p.add_argument(*[n for n in (short, long) if n], **kwargs)


# the commands that only run the forward (no -r): the fused MLP kernel always applies there
FORWARD_ONLY_HELP = {"--matmul-gelu": "the MLP's matmul + bias + GELU: xla or pallas (fused); default: as --kernels"}


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """--kernels and the per-op overrides, as the train command has them, for a command that runs the
    forward only (sample, eval_loss, eval_hellaswag, gradcheck)."""
    for short, long, typ, default, help_text in FLAGS:
        if long[2:].replace("-", "_") in KERNEL_FLAGS:
            _add_flag(p, short, long, typ, default, FORWARD_ONLY_HELP.get(long, help_text))


def resolve_kernels(args: argparse.Namespace, *, recompute: int = 0, platform: str | None = None,
                    dtype: str | None = None) -> kernels.Kernels:
    """The Kernels the kernel flags name (see kernels.Kernels.resolve); a conflict is a UsageError."""
    try:
        return kernels.Kernels.resolve(args.kernels, recompute=recompute, platform=platform, dtype=dtype,
                                       **{op: getattr(args, op) for op in kernels.OP_CHOICES})
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m llmc_jax.train", add_help=False,
        description="Train GPT-2 as llm.c's train_gpt2.cu does: same flags, files and main.log. "
                    "With no arguments: a small GPT-2 on the source of Python's standard library, offline.")
    p.add_argument("--help", action="help", help="show this help and exit (-h is llm.c's HellaSwag flag)")
    p.add_argument("--config", help="TOML file whose keys are the long option names (command line wins)")
    for flag in FLAGS:
        _add_flag(p, *flag)
    plan = p.add_argument_group("plan a GPU run on any machine (compiles the step for GPUs that are not here; "
                                "needs jax's CUDA plugin)")
    plan.add_argument("--target", metavar="GPU[xN[xH]]", help="h100 or h200, N GPUs per host, H hosts "
                                                              "(e.g. h100x8, h200x8x2)")
    plan.add_argument("--target-config", metavar="FILE", help="any other GPU: XLA's GpuTargetConfigProto text spec")
    plan.add_argument("--compile-only", action="store_true", help="compile the run's steps for --target, print "
                      "memory per GPU, collectives and kernels, and stop (exit 0 fits, 1 does not)")
    plan.add_argument("--compile-report", metavar="FILE.json", help="also write the plan as JSON")
    plan.add_argument("--find-batch", action="store_true", help="find the largest -b that fits --target, then plan it")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The train flags, --config defaults under them, llm.c's (or the built-in run's) defaults for
    what neither gives; every value range-checked (UsageError naming the flag, value and range)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config_path = _find_config(argv)
    model_table, from_config = None, {}
    if config_path is not None:
        from_config, model_table = _config_defaults(config_path)
        parser.set_defaults(**from_config)
    args = parser.parse_args(argv)
    args.model_config = model_table
    args.model_source = f"{config_path} [model]" if model_table is not None else None   # for the config table
    builtin = args.train_data is None
    for key, value in (BUILTIN_DEFAULTS if builtin else LLMC_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.builtin_corpus = builtin
    check_bounds(parser, args, BOUNDS, from_config, config_path)
    return args


def check_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace, bounds: Mapping[str, Bound],
                 from_config: Mapping[str, object] | None = None, config_path: str | None = None) -> None:
    """Refuse nan/inf in every float flag and values outside `bounds`, naming flag, value and range."""
    from_config = from_config or {}
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or isinstance(value, (str, bool)):
            continue
        flag = "/".join(action.option_strings)
        given = from_config.get(action.dest)
        same = given is not None and (given == value or given != given and value != value)    # nan
        where = f" (from --config {config_path})" if same else ""
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {value}{where}: must be a finite number"
                             + (f" {bounds[action.dest].allowed}" if action.dest in bounds else ""))
        bound = bounds.get(action.dest)
        if bound is not None and not bound.ok(value):
            raise UsageError(f"{flag} {value}{where}: must be {bound.allowed}")


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _config_defaults(path: str) -> tuple[dict[str, object], cfgmod.GPTConfig | None]:
    """The --config TOML as argparse defaults (each key a long option name, its value of that
    option's type and among its choices) and its [model] table; any problem is a UsageError."""
    with user_files():
        data = cfgmod.load_toml(path)
    model_table = data.pop("model", None)
    types = {long[2:].replace("-", "_"): typ for _, long, typ, *_ in FLAGS}
    defaults: dict[str, object] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in types:
            raise UsageError(f"--config {path}: unknown key {key!r}; keys are the long option names, "
                             f"e.g. batch-size, learning-rate (see --help)")
        typ = types[dest]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) if typ is str else numeric and (typ is float or isinstance(value, int))):
            raise UsageError(f"--config {path}: {key} = {value!r} must be {_TYPE_WORDS[typ]}")
        value = typ(value)
        if dest in CHOICES and value not in CHOICES[dest]:
            raise UsageError(f"--config {path}: {key} = {value!r} must be one of "
                             f"{', '.join(map(str, CHOICES[dest]))}")
        defaults[dest] = value
    return defaults, model_table


def _find_config(argv: list[str]) -> str | None:
    """The last --config value (as argparse would take it), or None."""
    found = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
    return found
