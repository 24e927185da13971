"""scripts/bench_torch_gpt2.py, the PyTorch peer: its --smoke run and JSON, its failure lines, and that
its GPT-2 is our GPT-2 (the loss of llmc_jax.models.gpt2 on the same weights)."""
import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the PyTorch peer benchmark is optional")

from conftest import TEST_CONFIG, random_batch, random_params  # noqa: E402
from llmc_jax import errors  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_torch_gpt2", os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_torch_gpt2.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RESULT_FIELDS = {"first_step_s", "step_ms_median", "step_ms_min", "step_ms_all", "tok_per_s", "gflops", "mfu",
                 "peak_flops", "peak_mem_bytes", "first_loss", "last_loss", "last_grad_norm", "compiled",
                 "compile_error", "sdpa_backend", "fused_adamw"}


def test_smoke_run_writes_every_field(tmp_path, capsys):
    out = tmp_path / "torch.json"
    assert errors.run(bench.main, ["--smoke", "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[0] == "torch-eager"          # the table comes last
    data = json.load(open(out))
    assert {"device", "device_kind", "torch", "cuda", "cudnn", "python", "model", "optimizer", "config",
            "variants"} <= set(data)
    assert data["device"] == "cpu" and data["torch"] == torch.__version__
    assert data["model"]["num_parameters"] == bench.from_descriptor("tiny").num_parameters
    (name, r), = data["variants"].items()
    assert name == "torch-eager" and RESULT_FIELDS <= set(r)
    assert len(r["step_ms_all"]) == 3 and 0 < r["step_ms_min"] <= r["step_ms_median"] and r["first_step_s"] > 0
    assert r["tok_per_s"] > 0 and r["gflops"] > 0 and r["mfu"] is None      # no CPU peak
    # random tokens over V=256 start near ln(256) = 5.55
    assert abs(r["first_loss"] - np.log(256)) < 0.2 and np.isfinite(r["last_loss"])
    assert r["compiled"] is False and r["compile_error"] is None


def test_the_peer_computes_our_gpt2():
    """Its loss equals our JAX GPT-2's on the same fp32 weights; V < Vp, so the padded classifier
    columns must be left out of the softmax as ours does. The weights are scaled up so that the MLP
    dominates the residual stream with GELU inputs of O(1): an exact (erf) GELU instead of the tanh
    one is then 1e-4 off, dropping wpe 2e-2, non-causal attention 3e-2, LayerNorm eps 1e-3 1e-3."""
    import jax
    import jax.numpy as jnp
    from llmc_jax.models.family import family_of

    cfg = TEST_CONFIG
    params = random_params(cfg)
    for name, scale in (("fcw", 10), ("fcprojw", 50), ("qkvw", 10), ("wte", 15)):
        params[name] *= scale
    idx, tgt = random_batch(cfg, B=2, T=13)
    model = bench.GPT(cfg)
    bench.load_llmc_params(model, params)
    with torch.no_grad():
        got = float(model(torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(tgt, dtype=torch.long)))
    loss = jax.jit(lambda p, x, y: family_of(cfg).loss(p, x, y, cfg))
    want = float(loss({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(idx), jnp.asarray(tgt)))
    assert abs(got - want) < 1e-5


def test_init_and_optimizer_groups_are_llmcs():
    cfg = TEST_CONFIG
    model = bench.GPT(cfg)
    bench.init_llmc(model)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters      # tied: wte counted once
    assert float(model.wte.weight.detach()[cfg.V:].abs().max()) == 0.0
    fcproj = torch.stack([b.fcproj.weight for b in model.blocks])
    assert abs(float(fcproj.detach().std()) / (0.02 / np.sqrt(2 * cfg.L)) - 1) < 0.02
    decay, nodecay = bench.make_optimizer(model, fused=False).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert nodecay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in nodecay["params"])
    assert len(decay["params"]) == 2 + 4 * cfg.L                 # wte, wpe, and 4 matmul weights per layer


def test_a_failed_compile_times_the_eager_model(tmp_path, monkeypatch, capsys):
    def broken(model, mode):
        def forward(*args):
            raise RuntimeError("no C compiler")
        return forward
    monkeypatch.setattr(bench, "_compile", broken)
    out = tmp_path / "torch.json"
    assert errors.run(bench.main, ["--smoke", "--compile", "1", "--steps", "1", "--warmup", "0",
                                   "--json", str(out)]) == 0
    assert "torch.compile failed (RuntimeError: no C compiler)" in capsys.readouterr().out
    (name, r), = json.load(open(out))["variants"].items()
    assert name == "torch-eager" and r["compiled"] is False and "no C compiler" in r["compile_error"]


@pytest.mark.parametrize("argv, words", [
    (["--smoke", "-t", "65"], "-t 65: must be <= the model's maxT 64"),
    (["--smoke", "--steps", "0"], "--steps 0: must be >= 1"),
    (["--model", "d13"], "argument --model: invalid choice"),
    (["--smoke", "--json", "/nonexistent-dir/torch.json"], "No such file or directory"),   # before the run
])
def test_bad_flags_one_line(argv, words, capsys):
    assert errors.run(bench.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_without_torch_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(bench, "torch", None)
    monkeypatch.setattr(bench, "_TORCH_ERROR", "No module named 'torch'")
    assert errors.run(bench.main, ["--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PyTorch is not installed" in err[0]
