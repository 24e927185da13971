"""Preemption (llmc_jax/training/preemption.py): SIGTERM or SIGUSR1 mid-run makes every process stop
at one step boundary, write a verified checkpoint there and exit 75; the resumed run's main.log is
byte-equal to an uninterrupted run's. And a stopped (SIGSTOP) peer stops the others, named.

Each run is a subprocess (signals), on the llm.c fixture model, fp32, unshuffled."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_multiprocess import COMMON, REPO, _children, _env, cache_dir  # noqa: F401 (a fixture)

PREEMPTED = 75
STEPS = 80
ONE = COMMON[:-2] + ["-x", str(STEPS), "-v", "50", "-m", "1", "-n", "0"]     # no -z: one process
TWO = COMMON + ["-x", str(STEPS), "-v", "50", "-m", "1", "-n", "0"]


class Running:
    """A run started in the background whose stdout is read line by line on a thread."""

    def __init__(self, argv: list[str], env: dict):
        self.p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.lines: list[str] = []
        self.stepped = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            m = re.match(r"^step\s+(\d+)/", line)
            if m and int(m.group(1)) >= 3:
                self.stepped.set()

    def wait_for_steps(self) -> None:
        assert self.stepped.wait(120), "no step 3 within 120 s:\n" + "".join(self.lines)[-2000:]

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                for pid, _ in _children(self.p.pid):
                    os.kill(pid, signal.SIGKILL)
                self.p.kill()
                self.p.wait()
        time.sleep(0.2)                  # the reader thread takes the last lines
        return rc, "".join(self.lines), self.p.stderr.read()


def _done_steps(out_dir) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(out_dir) if n.startswith("DONE_"))


def _train(argv, env, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _preempt_and_resume(cmd: list[str], env: dict, out_dir, send) -> tuple[str, int]:
    """Start `cmd -o out_dir`, call send(running) after step 3, expect exit 75 and one checkpoint,
    resume it with -y 1 to the end; (main.log, the preempted step)."""
    run = Running(cmd + ["-o", str(out_dir)], env)
    run.wait_for_steps()
    send(run)
    rc, out, err = run.finish()
    assert rc == PREEMPTED, f"rc {rc}\n{out[-2000:]}\n{err[-2000:]}"
    steps = _done_steps(out_dir)
    assert len(steps) == 1 and 3 <= steps[0] < STEPS, steps
    assert "preempted" in out and f"at step {steps[0]}: the checkpoint of step {steps[0]}" in out, out[-1500:]
    _train(cmd + ["-o", str(out_dir), "-y", "1"], env)
    return open(os.path.join(out_dir, "main.log")).read(), steps[0]


@pytest.fixture(scope="module")
def straight_one(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("straight_one")
    _train([sys.executable, "-m", "llmc_jax.train"] + ONE + ["-o", str(out)], _env(cache_dir))
    return open(out / "main.log").read()


def _keep_sending(run: Running, signum: int) -> None:
    """signum every 20 ms until the process ends: some land while it evaluates and saves."""
    def send():
        while run.p.poll() is None:
            try:
                run.p.send_signal(signum)
            except ProcessLookupError:
                return
            time.sleep(0.02)
    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("first,then", [("SIGTERM", None), ("SIGUSR1", "SIGTERM")])
def test_one_process_preempted_resumes_exactly(tmp_path, cache_dir, straight_one, first, then):
    """A signal (and, in the second case, SIGTERM every 20 ms after it, through the stop and the
    save): exit 75, one verified checkpoint, and the resumed main.log equals the uninterrupted one."""
    def send(run):
        run.p.send_signal(getattr(signal, first))
        if then:
            _keep_sending(run, getattr(signal, then))
    log, step = _preempt_and_resume([sys.executable, "-m", "llmc_jax.train"] + ONE, _env(cache_dir),
                                    tmp_path / "out", send)
    assert log.count("trl:") == STEPS and log == straight_one


def _ranks(run: Running) -> dict[int, int]:
    kids = {}
    for pid, cmd in _children(run.p.pid):
        m = re.search(r"-pr (\d+)\s*$", cmd)
        if m:
            kids[int(m.group(1))] = pid
    assert sorted(kids) == [0, 1], _children(run.p.pid)
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launcher's children through /proc")
def test_two_processes_stop_at_one_step_and_resume_exactly(tmp_path, cache_dir):
    """2 processes x 2 devices, -z 1: SIGTERM to rank 1 alone, then in a second run SIGUSR1 to rank 0
    alone followed by SIGTERM to the launcher every 20 ms (passed on to both, through the stop and the
    save). Both processes stop at one step (the sharded save is collective: a process elsewhere would
    hang it, and the DONE marker verifies both processes' shards), the launcher exits 75, and the
    resumed main.log equals an uninterrupted 2-process run's."""
    launch = [sys.executable, "-m", "llmc_jax.launch", "--nproc", "2", "--devices-per-proc", "2", "--"]
    env = _env(cache_dir, LLMC_JAX_PEER_TIMEOUT="30")
    straight = tmp_path / "straight"
    _train(launch + TWO + ["-o", str(straight)], env)
    want = open(straight / "main.log").read()
    for rank, name, storm in ((1, "SIGTERM", False), (0, "SIGUSR1", True)):
        def send(run):
            os.kill(_ranks(run)[rank], getattr(signal, name))
            if storm:
                _keep_sending(run, signal.SIGTERM)
        log, step = _preempt_and_resume(launch + TWO, env, tmp_path / name, send)
        assert log == want, (name, step)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launcher's children through /proc")
def test_a_stopped_peer_stops_the_other_within_the_timeout(cache_dir):
    """Rank 1 frozen by SIGSTOP (alive, silent): rank 0 stops within LLMC_JAX_PEER_TIMEOUT (5 s) plus
    its polling, with a line naming rank 1; the launcher exits non-zero and leaves nothing running."""
    launch = [sys.executable, "-m", "llmc_jax.launch", "--nproc", "2", "--devices-per-proc", "2", "--grace", "2", "--"]
    run = Running(launch + TWO[:-8] + ["-x", "100000", "-v", "0"], _env(cache_dir, LLMC_JAX_PEER_TIMEOUT="5"))
    run.wait_for_steps()
    rank1 = _ranks(run)[1]
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGSTOP)
    rc, out, err = run.finish(timeout=60)
    elapsed = time.monotonic() - t0
    assert rc not in (0, PREEMPTED), rc
    assert "process rank 1 stopped responding (no heartbeat for 5 s" in err, err[-2000:]
    assert elapsed < 5 + 15, elapsed
    assert not _children(run.p.pid)
    with pytest.raises(ProcessLookupError):
        os.kill(rank1, 0)
