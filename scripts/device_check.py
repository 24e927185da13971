"""The one GPU check: correctness and speed of everything CPU CI cannot run, in one call of a few minutes.

    set -o pipefail; PYTHONUNBUFFERED=1 python scripts/device_check.py --out $OUT 2>&1 | tee $OUT/console.txt
    python scripts/device_check.py --smoke --out /tmp/dc     # CPU rehearsal: tiny shapes, interpret mode

Sections, in this order, each a list of parts. On a GPU the parts run in three worker processes
(GPU_GROUPS: env to bench; the d12 steps; llama and d48), the PyTorch peer after them with the GPU
free; a part that crashes, hangs or overruns is killed and the rest of its group goes on in a fresh
process, so one failure never takes the next parts with it. --smoke runs every jax part in one process.
  1 environment  device kind, driver/CUDA/cuDNN versions, jax/jaxlib/torch/triton/Python; the two
                 ceilings measured there: a bf16 matmul's TFLOP/s (8192^3) and a device copy's GB/s.
  2 correctness  every Pallas kernel compiled (interpret=False on a GPU), forward and backward, at
                 GPT-2 124M/1.6B and Llama 3.2-1B/3.1-8B shapes (and a ragged T / row count) on fresh
                 random inputs, against float64 NumPy, with the device's free memory filled with NaN
                 before each run (a canary kernel that writes half its output proves the NaN shows);
                 then the model's gradients in bf16 with --kernels pallas and with cuDNN attention
                 against the fp32 XLA path (d12 and llama3:d12), and llmc_jax.gradcheck's main.
  3 kernels      scripts/bench_kernels.py's rows at GPT-2 shapes (Pallas vs XLA, cuDNN, jax's Pallas ops).
  4 train        the real training step (scripts/bench_train.py's machinery): d12 at T=1024 in bf16 for
                 each kernel choice (xla, cudnn attention, pallas) at -r 1 and 0, micro-batch 16, 32, 8:
                 ms/step, tok/s, MFU by llm.c's formula, peak memory, compile and first-step time; d48
                 at the largest -b that fits; llama3.2:1B and llama3:d12 at a small -b.
  5 torch        scripts/bench_torch_gpt2.py (the PyTorch peer) at the d12 step's shapes.

Time: --budget-s (default 450) for the whole run; each part gets a share of what is left in proportion
to its nominal time (PARTS), items that would not fit are skipped with the reason "budget", and a
part still running at its end is killed (the item it was on is recorded as a timeout).

Output, in --out (default $OUT when set, else ./device_check_out), rewritten after every item:
  1_environment.json .. 5_torch.json   one per section: status, and per part its rows
  device_check.log                     everything printed, the workers' tracebacks included
  summary.txt                          the table printed last
Exit status: 0 when every row passed or was skipped for a stated reason, 1 when any row failed,
errored or timed out, 2 for a usage error (this is a GPU script: on a CPU it needs --smoke).
"""
# This file is the entry point (arguments, the run's section order and time shares, the worker
# processes and their deadlines); what each part does is in scripts/device/ (see its __init__.py).
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))     # scripts/device/ and the bench_*.py scripts it uses
from llmc_jax.errors import ArgumentParser, UsageError, run_command  # noqa: E402
from device.common import one_line, read_json  # noqa: E402
from device.peer import run_torch  # noqa: E402
from device.plan import EXIT_NOT_GPU, LOG_FILE, PARTS, PLANS, SECTION_FILE, SECTIONS, SUMMARY_FILE  # noqa: E402,F401
from device.reference import TOLERANCES  # noqa: E402,F401  (tests/test_device_check.py checks them here)
from device.report import Results  # noqa: E402
from device.summary import summary_table  # noqa: E402
from device.training import best_kernels  # noqa: E402

# Parts that share a worker process on a GPU (a process start costs jax's import and CUDA's init):
# a part that crashes or overruns is killed and the rest of its group goes on in a fresh process.
# With --smoke every jax part shares one process.
GPU_GROUPS = [["env", "kernels", "model", "bench"], ["train-d12-b16", "train-d12-b32", "train-d12-b8"],
              ["train-llama", "train-fp8", "train-d48"]]
KILL_GRACE_S = 15          # a part past its share gets this long before it is killed
HARD_STOP_GRACE_S = 20     # the whole run stops at --budget-s plus this


