"""python -m llmc_jax.gradcheck: hand-written backward vs JAX autodiff (vs an llm.c debug state).

One row per parameter tensor: the largest absolute difference, the relative error
(max |manual - other| / max |other|) and OK / NOT OK against the stated tolerance. Exit status 1
if any row fails, so it can gate CI or a new kernel.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from llmc_jax.training import cli
from llmc_jax.errors import ArgumentParser, UsageError, run_command, user_files

# Relative tolerances. fp32: manual and autodiff differ only in summation order (measured ~1e-6
# on small models); bf16: both round activations to 8 mantissa bits, differently placed.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Against an llm.c debug state (PyTorch or llm.c's C code in fp32): a different implementation
# of the same fp32 math; llm.c's own test_gpt2 is far looser (1e-2 absolute on logits, 2e-2 on grads).
LLMC_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
BOUNDS = {"batch_size": cli.POSITIVE, "seq_len": cli.POSITIVE, "seed": cli.NONNEG, "tol": cli.ABOVE_ZERO}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m llmc_jax.gradcheck", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", default="d12",
                   help="model: an llm.c .bin file or a descriptor (d12, gpt2:d24, gpt3:c768, tiny); default d12")
    p.add_argument("--config", help="TOML file with a [model] table (L, NH, C, maxT, V, Vp); overrides -e")
    p.add_argument("-i", "--input", help="take the batch from the start of this llm.c data shard")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="B (default 4)")
    p.add_argument("-t", "--seq-len", type=int, default=64, help="T (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for random tokens when no -i is given")
    p.add_argument("--llmc-state", metavar="FILE",
                   help="llm.c debug state: take x, y from it and also check logits, loss, every gradient")
    p.add_argument("--dump", metavar="FILE.npz", help="write loss, logits, grads/<name>, autodiff/<name>")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    cli.add_kernel_flags(p)      # the hand-written model's ops; Pallas kernels run interpreted on a CPU
    p.add_argument("--tol", type=float, help="relative tolerance (default: 1e-4 fp32, 5e-2 bf16)")
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def load_model(init: str, config_path: str | None = None):
    """(config, numpy params) of -e, or a random init of --config's [model] table."""
    from llmc_jax.models import config as cfgmod
    from llmc_jax.models.family import load_model as load
    model_table = None
    if config_path is not None:
        with user_files():
            data = cfgmod.load_toml(config_path)
        if "model" not in data:
            raise UsageError(f"--config {config_path}: no [model] table with L, NH, C (and maxT, V, Vp)")
        model_table = data["model"]
    return load(init, model_table)


def _batch(args, cfg) -> tuple[np.ndarray, np.ndarray, object]:
    """(x, y, debug state or None): from --llmc-state, the start of the -i shard, or random tokens;
    a bad file, or one that does not fit the model, is a UsageError."""
    from llmc_jax.formats import llmc_format
    B, T = args.batch_size, args.seq_len
    with user_files():
        if args.llmc_state:
            from llmc_jax.models.family import family_of
            state = family_of(cfg).read_debug_state(args.llmc_state, cfg)
            llmc_format.check_seq_len(cfg, state.x.shape[1], args.llmc_state)
            return state.x, state.y, state
        if args.input:
            tokens = llmc_format.read_shard(args.input, vocab_size=cfg.V)
            if tokens.size < B * T + 1:
                raise UsageError(f"-i {args.input}: holds {tokens.size} tokens, a batch needs B*T+1 = {B * T + 1}; "
                                 f"lower -b or -t")
            buf = np.asarray(tokens[:B * T + 1], np.int32)
        else:
            buf = np.random.default_rng(args.seed).integers(0, cfg.V, size=B * T + 1).astype(np.int32)
        llmc_format.check_seq_len(cfg, T, args.init)
    return buf[:-1].reshape(B, T), buf[1:].reshape(B, T), None


