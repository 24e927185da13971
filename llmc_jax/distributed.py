"""Multi-process start-up through jax.distributed, and what stops a run whose processes fall apart.

    --coordinator HOST:PORT -pn N -pr R    explicit (llm.c's -pn/-pr); what llmc_jax.launch passes
    SLURM (srun) / Open MPI (mpirun), with neither -pn nor --coordinator given:
                                           -pn/-pr come from the job's environment and
                                           jax.distributed.initialize() finds the coordinator itself
    anything else (or an explicit -pn 1)   one process: nothing is initialized

Must run before any JAX computation (train.main calls it first). Every failure is bounded and named:

- start-up (LLMC_JAX_INIT_TIMEOUT seconds, default 300): rank 0 first checks that the coordinator's
  port is free (jax may crash on a taken one), a rank other than 0 waits for that port to accept
  connections, then every rank waits in jax.distributed.initialize for all N to register. Past the
  timeout the process prints which rank (or the coordinator) is missing and what to check, and exits
  with status 1. JAX's own abort (SIGABRT, a page of C++ log) is given 30 s more, so it never comes
  first.
- during the run (LLMC_JAX_PEER_TIMEOUT seconds, default 60; 0 turns this off): a thread in every
  process writes a heartbeat to jax.distributed's key-value store and reads the others'. A process
  that stops beating that long (killed, hung, cut off) or that failed with an exception makes every
  other one print "llmc_jax: process rank R ..." and exit with status 1, even from inside a collective
  that would otherwise wait forever. JAX's own heartbeat timeout is set to twice as long (at least
  100 s), so ours comes first. Rank 0 hosts the coordination service: where it dies, JAX itself
  aborts the others at once (its message says the coordination service's socket closed).
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

INIT_TIMEOUT_ENV = "LLMC_JAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300
PEER_TIMEOUT_ENV = "LLMC_JAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 60.0
JAX_INIT_GRACE = 30         # JAX's own initialization_timeout is ours plus this: our message comes first

# A cluster launcher whose environment names every process: (its name, size var, rank var).
_CLUSTERS = (("SLURM", "SLURM_NTASKS", "SLURM_PROCID"), ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))
# what jax's SLURM detection reads (jax._src.clusters.slurm_cluster); without them it cannot start
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _seconds(var: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(var, default)))
    except ValueError:
        return default


def init_timeout() -> int:
    """Seconds that start-up may take before a missing process is reported ($LLMC_JAX_INIT_TIMEOUT)."""
    return max(1, int(_seconds(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT)))


def peer_timeout() -> float:
    """Seconds of silence after which a peer counts as dead ($LLMC_JAX_PEER_TIMEOUT; 0 = no watch)."""
    return _seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT)


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


def check_args(args) -> str | None:
    """A usage problem with -pn/-pr/--coordinator (a message), or None.

    Also resolves -pn (None = not given): under SLURM or Open MPI, with no --coordinator either, to
    the job's task count, -pr to this task's rank and args.cluster to the launcher's name (jax then
    reads the rest from the environment); otherwise to 1. So an explicit -pn 1 runs one process even
    inside such a job."""
    args.cluster = None
    if args.num_processes is None:
        env = None if args.coordinator else cluster_env()
        if env is None:
            args.num_processes = 1
        else:
            _, size_var, rank_var = next(c for c in _CLUSTERS if c[0] == env)
            args.num_processes, args.process_rank = _int_env(size_var, 1), _int_env(rank_var, 0)
            args.cluster = env
            if env == "Open MPI" and "OMPI_MCA_orte_hnp_uri" not in os.environ:
                return ("this Open MPI (5 or newer) does not tell jax where the coordinator is: pass "
                        "--coordinator HOST:PORT -pn $OMPI_COMM_WORLD_SIZE -pr $OMPI_COMM_WORLD_RANK "
                        "(as scripts/run_mpirun.sh does)")
    n, r = args.num_processes, args.process_rank
    if n < 1:
        return f"-pn {n}: the number of processes must be >= 1"
    if not 0 <= r < n:
        return f"-pr {r} is out of range for -pn {n} (need 0 <= rank < num_processes)"
    if n > 1 and not args.coordinator and not args.cluster:
        return (f"-pn {n} needs --coordinator HOST:PORT (the address process 0 listens on); "
                "or start the processes with `python -m llmc_jax.launch --nproc N -- <train args>`")
    if args.coordinator:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            return f"--coordinator {args.coordinator!r}: expected HOST:PORT"
    return None


def _die(message: str | None) -> None:
    """Print one line naming the failure (if given) and leave at once with status 1: no atexit, since
    jax's shutdown barrier would wait for the lost process."""
    try:
        sys.stdout.flush()
        if message:
            print(f"llmc_jax: {message}", file=sys.stderr)
        sys.stderr.flush()
    finally:
        os._exit(1)


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


