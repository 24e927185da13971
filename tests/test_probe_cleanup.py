"""scripts/probe_reliability.py leaves nothing behind in the temp dir: a finished probe keeps only
its report there, a stopped one (SIGTERM, as a timeout or a scheduler stops it) nothing, and the
commands it was running are killed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROBE = os.path.join(REPO, "scripts", "probe_reliability.py")


def _start(*args) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, PROBE, *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    first = p.stderr.readline()          # "probing N cases with J jobs; out dir DIR"
    m = re.search(r"out dir (\S+)$", first.strip())
    assert m, first + p.stderr.read()[-2000:]
    return p, m.group(1)


def test_a_stopped_probe_removes_its_temp_dir():
    p, out = _start("--quick", "--only", "model", "--jobs", "1")
    assert os.path.isdir(out)
    time.sleep(3)                        # a case is running
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM
    assert not os.path.exists(out)
    survivors = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True).stdout.split()
    assert not survivors, survivors      # no command of the probe outlives it


def test_a_finished_probe_keeps_only_its_report():
    p, out = _start("--quick", "--only", "data", "--jobs", "2")
    _, err = p.communicate(timeout=600)
    assert p.returncode in (0, 1), err[-2000:]
    assert sorted(os.listdir(out)) == ["probe.json", "probe.md"]
    for name in ("probe.json", "probe.md"):
        os.remove(os.path.join(out, name))
    os.rmdir(out)
