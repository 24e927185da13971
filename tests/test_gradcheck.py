"""python -m llmc_jax.gradcheck end to end on a tiny model, including --llmc-state and --dump."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import numpy_gpt2
from conftest import TEST_CONFIG, random_batch, random_params
from llmc_jax import gradcheck
from llmc_jax.formats import llmc_format
from llmc_jax.models import gpt2_reference
from llmc_jax.models.config import PARAM_NAMES

CFG = TEST_CONFIG
B, T = 2, 13


@pytest.fixture(scope="module")
def model_and_state(tmp_path_factory):
    """A model .bin and a debug state whose logits and loss come from the float64 NumPy GPT-2."""
    d = tmp_path_factory.mktemp("gradcheck")
    params = random_params(CFG, seed=5)
    llmc_format.write_model(d / "model.bin", CFG, params)
    x, y = random_batch(CFG, B, T, seed=6)
    logits, _ = numpy_gpt2.forward(params, x, CFG)
    loss = numpy_gpt2.loss(params, x, y, CFG)
    # gradients: autodiff of the plain model (the NumPy GPT-2 has no backward)
    _, grads = gpt2_reference.value_and_grad(CFG)({k: jnp.asarray(v) for k, v in params.items()}, x, y)
    grads = {k: np.asarray(v) for k, v in grads.items()}
    llmc_format.write_debug_state(d / "state.bin", CFG, x, y, logits.astype(np.float32), loss, grads)
    return d, grads


def _rows(out):
    return {line.split("|")[0].strip(): line.split("|")[-1].strip()
            for line in out.splitlines() if line.count("|") == 3 and "tensor" not in line}


def test_random_batch_all_ok(model_and_state, capsys):
    d, _ = model_and_state
    rc = gradcheck.main(["-e", str(d / "model.bin"), "-b", "2", "-t", "16", "--dump", str(d / "dump.npz")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    assert [r for r in rows] == list(PARAM_NAMES) and set(rows.values()) == {"OK"}
    dump = np.load(d / "dump.npz")
    assert dump["logits"].shape == (2, 16, CFG.Vp)
    for name, shape in CFG.param_shapes().items():
        assert dump[f"grads/{name}"].shape == shape and dump[f"autodiff/{name}"].shape == shape
    assert np.isfinite(dump["loss"])


def test_llmc_state_passes(model_and_state, capsys):
    d, _ = model_and_state
    rc = gradcheck.main(["-e", str(d / "model.bin"), "--llmc-state", str(d / "state.bin")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "manual vs llm.c debug state" in out
    assert out.count("| OK") == 2 * len(PARAM_NAMES) + 2     # + logits and loss rows


def test_llmc_state_with_one_perturbed_gradient_fails_naming_it(model_and_state, tmp_path, capsys):
    d, grads = model_and_state
    state = llmc_format.read_debug_state(d / "state.bin", CFG)
    bad = {k: v.copy() for k, v in grads.items()}
    bad["fcw"][1, 3, 5] += 0.01 * np.abs(bad["fcw"]).max()   # a 1% error in one element
    llmc_format.write_debug_state(tmp_path / "bad.bin", CFG, state.x, state.y, state.logits, state.loss, bad)
    rc = gradcheck.main(["-e", str(d / "model.bin"), "--llmc-state", str(tmp_path / "bad.bin")])
    out = capsys.readouterr().out
    assert rc == 1
    llmc_section = out.split("manual vs llm.c debug state")[1]
    not_ok = [line.split("|")[0].strip() for line in llmc_section.splitlines() if line.endswith("| NOT OK")]
    assert not_ok == ["fcw"]
    assert "FAILED: NOT OK: fcw" in out


def test_bfloat16_path(model_and_state, capsys):
    d, _ = model_and_state
    rc = gradcheck.main(["-e", str(d / "model.bin"), "-b", "2", "-t", "16", "--dtype", "bfloat16"])
    assert rc == 0, capsys.readouterr().out


def test_batch_from_a_shard(model_and_state, tmp_path, capsys):
    d, _ = model_and_state
    llmc_format.write_shard(tmp_path / "s.bin", np.arange(100) % CFG.V)
    assert gradcheck.main(["-e", str(d / "model.bin"), "-i", str(tmp_path / "s.bin"), "-b", "2", "-t", "8"]) == 0
    with pytest.raises(SystemExit, match="a batch needs"):
        gradcheck.main(["-e", str(d / "model.bin"), "-i", str(tmp_path / "s.bin"), "-b", "4", "-t", "32"])


def test_llmc_c_code_debug_state(capsys):
    """A debug state computed by llm.c's own C forward/backward (tests/data/llmc_tiny/README.md)."""
    fixture = os.path.join(os.path.dirname(__file__), "data", "llmc_tiny")
    rc = gradcheck.main(["-e", f"{fixture}/model.bin", "--llmc-state", f"{fixture}/debug_state.bin", "--tol", "1e-5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("| OK") == 2 * len(PARAM_NAMES) + 2
