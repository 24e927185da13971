"""Planning helpers shared by the GPU compile tests."""
from __future__ import annotations

from llmc_jax.planning import plan


def report(flags: str, target: str = "h100x8", *, eval_step: bool = False, fp8_cublas: bool = False) -> dict:
    """plan's report for the train flags `flags` on `target` (the validation step and the FP8 step
    with cuBLAS GEMMs only if asked)."""
    return plan.plan_flags(flags.split(), target, eval_step=eval_step, fp8_cublas=fp8_cublas)


fp8_gemms = plan.fp8_gemm_count


def train_step_hlo(flags: str, target: str = "h100") -> tuple[object, str]:
    """(the resolved run, the optimized HLO of its train step compiled for `target`)."""
    from llmc_jax.planning.targets import parse_target, prepare_jax, topology_mesh
    from llmc_jax.training import cli
    prepare_jax()
    t = parse_target(target)
    mesh = topology_mesh(t)
    run = plan.resolve(cli.parse_args(flags.split()), t, mesh)
    state, shardings = plan.abstract_state(run, mesh)
    return run, plan.compile_train_step(run, mesh, state, shardings).hlo
