"""Multi-process start-up through jax.distributed: which processes a run has, and joining them.

    --coordinator HOST:PORT -pn N -pr R    explicit (llm.c's -pn/-pr); what llmc_jax.launch passes
    SLURM (srun) / Open MPI (mpirun), with neither -pn nor --coordinator given:
                                           -pn/-pr come from the job's environment and
                                           jax.distributed.initialize() finds the coordinator itself
    anything else (or an explicit -pn 1)   one process: nothing is initialized

resolve_processes turns the flags into a ProcessSpec (a usage problem is a UsageError);
maybe_initialize(spec) must run before any JAX computation (train.main calls it first). Start-up is
bounded and every failure named (LLMC_JAX_INIT_TIMEOUT seconds, default 300): rank 0 first checks
that the coordinator's port is free (jax may crash on a taken one), a rank other than 0 waits for
that port to accept connections, then every rank waits in jax.distributed.initialize for all N to
register. Past the timeout the process prints which rank (or the coordinator) is missing and what to
check, and exits with status 1. JAX's own abort (SIGABRT, a page of C++ log) is given 30 s more, so
it never comes first.

Once they have joined, maybe_initialize starts llmc_jax.multihost.peer_watch's heartbeat watch
(LLMC_JAX_PEER_TIMEOUT), which stops every process when one dies, hangs or fails during the run;
its module doc says how.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from llmc_jax.errors import UsageError
from llmc_jax.multihost.peer_watch import PeerWatch, die, env_seconds, hang_timeout, peer_timeout

INIT_TIMEOUT_ENV = "LLMC_JAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300
JAX_INIT_GRACE = 30         # JAX's own initialization_timeout is ours plus this: our message comes first

# A cluster launcher whose environment names every process: (its name, size var, rank var).
_CLUSTERS = (("SLURM", "SLURM_NTASKS", "SLURM_PROCID"), ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))
# what jax's SLURM detection reads (jax._src.clusters.slurm_cluster); without them it cannot start
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def init_timeout() -> int:
    """Seconds that start-up may take before a missing process is reported ($LLMC_JAX_INIT_TIMEOUT)."""
    return max(1, int(env_seconds(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT)))


def _int_env(var: str, default: int) -> int:
    try:
        return int(os.environ.get(var, default))
    except ValueError:
        return default


def cluster_env() -> str | None:
    """'SLURM' or 'Open MPI' where this process is one task of several of such a launcher, else None."""
    if all(v in os.environ for v in _SLURM_VARS) and _int_env("SLURM_NTASKS", 1) > 1:
        return "SLURM"
    if _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "Open MPI"
    return None


@dataclass(frozen=True)
class ProcessSpec:
    """The processes of this run, as resolve_processes found them: how many, which one this is,
    --coordinator's HOST:PORT (None: not given), and the cluster launcher ('SLURM' or 'Open MPI')
    whose environment jax reads the rest from (None: the flags say it all)."""
    num_processes: int
    process_rank: int
    coordinator: str | None
    cluster: str | None = None


def resolve_processes(num_processes: int | None, process_rank: int, coordinator: str | None) -> ProcessSpec:
    """The processes that -pn (None = not given), -pr and --coordinator ask for; a usage problem with
    them raises UsageError.

    -pn not given: under SLURM or Open MPI, with no --coordinator either, the job's task count, this
    task's rank as -pr and the launcher's name as the cluster (jax then reads the rest from the
    environment); otherwise 1. So an explicit -pn 1 runs one process even inside such a job."""
    cluster = None
    if num_processes is None:
        env = None if coordinator else cluster_env()
        if env is None:
            num_processes = 1
        else:
            _, size_var, rank_var = next(c for c in _CLUSTERS if c[0] == env)
            num_processes, process_rank = _int_env(size_var, 1), _int_env(rank_var, 0)
            cluster = env
            if env == "Open MPI" and "OMPI_MCA_orte_hnp_uri" not in os.environ:
                raise UsageError("this Open MPI (5 or newer) does not tell jax where the coordinator is: pass "
                                 "--coordinator HOST:PORT -pn $OMPI_COMM_WORLD_SIZE -pr $OMPI_COMM_WORLD_RANK "
                                 "(as scripts/run_mpirun.sh does)")
    n, r = num_processes, process_rank
    if n < 1:
        raise UsageError(f"-pn {n}: the number of processes must be >= 1")
    if not 0 <= r < n:
        raise UsageError(f"-pr {r} is out of range for -pn {n} (need 0 <= rank < num_processes)")
    if n > 1 and not coordinator and not cluster:
        raise UsageError(f"-pn {n} needs --coordinator HOST:PORT (the address process 0 listens on); "
                         "or start the processes with `python -m llmc_jax.launch --nproc N -- <train args>`")
    if coordinator:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    return ProcessSpec(n, r, coordinator, cluster)


def _wait_for_port(address: str, deadline: float) -> str | None:
    """Poll until HOST:PORT accepts a TCP connection: None, or the last error once the deadline passed."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return None
        except OSError as e:
            error = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            return error
        time.sleep(0.25)


