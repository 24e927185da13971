"""Planning helpers shared by the GPU compile tests: a run's report for a target, in this process."""
from __future__ import annotations

import functools

from llmc_jax.planning import plan, targets
from llmc_jax.training import cli


@functools.lru_cache(maxsize=None)
def target_and_mesh(name: str):
    targets.prepare_jax()
    target = targets.parse_target(name)
    return target, targets.topology_mesh(target)


def report(flags: str, target: str = "h100x8", *, eval_step: bool = False) -> dict:
    """plan.plan's report for the train flags `flags` on `target` (the validation step only if asked)."""
    t, mesh = target_and_mesh(target)
    return plan.plan(cli.parse_args(flags.split()), t, mesh, eval_step=eval_step)


def fp8_gemms(kernels: dict) -> int:
    return sum(n for name, n in kernels.items() if "FP8" in name)
