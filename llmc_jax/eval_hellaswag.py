"""python -m llmc_jax.eval_hellaswag: llm.c's HellaSwag eval (completion-style acc_norm) of a model.

Prints `HellaSwag: <correct>/<total> = <acc>` as llm.c's train_gpt2.cu does; progress goes to stderr.
The eval file is llm.c's hellaswag_val.bin (make it with scripts/prepare_hellaswag.py). The model is
GPT-2 or Llama 3 (the family comes from the file or descriptor); the eval file must be tokenized for
the model's vocabulary: for Llama 3, `python scripts/prepare_hellaswag.py --tokenizer llama3:PATH`
(a file made for another vocabulary is refused in one line, exit 2).
"""
from __future__ import annotations

import argparse
import sys
import time

from llmc_jax.training import cli
from llmc_jax.evals import hellaswag
from llmc_jax.errors import ArgumentParser, UsageError, run_command, user_files

BOUNDS = {"batch_size": cli.Bound(">= 4 (4 rows per example)", lambda v: v >= 4), "seq_len": cli.POSITIVE,
          "max_examples": cli.POSITIVE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.eval_hellaswag", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", required=True,
                   help="model: an llm.c .bin file (model_*.bin, gpt2_124M.bin, a Llama 3 model .bin) or a "
                        "descriptor (d12, tiny, llama3:tiny) for a randomly initialised one")
    p.add_argument("-i", "--input", default=hellaswag.DEFAULT_PATH,
                   help=f"eval file in llm.c's format, tokenized for the model's vocabulary "
                        f"(default {hellaswag.DEFAULT_PATH})")
    p.add_argument("-b", "--batch-size", type=int, default=32,
                   help="B rows per forward, >= 4; floor(B/4) examples each (default 32)")
    p.add_argument("-t", "--seq-len", type=int, default=None,
                   help="T as llm.c: every example needs context + completion < T (default min(1024, maxT))")
    p.add_argument("-n", "--max-examples", type=int, default=None, help="only the first N examples")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU/TPU)")
    cli.add_kernel_flags(p)
    p.add_argument("--no-trim", action="store_true",
                   help="run every forward at the full T (default: at the longest example rounded up to "
                        "64, which gives the same losses because attention is causal)")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os
    if not os.path.exists(args.input):
        raise UsageError(f"-i {args.input}: HellaSwag eval file not found; {hellaswag.HOW_TO_MAKE}")
    import jax

    from llmc_jax.models.family import load_model
    from llmc_jax.nn.kernels import default_dtype

    platform = jax.devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    kernels = cli.resolve_kernels(args, platform=platform, dtype=dtype)
    t0 = time.time()
    config, params = load_model(args.init)
    T = args.seq_len if args.seq_len is not None else min(1024, config.maxT)
    if T > config.maxT:
        raise UsageError(f"-t {T} exceeds the model's maxT={config.maxT}; use -t {config.maxT} or less")
    with user_files():       # LLMCFormatError (a ValueError) for a bad file or one that does not fit B, T, V
        examples = hellaswag.load(args.input, args.batch_size, T, config.V)
    if args.max_examples is not None:
        examples = examples[:args.max_examples]
    Tf = T if args.no_trim else hellaswag.forward_seq_len(examples, T)
    print(f"{len(examples)} examples from {args.input}; model {args.init} ({config.describe()}); "
          f"B={args.batch_size} T={T} (forward T={Tf}), {dtype} on {platform}", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"evaluating HellaSwag: {done}/{total}", end="\r" if done < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        correct, total = hellaswag.score(params, config, examples, B=args.batch_size, T=T, dtype=dtype,
                                         kernels=kernels, trim=not args.no_trim, progress=progress)
    except NotImplementedError as e:     # an op set that cannot run this model here
        raise UsageError(str(e)) from None
    print(f"HellaSwag: {correct}/{total} = {correct / max(total, 1):f}")
    print(f"took {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_command(main, "lower -b or -t, or use --dtype bfloat16")
