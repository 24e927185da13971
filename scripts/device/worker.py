"""The worker side of device_check: `device_check.py --worker part,part,...` runs the named parts in
one process, each against its share of the group's deadline, each part's rows in its own file in
--result-dir (read by the parent while it runs, and after a kill)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from llmc_jax.errors import describe

from .common import one_line
from .correctness import part_kernels, part_model
from .environment import part_env
from .kernel_bench import part_bench
from .plan import EXIT_NOT_GPU, PARTS, PLANS
from .recorder import Recorder
from .training import best_kernels, part_train_d12, part_train_d48, part_train_fp8, part_train_llama

PART_FUNCS = {"env": part_env, "kernels": part_kernels, "model": part_model, "bench": part_bench,
              "train-d48": part_train_d48, "train-llama": part_train_llama, "train-fp8": part_train_fp8}


def worker_main(args: argparse.Namespace) -> int:
    """Run the named parts in this process, each against its own deadline."""
    import warnings
    warnings.filterwarnings("once", category=DeprecationWarning)    # Pallas' Triton backend warns per call
    plan = PLANS["smoke" if args.smoke else "gpu"]
    ctx = json.loads(args.hint) if args.hint else {}
    parts = args.worker.split(",")
    nominal = {p: (s if args.smoke else g) for p, _, g, s in PARTS}
    for i, part in enumerate(parts):
        now = time.time()
        left = args.deadline - now
        share = left * nominal[part] / sum(nominal[p] for p in parts[i:])
        rec = Recorder(os.path.join(args.result_dir, f"{part}.json"), part, now + share)
        rec.info.update(deadline=rec.deadline, started=rec.t0)
        rec.save()
        print(f"[{part}] start: {share:.0f} s of {left:.0f} s left", flush=True)
        fn = PART_FUNCS.get(part) or (part_train_d12 if part.startswith("train-d12") else None)
        try:
            fn(rec, plan, ctx)
        except Exception as e:      # noqa: BLE001
            rec.info["error"] = f"{type(e).__name__}: {one_line(describe(e), 400)}"
            print(f"[{part}] part error: {rec.info['error']}", flush=True)
            traceback.print_exc(file=sys.stdout)
        if part.startswith("train-d12"):
            ctx.update(best_kernels([rec.rows], ctx))
        rec.save(done=True)
        if part == "env" and rec.info.get("platform") != "gpu" and not (args.smoke or args.allow_cpu):
            return EXIT_NOT_GPU
    return 0

