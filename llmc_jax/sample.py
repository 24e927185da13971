"""python -m llmc_jax.sample: generate text from a model, llm.c's sampler with a KV cache.

    python -m llmc_jax.sample -e gpt2_124M.bin --prompt "Hello" -g 64 --top-k 40

The generation library (llm.c's xorshift coin, the cache, the sliding window past maxT) is
generate.py; this module is its command line.
"""
from __future__ import annotations

import argparse
import sys
import time

from llmc_jax.training import cli
from llmc_jax.errors import ArgumentParser, UsageError, run_command


def _get_tokenizer(name: str):
    from llmc_jax.formats.tokenizer import get_tokenizer
    try:
        return get_tokenizer(name)
    except ValueError as e:            # an unknown name
        raise UsageError(f"--tokenizer: {e}") from None
    except RuntimeError as e:          # no BPE file offline, or a corrupt one: say what to do
        raise SystemExit(f"cannot load the {name} tokenizer: {e}") from None


# xorshift64* needs a non-zero 64-bit state
BOUNDS = {"gen_tokens": cli.POSITIVE, "temperature": cli.NONNEG, "top_k": cli.POSITIVE,
          "seed": cli.Bound("in [1, 2**64)", lambda v: 1 <= v < 2**64)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.sample",
                       description="Sample from a GPT-2 or Llama 3 model (llm.c's xorshift sampler, KV cache).")
    p.add_argument("-e", "--init", required=True,
                   help="model: an llm.c .bin file (GPT-2 or llama3) or a descriptor (d12, gpt2:d24, tiny, llama3:tiny: random init)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from EOT alone)")
    p.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=1337, help="xorshift seed (default 1337, as llm.c)")
    p.add_argument("--tokenizer", help="gpt2, byte or llama3:PATH (Meta's tokenizer.model; plain llama3 reads "
                   "$LLMC_JAX_LLAMA3_TOKENIZER); default: byte when the model's V is 256, llama3 for a Llama 3 "
                   "model's 128256, gpt2 otherwise")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    cli.add_kernel_flags(p)
    p.add_argument("--no-eot", action="store_true",
                   help="do not put EOT before the prompt (by default it is, as every training document)")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from llmc_jax.models.family import load_model
    from llmc_jax.evals.generate import generate
    kernels = cli.resolve_kernels(args, platform=jax.devices()[0].platform, dtype=args.dtype)
    config, params = load_model(args.init)
    tok = _get_tokenizer(args.tokenizer or {256: "byte", 128256: "llama3"}.get(config.V, "gpt2"))
    prompt = ([] if args.no_eot and args.prompt else [tok.eot]) + tok.encode(args.prompt)
    bad = [t for t in prompt if not 0 <= t < config.V]
    if bad:
        raise UsageError(f"the prompt has token ids outside the model's vocabulary V={config.V} "
                         f"(e.g. {bad[0]}); choose the model's tokenizer with --tokenizer")
    print(f"model {args.init}: {config.describe()}; "
          f"prompt {len(prompt)} tokens, generating {args.gen_tokens}", file=sys.stderr)
    t0 = time.perf_counter()
    out = generate(params, config, len(prompt) + args.gen_tokens, tok.eot, dtype=jnp.dtype(args.dtype),
                   kernels=kernels, seed=args.seed, prompt=prompt, temperature=args.temperature,
                   top_k=args.top_k)
    dt = time.perf_counter() - t0
    print(tok.decode(out[len(prompt):]))
    print(f"{args.gen_tokens} tokens in {dt:.2f} s (compilation included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_command(main, "use --dtype bfloat16, or a smaller model")
