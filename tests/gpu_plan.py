"""Planning helpers shared by the GPU compile tests."""
from __future__ import annotations

from llmc_jax.planning import plan


def report(flags: str, target: str = "h100x8", *, eval_step: bool = False, fp8_cublas: bool = False) -> dict:
    """plan's report for the train flags `flags` on `target` (the validation step and the FP8 step
    with cuBLAS GEMMs only if asked)."""
    return plan.plan_flags(flags.split(), target, eval_step=eval_step, fp8_cublas=fp8_cublas)


def fp8_gemms(kernels: dict) -> int:
    return sum(n for name, n in kernels.items() if "FP8" in name)
