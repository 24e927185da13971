"""The train command's flags: llm.c's short flags with llm.c's meanings and defaults, each also a
long option, plus llmc-jax's own; a TOML file (--config) whose keys are the long names supplies
defaults that the command line overrides."""
from __future__ import annotations

import argparse
import sys

from llmc_jax import config as cfgmod

# (short, long, type, default, help). A default of None is resolved later: for the built-in
# corpus run (no -i) to a small model that trains in minutes on a CPU, otherwise to llm.c's default.
FLAGS: list[tuple[str | None, str, type, object, str]] = [
    ("-i", "--train-data", str, None, "train shard glob (llm.c format); default: the built-in corpus"),
    ("-j", "--val-data", str, None, "val shard glob; default: the built-in corpus' val split"),
    ("-e", "--init", str, None, "model: llm.c .bin file or descriptor (d12, gpt2:d24, gpt3:c768, tiny, small); "
                                "default d12 (with -i) or small (built-in corpus)"),
    ("-o", "--output-dir", str, None, "output dir for main.log and checkpoints (default: none; "
                                      "out/builtin for the built-in corpus run)"),
    ("-n", "--checkpoint-every", int, 0, "write a checkpoint every N steps (and at the end); needs -o"),
    ("-nk", "--checkpoint-keep", int, 0, "keep only the last N checkpoints (0 = all)"),
    ("-nm", "--checkpoint-major", int, 0, "checkpoints at multiples of N are never deleted"),
    ("-y", "--resume", int, 0, "1 = resume from the newest complete checkpoint in -o"),
    ("-b", "--batch-size", int, None, "micro-batch size B per device (default 4; 16 for the built-in run)"),
    ("-t", "--seq-len", int, None, "sequence length T (default 1024; 128 for the built-in run)"),
    ("-d", "--total-batch-size", int, -1, "tokens per optimizer step; gradient accumulation is derived "
                                          "(default B*T*processes: no accumulation)"),
    ("-x", "--max-steps", int, None, "optimizer steps (default -1 = one epoch of the train data; "
                                     "800 for the built-in run)"),
    ("-k", "--lr-scheduler", str, "cosine", "cosine, linear, constant or wsd"),
    ("-l", "--learning-rate", float, None, "peak learning rate (default 3e-4; 2e-3 for the built-in run)"),
    ("-u", "--warmup-steps", int, None, "linear warmup steps (default 0; 50 for the built-in run)"),
    ("-q", "--final-lr-frac", float, None, "final LR as a fraction of the peak (default 1.0; 0.1 built-in)"),
    ("-c", "--weight-decay", float, 0.0, "AdamW weight decay on the 2-D tensors"),
    ("-sl", "--skip-loss-z", float, 0.0, "skip updates whose loss z-score exceeds this (0 = off)"),
    ("-sg", "--skip-grad-z", float, 0.0, "skip updates whose grad-norm z-score exceeds this (0 = off)"),
    ("-v", "--val-every", int, None, "val loss every N steps (default 20; 200 for the built-in run)"),
    ("-m", "--val-batches", int, None, "val batches per evaluation, -1 = all (default 20; 10 built-in)"),
    ("-s", "--sample-every", int, None, "sample text every N steps, 0 = never (default 20; 400 built-in)"),
    ("-g", "--gen-tokens", int, None, "tokens to generate per sample (default 64; 128 built-in)"),
    ("-h", "--hellaswag", int, 0, "1 = HellaSwag eval at every val step (needs B >= 4 and T >= the longest example)"),
    (None, "--hellaswag-file", str, "data/hellaswag/hellaswag_val.bin", "llm.c eval file for -h 1 "
                                                                      "(make it with scripts/prepare_hellaswag.py)"),
    ("-a", "--overfit", int, 0, "1 = overfit a single batch (the first val batch), for debugging"),
    ("-f", "--allow-tf32", int, 1, "1 = allow TF32 matmuls in float32 runs on GPU"),
    ("-w", "--master-weights", int, 1, "1 = keep fp32 master weights in bfloat16 runs"),
    ("-z", "--zero-stage", int, 0, "ZeRO stage: 0 replicated, 1 optimizer state, 2 + gradients, 3 + params"),
    ("-r", "--recompute", int, 1, "recompute in the backward: 0 nothing, 1 GELU, 2 GELU and layernorms"),
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
    (None, "--layernorm", str, None, "layernorm (fused with the residual add): xla or pallas; default: as --kernels"),
    (None, "--matmul-gelu", str, None, "the MLP's matmul + bias + GELU: xla or pallas (fused; with -r 0 only, "
                                       "since -r 1/2 keep just its pre-activation); default: as --kernels"),
    (None, "--backward", str, "manual", "manual (hand-derived custom_vjp ops) or autodiff (jax.grad of the "
                                        "plain reference model)"),
    (None, "--coordinator", str, None, "HOST:PORT of the jax.distributed coordinator (with -pn/-pr)"),
]

CHOICES = {"lr_scheduler": ("cosine", "linear", "constant", "wsd"), "dtype": ("float32", "bfloat16"),
           "kernels": cfgmod.KERNELS, **cfgmod.OP_CHOICES,
           "backward": ("manual", "autodiff"), "recompute": (0, 1, 2), "zero_stage": (0, 1, 2, 3)}

# The built-in corpus run: a small byte-level GPT-2 that learns visibly in a few CPU minutes.
BUILTIN_DEFAULTS = {"init": "small", "batch_size": 16, "seq_len": 128, "max_steps": 800, "learning_rate": 2e-3,
                    "warmup_steps": 50, "final_lr_frac": 0.1, "val_every": 200, "val_batches": 10,
                    "sample_every": 400, "gen_tokens": 128, "output_dir": "out/builtin"}
LLMC_DEFAULTS = {"init": "d12", "batch_size": 4, "seq_len": 1024, "max_steps": -1, "learning_rate": 3e-4,
                 "warmup_steps": 0, "final_lr_frac": 1.0, "val_every": 20, "val_batches": 20,
                 "sample_every": 20, "gen_tokens": 64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmc_jax.train", add_help=False,
        description="Train GPT-2 as llm.c's train_gpt2.cu does: same flags, files and main.log. "
                    "With no arguments: a small GPT-2 on a corpus built from Python's own docs, offline.")
    p.add_argument("--help", action="help", help="show this help and exit (-h is llm.c's HellaSwag flag)")
    p.add_argument("--config", help="TOML file whose keys are the long option names (command line wins)")
    for short, long, typ, default, help_ in FLAGS:
        names = [n for n in (short, long) if n]
        dest = long[2:].replace("-", "_")
        kwargs = dict(type=typ, default=default, help=help_, dest=dest)
        if dest in CHOICES:
            kwargs["choices"] = CHOICES[dest]
        p.add_argument(*names, **kwargs)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config_path = _find_config(argv)
    model_table = None
    if config_path:
        data = cfgmod.load_toml(config_path)
        model_table = data.pop("model", None)
        known = {long[2:].replace("-", "_") for _, long, *_ in FLAGS}
        defaults = {}
        for key, value in data.items():
            dest = key.replace("-", "_")
            if dest not in known:
                parser.error(f"{config_path}: unknown key {key!r}; keys are the long option names, "
                             f"e.g. batch-size, learning-rate (see --help)")
            defaults[dest] = value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.model_config = model_table
    builtin = args.train_data is None
    for key, value in (BUILTIN_DEFAULTS if builtin else LLMC_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.builtin_corpus = builtin
    return args


def _find_config(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None
