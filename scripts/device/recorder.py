"""One part's results on the worker side: each item runs under the part's deadline and the rows are
rewritten to the part's file after every item, so a part that is killed keeps what it finished."""
from __future__ import annotations

import gc
import sys
import time
import traceback
from typing import Callable

from llmc_jax.errors import describe, is_out_of_memory

from .common import Skip, one_line, write_json


class Recorder:
    """One part's rows, written to `path` after every item; `running` names the item in progress
    so that the parent can record it as a timeout if it has to kill this process."""

    def __init__(self, path: str, part: str, deadline: float) -> None:
        self.path, self.part, self.deadline = path, part, deadline
        self.rows: list[dict] = []
        self.info: dict = {}
        self.running: str | None = None
        self.t0 = time.time()
        self.est: dict[str, float] = {}
        self.save()

    def save(self, done: bool = False) -> None:
        write_json(self.path, {"part": self.part, "rows": self.rows, "info": self.info, "running": self.running,
                               "done": done, "elapsed_s": time.time() - self.t0})

    def left(self) -> float:
        """Seconds to the part's deadline (negative past it)."""
        return self.deadline - time.time()

    def item(self, name: str, kind: str, default_est: float, fn: Callable[[], dict | None], **meta) -> dict:
        """Run fn() -> dict of results unless the estimate for `kind` (the last such item's time, or
        default_est) would overrun the part's deadline. Exceptions become the row's error."""
        est = self.est.get(kind, default_est)
        oom_is_skip = meta.pop("oom_is_skip", False)     # out of memory = "does not fit", not an error
        row = {"name": name, **meta}
        if est > self.left():
            row.update(status="skipped", reason=f"budget: ~{est:.0f} s needed, {max(0.0, self.left()):.0f} s left")
            print(f"[{self.part}] {name}: skipped ({row['reason']})", flush=True)
            self.rows.append(row)
            self.save()
            return row
        self.running = name
        self.save()
        print(f"[{self.part}] {name} ...", flush=True)
        t0 = time.time()
        try:
            res = fn() or {}
            row.update(res)
            row.setdefault("status", "ok")
        except Skip as e:
            row.update(status="skipped", reason=one_line(e))
        except Exception as e:     # noqa: BLE001  (recorded; the next item still runs)
            oom = is_out_of_memory(e)
            row.update(status="skipped" if oom and oom_is_skip else "error",
                       error=f"{type(e).__name__}: {one_line(describe(e), 400)}")
            if oom and oom_is_skip:
                row["reason"] = "does not fit: out of device memory"
            print(f"[{self.part}] {name}: {type(e).__name__}: {one_line(describe(e), 400)}", flush=True)
            traceback.print_exc(file=sys.stdout)
        finally:
            gc.collect()              # a failed step's device buffers go before the next item
        row["elapsed_s"] = round(time.time() - t0, 3)
        if row["status"] != "skipped":
            self.est[kind] = row["elapsed_s"]
        self.running = None
        self.rows.append(row)
        self.save()
        status = row["status"] + (f" ({row.get('reason') or row.get('error')})" if row["status"] != "ok" else "")
        print(f"[{self.part}] {name}: {status} in {row['elapsed_s']:.1f} s", flush=True)
        return row
