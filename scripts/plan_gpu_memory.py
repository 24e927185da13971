"""Memory per GPU of llm.c's own GPT-2 configurations, planned for H100s on any machine, beside llm.c's
allocation (llmc_jax/planning/llmc_alloc.py), and the largest -b of each on 1 and 8 H100s. Prints
markdown tables for docs/benchmarks.md.

    python scripts/plan_gpu_memory.py                 # the configurations and the largest -b per depth
    python scripts/plan_gpu_memory.py --no-find       # the configurations only
    python scripts/plan_gpu_memory.py --depths d48 --targets h100x8 --extra "--attention cudnn"   # some rows
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.errors import run_command  # noqa: E402

GiB = 1024 ** 3
# (label, train flags, target): llm.c's runs (scripts/run_gpt2_124M.sh, _1558M.sh) and the Llama presets
CONFIGS = [
    ("GPT-2 124M, llm.c's run", "-e d12 -b 64 -t 1024 -z 1", "h100x8"),
    ("GPT-2 1558M, llm.c's 24-hour run", "-e d48 -b 16 -t 1024 -r 0 -z 1", "h100x8"),
    ("GPT-2 124M, one GPU", "-e d12 -b 64 -t 1024", "h100x1"),
    # llm.c's runs use cuDNN's fused attention (no T x T scores in memory); XLA's attention, our default, keeps them
    ("GPT-2 124M, llm.c's run, cuDNN attention", "-e d12 -b 64 -t 1024 -z 1 --attention cudnn", "h100x8"),
    ("GPT-2 1558M, llm.c's run, cuDNN attention", "-e d48 -b 16 -t 1024 -r 0 -z 1 --attention cudnn", "h100x8"),
    ("Llama 3.2-1B", "-e llama3.2:1B -b 4 -t 2048 -z 1", "h100x8"),
    ("Llama 3.1-8B", "-e llama3.1:8B -b 1 -t 2048 -z 3", "h100x8"),
]
DEPTHS = ["d12", "d24", "d36", "d48"]


def _plan(flags: str, target: str, eval_step: bool = True) -> dict:
    from llmc_jax.planning import plan
    return plan.plan_flags(flags.split(), target, eval_step=eval_step)


def configurations() -> None:
    print("| run | flags | target | ours GiB/GPU | llm.c GiB/GPU | ratio | compile s (train, val) | collectives per step |")
    print("|---|---|---|---|---|---|---|---|")
    for label, flags, target in CONFIGS:
        r = _plan(flags, target)
        llmc, ours = r.get("llmc", {}).get("total"), r["per_device_bytes"]
        coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / GiB:.2f} GiB)" for k, v in r["collectives"].items())
        c = r["compile_seconds"]
        print(f"| {label} | `{flags}` | {target} | {ours / GiB:.2f} | "
              f"{'-' if llmc is None else f'{llmc / GiB:.2f}'} | "
              f"{'-' if llmc is None else f'{ours / llmc:.2f}x'} | "
              f"{c['train']:.1f}, {c['validation']:.1f} | {coll or 'none'} |", flush=True)


def largest_batches(depths: list[str], target_names: list[str], extra: str) -> None:
    from llmc_jax.models.family import model_config
    from llmc_jax.planning import llmc_alloc, plan, targets
    from llmc_jax.training import cli
    print("| model | target | flags | largest -b, ours | largest -b, llm.c | ratio |")
    print("|---|---|---|---|---|---|")
    for target in target_names:
        t = targets.parse_target(target)
        mesh = targets.topology_mesh(t)
        for depth in depths:
            flags = f"-e {depth} -t 1024 -r 1" + (" -z 1" if t.devices > 1 else "") + (f" {extra}" if extra else "")
            ours = plan.find_batch(cli.parse_args(flags.split()), t, mesh)
            theirs = llmc_alloc.largest_batch(model_config(depth), 1024, 1, t.devices, 1 if t.devices > 1 else 0,
                                              t.capacity_bytes)
            print(f"| {depth} | {target} | `{flags}` | {ours} | {theirs} | "
                  f"{ours / theirs if theirs else float('nan'):.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-find", action="store_true", help="skip the largest-batch search (many compiles)")
    p.add_argument("--no-configs", action="store_true", help="only the largest-batch search")
    p.add_argument("--depths", default=",".join(DEPTHS), help="GPT-2 depths for the search (comma-separated)")
    p.add_argument("--targets", default="h100x1,h100x8", help="targets for the search (comma-separated)")
    p.add_argument("--extra", default="", help="more train flags for the search, e.g. \"--attention cudnn\"")
    args = p.parse_args()
    from llmc_jax.planning import targets
    targets.prepare_jax()
    if not args.no_configs:
        configurations()
    if not args.no_find:
        largest_batches(args.depths.split(","), args.targets.split(","), args.extra)


if __name__ == "__main__":
    run_command(main)
