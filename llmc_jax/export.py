"""python -m llmc_jax.export: a model in another format, for Hugging Face transformers or for llm.c.

    python -m llmc_jax.export -e out/model_00005000.bin --format hf -o gpt2-mine     # from_pretrained("gpt2-mine")
    python -m llmc_jax.export -e path/to/Llama-3.2-1B --format llmc -o llama3.2_1B.bin
    python -m llmc_jax.export -e llama3:tiny --format hf --dtype bfloat16 -o tiny-hf

`-e` takes what every command takes (an llm.c .bin of either family, an HF checkpoint directory, a
descriptor). `--format hf` writes config.json + model.safetensors, sharded with an index past
`--max-shard-gb` as save_pretrained does (GPT-2: GPT2LMHeadModel, Conv1D
layout, V rows; Llama 3: LlamaForCausalLM, rotate-half q/k rows); `--format llmc` writes llm.c's
.bin (version 3 fp32 or 5 bf16) that train_gpt2.cu / train_llama3.py read. In float32 both
directions keep the weights bit for bit, and .bin -> hf -> .bin keeps llm.c's whole header (a
Llama's maxT, multiple_of and ffn_dim_multiplier go into config.json as llmc_* keys).
"""
from __future__ import annotations

import argparse
import os
import sys

from llmc_jax.errors import ArgumentParser, UsageError, run_command, user_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", required=True,
                   help="model: an llm.c .bin, a Hugging Face checkpoint directory or a descriptor")
    p.add_argument("--format", choices=("hf", "llmc"), required=True,
                   help="hf: a Hugging Face directory (config.json + model.safetensors); llmc: llm.c's .bin")
    p.add_argument("-o", "--output", required=True, help="the directory (hf) or file (llmc) to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="stored precision (default float32, lossless); bfloat16 rounds to nearest even")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="hf: weights past this many GB (10^9 bytes) go into model-0000k-of-0000N.safetensors "
                        "shards with an index, as save_pretrained writes them (default 5)")
    args = p.parse_args(argv)
    if not (args.max_shard_gb > 0 and args.max_shard_gb < float("inf")):
        raise UsageError(f"--max-shard-gb {args.max_shard_gb}: must be a finite number > 0")
    return args


def _check_output(args: argparse.Namespace) -> None:
    out = args.output
    if args.format == "hf" and os.path.isfile(out):
        raise UsageError(f"-o {out}: is a file; --format hf writes a directory")
    if args.format == "llmc" and os.path.isdir(out):
        raise UsageError(f"-o {out}: is a directory; --format llmc writes one .bin file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"-o {out}: the folder {parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check_output(args)
    from llmc_jax.formats import hf_checkpoint
    from llmc_jax.models.family import family_of, load_model

    config, params = load_model(args.init)
    with user_files():
        if args.format == "hf":
            hf_checkpoint.write_model(args.output, config, params, args.dtype, int(args.max_shard_gb * 1e9))
        else:
            family_of(config).write_model(args.output, config, params, 3 if args.dtype == "float32" else 5)
    print(f"wrote {args.output} ({args.format}, {args.dtype}): {config.describe()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_command(main)
