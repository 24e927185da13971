"""Sharded (Orbax) checkpoints: saved by 2 processes x 2 devices, resumed by 1 process x 4 devices
and back, on other ZeRO stages; incomplete steps skipped; the data position on another device count.

Every subprocess runs under a timeout; processes meet on a free port picked by llmc_jax.launch."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import device_flags

from llmc_jax.formats import llmc_format
from llmc_jax.training import checkpoint
from llmc_jax.formats.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "llmc_tiny")
# constant LR (-q 1.0), so a run extended with a larger -x continues the same schedule
COMMON = ["-e", f"{FIXTURE}/model.bin", "-i", f"{FIXTURE}/train.bin", "-j", f"{FIXTURE}/val.bin",
          "-t", "64", "-d", "256", "-b", "1", "-s", "0", "-c", "0.1", "-q", "1.0", "--dtype", "float32",
          "--shuffle", "1", "-v", "5", "-m", "1", "-n", "5", "-x", "15"]


def _run(out_dir, cache: str, zero: int, nproc: int, *extra: str) -> str:
    """stdout of a train run on 4 devices: nproc=2 as 2 processes x 2, nproc=1 as 1 process x 4."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", LLMC_JAX_CACHE=cache, LLMC_JAX_INIT_TIMEOUT="60")
    argv = COMMON + ["-z", str(zero), "-o", str(out_dir)] + list(extra)
    if nproc == 1:
        env["XLA_FLAGS"] = device_flags(4)
        cmd = [sys.executable, "-m", "llmc_jax.train"] + argv
    else:
        cmd = [sys.executable, "-m", "llmc_jax.launch", "--nproc", str(nproc), "--devices-per-proc", "2", "--"] + argv
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _losses(stdout: str) -> dict[int, float]:
    """{step: train loss} as printed (step numbers 1-based, as llm.c prints them)."""
    ms = (re.match(r"^step\s+(\d+)/\d+ \| loss (\S+)", line) for line in stdout.splitlines())
    return {int(m.group(1)): float(m.group(2)) for m in ms if m}


def _log(path) -> list[tuple[str, float]]:
    """main.log as (line without its numbers, first number) pairs."""
    out = []
    for line in open(path).read().splitlines():
        step, kind_value = line.split()[0], line.split()[1]
        kind, value = kind_value.split(":")
        out.append((f"{step} {kind}", float(value)))
    return out


def _steps_done(out_dir) -> list[int]:
    return sorted(int(f[5:]) for f in os.listdir(out_dir) if f.startswith("DONE_"))


@pytest.mark.slow
def test_two_processes_checkpoint_resumes_on_one_process_and_back(tmp_path):
    """2 processes x 2 devices at -z 1 checkpoint steps 5, 10, 15. With DONE_10 and DONE_15 removed
    (a run killed while writing), 1 process x 4 devices at -z 3 resumes from 5 and runs to 15; with
    its DONE_15 removed, 2 processes at -z 0 resume from its step 10 and run to 15, pruning (-nk 1)
    step 10 behind them. Every continued loss equals the straight run's (to 1e-5: the all-reduce
    sums in another order), main.log too, and so does the exported llm.c model."""
    cache = str(tmp_path / "cache")
    straight, split = tmp_path / "straight", tmp_path / "split"
    ref = _losses(_run(straight, cache, 1, 2))
    assert sorted(ref) == list(range(1, 16)) and _steps_done(straight) == [5, 10, 15]
    assert os.path.isdir(straight / "state_00000005") and os.path.isfile(straight / "meta_00000005.json")

    shutil.copytree(straight, split)
    for step in (10, 15):                            # written, but not marked complete
        os.remove(split / f"DONE_{step:08d}")
    out = _run(split, cache, 3, 1, "-y", "1")
    assert "resumed from step 5 of" in out
    got = _losses(out)
    assert sorted(got) == list(range(6, 16))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)

    os.remove(split / "DONE_00000015")               # step 15 written but not marked complete
    out = _run(split, cache, 0, 2, "-y", "1", "-nk", "1")
    assert "resumed from step 10 of" in out
    got = _losses(out)
    assert sorted(got) == list(range(11, 16))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)
    assert _steps_done(split) == [5, 15]
    assert not [f for f in os.listdir(split) if "00000010" in f]       # pruned, the Orbax directory too

    a, b = _log(straight / "main.log"), _log(split / "main.log")
    assert [k for k, _ in a] == [k for k, _ in b]
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=0, atol=2e-4)   # 4 decimals
    _, want = llmc_format.read_model(straight / "model_00000015.bin")
    _, have = llmc_format.read_model(split / "model_00000015.bin")
    for k in want:
        np.testing.assert_allclose(have[k], want[k], rtol=0, atol=1e-5, err_msg=k)


def _loaders(n: int, samples_read: int, shuffle: bool = False) -> list[DataLoader]:
    loaders = [DataLoader(f"{FIXTURE}/train.bin", 1, 64, r, n, shuffle=shuffle) for r in range(n)]
    for loader in loaders:
        for _ in range(samples_read):
            loader.next_batch()
    return loaders


def test_unshuffled_data_position_carries_over_to_another_device_count():
    """4 device ranks 6 samples in (6*4*64 tokens), resumed on 2: the next 2 samples of the 2 ranks
    are the tokens the 4 ranks' next sample holds, in the same order; with a note saying so."""
    four = _loaders(4, 6)
    meta = {"step": 6, "train_loaders": [loader.state_dict() for loader in four]}
    states, note = checkpoint.loader_states(meta, [0, 1], 2)
    assert note and "written on 4 devices, this run has 2" in note
    two = _loaders(2, 0)
    for loader, state in zip(two, states):
        loader.load_state_dict(state)
    for _ in range(3):
        want = np.concatenate([loader.next_batch()[0] for loader in four])
        got = np.concatenate([loader.next_batch()[0] for _ in range(2) for loader in two])
        np.testing.assert_array_equal(got, want)
    assert checkpoint.loader_states(meta, [1, 3], 4) == ([meta["train_loaders"][1], meta["train_loaders"][3]], None)


def test_data_position_that_has_no_equivalent_is_refused():
    shuffled = {"step": 2, "train_loaders": [loader.state_dict() for loader in _loaders(4, 2, shuffle=True)]}
    with pytest.raises(ValueError, match="--shuffle 1 every device rank draws its own data order"):
        checkpoint.loader_states(shuffled, [0, 1], 2)
    odd = {"step": 1, "train_loaders": [loader.state_dict() for loader in _loaders(4, 1)]}
    with pytest.raises(ValueError, match="not a whole number of this run's 512-token samples"):
        checkpoint.loader_states(odd, list(range(8)), 8)
