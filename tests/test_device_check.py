"""scripts/device_check.py --smoke: the GPU check's CPU rehearsal runs every section end to end (tiny
shapes, Pallas interpret mode) and leaves a passing result file per section and the summary table;
plus its tolerances are still the CPU kernel tests' own, and it refuses to run on a CPU without --smoke."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# the kernel tests' tolerance constants (tests/ is on sys.path, as for conftest)
import test_pallas_flash_attention as t_attn
import test_pallas_layernorm as t_ln
import test_pallas_matmul_gelu as t_mg
import test_pallas_rmsnorm as t_rms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "device_check.py")
_spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
dc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dc)

# rows that only a GPU (cuDNN) can run: the smoke run must skip them, saying why
GPU_ONLY = "cuDNN attention needs an NVIDIA GPU"


def _env():
    # conftest.py has set JAX_PLATFORMS=cpu and the suite's XLA_FLAGS; the subprocess inherits them
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_smoke_runs_every_section_and_passes(tmp_path):
    out = tmp_path / "dc"
    p = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    # the table comes last, and is also in summary.txt and at the end of the log
    table = p.stdout[p.stdout.index("== device_check summary"):]
    for section in dc.SECTIONS:
        assert any(line.startswith(section) for line in table.splitlines()), section
    assert (out / dc.SUMMARY_FILE).read_text().strip() == table.strip()
    assert "== device_check summary" in (out / dc.LOG_FILE).read_text()
    assert len(os.listdir(out)) <= 8                      # the device tool brings back at most 8 files

    sections = {s: json.loads((out / dc.SECTION_FILE[s]).read_text()) for s in dc.SECTIONS}
    for name, data in sections.items():
        assert data["status"] == "ok", (name, data["status"])
        for part, entry in data["parts"].items():
            assert entry["status"] == "ok" and not entry.get("error"), (part, entry.get("error"))
            for row in entry["rows"]:
                if row["status"] == "skipped":     # only a GPU-only path, or d48's descent past a -b too large
                    assert row["reason"] == GPU_ONLY or (
                        part == "train-d48" and row["reason"].startswith("does not fit")), (part, row)
                else:
                    assert row["status"] == "ok", (part, row)

    env = sections["environment"]["parts"]["env"]
    assert env["info"]["platform"] == "cpu" and env["info"]["versions"]["jax"]
    assert {r["name"] for r in env["rows"]} == {"matmul bf16 ceiling", "device copy ceiling"}

    parts = sections["correctness"]["parts"]
    kernels = parts["kernels"]["rows"]
    assert {r["kernel"] for r in kernels} == {"canary", "attention", "layernorm", "residual_layernorm", "rmsnorm",
                                              "residual_rmsnorm", "matmul_gelu"}
    canary = next(r for r in kernels if r["kernel"] == "canary")
    assert canary["unwritten_rows_nan"] == canary["unwritten_rows"] > 0
    for r in kernels:
        if r["kernel"] != "canary":
            assert r["checks"] and all(c["ok"] and c["nonfinite"] == 0 and c["rel_error"] < c["tol"]
                                       for c in r["checks"]), r
    model = parts["model"]["rows"]
    assert [r["status"] for r in model if r.get("variant") == "pallas"] == ["ok"]
    assert [r["status"] for r in model if r.get("check") == "llmc_jax.gradcheck main"] == ["ok"]

    bench = sections["kernels"]["parts"]["bench"]["rows"]
    assert {(r["op"], r["variant"], r["mode"]) for r in bench} == {
        (op, v, "fwd+bwd") for op in ("attention", "matmul_gelu") for v in ("pallas", "xla")}
    assert all(r["ms_median"] > 0 for r in bench)

    train = sections["train"]["parts"]
    ran = [r for e in train.values() for r in e["rows"] if r["status"] == "ok" and "check" not in r]
    assert {r["kernels"] for r in ran} == {"xla"} and {r["model"] for r in ran} == {"tiny", "llama3:tiny"}
    for r in ran:
        assert r["step_ms_median"] > 0 and r["tok_per_s"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] is not None
    # FP8: the off/delayed pair at one shape, what XLA made of the fp8 dots (no cuBLASLt on a CPU),
    # and the loss on "the device" against the CPU backend (here the same backend: identical)
    fp8_rows = train["train-fp8"]["rows"]
    assert [(r.get("fp8"), r["status"]) for r in fp8_rows[:2]] == [("delayed", "ok"), ("off", "ok")]
    assert fp8_rows[0]["fp8_cublaslt_calls"] == 0 and "fp8_dots_not_rewritten" in fp8_rows[0]
    vs_cpu = fp8_rows[2]
    assert vs_cpu["check"] == "fp8 loss vs cpu" and vs_cpu["status"] == "ok", vs_cpu
    assert vs_cpu["max_rel_fp8"] == 0.0 and vs_cpu["max_rel_off"] == 0.0
    assert len(vs_cpu["losses"]["delayed/device"]) == 2
    # the d48 stand-in descends: the first -b is over the smoke memory limit, the next one runs
    d48 = train["train-d48"]
    assert [r["status"] for r in d48["rows"]] == ["skipped", "ok"]
    assert d48["rows"][0]["reason"].startswith("does not fit") and d48["info"]["largest_b"] == d48["rows"][1]["B"]

    torch_rows = sections["torch"]["parts"]["torch"]["rows"]
    assert len(torch_rows) == 1 and torch_rows[0]["status"] in ("ok", "skipped"), torch_rows
    if torch_rows[0]["status"] == "skipped":            # only when PyTorch is missing
        assert "PyTorch" in torch_rows[0]["reason"]


def test_tolerances_are_the_kernel_tests_own():
    tol = dc.TOLERANCES
    assert tol["attention"] == {"float32": t_attn.TOL_F32, "bfloat16": t_attn.TOL_BF16}
    assert tol["layernorm"] == {"float32": t_ln.TOL_F32, "bfloat16": t_ln.TOL_BF16, "param_float32": t_ln.TOL_PARAM_F32}
    assert tol["rmsnorm"] == {"float32": t_rms.TOL_F32, "bfloat16": t_rms.TOL_BF16, "param_float32": t_rms.TOL_F32}
    assert tol["matmul_gelu"] == {"float32": t_mg.FP32_TOL, "bfloat16": t_mg.BF16_TOL, "param_float32": t_mg.BF16_TOL}


def test_refuses_a_cpu_without_smoke(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "--smoke" in p.stderr
    assert not (tmp_path / "x").exists()
