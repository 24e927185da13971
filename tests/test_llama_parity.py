"""Llama 3 against llm.c's own train_llama3.py (branch llama3): the numbers in tests/data/llama3_tiny
were written by that script under PyTorch on the CPU (its README says how)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmc_jax import train
from llmc_jax.formats import llama3_format
from llmc_jax.models import llama

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "llama3_tiny")
EXPECTED = json.load(open(os.path.join(FIXTURE, "expected.json")))
# train_llama3.py's flags as the fixture's command line gives them: one batch reused (-a 1),
# constant lr 1e-3, AdamW (0.9, 0.95), eps 1e-8, no weight decay
TRAIN_FLAGS = ["-e", f"{FIXTURE}/model.bin", "-i", f"{FIXTURE}/train.bin", "-j", f"{FIXTURE}/train.bin",
               "-b", "4", "-t", "64", "-d", "256", "-x", "10", "-l", "1e-3", "-u", "0", "-q", "1.0", "-c", "0",
               "-a", "1", "-k", "constant", "--beta2", "0.95", "--dtype", "float32", "-v", "0", "-s", "0",
               "--shuffle", "0"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_forward_and_every_gradient_match_llmc_debug_state():
    """The issue's tolerances: logits 1e-5, loss 1e-6 relative, every gradient 1e-4 relative."""
    config, params = llama3_format.read_model(f"{FIXTURE}/model.bin")
    state = llama3_format.read_debug_state(f"{FIXTURE}/debug_state.bin", config)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    x, y = jnp.asarray(state.x), jnp.asarray(state.y)
    loss, grads = jax.jit(llama.value_and_grad(config))(params, x, y)
    logits = jax.jit(lambda p, i: llama.logits(p, i, config))(params, x)
    assert _rel(logits, state.logits) < 1e-5
    assert abs(float(loss) - float(state.loss)) < 1e-6 * float(state.loss)
    assert set(grads) == set(state.grads)
    for name in grads:
        assert _rel(grads[name], state.grads[name]) < 1e-4, name


@pytest.mark.parametrize("clip, run", [("1.0", EXPECTED), ("0.5", EXPECTED["clip_0p5_run"])], ids=["clip1", "clip0.5"])
def test_train_command_reproduces_train_llama3_losses(clip, run, capsys):
    """Ten AdamW steps on llm.c's batch print train_llama3.py's ten losses (2e-5, print precision);
    with --grad-clip 0.5 the clipping acts at every step and still agrees."""
    assert train.main(TRAIN_FLAGS + ["--grad-clip", clip]) == 0
    out = capsys.readouterr().out
    losses = [float(line.split("|")[1].split()[1]) for line in out.splitlines() if line.startswith("step ")]
    np.testing.assert_allclose(losses, run["history_losses"], atol=2e-5, rtol=0)


def test_bf16_file_holds_the_rounded_fp32_weights():
    config, p32 = llama3_format.read_model(f"{FIXTURE}/model.bin")
    config16, p16 = llama3_format.read_model(f"{FIXTURE}/model_bf16.bin")
    assert config16 == config
    for name in p32:
        want = np.asarray(jnp.asarray(p32[name]).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(p16[name], want, err_msg=name)


def test_resume_gives_the_same_main_log_and_model(tmp_path, capsys):
    """Llama 3 checkpoints (llm.c llama3 model files + the optimizer and loader state): 4 steps, then
    -y 1 to 8, equals 8 straight, main.log and the final model file byte for byte; shuffled, so the
    loader state matters, and bf16 params without master weights (-w 0), so the bf16 (v5) file and
    state must come back bit for bit."""
    flags = TRAIN_FLAGS[:TRAIN_FLAGS.index("-b")] + [
        "-b", "2", "-t", "32", "-d", "64", "-l", "1e-3", "-u", "2", "-c", "0.1", "--dtype", "bfloat16",
        "-w", "0", "--shuffle", "1", "-v", "4", "-n", "4", "-s", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for extra in (["-x", "8", "-o", str(straight)], ["-x", "4", "-o", str(split)],
                  ["-x", "8", "-o", str(split), "-y", "1"]):
        assert train.main(flags + extra) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4 of" in out
    assert open(split / "main.log").read() == open(straight / "main.log").read()
    assert open(split / "model_00000008.bin", "rb").read() == open(straight / "model_00000008.bin", "rb").read()
    config, version = llama3_format.read_model_header(split / "model_00000008.bin")
    assert version == 5 and config == llama3_format.read_model_header(f"{FIXTURE}/model.bin")[0]
