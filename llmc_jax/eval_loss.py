"""python -m llmc_jax.eval_loss: the validation loss of a model, as the trainer's `val loss` line.

    python -m llmc_jax.eval_loss -e out/builtin/model_00000800.bin            # the built-in corpus' val split
    python -m llmc_jax.eval_loss -e model.bin -j "data/my/*_val_*.bin" -b 8 -t 256

Reads the val shards unshuffled from the start, B*T tokens a batch, as llm.c's val loader does, and
prints the mean cross-entropy in nats per token (per byte for the byte-level built-in corpus). A
byte-level model (V = 256) defaults to the built-in corpus' val split; any other needs -j.
"""
from __future__ import annotations

import argparse
import sys
import time

from llmc_jax.training import cli
from llmc_jax.errors import ArgumentParser, UsageError, run_command, user_files

BOUNDS = {"batch_size": cli.POSITIVE, "seq_len": cli.POSITIVE, "val_batches": cli.ALL_OR_POSITIVE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.eval_loss", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", required=True, help="model: an llm.c .bin file or a descriptor (d12, small)")
    p.add_argument("-j", "--val-data", help="val shard glob (default for V=256 models: the built-in corpus' val split)")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="B (default 16)")
    p.add_argument("-t", "--seq-len", type=int, default=None, help="T (default min(128, maxT))")
    p.add_argument("-m", "--val-batches", type=int, default=-1, help="batches to average, -1 = all (default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU)")
    cli.add_kernel_flags(p)
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def _val_pattern(args, config) -> str:
    if args.val_data:
        return args.val_data
    if config.V != 256:
        raise UsageError(f"-e {args.init} has V={config.V}, not the built-in corpus' byte vocabulary; "
                         "name its val shards with -j")
    from llmc_jax.formats.corpus import builtin_corpus
    return builtin_corpus()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmc_jax.formats import llmc_format
    from llmc_jax.training import train_step
    from llmc_jax.formats.data import DataLoader
    from llmc_jax.models.family import load_model
    from llmc_jax.nn.kernels import default_dtype

    config, params = load_model(args.init)
    T = args.seq_len if args.seq_len is not None else min(128, config.maxT)
    pattern = _val_pattern(args, config)
    with user_files():
        llmc_format.check_seq_len(config, T, args.init)
        loader = DataLoader(pattern, args.batch_size, T, shuffle=False, vocab_size=config.V)
    n = loader.batches_per_epoch if args.val_batches < 0 else min(args.val_batches, loader.batches_per_epoch)
    if n < 1:
        raise UsageError(f"{pattern}: {loader.num_tokens} tokens, less than one batch of B*T+1 = "
                         f"{args.batch_size * T + 1}; lower -b/-t")
    platform = jax.devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    sc = train_step.StepConfig(model=config, dtype=dtype,
                               kernels=cli.resolve_kernels(args, platform=platform, dtype=dtype))
    eval_fn = train_step.make_eval_step(sc)
    params = {k: jax.numpy.asarray(v) for k, v in params.items()}
    t0, total = time.perf_counter(), 0.0
    for _ in range(n):
        x, y = loader.next_batch()
        total += float(eval_fn(params, x, y))
    print(f"{n} batches of {args.batch_size}x{T} from {pattern}, {dtype}, {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    print(f"val loss {total / n:.6f}")
    return 0


if __name__ == "__main__":
    run_command(main)
