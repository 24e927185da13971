"""The table printed last (the tail of a device call's output, and summary.txt): one line per section,
the problems, then the correctness, kernel timing and training step tables."""
from __future__ import annotations

from .common import one_line
from .plan import SECTIONS
from .report import BAD_ROW, Results


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _rows(parts: dict, part: str) -> list[dict]:
    return parts.get(part, {}).get("rows", [])


def _count(rs: list[dict]) -> str:
    n_ok = sum(r.get("status") == "ok" for r in rs)
    n_skip = sum(r.get("status") == "skipped" for r in rs)
    return f"{n_ok}/{len(rs)} ok" + (f" ({n_skip} skipped)" if n_skip else "")


def _kernel_rows(parts: dict) -> list[dict]:
    return [r for r in _rows(parts, "kernels") if r.get("kernel") != "canary"]


def _train_rows(parts: dict) -> list[dict]:
    return [r for p in parts if p.startswith("train") for r in _rows(parts, p) if "check" not in r]


def _kernels_label(r: dict) -> str:
    return str(r.get("kernels")) + ("" if r.get("fp8", "off") == "off" else "+fp8")


def _section_notes(parts: dict, d48_model: str) -> dict:
    """The notes column of each section's line: its headline numbers."""
    notes = {}
    mm = next((r for r in _rows(parts, "env") if r.get("name", "").startswith("matmul")), {})
    cp = next((r for r in _rows(parts, "env") if r.get("name", "").startswith("device copy")), {})
    tf = mm.get("tflops_median")
    rate = "-" if tf is None else f"{tf:.1f} TFLOP/s" if tf >= 1 else f"{tf * 1e3:.1f} GFLOP/s"
    notes["environment"] = (f"matmul {mm.get('shape', ['?'])[0]}^3 bf16 {rate}"
                            f" ({_f(mm.get('of_table_peak') and 100 * mm['of_table_peak'], '.0f')}% of table); "
                            f"copy {_f(cp.get('gbps_median'), '.0f')} GB/s"
                            f" ({_f(cp.get('of_table_peak') and 100 * cp['of_table_peak'], '.0f')}% of table)")
    kr = _kernel_rows(parts)
    canary = next((r for r in _rows(parts, "kernels") if r.get("kernel") == "canary"), {})
    worst = max((r for r in kr if r.get("worst_ratio") is not None), key=lambda r: r["worst_ratio"], default=None)
    notes["correctness"] = (f"kernels {_count(kr)}" + (f", closest to its tolerance: {worst['worst_ratio']:.2f}x"
                                                       if worst else "")
                            + f"; model grads {_count(_rows(parts, 'model'))}; NaN canary {canary.get('status', '-')}")
    notes["kernels"] = f"rows {_count(_rows(parts, 'bench'))}"
    d48 = parts.get("train-d48", {}).get("info", {})
    notes["train"] = (f"variants {_count(_train_rows(parts))}; {d48_model} largest -b "
                      f"{d48.get('largest_b', '-')} ({d48.get('kernels', '-')})")
    to = _rows(parts, "torch")
    notes["torch"] = f"runs {_count(to)}" + (f" ({to[0].get('reason')})" if to and to[0].get("reason") else "")
    return notes


def _problem_lines(parts: dict) -> list[str]:
    """Every failed, errored or timed-out row and errored part (the first 12)."""
    bad = [(p, r) for p in parts for r in _rows(parts, p) if r.get("status") in BAD_ROW]
    bad += [(p, {"name": "(part)", "status": "error", "error": parts[p]["error"]}) for p in parts
            if parts[p].get("error")]
    if not bad:
        return []
    lines = ["problems:"]
    for p, r in bad[:12]:
        why = r.get("error") or r.get("reason") or r.get("worst") or ""
        if r.get("failed_tensors"):
            why = f"tensors {', '.join(r['failed_tensors'][:5])}; worst {r.get('worst')}"
        lines.append(f"  [{p}] {r.get('name')}: {r.get('status')} {one_line(why, 160)}")
    if len(bad) > 12:
        lines.append(f"  ... and {len(bad) - 12} more (see the section files)")
    return lines


def _correctness_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["correctness (rel error / tolerance of the worst output):"]
    for r in rows:
        what = (r.get("worst", "") if r.get("status") in ("ok", "fail")
                else (r.get("reason") or r.get("error") or ""))
        lines.append(f"  {r.get('status', '?'):<7} {r.get('name', '')[:58]:<58} {one_line(what, 60)}")
    return lines


def _bench_lines(rows: list[dict]) -> list[str]:
    """fwd+bwd median ms, one line per (op, shape), one column per variant."""
    timed = [r for r in rows if r.get("op") and r.get("variant")]
    if not timed:
        return []
    lines = ["kernels, fwd+bwd ms (median):"]
    variants = []
    for r in timed:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    lines.append(f"  {'op':<18} {'shape':<22} " + " ".join(f"{v:>10}" for v in variants))
    seen = []
    for r in timed:
        key = (r["op"], tuple(r.get("shape") or ()))
        if key in seen:
            continue
        seen.append(key)
        cells = []
        for vname in variants:
            m = next((x for x in timed if (x.get("op"), tuple(x.get("shape") or ())) == key
                      and x.get("variant") == vname and x.get("mode") == "fwd+bwd"), None)
            cells.append(f"{_f(m and m.get('ms_median'), '.3f', '-' if m is None else m.get('status')):>10}")
        lines.append(f"  {key[0]:<18} {str(key[1]):<22} " + " ".join(cells))
    return lines


