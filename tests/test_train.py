"""python -m llmc_jax.train against llm.c's own numbers, resume, checkpoints, flags and main.log."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_CONFIG, random_params
from llmc_jax import train
from llmc_jax.formats import llmc_format
from llmc_jax.training import optim, train_step

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "llmc_tiny")
# The acceptance command of the train issue, on the tiny llm.c fixture (tests/data/llmc_tiny/README.md).
LLMC_CPU_FLAGS = ["-e", f"{FIXTURE}/model.bin", "-i", f"{FIXTURE}/train.bin", "-j", f"{FIXTURE}/val.bin",
                  "-b", "4", "-t", "64", "-d", "256", "-l", "1e-4", "-u", "0", "-q", "1.0", "-c", "0",
                  "-v", "10", "-m", "5", "-s", "0", "--beta2", "0.999", "--grad-clip", "0",
                  "--dtype", "float32", "--shuffle", "0"]
STEP_RE = re.compile(r"^step\s+(\d+)/(\d+) \| loss (\S+) \(")


def _run(argv, capsys):
    rc = train.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def _stdout_losses(out):
    train_l = [float(m.group(3)) for m in map(STEP_RE.match, out.splitlines()) if m]
    val_l = [float(line.split()[2]) for line in out.splitlines() if line.startswith("val loss ")]
    return train_l, val_l


def test_reproduces_llmc_cpu_trainer_losses(tmp_path, capsys):
    """Same model, data and flags as llm.c's train_gpt2.c (unshuffled loader): the same 40 losses."""
    expected = json.load(open(f"{FIXTURE}/expected.json"))
    out = _run(LLMC_CPU_FLAGS + ["-x", "40", "-o", str(tmp_path)], capsys)
    train_l, val_l = _stdout_losses(out)
    np.testing.assert_allclose(train_l, expected["train_losses"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(val_l, [expected["val_losses"][k] for k in ("0", "10", "20", "30", "40")],
                               atol=2e-5, rtol=0)


def test_compilation_cache_is_used_by_a_second_start(tmp_path):
    """A fresh process writes the compiled step into the cache; a second start finds it (no new entries)."""
    import subprocess
    import sys
    env = dict(os.environ, LLMC_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    cache = tmp_path / "cache" / "jax_compilation_cache"
    cmd = [sys.executable, "-m", "llmc_jax.train"] + LLMC_CPU_FLAGS + ["-x", "2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the train step's entry; small jits join the cache only when their compile passes 0.5 s, which
    # depends on the machine's load, so only the step (seconds to compile) is asserted on
    step_entries = lambda: {n for n in os.listdir(cache) if n.startswith("jit_step_fn")}  # noqa: E731
    subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, timeout=300)
    first = step_entries()
    assert first
    subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, timeout=300)
    assert step_entries() == first


def test_main_log_is_llmc_format(tmp_path, capsys):
    _run(LLMC_CPU_FLAGS + ["-x", "12", "-o", str(tmp_path)], capsys)
    lines = open(tmp_path / "main.log").read().splitlines()
    patterns = [re.compile(r"^s:(\d+) trl:\d+\.\d{4} lr:\d+\.\d{6} norm:\d+\.\d{2}$"),
                re.compile(r"^s:(\d+) tel:\d+\.\d{4}$")]
    assert all(any(p.match(line) for p in patterns) for line in lines), lines
    assert [line.split()[0] for line in lines if "tel" in line] == ["s:0", "s:10", "s:12"]
    assert [int(line.split()[0][2:]) for line in lines if "trl" in line] == list(range(12))
    assert lines[0] == "s:0 tel:5.5147"   # llm.c's val loss at step 0 (expected.json), 4 decimals


def test_resume_gives_the_same_main_log(tmp_path, capsys):
    """10 steps, then -y 1 to 20, equals 20 straight; with shuffling, so the loader state matters."""
    flags = LLMC_CPU_FLAGS[:-2] + ["--shuffle", "1", "-v", "5", "-n", "5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(flags + ["-x", "20", "-o", str(straight)], capsys)
    _run(flags + ["-x", "10", "-o", str(split)], capsys)
    _run(flags + ["-x", "20", "-o", str(split), "-y", "1"], capsys)
    assert open(split / "main.log").read() == open(straight / "main.log").read()


@pytest.mark.slow
def test_resume_bfloat16_without_master_weights(tmp_path, capsys):
    """bf16 params (-w 0, stochastically rounded: the default) survive the checkpoint bit for bit, and
    the resumed run rounds as the straight one: same log, byte-equal final model. Rounding to nearest
    ends elsewhere (the flag reaches the step)."""
    flags = LLMC_CPU_FLAGS[:-4] + ["--dtype", "bfloat16", "-w", "0", "-v", "4", "-n", "4"]
    straight, split, nearest = tmp_path / "straight", tmp_path / "split", tmp_path / "nearest"
    out = _run(flags + ["-x", "8", "-o", str(straight)], capsys)
    assert re.search(r"\| param rounding +\| stochastic", out)
    _run(flags + ["-x", "4", "-o", str(split)], capsys)
    _run(flags + ["-x", "8", "-o", str(split), "-y", "1"], capsys)
    _run(flags + ["-x", "8", "-o", str(nearest), "--param-rounding", "nearest"], capsys)
    assert open(split / "main.log").read() == open(straight / "main.log").read()
    final = "model_00000008.bin"
    assert llmc_format.read_model_header(split / final)[1] == 5   # bf16 model file
    assert (split / final).read_bytes() == (straight / final).read_bytes()
    assert (nearest / final).read_bytes() != (straight / final).read_bytes()


def test_incomplete_checkpoint_is_ignored(tmp_path, capsys):
    flags = LLMC_CPU_FLAGS + ["-n", "4", "-o", str(tmp_path)]
    _run(flags + ["-x", "8"], capsys)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("DONE")) == ["DONE_00000004", "DONE_00000008"]
    # a run killed while writing step 12: files there, DONE marker not yet
    for name in ("model_00000008.bin", "state_00000008", "meta_00000008.json"):
        src = tmp_path / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, str(src).replace("00000008", "00000012"))
    out = _run(flags + ["-x", "10", "-y", "1"], capsys)
    assert "resumed from step 8" in out
    with pytest.raises(SystemExit, match="cannot resume from step 10"):   # other batch geometry
        other = list(LLMC_CPU_FLAGS)
        other[other.index("-b") + 1], other[other.index("-d") + 1] = "2", "128"
        train.main(other + ["-n", "4", "-o", str(tmp_path), "-x", "12", "-y", "1"])


@pytest.mark.parametrize("argv,message", [
    (["-d", "300"], "not a multiple of B\\*T"),
    (["-t", "128", "-d", "512"], "exceeds maxT"),
    (["-i", "/nonexistent/shard_*.bin"], "/nonexistent/shard_\\*.bin"),
    (["-y", "1", "-o", "/tmp/llmc-jax-no-such-dir"], "no complete checkpoint"),
    (["-n", "5"], "needs an output dir"),
])
def test_bad_flags_stop_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(LLMC_CPU_FLAGS + ["-x", "2"] + argv)


def test_bad_files_stop_with_a_message(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(open(f"{FIXTURE}/train.bin", "rb").read()[:-100])
    cases = [(["-e", f"{FIXTURE}/train.bin"], "data shard"),            # a shard given as the model
             (["-i", str(truncated)], "truncated"),
             (["-e", str(tmp_path / "missing.bin")], "no such file")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(LLMC_CPU_FLAGS + ["-x", "2"] + argv)


def test_autodiff_backward_gives_the_same_losses(tmp_path, capsys):
    manual, _ = _stdout_losses(_run(LLMC_CPU_FLAGS + ["-x", "6"], capsys))
    autodiff, _ = _stdout_losses(_run(LLMC_CPU_FLAGS + ["-x", "6", "--backward", "autodiff"], capsys))
    np.testing.assert_allclose(manual, autodiff, rtol=1e-5)


def _state_and_batch(A, B, T=16, seed=0):
    params = {k: jnp.asarray(v) for k, v in random_params(TEST_CONFIG, seed).items()}
    rng = np.random.default_rng(seed + 1)
    tok = rng.integers(0, TEST_CONFIG.V, size=(A * B, T + 1)).astype(np.int32)
    return params, tok[:, :-1].reshape(A, B, T), tok[:, 1:].reshape(A, B, T)


def test_accumulating_4_micro_batches_equals_one_4x_batch():
    sc = train_step.StepConfig(model=TEST_CONFIG)
    params, x, y = _state_and_batch(4, 1)
    grads = jax.jit(train_step.accumulate_gradients(sc))
    loss4, g4 = grads(params, x, y)                                       # 4 micro-batches of B=1
    loss1, g1 = grads(params, x.reshape(1, 4, -1), y.reshape(1, 4, -1))  # one batch of B=4
    assert abs(float(loss4) - float(loss1)) < 1e-6
    for k in params:
        scale = float(jnp.max(jnp.abs(g1[k])))
        np.testing.assert_allclose(g4[k], g1[k], rtol=0, atol=1e-5 * scale, err_msg=k)


def test_three_steps_match_adamw_by_hand():
    """The jitted step vs AdamW + global-norm clipping written out in float64 numpy.

    Both sides take the same fp32 gradients (Adam divides a gradient by its own magnitude, so
    elements whose true gradient is zero, like the key bias, would turn summation-order noise
    into full-size steps), and the numpy side updates the step's own fp32 params each time."""
    sc = train_step.StepConfig(model=TEST_CONFIG, weight_decay=0.1, grad_clip=1.0)
    params, x, y = _state_and_batch(1, 4, seed=3)
    step = train_step.make_train_step(sc)
    grad_fn = jax.jit(train_step.accumulate_gradients(sc))
    m = {k: np.zeros(v.shape) for k, v in params.items()}
    v = {k: np.zeros(p.shape) for k, p in params.items()}
    state = train_step.init_train_state(params, sc)
    for t, lr in enumerate([1e-3, 5e-4, 2e-3]):
        before = {k: np.asarray(a, np.float64) for k, a in state.params.items()}
        loss, g = grad_fn(state.params, x, y)
        g = {k: np.asarray(a, np.float64) for k, a in g.items()}
        norm = np.sqrt(sum((a ** 2).sum() for a in g.values()))
        scale = 1.0 / norm if norm > 1.0 else 1.0
        want = {}
        for k in before:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.95 * v[k] + 0.05 * gk ** 2
            mhat, vhat = m[k] / (1 - 0.9 ** (t + 1)), v[k] / (1 - 0.95 ** (t + 1))
            wd = 0.1 if k in optim.WEIGHT_DECAY_PARAMS else 0.0
            want[k] = before[k] - lr * (mhat / (np.sqrt(vhat) + 1e-8) + wd * before[k])
        state, metrics = step(state, x, y, np.float32(lr), np.int32(t))
        assert abs(float(metrics.loss) - float(loss)) < 1e-6
        assert abs(float(metrics.norm) - norm) < 1e-5 * norm
        for k in want:   # fp32 rounding of the new weight, plus 1e-5 of a step
            np.testing.assert_allclose(np.asarray(state.params[k]), want[k], rtol=2e-7, atol=1e-5 * lr,
                                       err_msg=f"step {t} {k}")


@pytest.mark.parametrize("flag", ["skip_loss_z", "skip_grad_z"])
def test_outlier_update_is_skipped(flag):
    """With -sl/-sg set, a loss (grad norm) far above the last 128 steps' leaves the weights alone."""
    sc = train_step.StepConfig(model=TEST_CONFIG, **{flag: 3.0})
    params, x, y = _state_and_batch(1, 2)
    calm = lambda: optim.DetectorState(   # 128 small values; a fresh copy each (the step donates)
        jnp.full((128,), 0.1, jnp.float32).at[::2].set(0.2), jnp.int32(128), jnp.int32(0))
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), sc)._replace(
        loss_detector=calm(), norm_detector=calm())
    new, metrics = train_step.make_train_step(sc)(state, x, y, np.float32(1e-3), np.int32(200))
    assert bool(metrics.skipped) and float(getattr(metrics, "loss_z" if flag == "skip_loss_z" else "norm_z")) > 3
    for k in params:
        np.testing.assert_array_equal(new.params[k], params[k])
    # the same step without the threshold updates the weights
    sc0 = train_step.StepConfig(model=TEST_CONFIG)
    state0 = train_step.init_train_state(jax.tree.map(jnp.copy, params), sc0)._replace(
        loss_detector=calm(), norm_detector=calm())
    new0, m0 = train_step.make_train_step(sc0)(state0, x, y, np.float32(1e-3), np.int32(200))
    assert not bool(m0.skipped) and not np.array_equal(new0.params["fcw"], params["fcw"])


def test_hellaswag_inside_training(tmp_path, capsys):
    """-h 1 scores the eval file at every val step after 0 and at the end, logged as s:N eval:ACC,
    with the same code path as the standalone eval (checked on the final model)."""
    from llmc_jax.evals import hellaswag
    rng = np.random.default_rng(0)
    examples = [hellaswag.Example(index=i, label=int(rng.integers(4)),
                                  context=rng.integers(1, 250, 10).tolist(),
                                  completions=[rng.integers(1, 250, 5).tolist() for _ in range(4)])
                for i in range(6)]
    hellaswag.write_eval_file(tmp_path / "hs.bin", examples)
    out = _run(LLMC_CPU_FLAGS + ["-x", "2", "-v", "1", "-h", "1", "--hellaswag-file", str(tmp_path / "hs.bin"),
                                 "-n", "2", "-o", str(tmp_path)], capsys)
    evals = [line for line in open(tmp_path / "main.log").read().splitlines() if "eval:" in line]
    assert [line.split()[0] for line in evals] == ["s:1", "s:2"]
    cfg, params = llmc_format.read_model(tmp_path / "model_00000002.bin")
    correct, total = hellaswag.score(params, cfg, examples, B=4, T=64)
    assert total == 6 and evals[1] == f"s:2 eval:{correct / total:.4f}"
    assert f"HellaSwag: {correct}/6" in out


def test_exported_checkpoint_model_is_an_llmc_model(tmp_path, capsys):
    _run(LLMC_CPU_FLAGS + ["-x", "3", "-n", "3", "-o", str(tmp_path)], capsys)
    cfg, params = llmc_format.read_model(tmp_path / "model_00000003.bin")
    assert cfg == llmc_format.read_model_header(f"{FIXTURE}/model.bin")[0]
    _, start = llmc_format.read_model(f"{FIXTURE}/model.bin")
    assert not np.array_equal(params["fcw"], start["fcw"])   # trained weights, not the init


def test_resolve_gives_a_frozen_run_and_leaves_the_flags_alone(tmp_path):
    """The train command's first phase: the Run holds every resolved value (here the -r fallback of
    the fused MLP kernel and the platform's dtype), and the parsed flags stay as parsed."""
    import dataclasses

    from llmc_jax.nn.kernels import Kernels
    from llmc_jax.training import cli, run as run_mod
    argv = LLMC_CPU_FLAGS + ["-x", "7", "-o", str(tmp_path), "--kernels", "pallas", "-r", "1"]
    args = cli.parse_args([a for a in argv if a not in ("--dtype", "float32")])
    parsed = dict(vars(args))
    run_mod.check_flags(args)
    run = run_mod.resolve(args)
    assert vars(args) == parsed
    assert run.flags._asdict() == parsed
    assert run.kernels == Kernels("pallas", "pallas", "xla")          # -r 1: the fused MLP falls back
    assert run.dtype == "float32" and args.dtype is None                # the CPU's default, resolved
    assert (run.B, run.T, run.grad_accum, run.max_steps, run.val_batches) == (4, 64, 1, 7, 5)
    assert run.step_config().kernels == run.kernels
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.max_steps = 8
    rows = dict(run_mod.describe_run(run, jax.devices()[0], jax.__version__))
    assert rows["kernels"] == "pallas (matmul_gelu=xla)" and rows["max_steps"] == 7
