"""Time KV-cache generation: the prefill of a prompt and the one-token decode steps.

    python scripts/bench_sample.py -e d12 -p 64 -g 128 --repeats 3

Each repeat runs `generate` (llm.c's sampler: prefill, then one decode step per token) after a
first, untimed call that compiles; it reports the prefill milliseconds, the median decode-step
milliseconds (from the timed tokens after the prefill), and tokens per second of the whole call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.training import cli  # noqa: E402
from llmc_jax.errors import ArgumentParser, run_command  # noqa: E402

BOUNDS = {"prompt_len": cli.POSITIVE, "gen_tokens": cli.POSITIVE, "repeats": cli.POSITIVE, "batch": cli.POSITIVE}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", default="d12", help="descriptor or llm.c .bin (default d12)")
    p.add_argument("-p", "--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("-g", "--gen-tokens", type=int, default=128, help="tokens generated after the prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (default 3)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (prefill/decode only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llmc_jax.evals import generate as gen
    from llmc_jax.models.family import load_model

    config, params_np = load_model(args.init)
    params = jax.tree.map(jnp.asarray, params_np)
    P, G, B = args.prompt_len, args.gen_tokens, args.batch
    S = min(config.maxT, P + G)
    prompt = np.random.default_rng(0).integers(0, config.V, size=(B, P)).astype(np.int32)
    dtype = jnp.dtype(args.dtype)

    def one_pass() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        logits, cache = gen.prefill(params, config, prompt, cache_len=S, dtype=dtype)
        logits.block_until_ready()
        prefill_s = time.perf_counter() - t0
        steps = []
        for pos in range(P, S):
            t0 = time.perf_counter()
            logits, cache = gen.decode_step(params, config, cache, prompt[:, -1], pos)
            logits.block_until_ready()
            steps.append(time.perf_counter() - t0)
        return prefill_s, steps

    one_pass()                                                       # compiles both
    gen.generate(params, config, P + G, 0, prompt=list(prompt[0]), dtype=dtype)
    rows = []
    for _ in range(args.repeats):
        prefill_s, steps = one_pass()
        t0 = time.perf_counter()
        gen.generate(params, config, P + G, 0, prompt=list(prompt[0]), dtype=dtype)
        total = time.perf_counter() - t0
        rows.append({"prefill_ms": 1e3 * prefill_s, "decode_ms_median": 1e3 * statistics.median(steps),
                     "generate_tok_s": G / total})
    best = {k: (min if k != "generate_tok_s" else max)(r[k] for r in rows) for k in rows[0]}
    print(f"{args.init} B={B} prompt {P} + {G} tokens (cache {S}), {args.dtype}, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")
    print(f"prefill {best['prefill_ms']:.2f} ms | decode step {best['decode_ms_median']:.2f} ms (median) | "
          f"generate {best['generate_tok_s']:.1f} tok/s (best of {args.repeats})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"init": args.init, "B": B, "P": P, "G": G, "dtype": args.dtype, "jax": jax.__version__,
                       "best": best, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    run_command(main)
