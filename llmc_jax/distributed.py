"""Multi-process start-up: jax.distributed.initialize, explicit or from the cluster's environment.

    --coordinator HOST:PORT -pn N -pr R    explicit (llm.c's -pn/-pr); what llmc_jax.launch passes
    SLURM (SLURM_NTASKS > 1) / Open MPI (OMPI_COMM_WORLD_SIZE > 1), with no -pn and no --coordinator:
                                           jax.distributed.initialize() detects everything itself
    anything else                          one process: nothing is initialized

Must run before any JAX computation (train.main calls it first). A peer that never arrives makes
initialize abort the process (SIGABRT, exit 134) after the timeout, LLMC_JAX_INIT_TIMEOUT seconds
(default 300); it does not raise.
"""
from __future__ import annotations

import os
import sys

INIT_TIMEOUT_ENV = "LLMC_JAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300


def init_timeout() -> int:
    try:
        return max(1, int(os.environ.get(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT)))
    except ValueError:
        return DEFAULT_INIT_TIMEOUT


def cluster_env() -> str | None:
    """'SLURM' or 'Open MPI' where this process is one task of several of such a launcher, else None."""
    def size(var: str) -> int:
        try:
            return int(os.environ.get(var, "1"))
        except ValueError:
            return 1
    if "SLURM_JOB_ID" in os.environ and size("SLURM_NTASKS") > 1:
        return "SLURM"
    if size("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    return None


def check_args(args) -> str | None:
    """A usage problem with -pn/-pr/--coordinator (a message), or None."""
    n, r = args.num_processes, args.process_rank
    if n < 1:
        return f"-pn {n}: the number of processes must be >= 1"
    if not 0 <= r < n:
        return f"-pr {r} is out of range for -pn {n} (need 0 <= rank < num_processes)"
    if n > 1 and not args.coordinator:
        return (f"-pn {n} needs --coordinator HOST:PORT (the address process 0 listens on); "
                "or start the processes with `python -m llmc_jax.launch --nproc N -- <train args>`")
    if args.coordinator:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            return f"--coordinator {args.coordinator!r}: expected HOST:PORT"
    return None


def maybe_initialize(args) -> bool:
    """Initialize jax.distributed as the flags or the environment ask; True where it did."""
    import jax
    if args.coordinator or args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_rank, initialization_timeout=init_timeout())
        return True
    env = cluster_env()
    if env is not None:
        print(f"{env} job with several tasks: initializing jax.distributed from its environment",
              file=sys.stderr, flush=True)
        jax.distributed.initialize(initialization_timeout=init_timeout())
        return True
    return False
