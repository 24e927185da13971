"""main.log: llm.c's log lines (`s:STEP trl:... lr:... norm:...`, `s:STEP tel:...`, `s:STEP eval:...`),
cut back to the checkpoint when a run resumes, so the resumed log is byte-equal to an unbroken one."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, TextIO

from llmc_jax.errors import UsageError


def open_log(out_dir: str, resume_step: int | None, note: Callable[[str], None]) -> TextIO:
    """main.log of out_dir, opened for appending after a resume (cut back to the checkpoint), else anew."""
    log_path = os.path.join(out_dir, "main.log")
    dropped = truncate(log_path, resume_step) if resume_step is not None else 0
    if dropped:
        note(f"note: dropped {dropped} malformed line(s) from {log_path} (not s:STEP ...)")
    try:
        return open(log_path, "a" if resume_step is not None else "w")
    except OSError as e:
        raise UsageError(f"cannot write {log_path}: {e.strerror or e}") from None


def write(log: TextIO | None, line: str, step: int, stop: Callable[[str], None]) -> None:
    """One main.log line, flushed; a write error ends the run through `stop` with one line naming the file."""
    if log is None:
        return
    try:
        log.write(line + "\n")
        log.flush()
    except OSError as e:
        with contextlib.suppress(OSError):
            log.close()          # else closing it at exit tries the write again, and reports that
        stop(f"cannot write {log.name} at step {step}: {e.strerror or e}")


EVAL_TAGS = {"tel": "val/loss", "eval": "eval/hellaswag"}    # main.log's eval keys -> live_metrics tags


def evals_at(out_dir: str, step: int) -> dict[str, float]:
    """The evaluations main.log holds for `step` (a resumed run's first step, whose events ran before
    its checkpoint), as live_metrics tags: so the resumed run's events can hold them again."""
    out = {}
    try:
        with open(os.path.join(out_dir, "main.log"), errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and line_step(line) == step and ":" in parts[1]:
                    key, _, value = parts[1].partition(":")
                    if key in EVAL_TAGS:
                        out[EVAL_TAGS[key]] = float(value)
    except (OSError, ValueError):
        return {}
    return out


def line_step(line: str) -> int | None:
    """The step of a main.log line ("s:N ..."); None for a line that is not one (malformed or foreign)."""
    head = line.split(maxsplit=1)[0] if line.strip() else ""
    if not head.startswith("s:") or not head[2:].isdigit():
        return None
    return int(head[2:])


def truncate(path: str, resume_step: int) -> int:
    """Keep what the run had logged up to its checkpoint at `resume_step`: every line of earlier
    steps and the eval lines of that step (logged before the checkpoint was written); a run that
    went on past its last checkpoint before it died leaves no duplicate lines behind. Malformed
    lines (a run killed mid-write, an edit) are dropped and counted (the return value); an
    unreadable log is one UsageError line."""
    if not os.path.exists(path):
        return 0
    try:
        with open(path, errors="surrogateescape") as f:
            lines = f.read().splitlines()
        steps = [line_step(line) for line in lines]
        kept = [line + "\n" for line, s in zip(lines, steps)
                if s is not None and (s < resume_step or (s == resume_step and "trl:" not in line))]
        with open(path + ".tmp", "w", errors="surrogateescape") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise UsageError(f"-y 1: cannot rewrite {path} up to step {resume_step} ({e.strerror or e}); "
                         "move it away to resume with a new log") from None
    return sum(1 for line, s in zip(lines, steps) if s is None and line.strip())
