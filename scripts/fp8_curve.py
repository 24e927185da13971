"""The FP8 loss curve beside the unquantized one: the same model, weights and batches, trained
with --fp8 off and each FP8 recipe in turn, step by step (docs/fp8.md).

    python scripts/fp8_curve.py -e d12 -b 4 -t 128 -x 40 --fp8 delayed,current

With no -i, the built-in byte-level corpus (V = 256) is the data and a descriptor model takes its
vocabulary: `-e d12` is then d12's 12 layers of 768 channels (85M parameters in the layers, the
shapes FP8 touches) with a 256-row embedding. Prints the losses every --print-every steps and, per
recipe, the largest and the final relative distance from the --fp8 off loss; --json writes all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.training import cli  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, run_command  # noqa: E402

BOUNDS = {"batch_size": cli.POSITIVE, "seq_len": cli.POSITIVE, "max_steps": cli.POSITIVE,
          "learning_rate": cli.NONNEG, "warmup_steps": cli.NONNEG, "print_every": cli.POSITIVE}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", default="d12", help="descriptor or model file (default d12)")
    p.add_argument("-i", "--train-data", default=None, help="token shards (default: the built-in corpus)")
    p.add_argument("-b", "--batch-size", type=int, default=4)
    p.add_argument("-t", "--seq-len", type=int, default=128)
    p.add_argument("-x", "--max-steps", type=int, default=40)
    p.add_argument("-l", "--learning-rate", type=float, default=6e-4)
    p.add_argument("-u", "--warmup-steps", type=int, default=10)
    p.add_argument("-r", "--recompute", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--fp8", default="delayed,current", help="comma list of delayed, current")
    p.add_argument("--fp8-matmuls", default="qkv,fc,fcproj")
    p.add_argument("--print-every", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    args.recipes = [r.strip() for r in args.fp8.split(",")]
    if any(r not in ("delayed", "current") for r in args.recipes):
        raise UsageError(f"--fp8 {args.fp8}: each entry is delayed or current")
    from llmc_jax.nn import fp8
    try:
        args.matmuls = fp8.parse_matmuls(args.fp8_matmuls)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args


def model_and_data(args: argparse.Namespace):
    """(config, params, train pattern): a descriptor on the built-in corpus takes its vocabulary."""
    from llmc_jax.models.family import family_of, is_descriptor, load_model, model_config
    train = args.train_data
    if train is None:
        from llmc_jax.formats.corpus import VOCAB_SIZE, builtin_corpus
        train = builtin_corpus()[0]
        if is_descriptor(args.init):
            cfg = model_config(args.init)
            padded = {"Vp": VOCAB_SIZE} if "Vp" in {f.name for f in dataclasses.fields(cfg)} else {}
            cfg = dataclasses.replace(cfg, V=VOCAB_SIZE, **padded)
            return cfg, family_of(cfg).init_params(cfg), train
    cfg, params = load_model(args.init)
    return cfg, params, train


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llmc_jax.formats.data import DataLoader
    from llmc_jax.training import optim, train_step

    cfg, params_np, train = model_and_data(args)
    loader = DataLoader(train, args.batch_size, args.seq_len, 0, 1, shuffle=False, vocab_size=cfg.V)
    names = ["off", *args.recipes]
    runs = {}
    for name in names:
        sc = train_step.StepConfig(model=cfg, dtype=args.dtype, recompute=args.recompute, fp8=name,
                                   fp8_matmuls=args.matmuls, weight_decay=0.1)
        state = train_step.init_train_state({k: jnp.asarray(v, jnp.float32) for k, v in params_np.items()}, sc)
        runs[name] = [train_step.make_train_step(sc), state, []]
    print(f"model {args.init} {cfg.describe()} ({cfg.num_parameters:,} params), B={args.batch_size} "
          f"T={args.seq_len} {args.dtype} -r {args.recompute}, fp8 matmuls {','.join(args.matmuls)}, "
          f"{jax.devices()[0].platform}, jax {jax.__version__}", flush=True)
    print(f"{'step':>5} " + " ".join(f"{n:>10}" for n in names) + "   rel. distance from off", flush=True)
    t0 = time.perf_counter()
    for step in range(args.max_steps):
        x, y = loader.next_batch()
        lr = optim.learning_rate(step, schedule="cosine", max_lr=args.learning_rate, warmup=args.warmup_steps,
                                 total_steps=args.max_steps, final_frac=0.0)
        for run in runs.values():           # the variants take turns on the same batch
            run[1], m = run[0](run[1], x[None], y[None], np.float32(lr), np.int32(step + 1))
            run[2].append(float(m.loss))
        if (step + 1) % args.print_every == 0 or step == 0 or step + 1 == args.max_steps:
            off = runs["off"][2][-1]
            print(f"{step + 1:>5} " + " ".join(f"{runs[n][2][-1]:>10.6f}" for n in names) + "   "
                  + " ".join(f"{n} {abs(runs[n][2][-1] - off) / off:.2e}" for n in args.recipes)
                  + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    off = np.asarray(runs["off"][2])
    summary = {}
    for n in args.recipes:
        rel = np.abs(np.asarray(runs[n][2]) - off) / off
        summary[n] = {"max_rel": float(rel.max()), "max_rel_step": int(rel.argmax()) + 1, "final_rel": float(rel[-1])}
        print(f"{n}: max relative distance {rel.max():.2e} (step {rel.argmax() + 1}), final {rel[-1]:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "matmuls"}, "model": cfg.describe(),
                       "device": jax.devices()[0].platform, "jax": jax.__version__,
                       "losses": {n: r[2] for n, r in runs.items()}, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    run_command(main)
