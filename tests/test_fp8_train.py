"""--fp8 in the trainer (docs/fp8.md, "The trainer's --fp8"): GPT-2 and Llama 3 tiny train with FP8
layer matmuls close to the unquantized run under both recipes, the metas follow the step (max over
micro-batches), survive a checkpoint resume exactly, validation runs the FP8 forward, and the
compiled step really holds fp8 dots. The multi-device metas: test_parallel.py. `--fp8 off` itself is covered,
unchanged, by test_train.py, test_parallel.py and test_checkpoint_integrity.py."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmc_jax import train
from llmc_jax.errors import UsageError
from llmc_jax.formats.data import DataLoader
from llmc_jax.models.family import load_model
from llmc_jax.nn import fp8
from llmc_jax.training import checkpoint, train_step

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "llmc_tiny")
STEPS = 20


def _setup(dtype: str, fp8_recipe: str, recompute: int = 1, model: str = "tiny",
           matmuls: tuple[str, ...] = fp8.LAYER_MATMULS):
    """The CLI's tiny run (the model's own init, lr 1e-3, -r 1) as a StepConfig, state and batches."""
    config, params_np = load_model(model, None, check_finite=False)
    sc = train_step.StepConfig(model=config, dtype=dtype, recompute=recompute, fp8=fp8_recipe, fp8_matmuls=matmuls)
    state = train_step.init_train_state({k: jnp.asarray(v, jnp.float32) for k, v in params_np.items()}, sc)
    loader = DataLoader(f"{FIXTURE}/train.bin", 4, 64, 0, 1, shuffle=False, vocab_size=config.V)
    batches = [loader.next_batch() for _ in range(STEPS)]
    return sc, state, batches


def _losses(sc, state, batches) -> tuple[np.ndarray, train_step.TrainState, str]:
    """The losses of STEPS updates, the final state, and the step's lowered program (StableHLO text)."""
    step = train_step.make_train_step(sc)
    hlo = step.lower(state, batches[0][0][None], batches[0][1][None], np.float32(1e-3), np.int32(1)).as_text()
    losses = []
    for i, (x, y) in enumerate(batches):
        state, m = step(state, x[None], y[None], np.float32(1e-3), np.int32(i + 1))
        losses.append(m.loss)
    return np.asarray(jax.device_get(losses), np.float64), state, hlo


@functools.lru_cache(maxsize=None)
def _unquantized(model: str) -> tuple[np.ndarray, str]:
    """The --fp8 off bf16 curve and program of `model` (once per model for the cases below)."""
    off, _, hlo = _losses(*_setup("bfloat16", "off", model=model))
    return off, hlo


# (model, recipe, matmuls, the bound on the largest per-step relative loss distance from --fp8 off).
# Measured over these 20 bf16 steps with jax 0.10.2 (docs/fp8.md): GPT-2 delayed 5.8e-4, GPT-2
# current 7.4e-4, Llama 3 delayed with all four layer matmuls 6.9e-4 (3.2e-4 without attproj; fp32
# activations 5.6e-4). The largest distance falls on the same noisy step (17) in most runs. Each
# bound is ~2.6-2.9x its measurement: room for another jax's float32 rounding, not for a missing
# scale (a fresh meta cast at scale 1 moved Llama's curve to 1.75e-3; unscaled FP8 lags 3x further
# in test_fp8.py's MLP).
CASES = [("tiny", "delayed", fp8.LAYER_MATMULS, 1.5e-3),
         ("tiny", "current", fp8.LAYER_MATMULS, 2e-3),
         ("llama3:tiny", "delayed", fp8.ALL_LAYER_MATMULS, 2e-3)]


@pytest.mark.parametrize("model,recipe,matmuls,bound", CASES, ids=[f"{m}-{r}-{len(mm)}" for m, r, mm, _ in CASES])
def test_fp8_tracks_the_unquantized_run_and_its_step_holds_fp8_dots(model, recipe, matmuls, bound):
    """bf16 (the dtype FP8 runs beside on a GPU): both families, both recipes."""
    off, hlo_off = _unquantized(model)
    on, state, hlo_on = _losses(*_setup("bfloat16", recipe, model=model, matmuls=matmuls))
    assert np.all(np.isfinite(on))
    rel = np.max(np.abs(on - off) / off)
    print(f"{model} {recipe}: max relative loss distance {rel:.3e}")
    assert rel < bound, (rel, on, off)
    assert not np.array_equal(on, off)           # the FP8 path is in use
    assert set(state.fp8) == set(matmuls)
    for name, metas in state.fp8.items():        # every layer's metas saw STEPS steps: scales moved off 1.0
        hist = np.asarray(metas.x.amax_history)
        assert hist.shape == (2, fp8.DEFAULT_HISTORY) and np.all(hist[:, :STEPS] > 0), name
        assert np.all(hist[:, STEPS:] == 0) and np.all(np.asarray(metas.dout.scale) > 1), name
    # each FP8 matmul: forward, dx, dw (the dx/dw dots take an e5m2 dout); none with --fp8 off
    dots = [ln for ln in hlo_on.splitlines() if "dot_general" in ln and "f8E4M3FN" in ln]
    assert len(dots) >= 3 * len(matmuls) and sum("f8E5M2" in ln for ln in dots) >= 2 * len(matmuls), dots
    assert "f8E4M3FN" not in hlo_off


