"""The hang check of llmc_jax/multihost/peer_watch.py, driven by hand on an in-memory key-value store
(the SIGSTOP and dead-peer cases run real processes: tests/test_preemption.py, test_multiprocess*.py)."""
from __future__ import annotations

import time

from llmc_jax.multihost import peer_watch


class Store:
    """jax.distributed's key-value client, as PeerWatch uses it."""

    def __init__(self):
        self.kv: dict[str, str] = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _pair(hang: float):
    store = Store()
    return [peer_watch.PeerWatch(store, r, 2, timeout=60.0, hang=hang) for r in (0, 1)]


def _round(watches):
    """Each beats once; rank 0's verdict."""
    for w in watches:
        w._beat("run")
    return watches[0]._problem(watches[0]._exchange(None))


def test_a_process_behind_is_named_once_progress_stops():
    w0, w1 = _pair(hang=0.3)
    assert _round([w0, w1]) is None                      # before the first step: never a hang
    w0.progress, w1.progress = 7, 5                      # rank 1 stuck two events behind
    assert _round([w0, w1]) is None
    time.sleep(0.15)
    assert _round([w0, w1]) is None                      # within the timeout
    time.sleep(0.3)
    problem = _round([w0, w1])
    assert problem.startswith("no progress for 0.3 s (LLMC_JAX_HANG_TIMEOUT): process rank 1 is behind the others")


def test_all_stuck_together_names_every_rank_and_progress_clears_it():
    w0, w1 = _pair(hang=0.2)
    w0.progress = w1.progress = 4
    _round([w0, w1])
    time.sleep(0.3)
    assert "process ranks 0, 1 are all at the same point" in _round([w0, w1])
    w0.progress += 1                                     # the main thread moved: the clock restarts
    assert _round([w0, w1]) is None


def test_no_hang_check_when_turned_off():
    w0, w1 = _pair(hang=0.0)
    w0.progress = w1.progress = 1
    _round([w0, w1])
    time.sleep(0.05)
    assert _round([w0, w1]) is None


def test_progress_is_a_no_op_without_a_watch(monkeypatch):
    monkeypatch.setattr(peer_watch, "_active", None)
    peer_watch.progress()
    w0, _ = _pair(hang=1.0)
    monkeypatch.setattr(peer_watch, "_active", w0)
    peer_watch.progress()
    peer_watch.progress()
    assert w0.progress == 2
