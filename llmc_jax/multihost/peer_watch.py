"""What stops a multi-process run whose processes fall apart while it trains (after start-up, which
llmc_jax.multihost.distributed bounds).

During the run (LLMC_JAX_PEER_TIMEOUT seconds, default 60; 0 turns this off): a thread in every
process writes a heartbeat to jax.distributed's key-value store and reads the others'. A process
that stops beating that long (killed, hung, cut off) or that failed with an exception makes every
other one print "llmc_jax: process rank R ..." and exit with status 1, even from inside a collective
that would otherwise wait forever. JAX's own heartbeat timeout is set to twice as long (at least
100 s; llmc_jax.multihost.distributed.maybe_initialize does that), so ours comes first. Rank 0 hosts the
coordination service: where it dies, JAX itself aborts the others at once (its message says the
coordination service's socket closed).

llmc_jax.multihost.distributed.maybe_initialize starts a PeerWatch once jax.distributed is up; its start-up
code uses die and env_seconds from here too.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

PEER_TIMEOUT_ENV = "LLMC_JAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 60.0
HANG_TIMEOUT_ENV = "LLMC_JAX_HANG_TIMEOUT"
DEFAULT_HANG_TIMEOUT = 1800.0       # longer than a compile, an evaluation or a checkpoint write
_active: "PeerWatch | None" = None


def progress() -> None:
    """The training loop's main thread finished a step or an event (a no-op without a watch)."""
    if _active is not None:
        _active.progress += 1


def env_seconds(var: str, default: float) -> float:
    """$var as a number of seconds (>= 0); `default` where it is unset or not a number."""
    try:
        return max(0.0, float(os.environ.get(var, default)))
    except ValueError:
        return default


def hang_timeout() -> float:
    """Seconds without a finished step on every process after which the run counts as hung
    ($LLMC_JAX_HANG_TIMEOUT; 0 = no check)."""
    return env_seconds(HANG_TIMEOUT_ENV, DEFAULT_HANG_TIMEOUT)


def peer_timeout() -> float:
    """Seconds of silence after which a peer counts as dead ($LLMC_JAX_PEER_TIMEOUT; 0 = no watch)."""
    return env_seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT)


def die(message: str | None) -> None:
    """Print one line naming the failure (if given) and leave at once with status 1: no atexit, since
    jax's shutdown barrier would wait for the lost process."""
    try:
        sys.stdout.flush()
        if message:
            print(f"llmc_jax: {message}", file=sys.stderr)
        sys.stderr.flush()
    finally:
        os._exit(1)


class PeerWatch:
    """Heartbeats through jax.distributed's key-value store, so that a process that dies, hangs or
    fails stops the others within `timeout` seconds, with a message naming it.

    Hangs: a process whose heartbeat goes on but whose main thread is stuck (a hung collective, a
    deadlock) stops advancing its `progress` count, which the heartbeat carries ("run <beats>
    <progress>"). Once this process's own count has not moved for `hang` seconds (after its first
    step), it stops the run naming the ranks furthest behind (all of them where none is).

    Each process keeps one key, llmc_jax/state/<rank>: "run <count>" while training, "done <count>"
    once its main thread has finished and it waits (at exit, before jax's shutdown barrier) for the
    others to finish too, "failed" after an uncaught exception, "stopped <reason>" when it stops
    because of another. A peer whose state has not changed for `timeout` seconds of this process's
    clock is lost; every process must run with the same LLMC_JAX_PEER_TIMEOUT. Rank 0 hosts the
    store, and JAX aborts the others the moment it goes, so before it leaves it waits (at most
    `timeout`) for the others to read why and leave; each marks llmc_jax/left/<rank> just before."""

    PREFIX, LEFT = "llmc_jax/state/", "llmc_jax/left/"

    def __init__(self, client, rank: int, n: int, timeout: float, hang: float = 0.0):
        self.client, self.rank, self.n, self.timeout, self.hang = client, rank, n, timeout, hang
        self.progress = 0                # advanced by the main thread (module-level progress())
        self._own_progress = (0, time.monotonic())
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
        global _active
        _active = self
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
                die(f"lost the coordination service (process rank 0) for {self.timeout:g} s "
                    f"({PEER_TIMEOUT_ENV}): {type(e).__name__}: {e}; stopping rank {self.rank} of {self.n}")
            return None
        self._kv_failing_since = None
        return states

    def _beat(self, phase: str) -> dict[int, str] | None:
        self._beats += 1
        return self._exchange(f"{phase} {self._beats} {self.progress}")

    def _hung(self, states: dict[int, str]) -> str | None:
        """Where this process's progress has stood still `hang` seconds (since its first step): the
        ranks furthest behind, as a sentence; None otherwise."""
        now, count = time.monotonic(), self.progress
        if count != self._own_progress[0]:
            self._own_progress = (count, now)
        if not self.hang or count == 0 or now - self._own_progress[1] <= self.hang:
            return None
        counts = {self.rank: count}
        for r, state in states.items():
            parts = state.split()
            if r != self.rank and len(parts) == 3 and parts[2].isdigit():
                counts[r] = int(parts[2])
        low = min(counts.values())
        behind = sorted(r for r, c in counts.items() if c == low)
        who = (f"process rank {behind[0]} is" if len(behind) == 1 else
               f"process ranks {', '.join(map(str, behind))} are")
        where = "behind the others" if len(behind) < len(counts) else "all at the same point"
        return (f"no progress for {self.hang:g} s ({HANG_TIMEOUT_ENV}): {who} {where} (a hung collective, "
                "or a process stuck in its own code); see its own output")

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
        return self._hung(states)

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
        die(message)

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
        self.hang = 0.0                  # the main thread is done: waiting for the others is no hang
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