def relative_error(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    diff = float(np.max(np.abs(a64 - r64))) if a64.size else 0.0
    scale = float(np.max(np.abs(r64))) if r64.size else 0.0
    return diff, diff / scale if scale > 0 else diff


def _row(name: str, diff: float, rel: float, tol: float, failed: list[str]) -> None:
    ok = rel <= tol
    print(f"{name:>10s} | {diff:12.4e} | {rel:12.4e} | {'OK' if ok else 'NOT OK'}")
    if not ok:
        failed.append(name)


def _against_state(args, cfg, state, logits, loss_m, grads_m: dict, failed: list[str]) -> None:
    """Logits, loss and every gradient against the llm.c debug state (its own tolerance)."""
    ltol = args.tol if args.tol is not None else LLMC_TOLERANCE[args.dtype]
    print(f"\nmanual vs llm.c debug state {args.llmc_state}, relative tolerance {ltol:g}")
    print(f"{'tensor':>10s} | {'max abs diff':>12s} | {'rel error':>12s} | status")
    _row("logits", *relative_error(np.asarray(logits, np.float32)[..., :cfg.V], state.logits), ltol, failed)
    _row("loss", *relative_error(np.float32(loss_m), np.float32(state.loss)), ltol, failed)
    for name in cfg.param_shapes():
        _row(name, *relative_error(grads_m[name], state.grads[name]), ltol, failed)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from llmc_jax.models.family import family_of, reference_of
    from llmc_jax.nn.kernels import ModelOptions
    if args.dtype == "float32":        # exact float32 matmuls on GPUs too (no TF32)
        jax.config.update("jax_default_matmul_precision", "highest")

    t0 = time.time()
    cfg, params_np = load_model(args.init, args.config)
    x, y, state = _batch(args, cfg)
    B, T = x.shape
    dtype = jnp.dtype(args.dtype)
    kernels = cli.resolve_kernels(args, platform=jax.devices()[0].platform, dtype=args.dtype)
    opts = ModelOptions(dtype=dtype, kernels=kernels)
    family, reference = family_of(cfg), reference_of(cfg)
    tol = args.tol if args.tol is not None else TOLERANCE[args.dtype]
    print(f"model {cfg.describe()} "
          f"({cfg.num_parameters:,} params), batch B={B} T={T}, dtype {args.dtype}, kernels {kernels.describe(family.KERNEL_OPS)}")

    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    x, y = jnp.asarray(x), jnp.asarray(y)
    loss_m, grads_m = jax.jit(family.value_and_grad(cfg, opts))(params, x, y)
    loss_a, grads_a = jax.jit(reference.value_and_grad(cfg, dtype=dtype))(params, x, y)
    logits = jax.jit(lambda p, i: family.logits(p, i, cfg, opts))(params, x)
    grads_m = {k: np.asarray(v) for k, v in grads_m.items()}
    grads_a = {k: np.asarray(v) for k, v in grads_a.items()}
    print(f"loss manual {float(loss_m):.6f} autodiff {float(loss_a):.6f} ({time.time() - t0:.1f} s)")

    failed: list[str] = []
    print(f"\nmanual vs autodiff gradients, relative tolerance {tol:g}")
    print(f"{'tensor':>10s} | {'max abs diff':>12s} | {'rel error':>12s} | status")
    for name in cfg.param_shapes():              # the family's tensors, in its file order
        _row(name, *relative_error(grads_m[name], grads_a[name]), tol, failed)
    if state is not None:
        _against_state(args, cfg, state, logits, loss_m, grads_m, failed)

    if args.dump:
        arrays = {"loss": np.float32(loss_m), "logits": np.asarray(logits, np.float32)}
        arrays.update({f"grads/{k}": v.astype(np.float32) for k, v in grads_m.items()})
        arrays.update({f"autodiff/{k}": v.astype(np.float32) for k, v in grads_a.items()})
        np.savez(args.dump, **arrays)
        print(f"wrote {args.dump}")
    if failed:
        print(f"\nFAILED: NOT OK: {', '.join(failed)}")
        return 1
    print("\nall OK")
    return 0


if __name__ == "__main__":
    run_command(main, "lower -b or -t, or use --dtype bfloat16")
