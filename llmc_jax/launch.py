"""python -m llmc_jax.launch --nproc N [--devices-per-proc K] -- <train args>

Starts N processes on this machine, each `python -m llmc_jax.train <train args> --coordinator
127.0.0.1:PORT -pn N -pr i` (a free port). The command after `--` may also be a whole command
(`-- python -m llmc_jax.train ...`); it gets the same three flags appended. --devices-per-proc K
gives each process K fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K), for
testing on CPU.

Rank 0's stdout and stderr are passed through; the other ranks' stdout is dropped (train.py prints
only on process 0) and their stderr kept in an unnamed temporary file, shown if they fail. As soon as any
process exits non-zero or dies from a signal, the others get SIGTERM, then SIGKILL after
--grace seconds, and the launcher exits non-zero naming the rank that failed.

SIGTERM or SIGUSR1 to the launcher is passed on to every process: a preemption notice (see
llmc_jax.training.preemption). The processes agree on a step, write a checkpoint there and exit
with status 75, and so does the launcher, once they all have.

The processes never outlive the launcher. They stay in its process group, so a Ctrl-C at the
terminal reaches all of them (and the launcher stops them). If the launcher itself is killed
(SIGKILL, OOM killer), Linux sends each of them SIGTERM
(prctl PR_SET_PDEATHSIG, set in the child before exec; it fires when the creating *thread* exits,
so they are started from the main thread). Elsewhere, and as a second guard, each train process
started with $LLMC_JAX_LAUNCHER_PID set watches its parent (`watch_launcher`) and stops when it
is re-parented.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from llmc_jax.errors import ArgumentParser, run_command
from llmc_jax.training.preemption import PREEMPTED_EXIT

LAUNCHER_ENV = "LLMC_JAX_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1     # linux/prctl.h
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _command(rest: list[str]) -> list[str]:
    if rest and not rest[0].startswith("-"):
        return list(rest)                   # a whole command: python -m llmc_jax.train ...
    return [sys.executable, "-m", "llmc_jax.train"] + list(rest)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for p in procs:
        p.wait()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this (launcher) thread dies; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl    # loaded before the fork
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != launcher:     # the launcher died before the prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def spawn(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start a worker that stops when the launcher dies. Call it from the main thread: PDEATHSIG
    fires when the creating thread exits, so a worker started from a short-lived thread would die with it."""
    env = dict(env, **{LAUNCHER_ENV: str(os.getpid())})
    # jax.distributed's preemption service stays on: SIGTERM (from the launcher, PDEATHSIG or _stop)
    # is a preemption notice; a worker that cannot save (a peer died) gets SIGKILL after --grace
    return subprocess.Popen(cmd, env=env, preexec_fn=_pdeathsig_preexec(), **kwargs)


def watch_launcher(poll_s: float = 1.0) -> None:
    """In a worker started by the launcher: a daemon thread that stops this process (SIGTERM, then
    exit status 143) once its parent is gone, i.e. it was re-parented. The portable fallback to
    PDEATHSIG; does nothing when $LLMC_JAX_LAUNCHER_PID is not set."""
    if not os.environ.get(LAUNCHER_ENV):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"llmc_jax: the launcher (pid {os.environ[LAUNCHER_ENV]}) is gone; stopping", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)                    # SIGTERM handled (and ignored) by someone: leave anyway
        os._exit(143)
    threading.Thread(target=watch, name="llmc-watch-launcher", daemon=True).start()


