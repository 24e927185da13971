"""What one compiled step does, read from its optimized HLO text: the collectives and the kernels
it launches per step (a while loop's body counts its known trip count times: the layer scan's L,
the micro-batch scan's A), and the ops that make a GPU step non-deterministic."""
from __future__ import annotations

import collections
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLS = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"fusion_backend_config":\{"kind":"([\w$.]+)"')

CUBLASLT_FP8 = "cuBLASLt FP8 GEMM"
# custom-call targets -> the kernel names the report uses
_CALL_NAMES = (("__gpu$xla.gpu.triton", "pallas (Triton)"), ("__cublas$lt$matmul$f8", CUBLASLT_FP8),
               ("__cublas$lt$matmul", "cuBLASLt GEMM"), ("__cublas$gemm", "cuBLAS GEMM"),
               ("__cudnn$fmha", "cuDNN attention"), ("__cudnn$", "cuDNN"))


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            m = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs in one call of the entry (while bodies x trip count)."""
    callees: dict[str, list[tuple[str, int]]] = {}
    for name, lines in comps.items():
        edges = []
        for line in lines:
            trip = _TRIP.search(line)
            times = int(trip.group(1)) if trip and " while(" in line else 1
            for callee in _CALLS.findall(line):
                edges.append((callee, times))
            for group in _BRANCHES.findall(line):
                edges += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
        callees[name] = edges
    count: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        count[name] += times
        for callee, n in callees[name]:
            visit(callee, times * n, depth + 1)
    visit(entry, 1)
    return dict(count)


def _shapes_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text))


def _top_level(type_text: str) -> list[str]:
    """The elements of a tuple type `(a, (b, c))` -> ["a", "(b, c)"]; a plain type -> [it]."""
    t = type_text.strip()
    if not t.startswith("("):
        return [t]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(t):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 1:
            parts.append(t[start:i])
            start = i + 1
    parts.append(t[start:-1])
    return parts


def _collective_bytes(line: str, op: str, is_start: bool, group: int) -> int:
    """The full (unsharded) buffer one collective moves: an all-gather's output, a reduce-scatter's input."""
    type_text = line.split("=", 1)[1].split(f" {op}{'-start' if is_start else ''}(", 1)[0]
    parts = _top_level(type_text)
    if is_start and len(parts) == 2 and op != "all-reduce":      # (operands, results)
        return max(_shapes_bytes(parts[0]), _shapes_bytes(parts[1]))
    size = _shapes_bytes(type_text)
    return size * group if op == "reduce-scatter" else size


def analyze(hlo: str, num_devices: int = 1) -> dict:
    """{"collectives": {kind: {"count", "bytes"}}, "kernels": {name: count}, "scatters", "sorts"}:
    counts per step, bytes per device per step."""
    comps, entry = computations(hlo)
    times = multiplicities(comps, entry)
    fp8_params = _fp8_computations(hlo)
    coll: dict[str, dict[str, int]] = {}
    kernels: collections.Counter = collections.Counter()
    scatters = sorts = 0
    for name, lines in comps.items():
        n = times.get(name, 0)
        for line in lines:
            m = _COLLECTIVE_OP.search(line)
            if m and "=" in line:
                entry_ = coll.setdefault(m.group(1), {"count": 0, "bytes": 0})
                entry_["count"] += n
                entry_["bytes"] += n * _collective_bytes(line, m.group(1), bool(m.group(2)), num_devices)
            target = _CUSTOM_CALL.search(line)
            if target:
                kernels[_call_name(target.group(1))] += n
            kind = _FUSION_KIND.search(line)
            if kind and " fusion(" in line:
                label = _fusion_name(kind.group(1), line, fp8_params)
                if label:
                    kernels[label] += n
            scatters += n * (" scatter(" in line)
            sorts += n * (" sort(" in line)
    return {"collectives": coll, "kernels": dict(sorted(kernels.items())), "scatters": scatters, "sorts": sorts}


def _call_name(target: str) -> str:
    for prefix, label in _CALL_NAMES:
        if target.startswith(prefix):
            return label
    return target


def _fusion_name(kind: str, line: str, fp8_computations: set[str]) -> str | None:
    """XLA's own GEMM fusions (its Triton or cuDNN GEMMs); elementwise fusions are not listed."""
    called = re.search(r"calls=%([\w.\-]+)", line)
    fp8 = called is not None and called.group(1) in fp8_computations
    if "gemm" in kind:
        backend = "cuDNN" if "cudnn" in kind else "Triton"
        return f"{backend} FP8 GEMM (XLA)" if fp8 else f"{backend} GEMM (XLA)"
    if kind.startswith("__cudnn"):
        return "cuDNN fusion"
    return None


def _fp8_computations(hlo: str) -> set[str]:
    """The computations with an fp8 parameter (the GEMM fusions fed FP8 operands), read in one pass."""
    return {name for name, params in re.findall(r"^%([\w.\-]+)\s*\(([^)]*)\)", hlo, re.M) if "f8e" in params}
