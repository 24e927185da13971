"""TensorBoard events of a run (llmc_jax/training/live_metrics.py), read back by TensorBoard's own
EventAccumulator (what `tensorboard --logdir` reads), against the run's main.log; the step line's ETA."""
from __future__ import annotations

import re

import pytest

from llmc_jax.training import live_metrics, loop
from test_train import LLMC_CPU_FLAGS, _run

FLAGS = LLMC_CPU_FLAGS + ["-v", "5"]


def _scalars(out_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out_dir / live_metrics.EVENTS_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _main_log(out_dir) -> tuple[list[tuple[int, float, float, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in open(out_dir / "main.log").read().splitlines():
        m = re.match(r"s:(\d+) trl:(\S+) lr:(\S+) norm:(\S+)", line)
        if m:
            train.append((int(m.group(1)), *map(float, m.group(2, 3, 4))))
        m = re.match(r"s:(\d+) tel:(\S+)", line)
        if m:
            val.append((int(m.group(1)), float(m.group(2))))
    return train, val


def test_events_hold_main_logs_numbers(tmp_path, capsys):
    """Every train and val number of main.log (its 4 or 6 decimals) at its step, plus speed figures."""
    _run(FLAGS + ["-x", "12", "-o", str(tmp_path)], capsys)
    tb = _scalars(tmp_path)
    train, val = _main_log(tmp_path)
    assert [s for s, *_ in train] == list(range(12)) and [s for s, _ in val] == [0, 5, 10, 12]
    for tag, column, decimals in (("train/loss", 1, 4), ("train/lr", 2, 6), ("train/grad_norm", 3, 2)):
        assert [s for s, _ in tb[tag]] == list(range(12)), tag
        for (step, value), row in zip(tb[tag], train):
            assert round(value, decimals) == pytest.approx(row[column], abs=10 ** -decimals / 2 + 1e-9), (tag, step)
    assert [s for s, _ in tb["val/loss"]] == [0, 5, 10, 12]
    for (step, value), (_, logged) in zip(tb["val/loss"], val):
        assert round(value, 4) == pytest.approx(logged, abs=5e-5 + 1e-9), step
    assert all(v > 0 for _, v in tb["train/tokens_per_s"] + tb["train/step_ms"])
    assert "train/mfu" not in tb and "train/device_memory_gib" not in tb     # the CPU reports neither


def test_resume_purges_the_events_past_the_checkpoint(tmp_path, capsys):
    """A run to 10 with checkpoints every 5, resumed from 5 to 10 after events up to 9 were written:
    each step once, with the values of an uninterrupted run (train figures bit for bit)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(FLAGS + ["-x", "10", "-n", "5", "-o", str(straight)], capsys)
    _run(FLAGS + ["-x", "10", "-n", "5", "-o", str(split)], capsys)
    for name in ("DONE_00000010",):
        (split / name).unlink()          # as if killed after step 9's events, before its checkpoint
    _run(FLAGS + ["-x", "10", "-n", "5", "-o", str(split), "-y", "1"], capsys)
    want, got = _scalars(straight), _scalars(split)
    assert [s for s, _ in got["train/loss"]] == list(range(10))
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert got[tag] == want[tag], tag
    # step 5's val loss ran before its checkpoint: the resumed run writes it again from main.log (4 decimals)
    assert [s for s, _ in got["val/loss"]] == [s for s, _ in want["val/loss"]] == [0, 5, 10]
    for (step, value), (_, wanted) in zip(got["val/loss"], want["val/loss"]):
        assert value == (pytest.approx(wanted, abs=5e-5) if step == 5 else wanted), step


def test_eta_formats():
    assert [loop._duration(x) for x in (0, 12.4, 59.6, 61, 3599, 3600, 3725, 90061)] == \
        ["0s", "12s", "1m00s", "1m01s", "59m59s", "1h00m", "1h02m", "25h01m"]
