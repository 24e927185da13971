#!/usr/bin/env python3
"""Plot the train/val loss (and HellaSwag accuracy) of one or more runs from their main.log.

    python scripts/plot_log.py OUT [OUT2 ...] [-o plot.png] [--smooth N] [--title T]

OUT is a run's output dir (-o of the train command) or a main.log file. The log holds llm.c's
lines, `s:STEP trl:LOSS lr:LR norm:NORM` (train loss), `s:STEP tel:LOSS` (val loss) and
`s:STEP eval:ACC` (HellaSwag); a step logged twice (a resumed run) keeps its last value. Needs
matplotlib (pip install matplotlib); `parse_log` needs nothing beyond the standard library.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable

_PAIR = re.compile(r"(\w+):(\S+)")
KEYS = {"trl": "train loss", "tel": "val loss", "eval": "HellaSwag", "lr": "learning rate", "norm": "grad norm"}


def log_path(path: str) -> str:
    """main.log inside a run dir, or the file itself."""
    return os.path.join(path, "main.log") if os.path.isdir(path) else path


def parse_lines(lines: Iterable[str]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from main.log lines: every `key:value` after `s:STEP` (trl, tel, eval, lr,
    norm, ...). Lines that do not start with s:STEP, and values that are not numbers, are skipped;
    a later line for the same step and key replaces an earlier one (as after a resume)."""
    series: dict[str, dict[int, float]] = {}
    for line in lines:
        pairs = _PAIR.findall(line)
        if not pairs or pairs[0][0] != "s":
            continue
        try:
            step = int(pairs[0][1])
        except ValueError:
            continue
        for key, value in pairs[1:]:
            try:
                series.setdefault(key, {})[step] = float(value)
            except ValueError:
                pass
    return series


def parse_log(path: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] sorted by step} of a run dir's main.log (or a log file)."""
    p = log_path(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: no such log (give a run's output dir or its main.log)")
    with open(p, encoding="utf-8", errors="replace") as f:
        series = parse_lines(f)
    return {k: sorted(v.items()) for k, v in series.items()}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (window <= 1: unchanged)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def run_label(path: str) -> str:
    """The run as the user named it: its dir (a main.log file stands for its dir)."""
    p = os.path.normpath(path)
    if os.path.basename(p) == "main.log":
        p = os.path.dirname(p) or "."
    return p


def plot(runs: list[str], output: str = "plot.png", window: int = 1, title: str | None = None) -> str:
    """Draw the runs' losses (and HellaSwag where logged) into `output`; returns its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    data = [(run_label(r), parse_log(r)) for r in runs]
    has_eval = any(d.get("eval") for _, d in data)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(13 if has_eval else 8, 5), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, d) in enumerate(data):
        c = colors[i % len(colors)]
        if d.get("trl"):
            steps, vals = zip(*d["trl"])
            ax.plot(steps, smooth(list(vals), window), color=c, alpha=0.6, lw=1, label=f"{label} train")
        if d.get("tel"):
            steps, vals = zip(*d["tel"])
            ax.plot(steps, vals, color=c, lw=2, marker="o", ms=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss" + (f" (train smoothed over {window} steps)" if window > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_eval:
        ax2 = axes[0][1]
        for i, (label, d) in enumerate(data):
            if d.get("eval"):
                steps, vals = zip(*d["eval"])
                ax2.plot(steps, vals, color=colors[i % len(colors)], lw=2, marker="o", ms=3, label=label)
        ax2.set_xlabel("step")
        ax2.set_ylabel("accuracy")
        ax2.set_title("HellaSwag")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    from llmc_jax.training import cli
    from llmc_jax.errors import ArgumentParser, UsageError
    p = ArgumentParser(prog="python scripts/plot_log.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output dirs (holding main.log) or main.log files")
    p.add_argument("-o", "--output", default="plot.png", help="PNG to write (default plot.png)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss (default 1)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    cli.check_bounds(p, args, {"smooth": cli.POSITIVE})
    try:
        for r in args.runs:
            d = parse_log(r)
            if not d.get("trl") and not d.get("tel"):
                print(f"warning: {log_path(r)} has no loss lines (s:N trl:... / s:N tel:...)", file=sys.stderr)
        out = plot(args.runs, args.output, args.smooth, args.title)
    except FileNotFoundError as e:      # a run named on the command line: a usage error (exit 2)
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, uninstalled
    from llmc_jax.errors import run_command
    run_command(main)
