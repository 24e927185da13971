"""python -m llmc_jax.train: llm.c's training loop (train_gpt2.cu), step for step.

Three phases, each in its own module: the flags are resolved into one frozen Run (run.py: every
usage error is raised there), the run is started (loop.start: weights, loaders, train state, the
jitted step) and the loop runs llm.c's events and updates (loop.loop; its docstring has the order).
With no arguments: a small GPT-2 on the source of Python's standard library, offline.
"""
from __future__ import annotations

from llmc_jax.training import cli
from llmc_jax.errors import UsageError, run_command  # noqa: F401  (UsageError: also train.UsageError, its old home)

OOM_HINT = ("lower -b (micro-batch; -d keeps the total batch by accumulating) or -t, or use -r 1/2 "
            "(recompute), -z 1..3 (ZeRO, several devices), --dtype bfloat16")


def main(argv: list[str] | None = None) -> int:
    from llmc_jax.multihost import distributed
    from llmc_jax.training import loop, run as run_mod
    args = cli.parse_args(argv)
    if args.target or args.compile_only or args.compile_report or args.find_batch:
        from llmc_jax.planning import plan
        return plan.main(args)      # nothing started, read or written: the steps compiled for --target
    processes = run_mod.check_flags(args)      # what needs no JAX, before jax.distributed starts
    distributed.maybe_initialize(processes)
    run = run_mod.resolve(args)
    session = loop.start(run)
    return loop.loop(run, session)


if __name__ == "__main__":
    from llmc_jax.launch import watch_launcher
    watch_launcher()             # started by python -m llmc_jax.launch: stop when it dies
    run_command(main, OOM_HINT)
