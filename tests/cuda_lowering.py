"""Lower a jitted function for CUDA on a CPU-only host, so a kernel Triton cannot take fails CI.

This runs the Pallas -> Triton IR lowering (unsupported ops, bad block shapes), not ptxas or the
GPU itself. The abstract mesh names an H100 so lowering sees a GPU target (needed on jax 0.12,
harmless on 0.10.2).
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType

TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA; `args` are arrays or ShapeDtypeStructs."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(fn, *args) -> int:
    """How many Triton kernels `fn` lowers to for CUDA (0 means it did not go through Triton)."""
    return lower_for_cuda(fn, *args).count(TRITON_CALL)



def compile_for_gpu(fn, *args, target: str = "h100x1"):
    """jax.jit(fn) compiled by XLA's GPU compiler (Triton and ptxas included) for `target`'s GPU, on
    this CPU-only machine, as a plan compiles (llmc_jax.planning.plan.compile_for_gpu); `args` are
    arrays or ShapeDtypeStructs, placed whole on the first GPU."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmc_jax.planning import plan, targets
    targets.prepare_jax()
    rep = NamedSharding(targets.topology_mesh(targets.parse_target(target)), P())
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args]
    return plan.compile_for_gpu(jax.jit(fn), *specs)