class _Forward:
    """SIGTERM/SIGUSR1 to the launcher: the same signal to every worker still running."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs, self.signals = procs, []

    def __call__(self, signum, frame) -> None:
        self.signals.append(signum)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)


def _tail(f: BinaryIO, n: int = 4000) -> str:
    """The last n bytes of an open file, as text."""
    try:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the launcher's own flags, the train arguments after --)."""
    if "--" in argv:
        i = argv.index("--")
        own, rest = argv[:i], argv[i + 1:]
    else:
        own, rest = argv, []
    ap = ArgumentParser(prog="python -m llmc_jax.launch",
                        usage="python -m llmc_jax.launch --nproc N [--devices-per-proc K] [--port PORT] "
                              "[--grace S] -- <train flags>",
                        description="start N llmc_jax.train processes on this machine")
    ap.add_argument("--nproc", type=int, required=True, help="number of processes")
    ap.add_argument("--devices-per-proc", type=int, default=None,
                    help="fake CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds between SIGTERM and SIGKILL when stopping the others after a failure")
    a = ap.parse_args(own)
    from llmc_jax.training import cli
    cli.check_bounds(ap, a, {"nproc": cli.POSITIVE, "devices_per_proc": cli.POSITIVE, "grace": cli.NONNEG,
                             "port": cli.Bound("in [1, 65535]", lambda v: 1 <= v <= 65535)})
    if not rest:
        ap.error("give the train arguments after --")
    for flag in ("--coordinator", "-pn", "--num-processes", "-pr", "--process-rank"):
        if flag in rest:
            ap.error(f"{flag} is set by the launcher; leave it out of the train arguments")
    return a, rest


def _start_ranks(base: list[str], env: dict, nproc: int, procs: list[subprocess.Popen],
                 logs: list[BinaryIO | None]) -> None:
    """Spawn every rank into `procs`: rank 0 on this terminal, the others' stderr into `logs`: files
    with no name (unlinked at once), which vanish with the launcher however it ends, SIGKILL included."""
    for rank in range(nproc):
        err = None if rank == 0 else tempfile.TemporaryFile(prefix="llmc_launch_")
        out = None if rank == 0 else subprocess.DEVNULL
        procs.append(spawn(base + ["-pr", str(rank)], env, stdout=out, stderr=err))
        logs.append(err)


def _wait(procs: list[subprocess.Popen], failed: list[tuple[int, int]]) -> None:
    """Until every process has ended, or one has failed: (rank, status) of those found failed go to `failed`."""
    while True:
        running = False
        for rank, p in enumerate(procs):
            rc = p.poll()
            if rc is None:
                running = True
            elif rc not in (0, PREEMPTED_EXIT):
                failed.append((rank, rc))
        if failed or not running:
            return
        time.sleep(0.1)


def _report(failed: list[tuple[int, int]], tails: dict[int, str], nproc: int) -> int:
    for rank, rc in failed:
        if tails.get(rank):
            print(f"launch: last stderr of rank {rank}:\n{tails[rank]}", file=sys.stderr)
    for rank, rc in failed:
        print(f"launch: rank {rank} of {nproc} {_status(rc)}", file=sys.stderr)
    print(f"launch: stopped the other processes after rank {failed[0][0]} failed", file=sys.stderr, flush=True)
    rc = failed[0][1]
    return rc if rc > 0 else 1


def main(argv: list[str] | None = None) -> int:
    a, rest = _parse(sys.argv[1:] if argv is None else list(argv))
    port = a.port or free_port()
    base = _command(rest) + ["--coordinator", f"127.0.0.1:{port}", "-pn", str(a.nproc)]
    env = dict(os.environ)
    if a.devices_per_proc:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={a.devices_per_proc}").strip()

    procs: list[subprocess.Popen] = []
    logs: list[BinaryIO | None] = []
    main_thread = threading.current_thread() is threading.main_thread()
    forward = _Forward(procs)
    old_handlers = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main_thread else {}
    failed: list[tuple[int, int]] = []     # (rank, status) of those found failed at one poll
    try:
        _start_ranks(base, env, a.nproc, procs, logs)
        _wait(procs, failed)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping all processes", file=sys.stderr, flush=True)
        _stop(procs, a.grace)
        return 130
    finally:
        if failed or any(p.poll() is None for p in procs):
            _stop(procs, a.grace)
        tails = {rank: _tail(f).strip() for rank, f in enumerate(logs) if f is not None}
        for f in logs:
            if f is not None:
                f.close()
        for sig, handler in old_handlers.items():     # after a preemption notice: ignore more, leaving
            signal.signal(sig, signal.SIG_IGN if forward.signals else handler)
    if failed:
        return _report(failed, tails, a.nproc)
    if any(p.returncode == PREEMPTED_EXIT for p in procs):
        print(f"launch: the {a.nproc} processes were preempted and saved a checkpoint (exit status "
              f"{PREEMPTED_EXIT}): run again with -y 1 to resume", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    return 0

if __name__ == "__main__":
    run_command(main)