def test_meta_grads_are_the_max_over_micro_batches():
    """A=2 accumulation: each meta's observed amax is the max of the two micro-batches' (not the sum),
    one per layer (the scan stacks them), and the params' grads are unaffected by the metas."""
    sc, state, batches = _setup("float32", "delayed", recompute=0)
    grad_fn = jax.jit(train_step.accumulate_gradients(sc))
    (x0, y0), (x1, y1) = batches[:2]
    _, _, g0 = grad_fn(state.params, x0[None], y0[None], state.fp8)
    _, _, g1 = grad_fn(state.params, x1[None], y1[None], state.fp8)
    _, _, g01 = grad_fn(state.params, np.stack([x0, x1]), np.stack([y0, y1]), state.fp8)
    want = jax.tree.map(np.maximum, g0, g1)
    jax.tree.map(np.testing.assert_array_equal, g01, want)
    a0 = np.asarray(fp8.observed_amax(g0["qkv"].x))
    assert a0.shape == (2,) and a0[0] != a0[1]     # per layer, not summed over the scan


def test_resume_restores_the_metas_exactly(tmp_path, capsys):
    """6 steps with a checkpoint at 3, resumed with -y 1, equals 6 straight: main.log and the metas."""
    flags = ["-e", "tiny", "-i", f"{FIXTURE}/train.bin", "-j", f"{FIXTURE}/val.bin", "-b", "4", "-t", "64",
             "-l", "1e-3", "-u", "0", "-v", "3", "-m", "1", "-s", "0", "--dtype", "float32", "--fp8", "delayed",
             "-n", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main(flags + ["-x", "6", "-o", a]) == 0
    assert train.main(flags + ["-x", "3", "-o", b]) == 0
    assert train.main(flags + ["-x", "6", "-o", b, "-y", "1"]) == 0
    capsys.readouterr()
    log = open(f"{a}/main.log").read()
    assert log == open(f"{b}/main.log").read() and "s:3 tel:" in log and "s:6 tel:" in log
    sc, template, _ = _setup("float32", "delayed")
    sa, sb = (checkpoint.load_state(d, 6, template) for d in (a, b))
    jax.tree.map(np.testing.assert_array_equal, sa.fp8, sb.fp8)
    assert np.all(np.asarray(sa.fp8["fc"].dout.amax_history)[:, :6] > 0)
    # resuming an FP8 checkpoint without --fp8 is one clear error line
    with pytest.raises(UsageError, match="holds FP8 metas .* this run has --fp8 off"):
        train.main(flags[:-4] + ["-n", "3", "-x", "7", "-o", b, "-y", "1"])
    # so is resuming it with another --fp8-matmuls (its metas are another tree)
    with pytest.raises(UsageError, match="holds FP8 metas for --fp8-matmuls fc,fcproj,qkv, and this run has attproj,qkv"):
        train.main(flags + ["--fp8-matmuls", "qkv,attproj", "-x", "7", "-o", b, "-y", "1"])


def test_validation_runs_the_fp8_forward():
    """The val pass quantizes as the train step does (its metas, nothing observed): it equals the
    FP8 loss of the same params and metas through the step's own forward (-r 0 and -r 1 agree), and
    differs from the unquantized loss by the FP8 rounding only."""
    sc, state, batches = _setup("float32", "delayed")
    step = train_step.make_train_step(sc)
    for i, (x, y) in enumerate(batches[:3]):          # scales set from observed amaxes
        state, _ = step(state, x[None], y[None], np.float32(1e-3), np.int32(i + 1))
    x, y = batches[3]
    val = float(train_step.make_eval_step(sc)(state.params, x, y, state.fp8))
    sc0 = train_step.StepConfig(model=sc.model, dtype="float32", recompute=0, fp8="delayed")
    want = float(train_step.accumulate_gradients(sc0)(state.params, x[None], y[None], state.fp8)[0])
    plain = float(train_step.make_eval_step(train_step.StepConfig(model=sc.model, dtype="float32"))(state.params, x, y))
    assert abs(val - want) <= 1e-6 * want, (val, want)
    assert val != plain and abs(val - plain) < 2e-3 * plain, (val, plain)
