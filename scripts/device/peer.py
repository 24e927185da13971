"""Section 5, torch: the PyTorch peer, scripts/bench_torch_gpt2.py, run by the parent after the jax
workers are gone (so it has the whole GPU) at the d12 step's shapes, one subprocess per micro-batch
under the time left; torch.compile only when there is time for it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

from .common import one_line, read_json
from .report import Results, part_status

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "bench_torch_gpt2.py")
TORCH_COMPILE_MIN_S = 70     # less time left than this: the PyTorch peer runs eager (--compile 0)
TORCH_EAGER_MIN_S = 25       # less than this: it is skipped


def _command(plan: dict, B: int | None, out: str, gpu: bool, left: float) -> list[str]:
    """bench_torch_gpt2.py's command line for micro-batch B (None: its --smoke)."""
    cmd = [sys.executable, SCRIPT]
    cmd += (["--model", "d12", "-b", str(B), "-t", "1024", "--steps", str(plan["torch_steps"]),
             "--warmup", str(plan["torch_warmup"])] if B else ["--smoke"]) + ["--json", out]
    if gpu and left < TORCH_COMPILE_MIN_S:
        cmd += ["--compile", "0"]         # too little time for torch.compile: the eager model
    return cmd


def _run_one(cmd: list[str], row: dict, B: int | None, out: str, left: float, log: Callable[[str], None]) -> None:
    """Run the peer once and fill `row` from its JSON: ok, skipped (no PyTorch), error or timeout."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=REPO,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in (p.stdout + p.stderr).splitlines():
            log(f"[torch] {line}")
        last = ((p.stderr.strip() or p.stdout.strip()).splitlines() or [""])[-1]
        data = read_json(out) if p.returncode == 0 else None
        if p.returncode == 2 and "PyTorch" in (p.stdout + p.stderr):
            row.update(status="skipped", reason=one_line(last))
        elif data is None:
            row.update(status="error", error=f"exit {p.returncode}: {one_line(last)}")
        else:
            (vname, res), = data["variants"].items()
            row.update(status="ok", variant=vname, device=data.get("device"),
                       model=(data.get("model") or {}).get("name", "d12"),
                       B=B or data["config"].get("batch_size"),
                       torch=data.get("torch") or data.get("versions", {}).get("torch"), **res)
            row.pop("step_ms_all", None)
    except subprocess.TimeoutExpired:
        row.update(status="timeout", error=f"no result within {left:.0f} s")


def run_torch(results: Results, plan: dict, deadline: float, log: Callable[[str], None]) -> None:
    """The "torch" part: one row per planned micro-batch, the section files rewritten after each."""
    rows: list[dict] = []
    entry = {"rows": rows, "info": {}, "elapsed_s": 0}
    results.parts["torch"] = entry
    t_start = time.time()
    gpu = results.platform == "gpu"
    if not os.path.exists(SCRIPT):
        rows.append({"name": "bench_torch_gpt2.py", "status": "skipped",
                     "reason": "scripts/bench_torch_gpt2.py is not in this checkout"})
    for B in plan["torch_batches"] if os.path.exists(SCRIPT) else []:
        name = f"torch d12 -b {B} -t 1024" if B else "torch --smoke"
        left = deadline - time.time()
        if left < (TORCH_EAGER_MIN_S if gpu else 5):
            rows.append({"name": name, "status": "skipped", "reason": f"budget: {max(0, left):.0f} s left"})
            continue
        out = os.path.join(results.tmp, f"torch_{B}.json")
        cmd = _command(plan, B, out, gpu, left)
        log(f"[torch] {' '.join(cmd[1:])} (timeout {left:.0f} s)")
        row = {"name": name, "B": B, "T": 1024 if B else None, "cmd": " ".join(cmd[1:])}
        t0 = time.time()
        _run_one(cmd, row, B, out, left, log)
        row["elapsed_s"] = time.time() - t0
        rows.append(row)
        entry["elapsed_s"] = time.time() - t_start
        entry["status"] = part_status(entry)
        results.write_sections()
    entry["elapsed_s"] = time.time() - t_start
    entry["status"] = part_status(entry)
    results.write_sections()
