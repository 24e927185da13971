"""TensorBoard event files beside main.log (`-o DIR` -> DIR/tensorboard), through tensorboardX's
maintained writer: `tensorboard --logdir DIR/tensorboard` shows a run while it trains.

Scalars per step s (0-based, main.log's s): train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/mfu, train/step_ms, train/device_memory_gib (where the device reports it); val/loss and
eval/hellaswag when they run. A resumed run purges the events past its checkpoint, as main.log is
cut back. The writer must never stop a run: a write error is one warning, then no more events.
"""
from __future__ import annotations

import os
import sys
from typing import Any

EVENTS_DIR = "tensorboard"


class LiveMetrics:
    def __init__(self, out_dir: str, resume_step: int | None):
        from tensorboardX import SummaryWriter
        self.logdir = os.path.join(out_dir, EVENTS_DIR)
        self._writer: Any = SummaryWriter(logdir=self.logdir, purge_step=resume_step, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Write each value that is not None at `step`."""
        if self._writer is None:
            return
        try:
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, float(value), global_step=step)
        except Exception as e:        # noqa: BLE001 (a metrics file must not end a training run)
            self._give_up(e)

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except Exception as e:    # noqa: BLE001
                self._give_up(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:    # noqa: BLE001
                self._give_up(e)
            self._writer = None

    def _give_up(self, e: Exception) -> None:
        print(f"warning: cannot write TensorBoard events to {self.logdir} ({type(e).__name__}: {e}); "
              "training goes on without them", file=sys.stderr, flush=True)
        self._writer = None


def device_memory_gib(device: Any) -> float | None:
    """The bytes the device's allocator holds now, in GiB; None where it does not say (the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:                 # noqa: BLE001 (not every backend implements it)
        return None
    if not stats or "bytes_in_use" not in stats:
        return None
    return stats["bytes_in_use"] / 2**30