def gather_params(params: dict) -> dict:
    """Params this process can use on its own (sampling, HellaSwag, the llm.c model export): the
    arrays themselves with one process; with several, gathered from every process (a collective:
    every process must call it)."""
    import jax
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)


def maybe_initialize(args) -> bool:
    """Initialize jax.distributed as the flags (resolved by check_args) or the environment ask; True
    where it did. Bounded: a missing process or coordinator ends this one after LLMC_JAX_INIT_TIMEOUT
    seconds with a message; a peer lost later ends it after LLMC_JAX_PEER_TIMEOUT (see the module doc)."""
    n, rank, cluster = args.num_processes, args.process_rank, args.cluster
    if not (cluster or args.coordinator or n > 1):
        return False
    import jax
    timeout, watch = init_timeout(), peer_timeout()
    deadline = time.monotonic() + timeout
    if cluster:
        print(f"{cluster} job with {n} tasks: initializing jax.distributed from its environment",
              file=sys.stderr, flush=True)
    elif rank == 0:
        port = int(args.coordinator.rpartition(":")[2])
        error = _port_taken(port)
        if error is not None:
            _die(f"rank 0 cannot serve the coordinator on port {port} ({error}): another program, or "
                 "another run, listens there; pick another port in --coordinator HOST:PORT on every process")
    else:
        error = _wait_for_port(args.coordinator, deadline)
        if error is not None:
            _die(f"cannot reach the coordinator {args.coordinator} (process rank 0) within {timeout} s "
                 f"({INIT_TIMEOUT_ENV}; last error: {error}); this is rank {rank} of {n}. Check that rank 0 "
                 f"is running with --coordinator {args.coordinator} -pn {n} -pr 0, that HOST is its "
                 "address as seen from this machine (127.0.0.1 only works on one machine), and that no "
                 "firewall blocks the port")
    message = _missing_message(n, rank, args.coordinator, cluster, timeout)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _die, (message,))
    timer.daemon = True
    timer.start()
    kwargs = {} if cluster else dict(coordinator_address=args.coordinator, num_processes=n, process_id=rank)
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
        PeerWatch(global_state.client, global_state.process_id, global_state.num_processes, watch).start()
    return True