def _jax_step_line(r: dict) -> str:
    peak = r.get("peak_bytes") or r.get("peak_bytes_upper_bound")
    peak_s = _f(peak and peak / 2 ** 30, ".1f") + ("" if r.get("peak_bytes") or not peak else "<")
    status = r.get("status", "?") + (f" ({one_line(r.get('reason') or r.get('error'), 50)})"
                                     if r.get("status") != "ok" else "")
    return (f"  {str(r.get('model')):<12} {_f(r.get('B'), 'd'):>3} {_f(r.get('r'), 'd'):>2} "
            f"{_kernels_label(r):<9} {_f(r.get('step_ms_median'), '.1f'):>8} "
            f"{_f(r.get('tok_per_s'), '.0f'):>9} {_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>6} "
            f"{_f(r.get('of_measured_matmul') and 100 * r['of_measured_matmul'], '.1f'):>6} "
            f"{peak_s:>8} {_f(r.get('to_first_step_s'), '.1f'):>6}  {status}")


def _torch_step_line(r: dict) -> str:
    peak = r.get("peak_mem_bytes")
    status = r.get("status", "?") + (f" ({one_line(r.get('reason') or r.get('error'), 50)})"
                                     if r.get("status") != "ok" else f" ({r.get('variant')})")
    return (f"  {'torch ' + str(r.get('model', 'd12')):<12} {_f(r.get('B'), 'd'):>3} {'':>2} {'sdpa':<9} "
            f"{_f(r.get('step_ms_median'), '.1f'):>8} {_f(r.get('tok_per_s'), '.0f'):>9} "
            f"{_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>6} {'':>6} "
            f"{_f(peak and peak / 2 ** 30, '.1f'):>8} "
            f"{_f(r.get('first_step_s'), '.1f'):>6}  {status}")


def _train_lines(tr: list[dict], to: list[dict]) -> list[str]:
    if not (tr or to):
        return []
    return ["training step (bf16 on GPU; torch = bench_torch_gpt2.py at the same shape):",
            f"  {'model':<12} {'-b':>3} {'-r':>2} {'kernels':<9} {'ms/step':>8} {'tok/s':>9} {'MFU':>6} "
            f"{'of mm':>6} {'peak GiB':>8} {'1st s':>6}  status",
            "  (MFU: llm.c's formula vs the table peak; of mm: vs the matmul measured above; peak with <:"
            " an upper bound; 1st s: compile + first step)"] + [_jax_step_line(r) for r in tr] + [
        _torch_step_line(r) for r in to]


def summary_table(results: Results, elapsed_s: float, budget_s: float, d48_model: str) -> str:
    """The whole table as text: header, versions, one line per wanted section, then the details."""
    P = results.parts
    lines = [f"== device_check summary: {results.device or 'unknown device'}, "
             f"{elapsed_s:.0f} s of {budget_s:.0f} s budget, results in {results.out} =="]
    env = P.get("env", {}).get("info", {})
    v = env.get("versions", {})
    if env:
        lines.append(f"versions: python {v.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
                     f"torch {v.get('torch', '-')}, triton {v.get('triton', '-')}; cuda {env.get('cuda') or '-'}")
    lines.append(f"{'section':<12} {'status':<8} {'time s':>6}  notes")
    notes = _section_notes(P, d48_model)
    for section in SECTIONS:
        if section in results.sections:
            d = results.section_data(section)
            lines.append(f"{section:<12} {d['status']:<8} {d['elapsed_s']:>6.0f}  {notes.get(section, '')}")
    lines += _problem_lines(P)
    lines += _correctness_lines(_kernel_rows(P) + _rows(P, "model"))
    lines += _bench_lines(_rows(P, "bench"))
    lines += _train_lines(_train_rows(P), _rows(P, "torch"))
    lines += _fp8_lines(_rows(P, "train-fp8"))
    return "\n".join(lines)


def _fp8_lines(rows: list[dict]) -> list[str]:
    """FP8: what XLA made of the fp8 dots, and the loss on this device against the CPU backend."""
    lines = []
    for r in rows:
        if "fp8_cublaslt_calls" in r:
            lines.append(f"fp8: {r.get('model')} -b {r.get('B')}: {r['fp8_cublaslt_calls']} cuBLASLt FP8 GEMM calls, "
                         f"{r.get('fp8_dots_not_rewritten')} fp8 dots not rewritten")
        if r.get("check") == "fp8 loss vs cpu":
            lines.append(f"fp8: {r.get('model')} {r.get('steps')} steps, loss here vs the CPU backend: max rel "
                         f"{_f(r.get('max_rel_fp8'), '.2e')} (--fp8 off: {_f(r.get('max_rel_off'), '.2e')})  "
                         f"{r.get('status')}{(' ' + one_line(r.get('reason') or r.get('error'), 60)) if r.get('status') != 'ok' else ''}")
    return lines
