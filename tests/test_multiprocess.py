"""Multi-process training on CPU through llmc_jax.launch (processes on 127.0.0.1, fake devices).

Every subprocess runs under a timeout; the JAX distributed runtime aborts a process whose peer
never arrives only after LLMC_JAX_INIT_TIMEOUT seconds, set short here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import device_flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "llmc_tiny")
COMMON = ["-e", f"{FIXTURE}/model.bin", "-i", f"{FIXTURE}/train.bin", "-j", f"{FIXTURE}/val.bin",
          "-t", "64", "-d", "256", "-b", "1", "-s", "0", "-c", "0.1", "--dtype", "float32",
          "--shuffle", "0", "-z", "1"]
LLAMA = os.path.join(HERE, "data", "llama3_tiny")
# the same run on the Llama 3 fixture (its one shard serves as train and val data)
LLAMA_COMMON = ["-e", f"{LLAMA}/model.bin", "-i", f"{LLAMA}/train.bin", "-j", f"{LLAMA}/train.bin"] + COMMON[6:]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mp_cache"))


def _env(cache: str, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", LLMC_JAX_CACHE=cache, LLMC_JAX_INIT_TIMEOUT="30", **extra)


def _losses(stdout: str, what: str) -> list[float]:
    pat = r"^step\s+\d+/\d+ \| loss (\S+)" if what == "train" else r"^val loss (\S+)"
    return [float(m.group(1)) for m in (re.match(pat, line) for line in stdout.splitlines()) if m]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, cache_dir):
    """2 processes x 2 devices read and compute what 1 process x 4 devices does: same losses on
    stdout (to 1e-5: the cross-process all-reduce may sum in another order) and the same main.log.
    Run on the Llama 3 fixture; GPT-2's two processes are held to one process's losses by
    test_checkpoint_sharded (a 2-process run continued by a 1-process resume)."""
    argv = LLAMA_COMMON + ["-x", "4", "-v", "2", "-m", "1"]
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    one = subprocess.run([sys.executable, "-m", "llmc_jax.train"] + argv + ["-o", one_dir], cwd=REPO,
                         env=_env(cache_dir, XLA_FLAGS=device_flags(4)),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "llmc_jax.launch", "--nproc", "2", "--devices-per-proc", "2",
                          "--"] + argv + ["-o", two_dir], cwd=REPO, env=_env(cache_dir),
                         capture_output=True, text=True, timeout=150)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "num_devices           | 4 " in two.stdout and "num_processes         | 2 " in two.stdout
    assert two.stdout.count("batch_size B=1") == 1          # only process 0 prints
    for what, n in (("train", 4), ("val", 3)):
        a, b = _losses(one.stdout, what), _losses(two.stdout, what)
        assert len(a) == len(b) == n, (what, a, b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=what)
    log_one = open(os.path.join(one_dir, "main.log")).read()
    log_two = open(os.path.join(two_dir, "main.log")).read()
    assert log_one.count("trl:") == 4 and log_one.count("tel:") == 3
    assert log_two == log_one


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out.append((int(d), f.read().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launcher's children through /proc")
def test_peer_killed_mid_run_stops_the_launcher(cache_dir):
    """Rank 1 killed (SIGKILL) after rank 0 printed step 1: the launcher stops rank 0 and exits
    non-zero within a bounded time, naming rank 1."""
    argv = COMMON + ["-x", "200", "-v", "0"]
    p = subprocess.Popen([sys.executable, "-m", "llmc_jax.launch", "--nproc", "2", "--devices-per-proc", "2",
                          "--grace", "3", "--"] + argv, cwd=REPO, env=_env(cache_dir),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    stepped = threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if re.match(r"^step\s+1/", line):
                stepped.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert stepped.wait(90), "rank 0 never printed step 1:\n" + "".join(lines)[-2000:]
        rank1 = [pid for pid, cmd in _children(p.pid) if cmd.rstrip().endswith("-pr 1")]
        assert len(rank1) == 1, _children(p.pid)
        t0 = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        rc = p.wait(timeout=30)
        elapsed = time.monotonic() - t0
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            for pid, _ in _children(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.kill()
            p.wait()
    assert rc != 0
    assert elapsed < 15, elapsed
    assert "rank 1 of 2 was killed by SIGKILL" in err, err[-2000:]
    assert not _children(p.pid)                    # rank 0 was stopped too (the launcher waited for it)


def test_usage_errors():
    """Flag combinations a multi-process run refuses before starting any work."""
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "llmc_jax.train"] + COMMON + ["-x", "1"] + list(extra),
                              cwd=REPO, env=_env("/tmp"), capture_output=True, text=True, timeout=60)
    r = run("-pn", "2", "-pr", "0")
    assert r.returncode == 2 and "--coordinator" in r.stderr
    r = run("-pn", "2", "-pr", "2", "--coordinator", "127.0.0.1:1")
    assert r.returncode == 2 and "out of range" in r.stderr
