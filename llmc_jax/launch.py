"""python -m llmc_jax.launch --nproc N [--devices-per-proc K] -- <train args>

Starts N processes on this machine, each `python -m llmc_jax.train <train args> --coordinator
127.0.0.1:PORT -pn N -pr i` (a free port). The command after `--` may also be a whole command
(`-- python -m llmc_jax.train ...`); it gets the same three flags appended. --devices-per-proc K
gives each process K fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K), for
testing on CPU.

Rank 0's stdout and stderr are passed through; the other ranks' stdout is dropped (train.py prints
only on process 0) and their stderr kept in a temporary file, shown if they fail. As soon as any
process exits non-zero or dies from a signal, the others get SIGTERM, then SIGKILL after
--grace seconds, and the launcher exits non-zero naming the rank that failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


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


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:
        i = argv.index("--")
        own, rest = argv[:i], argv[i + 1:]
    else:
        own, rest = argv, []
    ap = argparse.ArgumentParser(prog="python -m llmc_jax.launch",
                                 description="start N llmc_jax.train processes on this machine")
    ap.add_argument("--nproc", type=int, required=True, help="number of processes")
    ap.add_argument("--devices-per-proc", type=int, default=None,
                    help="fake CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds between SIGTERM and SIGKILL when stopping the others after a failure")
    a = ap.parse_args(own)
    if a.nproc < 1:
        ap.error("--nproc must be >= 1")
    if not rest:
        ap.error("give the train arguments after --")
    for flag in ("--coordinator", "-pn", "--num-processes", "-pr", "--process-rank"):
        if flag in rest:
            ap.error(f"{flag} is set by the launcher; leave it out of the train arguments")
    port = a.port or free_port()
    base = _command(rest) + ["--coordinator", f"127.0.0.1:{port}", "-pn", str(a.nproc)]
    env = dict(os.environ)
    if a.devices_per_proc:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={a.devices_per_proc}").strip()

    procs: list[subprocess.Popen] = []
    logs: list[str | None] = []
    tmpdir = tempfile.mkdtemp(prefix="llmc_launch_")
    failed: list[tuple[int, int]] = []     # (rank, status) of those found failed at one poll
    try:
        for rank in range(a.nproc):
            if rank == 0:
                out, err, logs_path = None, None, None
            else:
                logs_path = os.path.join(tmpdir, f"rank{rank}.stderr")
                out, err = subprocess.DEVNULL, open(logs_path, "wb")
            procs.append(subprocess.Popen(base + ["-pr", str(rank)], env=env, stdout=out, stderr=err))
            if err is not None:
                err.close()
            logs.append(logs_path)
        while True:
            running = False
            for rank, p in enumerate(procs):
                rc = p.poll()
                if rc is None:
                    running = True
                elif rc != 0:
                    failed.append((rank, rc))
            if failed or not running:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping all processes", file=sys.stderr, flush=True)
        _stop(procs, a.grace)
        return 130
    finally:
        if failed or any(p.poll() is None for p in procs):
            _stop(procs, a.grace)
        tails = {rank: _tail(path).strip() for rank, path in enumerate(logs) if path}
        shutil.rmtree(tmpdir, ignore_errors=True)
    if not failed:
        return 0
    for rank, rc in failed:
        if tails.get(rank):
            print(f"launch: last stderr of rank {rank}:\n{tails[rank]}", file=sys.stderr)
    for rank, rc in failed:
        print(f"launch: rank {rank} of {a.nproc} {_status(rc)}", file=sys.stderr)
    print(f"launch: stopped the other processes after rank {failed[0][0]} failed", file=sys.stderr, flush=True)
    rc = failed[0][1]
    return rc if rc > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