class PeerWatch:
    """Heartbeats through jax.distributed's key-value store, so that a process that dies, hangs or
    fails stops the others within `timeout` seconds, with a message naming it.

    Each process keeps one key, llmc_jax/state/<rank>: "run <count>" while training, "done <count>"
    once its main thread has finished and it waits (at exit, before jax's shutdown barrier) for the
    others to finish too, "failed" after an uncaught exception, "stopped <reason>" when it stops
    because of another. A peer whose state has not changed for `timeout` seconds of this process's
    clock is lost; every process must run with the same LLMC_JAX_PEER_TIMEOUT. Rank 0 hosts the
    store, and JAX aborts the others the moment it goes, so before it leaves it waits (at most
    `timeout`) for the others to read why and leave; each marks llmc_jax/left/<rank> just before."""

    PREFIX, LEFT = "llmc_jax/state/", "llmc_jax/left/"

    def __init__(self, client, rank: int, n: int, timeout: float):
        self.client, self.rank, self.n, self.timeout = client, rank, n, timeout
        self.interval = min(5.0, max(0.1, timeout / 10))
        now = time.monotonic()
        self._seen = {r: (None, now) for r in range(n) if r != rank}   # rank -> (last state, since when)
        self._beats = 0
        self._kv_failing_since: float | None = None
        self._failed = False             # an uncaught exception in the main thread
        self._exiting = False            # the main thread has finished: _at_exit has taken over
        self._lock = threading.Lock()    # held by the thread per round; _at_exit takes it to end them
        self._stopping = threading.Lock()

    def start(self) -> None:
        previous = sys.excepthook

        def excepthook(*exc):
            self._failed = True
            if not self._stopping.locked():     # else the error follows from a loss already reported
                previous(*exc)
        sys.excepthook = excepthook
        atexit.register(self._at_exit)      # registered after jax's: runs before its shutdown barrier
        threading.Thread(target=self._run, name="llmc_jax-peer-watch", daemon=True).start()

    def _exchange(self, state: str | None) -> dict[int, str] | None:
        """Publish this process's state (None: leave it), read every peer's; None if the store failed."""
        try:
            if state is not None:
                self.client.key_value_set(f"{self.PREFIX}{self.rank}", state, allow_overwrite=True)
            states = {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(self.PREFIX)}
        except Exception as e:          # the coordination service is gone or cut off
            now = time.monotonic()
            self._kv_failing_since = self._kv_failing_since or now
            if now - self._kv_failing_since > self.timeout:
                _die(f"lost the coordination service (process rank 0) for {self.timeout:g} s "
                     f"({PEER_TIMEOUT_ENV}): {type(e).__name__}: {e}; stopping rank {self.rank} of {self.n}")
            return None
        self._kv_failing_since = None
        return states

    def _beat(self, phase: str) -> dict[int, str] | None:
        self._beats += 1
        return self._exchange(f"{phase} {self._beats}")

    def _update(self, states: dict[int, str]) -> None:
        now = time.monotonic()
        for r, (last, _) in self._seen.items():
            if states.get(r) != last:
                self._seen[r] = (states.get(r), now)

    def _silence(self, r: int) -> str | None:
        if time.monotonic() - self._seen[r][1] <= self.timeout:
            return None
        return (f"process rank {r} stopped responding (no heartbeat for {self.timeout:g} s, {PEER_TIMEOUT_ENV}): "
                "it died, hangs or lost its network; see its own output")

    def _problem(self, states: dict[int, str]) -> str | None:
        """The first peer that failed, stopped or fell silent, as a sentence; None while all are well."""
        self._update(states)
        for r in sorted(self._seen):
            state = states.get(r) or ""
            if state == "failed":
                return f"process rank {r} failed (its error is in its own output)"
            if state.startswith("stopped "):
                return state[len("stopped "):]
            silence = self._silence(r)
            if silence:
                return silence
        return None

    def _wait_for_others_to_leave(self) -> str | None:
        """After this process failed or stopped: wait (at most timeout + interval) until every peer
        has left or fallen silent (on ranks other than 0, also failed or stopped: only rank 0 must go
        last); the first silence found, as a sentence, or None."""
        silent, end = None, time.monotonic() + self.timeout + self.interval
        while time.monotonic() < end:
            states = self._exchange(None)
            if states is None:
                time.sleep(min(self.interval, 0.1))
                continue
            self._update(states)
            try:
                left = {int(k.rsplit("/", 1)[1]) for k, _ in self.client.key_value_dir_get(self.LEFT)}
            except Exception:
                left = set()
            waiting = False
            for r in sorted(self._seen):
                state = states.get(r) or ""
                if r in left or (self.rank != 0 and (state == "failed" or state.startswith("stopped "))):
                    continue
                silence = self._silence(r)
                silent = silent or silence
                waiting = waiting or not silence
            if not waiting:
                break
            time.sleep(min(self.interval, 0.1))
        return silent

    def _leave(self, message: str | None) -> None:
        if self.rank != 0:
            try:
                self.client.key_value_set(f"{self.LEFT}{self.rank}", "")
            except Exception:
                pass                    # rank 0 is gone already: nobody is waiting for this mark
        _die(message)

    def _claim_stop(self) -> None:
        """Let one thread (the watch's or the main one at exit) stop the process; the other waits."""
        if not self._stopping.acquire(blocking=False):
            while True:
                time.sleep(1)

    def _stop(self, reason: str) -> None:
        """A peer is lost: say so, tell the rest, leave with status 1."""
        self._claim_stop()
        self._exchange(f"stopped {reason}")
        print(f"llmc_jax: {reason}; stopping this process (rank {self.rank} of {self.n})",
              file=sys.stderr, flush=True)
        if self.rank == 0:
            self._wait_for_others_to_leave()
        self._leave(None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._exiting:
                    return
                states = self._beat("run")
                problem = states is not None and self._problem(states)
            if problem:
                self._stop(problem)
            time.sleep(self.interval)

    def _at_exit(self) -> None:
        """The main thread has finished. After an exception: publish it, wait for the others to read
        it, leave. Otherwise wait until every peer is done too (or lost) before jax's shutdown
        barrier, which would otherwise wait, holding the GIL, until JAX's own heartbeat timeout."""
        with self._lock:
            self._exiting = True
        if self._failed:
            self._claim_stop()
            self._exchange("failed")
            silent = self._wait_for_others_to_leave()     # a peer's death may be why this one failed
            self._leave(f"{silent}; stopping this process (rank {self.rank} of {self.n})" if silent else
                        f"this process (rank {self.rank} of {self.n}) failed (the error is above); "
                        "stopped the others")
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                states, next_beat = self._beat("done"), now + self.interval
            else:
                states = self._exchange(None)
            if states is not None:
                if all((states.get(r) or "").startswith("done ") for r in self._seen):
                    return
                problem = self._problem(states)
                if problem:
                    self._stop(problem)
            time.sleep(0.05)
