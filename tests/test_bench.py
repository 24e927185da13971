"""scripts/bench_train.py on a tiny model: every JSON field, and it times the trainer's own step."""
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from llmc_jax.formats import llmc_init
from llmc_jax.models import gpt2_reference
from llmc_jax.models.config import from_descriptor

_spec = importlib.util.spec_from_file_location(
    "bench_train", os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_train.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FIELDS = {"compile_s", "first_step_s", "step_ms_median", "step_ms_min", "tok_per_s", "gflops",
          "matmul_peak_gflops", "temp_bytes", "argument_bytes"}


def test_bench_json_has_every_field_and_times_the_trainer_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["-e", "tiny", "-b", "2", "-t", "16", "--steps", "2", "--warmup", "0",
                       "--json", str(out)]) == 0
    assert "manual-xla" in capsys.readouterr().out
    data = json.load(open(out))
    assert {"device", "jax", "variants"} <= set(data)
    assert set(data["variants"]) == {"manual-xla", "autodiff-xla"}
    for r in data["variants"].values():
        assert FIELDS <= set(r) and r["step_ms_median"] > 0 and r["temp_bytes"] is not None
    # the first timed step's loss is the loss of the benchmark's batch under the initial weights
    cfg = from_descriptor("tiny")
    params = {k: jnp.asarray(v) for k, v in llmc_init.init_params(cfg).items()}
    tok = np.random.default_rng(0).integers(0, cfg.V, size=(1, 2, 17)).astype(np.int32)
    want = float(gpt2_reference.loss(params, tok[0, :, :-1], tok[0, :, 1:], cfg))
    for r in data["variants"].values():
        assert abs(r["first_loss"] - want) < 1e-5


def test_compile_only(capsys):
    assert bench.main(["-e", "tiny", "-b", "2", "-t", "16", "--compile-only", "--backward", "manual"]) == 0
    assert "compile" in capsys.readouterr().out


_kspec = importlib.util.spec_from_file_location(
    "bench_kernels", os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_kernels.py"))
bench_kernels = importlib.util.module_from_spec(_kspec)
_kspec.loader.exec_module(bench_kernels)


@pytest.mark.slow
def test_bench_kernels_runs_every_op_on_cpu(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--iters", "1", "--json", str(out)]) == 0
    rows = json.load(open(out))["rows"]
    assert "interpret mode" in capsys.readouterr().out
    timed = {(r["op"], r["variant"], r["mode"]) for r in rows if "error" not in r}
    # our kernel and the XLA baseline, forward and forward+backward, for every op
    for op in bench_kernels.OPS:
        for variant in ("pallas", "xla"):
            for mode in ("fwd", "fwd+bwd"):
                assert (op, variant, mode) in timed, (op, variant, mode)
    for r in rows:
        if "error" not in r:
            assert r["ms_median"] > 0 and r["rate"] > 0 and r["peak_fraction"] is None   # no CPU peak