def _port_taken(port: int) -> str | None:
    """Why rank 0 cannot serve the coordinator on this port (all addresses, as jax binds it), or None.
    Checked first because jax crashes (SIGSEGV) on a taken port about as often as it raises."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as gRPC: TIME_WAIT does not count
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _missing_message(n: int, rank: int, coordinator: str | None, cluster: str | None, timeout: int) -> str:
    """What the init watchdog prints: who is missing, as far as this rank can know, and what to check."""
    waited = f"within {timeout} s ({INIT_TIMEOUT_ENV})"
    if cluster:
        return (f"the {n} tasks of this {cluster} job did not all join jax.distributed {waited}; this is "
                f"rank {rank}. jax takes the coordinator's address from the job's environment (the step's "
                "first node); check that every task was started together (srun / mpirun, not by hand), "
                "that the nodes can reach each other, and the other tasks' output for an earlier error")
    if rank == 0:
        who = "process rank 1 did not join" if n == 2 else f"not all of ranks 1..{n - 1} joined"
        return (f"{who} {waited}; this is rank 0 of {n}, serving the coordinator on {coordinator}. Check "
                f"that every rank was started with --coordinator {coordinator} -pn {n} and its own -pr, that "
                "it can reach this host on that port (HOST must be this machine's address as the others "
                "see it; a firewall may block the port), and its own output for an earlier error")
    return (f"the {n} processes did not all join {waited}; this is rank {rank}, and the coordinator at "
            f"{coordinator} (rank 0) is up, but one or more other ranks never registered. Check that every "
            f"process got the same -pn {n} and --coordinator and a different -pr, and their output")


def maybe_initialize(spec: ProcessSpec) -> bool:
    """Initialize jax.distributed as the flags (resolved by resolve_processes into `spec`) or the
    environment ask; True where it did. Bounded: a missing process or coordinator ends this one after
    LLMC_JAX_INIT_TIMEOUT seconds with a message (see the module doc); a peer lost later ends it after
    LLMC_JAX_PEER_TIMEOUT (see llmc_jax.peer_watch)."""
    n, rank, cluster, coordinator = spec.num_processes, spec.process_rank, spec.cluster, spec.coordinator
    if not (cluster or coordinator or n > 1):
        return False
    import jax
    timeout, watch = init_timeout(), peer_timeout()
    deadline = time.monotonic() + timeout
    if cluster:
        print(f"{cluster} job with {n} tasks: initializing jax.distributed from its environment",
              file=sys.stderr, flush=True)
    elif rank == 0:
        port = int(coordinator.rpartition(":")[2])
        error = _port_taken(port)
        if error is not None:
            die(f"rank 0 cannot serve the coordinator on port {port} ({error}): another program, or "
                "another run, listens there; pick another port in --coordinator HOST:PORT on every process")
    else:
        error = _wait_for_port(coordinator, deadline)
        if error is not None:
            die(f"cannot reach the coordinator {coordinator} (process rank 0) within {timeout} s "
                f"({INIT_TIMEOUT_ENV}; last error: {error}); this is rank {rank} of {n}. Check that rank 0 "
                f"is running with --coordinator {coordinator} -pn {n} -pr 0, that HOST is its "
                "address as seen from this machine (127.0.0.1 only works on one machine), and that no "
                "firewall blocks the port")
    message = _missing_message(n, rank, coordinator, cluster, timeout)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), die, (message,))
    timer.daemon = True
    timer.start()
    kwargs = {} if cluster else dict(coordinator_address=coordinator, num_processes=n, process_id=rank)
    if watch:
        kwargs["heartbeat_timeout_seconds"] = int(max(100, 2 * watch))
    try:
        jax.distributed.initialize(initialization_timeout=timeout + JAX_INIT_GRACE, **kwargs)
    except Exception as e:
        raise SystemExit(f"llmc_jax: jax.distributed.initialize failed on rank {rank} of {n}: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        timer.cancel()
    if watch:
        from jax._src.distributed import global_state      # what jax.distributed holds (no public API)
        PeerWatch(global_state.client, global_state.process_id, global_state.num_processes, watch,
                  hang_timeout()).start()
    return True
