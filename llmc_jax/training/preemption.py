"""Preemption: SIGTERM or SIGUSR1 to any process of a run stops every process at the same step
boundary, where the loop writes a verified checkpoint and exits with PREEMPTED_EXIT ("preempted,
resume me with -y 1"); docs/multihost.md has the protocol and a SLURM script that requeues itself.

One process: a signal handler notes the signal; the loop stops at the next step boundary.
Several processes: the processes agree through jax.distributed's preemption sync point: its
service catches SIGTERM in any process, tells the others through the coordination service, and
`reached_preemption_sync_point(step)` turns true on every process at the same step (the largest
step any of them had reached). SIGUSR1 (what SLURM's `--signal=USR1@SECONDS` sends ahead of the
end) is turned into a SIGTERM to this process for that service. Further signals change nothing:
the stop is already under way, and a save that is cut off leaves no DONE marker, so the previous
checkpoint stays the resume point.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT = 75          # sysexits.h EX_TEMPFAIL: "try again later", i.e. resume with -y 1
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Installs the handlers (main thread only) on construction; `requested(step)` at every step
    boundary, on every process, in the same order; `close()` restores the previous handlers."""

    def __init__(self, num_processes: int):
        self.multi = num_processes > 1
        self.signal: int | None = None
        self._sync_point = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        if self.multi:
            from jax.experimental import multihost_utils
            self._sync_point = multihost_utils.reached_preemption_sync_point
            self._install(signal.SIGUSR1, self._to_sigterm)    # JAX's service holds SIGTERM itself
        else:
            for signum in SIGNALS:
                self._install(signum, self._note)

    def _install(self, signum: int, handler) -> None:
        self._previous[signum] = signal.signal(signum, handler)

    def _note(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def _to_sigterm(self, signum, frame) -> None:
        self._note(signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """True on every process at the same step once any of them was signalled."""
        if self._sync_point is None:
            return self.signal is not None
        try:
            return bool(self._sync_point(step))
        except RuntimeError as e:     # JAX_ENABLE_PREEMPTION_SERVICE=false: no sync point to agree on
            print(f"warning: no preemption sync point ({e}); a SIGTERM ends this run without a checkpoint",
                  file=sys.stderr, flush=True)
            self._sync_point = lambda step: False
            return False

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a preemption notice"

    def close(self, preempted: bool) -> None:
        """Restore the previous handlers; after a preemption, ignore further signals instead: the
        checkpoint is written and the process is leaving with PREEMPTED_EXIT."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if preempted else handler)
        self._previous = {}
        if preempted and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)     # also JAX's handler, torn down at exit
