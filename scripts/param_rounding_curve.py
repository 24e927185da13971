"""bf16 parameter rounding, measured: the same model, weights and batches trained in bfloat16 with
bf16 params (-w 0) written by rounding to nearest and by llm.c's stochastic rounding, and with fp32
master weights (-w 1) whose bf16 copy is rounded to nearest (the default) or stochastically (as
llm.c makes its copy). docs/benchmarks.md quotes its output.

    python scripts/param_rounding_curve.py -e llama3:small -x 400

With no -i, the built-in byte-level corpus and its val split; a descriptor model takes its
vocabulary. Prints train losses (the mean of the last --print-every steps) and the val loss every
--val-every steps, then each variant's final val loss and its gap to -w 1; --json writes all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.training import cli  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, run_command  # noqa: E402
from fp8_curve import model_and_data  # noqa: E402

# name -> (param dtype, AdamW's bf16 write, the -w 1 forward copy)
VARIANTS = {"w0-nearest": ("bfloat16", "nearest", "nearest"),
            "w0-stochastic": ("bfloat16", "stochastic", "nearest"),
            "w1": ("float32", "nearest", "nearest"),
            "w1-stochastic-copy": ("float32", "nearest", "stochastic")}
BOUNDS = {"batch_size": cli.POSITIVE, "seq_len": cli.POSITIVE, "max_steps": cli.POSITIVE,
          "learning_rate": cli.NONNEG, "warmup_steps": cli.NONNEG, "print_every": cli.POSITIVE,
          "val_every": cli.POSITIVE, "val_batches": cli.POSITIVE}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", default="llama3:small", help="descriptor or model file (default llama3:small)")
    p.add_argument("-i", "--train-data", default=None, help="token shards (default: the built-in corpus)")
    p.add_argument("-j", "--val-data", default=None, help="val shards (default: the built-in val split, or -i)")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("-t", "--seq-len", type=int, default=64)
    p.add_argument("-x", "--max-steps", type=int, default=400)
    p.add_argument("-l", "--learning-rate", type=float, default=2e-3)
    p.add_argument("-u", "--warmup-steps", type=int, default=50)
    p.add_argument("-q", "--final-lr-frac", type=float, default=0.1)
    p.add_argument("-c", "--weight-decay", type=float, default=0.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    args.names = [v.strip() for v in args.variants.split(",")]
    bad = [v for v in args.names if v not in VARIANTS]
    if bad:
        raise UsageError(f"--variants {args.variants}: {', '.join(bad)} is not one of {', '.join(VARIANTS)}")
    return args


def val_loss(eval_fn, params, batches) -> float:
    import numpy as np
    return float(np.mean([float(eval_fn(params, x, y)) for x, y in batches]))


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llmc_jax.formats.data import DataLoader
    from llmc_jax.training import optim, train_step

    cfg, params_np, train = model_and_data(args)
    val = args.val_data
    if val is None and args.train_data is None:
        from llmc_jax.formats.corpus import builtin_corpus
        val = builtin_corpus()[1]
    loader = DataLoader(train, args.batch_size, args.seq_len, 0, 1, shuffle=False, vocab_size=cfg.V)
    val_loader = DataLoader(val or train, args.batch_size, args.seq_len, 0, 1, shuffle=False, vocab_size=cfg.V)
    val_batches = [val_loader.next_batch() for _ in range(args.val_batches)]
    runs = {}
    for name in args.names:
        param_dtype, param_rounding, copy_rounding = VARIANTS[name]
        sc = train_step.StepConfig(model=cfg, dtype="bfloat16", weight_decay=args.weight_decay,
                                   param_rounding=param_rounding, copy_rounding=copy_rounding)
        state = train_step.init_train_state({k: jnp.asarray(v, param_dtype) for k, v in params_np.items()}, sc)
        runs[name] = {"step": train_step.make_train_step(sc), "eval": train_step.make_eval_step(sc),
                      "state": state, "train": [], "val": {}}
    print(f"model {args.init} {cfg.describe()} ({cfg.num_parameters:,} params), B={args.batch_size} "
          f"T={args.seq_len} bfloat16, lr {args.learning_rate:g} warmup {args.warmup_steps} "
          f"final frac {args.final_lr_frac:g}, {jax.devices()[0].platform}, jax {jax.__version__}", flush=True)
    print(f"{'step':>5} " + " ".join(f"{n:>20}" for n in args.names), flush=True)
    t0 = time.perf_counter()
    for step in range(args.max_steps):
        x, y = loader.next_batch()
        lr = optim.learning_rate(step, schedule="cosine", max_lr=args.learning_rate, warmup=args.warmup_steps,
                                 total_steps=args.max_steps, final_frac=args.final_lr_frac)
        for run in runs.values():           # the variants take turns on the same batch
            run["state"], m = run["step"](run["state"], x[None], y[None], np.float32(lr), np.int32(step))
            run["train"].append(float(m.loss))
        last = step + 1 == args.max_steps
        if (step + 1) % args.print_every == 0 or last:
            k = args.print_every
            print(f"{step + 1:>5} " + " ".join(f"{np.mean(r['train'][-k:]):>20.4f}" for r in runs.values())
                  + f"   train ({time.perf_counter() - t0:.0f} s)", flush=True)
        if (step + 1) % args.val_every == 0 or last:
            for run in runs.values():
                run["val"][step + 1] = val_loss(run["eval"], run["state"].params, val_batches)
            print(f"{step + 1:>5} " + " ".join(f"{r['val'][step + 1]:>20.4f}" for r in runs.values()) + "   val",
                  flush=True)
    final = {n: r["val"][args.max_steps] for n, r in runs.items()}
    for n, v in final.items():
        gap = f", {v - final['w1']:+.4f} from w1" if "w1" in final and n != "w1" else ""
        print(f"{n}: final val loss {v:.4f}{gap}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "names"}, "model": cfg.describe(),
                       "device": jax.devices()[0].platform, "jax": jax.__version__,
                       "train": {n: r["train"] for n, r in runs.items()},
                       "val": {n: r["val"] for n, r in runs.items()}, "final_val": final}, f, indent=1)
    return 0


if __name__ == "__main__":
    run_command(main)