class Run:
    """The parent: runs the parts as worker processes, group by group under the budget, merges their
    results as they come, runs the PyTorch peer, prints the table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.plan = PLANS["smoke" if args.smoke else "gpu"]
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.log_f = open(os.path.join(self.out, LOG_FILE), "w")
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.end = self.t0 + args.budget_s
        self.hard_end = self.end + HARD_STOP_GRACE_S
        self.tmp = tempfile.mkdtemp(prefix="device_check_")
        wanted = {s for s in SECTIONS if args.sections is None or s in args.sections}
        self.results = Results(self.out, self.tmp, wanted)
        self.last_line = ""

    def log(self, msg: str) -> None:
        """Print and append to device_check.log (the workers' relayed lines too)."""
        with self.lock:
            print(msg, flush=True)
            self.log_f.write(msg + "\n")
            self.log_f.flush()

    # ---- running parts

    def hint(self) -> str:
        """What the earlier parts measured, for the next worker: the two ceilings, the best d12 kernels."""
        parts = self.results.parts
        ctx = {}
        env_rows = parts.get("env", {}).get("rows", [])
        for r in env_rows:
            if r.get("status") == "ok" and "tflops_median" in r:
                ctx["matmul_tflops"] = r["tflops_median"]
            if r.get("status") == "ok" and "gbps_median" in r:
                ctx["copy_gbps"] = r["gbps_median"]
        ctx.update(best_kernels([parts[p]["rows"] for p in parts if p.startswith("train-d12")], {}))
        return json.dumps(ctx)

    def _launch(self, parts: list[str], deadline: float, extra_env: dict) -> tuple[subprocess.Popen, threading.Thread]:
        """This script again as `--worker parts` in its own process group, its output relayed to the log."""
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(parts), "--result-dir", self.tmp,
               "--deadline", repr(deadline), "--hint", self.hint()]
        cmd += (["--smoke"] if self.smoke else []) + (["--allow-cpu"] if self.args.allow_cpu else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        # its own process group (to kill it with anything it started), but not its own session: a
        # command cut off by the device tool's timeout takes the workers with it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                process_group=0)
        self.last_line = ""

        def relay():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.strip():
                    self.last_line = line
                self.log(line)
        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        return proc, reader


    def _watch(self, proc: subprocess.Popen, todo: list[str], deadline: float) -> bool:
        """Wait for the worker, merging its parts' rows every 2 s; kill it (and anything it started)
        once the part it is on is past its deadline plus KILL_GRACE_S. Returns whether it was killed."""
        while True:
            try:
                proc.wait(timeout=2)
                return False
            except subprocess.TimeoutExpired:
                pass
            for p in todo:
                self.results.merge(p, final=False)
            current = next((d for d in (read_json(self.results.part_file(p)) for p in todo)
                            if d and not d.get("done")), None)
            part_end = (current or {}).get("info", {}).get("deadline", deadline)
            if time.time() > min(part_end + KILL_GRACE_S, self.hard_end):
                self.log(f"[device_check] {current['part'] if current else ','.join(todo)}: past its time, "
                         f"killing its worker (pid {proc.pid})")
                try:
                    os.killpg(proc.pid, 9)
                except OSError:
                    proc.kill()
                proc.wait()
                return True

    def run_group(self, group: list[str], deadline: float, extra_env: dict) -> int | None:
        """Run the parts of one group in a worker process; kill it when the part it is on is past its
        deadline; go on with the group's remaining parts in a fresh process after a crash or a kill.
        Returns the last worker's exit status."""
        todo = list(group)
        rc = None
        while todo:
            proc, reader = self._launch(todo, deadline, extra_env)
            killed = self._watch(proc, todo, deadline)
            reader.join(timeout=5)
            rc = proc.returncode
            states = {p: read_json(self.results.part_file(p)) for p in todo}
            finished = [p for p in todo if states[p] and states[p].get("done")]
            broken = [p for p in todo if states[p] and not states[p].get("done")]
            for p in finished + broken:
                self.results.merge(p, final=True, rc=rc, killed=killed)
            todo = [p for p in todo if not states[p]]
            if rc == EXIT_NOT_GPU:
                break
            if todo and not finished and not broken:      # died before its first part began
                self.results.set_parts(todo, status="failed",
                                       error=f"worker exited with status {rc}: {one_line(self.last_line, 300)}")
                break
            if todo and deadline - time.time() < 3:
                self.results.set_parts(todo, status="partial",
                                       reason="budget: no time left after the part before it stopped")
                break
        return rc

    # ---- the run

    def _plan_parts(self) -> list[tuple[str, str, float]]:
        """(part, section, nominal s) of the parts this run does, in order; env always (the platform
        check needs it)."""
        sections = self.results.sections
        plan_parts = [(p, s, smoke if self.smoke else gpu) for p, s, gpu, smoke in PARTS
                      if s in sections and (smoke if self.smoke else gpu) is not None]
        if "environment" not in sections:     # the platform check still needs it
            plan_parts.insert(0, ("env", "environment", 6))
            sections.add("environment")
        return plan_parts

    def _worker_env(self, group: list[str]) -> dict:
        """Environment variables for a group's worker, over the parent's own."""
        env = {}
        if not self.args.no_compile_cache:
            # shared by the parts (a fresh folder each run): XLA's autotuning results, the same matmul
            # shapes in many programs; and a program compiled twice (--smoke: d48's stand-in at -b 2
            # is the d12 stand-in's step) compiles once
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(self.tmp, "jax_cache")
        if group[0].startswith("train") and not self.smoke:
            # more of the card for the largest -b (default .75); cuDNN/cuBLAS workspaces are inside
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ".90")
        return env

    def main(self) -> int:
        """The groups in order, each with its share of the time left, then the PyTorch peer."""
        kind = "smoke (CPU rehearsal)" if self.smoke else "GPU"
        self.log(f"[device_check] {kind} run, budget {self.args.budget_s:.0f} s, out {self.out}")
        plan_parts = self._plan_parts()
        wanted = [p for p, s, _ in plan_parts if s != "torch"]
        groups = [wanted] if self.smoke else [[p for p in g if p in wanted] for g in GPU_GROUPS]
        nominal = {p: n for p, _, n in plan_parts}
        done: list[str] = []
        for group in groups:
            if not group:
                continue
            now = time.time()
            todo = [p for p, _, _ in plan_parts if p not in done]
            left = self.end - now
            share = left * sum(nominal[p] for p in group) / sum(nominal[p] for p in todo)
            if share < 3:
                self.results.set_parts(group, status="partial",
                                       reason=f"budget: {max(0.0, share):.0f} s share of {max(0.0, left):.0f} s left")
                done.extend(group)
                continue
            self.log(f"[device_check] {','.join(group)}: {share:.0f} s of {left:.0f} s left")
            rc = self.run_group(group, now + share, self._worker_env(group))
            done.extend(group)
            if rc == EXIT_NOT_GPU:
                why = self.results.parts.get("env", {}).get("error")
                self.log(f"[device_check] jax runs on {self.results.platform or 'no known platform'} here"
                         + (f" ({why})" if why else "") + ": device_check.py is a GPU script "
                         "(use --smoke for the CPU rehearsal)")
                self.finish()
                return 2
        if "torch" in self.results.sections:
            now = time.time()
            todo = [p for p, _, _ in plan_parts if p not in done]
            share = (self.end - now) * nominal["torch"] / max(1, sum(nominal[p] for p in todo))
            run_torch(self.results, self.plan, now + max(share, 0), self.log)
        return self.finish()

    def finish(self) -> int:
        """Write the section files and the summary, print the table last; 1 when anything failed."""
        self.results.write_sections()
        try:
            table = summary_table(self.results, time.time() - self.t0, self.args.budget_s, self.plan["d48"])
        except Exception as e:      # noqa: BLE001  (the section files hold everything anyway)
            table = f"== device_check summary failed: {type(e).__name__}: {one_line(e)} ==\n" + traceback.format_exc()
        with open(os.path.join(self.out, SUMMARY_FILE), "w") as f:
            f.write(table + "\n")
        self.log(table)
        self.log_f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return 1 if self.results.failed() else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (the worker ones hidden); --sections becomes a set."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "device_check_out",
                   help="results folder (default $OUT when set, else ./device_check_out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time, seconds (default 450)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU rehearsal: tiny shapes, Pallas interpret mode, every section exercised")
    p.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default all; the environment "
                                      "section always runs)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not share XLA's compilation and autotuning cache between the parts")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)   # developing the GPU plan on a CPU
    # the worker side (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--hint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be > 0, got {args.budget_s:g}")
    if args.sections is not None:
        want = {s.strip() for s in args.sections.split(",") if s.strip()}
        unknown = sorted(want - set(SECTIONS))
        if unknown or not want:
            raise UsageError(f"--sections {args.sections}: {', '.join(unknown) or 'empty'}; "
                             f"choose from {', '.join(SECTIONS)}")
        args.sections = want
    return args


def _has_gpu() -> bool:
    """Whether jax will find a GPU, without importing jax here (which would take the GPU's memory in
    this process): JAX not forced onto the CPU, and an NVIDIA device node or nvidia-smi; failing
    those, jax asked in a short subprocess that takes no GPU memory."""
    import glob
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
        return True
    try:
        p = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
        return p.stdout.strip().splitlines()[-1:] == ["gpu"]
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv: list[str] | None = None) -> int:
    """The parent's run, or with --worker (the parent re-invoking this script) the named parts."""
    args = parse_args(argv)
    if args.worker:
        from device.worker import worker_main     # the part modules: only a worker needs them
        return worker_main(args)
    if not (args.smoke or args.allow_cpu or _has_gpu()):
        raise UsageError("device_check.py is a GPU script and this machine has no NVIDIA GPU (or JAX_PLATFORMS=cpu); "
                         "run it with --smoke for the CPU rehearsal")
    return Run(args).main()


if __name__ == "__main__":
    run_command(main, "")
