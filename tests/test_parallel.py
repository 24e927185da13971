"""ZeRO-0/1/2/3 on 8 fake CPU devices against the single-device step (llmc_jax.training.parallel).

Fake devices must be configured before JAX starts, and this pytest process has already started
it with one CPU device, so the training comparison runs tests/parallel_worker.py in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=8) and checks the JSON it prints."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import device_flags

from llmc_jax.training import parallel
from llmc_jax.models.gpt2 import LAYER_PARAMS

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
N = 8


# ------------------------------------------------------------------ in-process, no devices needed

def test_shard_dim_first_divisible():
    assert parallel.shard_dim((256, 64), 8) == 0
    assert parallel.shard_dim((12, 768), 8) == 1          # GPT-2 L=12: the stacked L axis does not divide
    assert parallel.shard_dim((2, 192, 64), 8) == 1
    assert parallel.shard_dim((4, 3), 8) is None          # nothing divisible (and 4 < 8): replicated
    assert parallel.shard_dim((), 8) is None               # scalars replicated
    assert parallel.shard_dim((256, 64), 1) is None        # one device: nothing to split
    assert parallel.leaf_spec((2, 64), 8) == parallel.P(None, "data")
    assert parallel.leaf_spec((5,), 8) == parallel.P()
    assert parallel.shard_dim((8, 192, 64), 8, first=1) == 1   # a per-layer stack: never the L axis
    assert parallel.shard_dim((8, 3), 8, first=1) is None


def test_bad_stage_and_device_count():
    with pytest.raises(ValueError, match="zero stage"):
        parallel.make_shardings(None, None, 4, ())
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(10_000)


def test_state_shardings_structure_one_device():
    import jax
    from llmc_jax.training import train_step
    from conftest import TEST_CONFIG, random_params
    sc = train_step.StepConfig(model=TEST_CONFIG)
    state = train_step.init_train_state(random_params(TEST_CONFIG), sc)
    mesh = parallel.make_mesh(1)
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    for z in parallel.ZERO_STAGES:
        sh = parallel.make_shardings(state, mesh, z, LAYER_PARAMS)
        assert jax.tree.structure(sh.state) == jax.tree.structure(state)
        # gradients: the m/v sharding from -z 1 on (reduce-scatter), replicated at -z 0 (all-reduce)
        assert jax.tree.structure(sh.grads) == jax.tree.structure(state.params)
        placed = parallel.shard_state(state, sh)
        assert jax.tree.structure(placed) == jax.tree.structure(state)
    assert parallel.batch_sharding(mesh).spec == parallel.P(None, "data", None)


# ------------------------------------------------------------------ 8 fake devices, in a subprocess

@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=device_flags(N))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    r = subprocess.run([sys.executable, os.path.join(HERE, "parallel_worker.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"worker failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["num_devices"] == N
    return out


@pytest.mark.slow
@pytest.mark.parametrize("z", [0, 1, 2, 3])
def test_losses_and_params_match_single_device(worker, z):
    s = worker["stages"][str(z)]
    ref = worker["ref_losses"]
    assert all(math.isfinite(v) for v in ref)
    np.testing.assert_allclose(s["losses"], ref, atol=1e-5, rtol=0)
    # Training moved the params by ~3e-3; the sharded runs end within 2e-5 of the unsharded one.
    # The largest differences are AdamW normalising rounding noise in near-zero gradients (the
    # key bias qkvb has an exactly-zero gradient in exact arithmetic); most leaves agree to 1e-6.
    assert worker["max_param_update"] > 1e-3
    assert s["max_param_diff"] < 2e-5, s["param_diff"]
    assert np.median(list(s["param_diff"].values())) < 1e-6, s["param_diff"]
    # validation of the trained params, per device in shard_map (at -z 3 gathering one layer at a
    # time) against the unsharded forward, to the tolerance of the training losses
    assert abs(s["eval_loss"] - worker["ref_eval_loss"]) < 1e-5, (s["eval_loss"], worker["ref_eval_loss"])


@pytest.mark.slow
def test_autodiff_backward_at_zero3_matches_single_device(worker):
    """--backward autodiff (the reference model, which cannot gather layer by layer) at -z 3 on 8
    devices: whole params in the forward, the state and gradients split; the losses of the
    unsharded autodiff run, to the tolerance of the stages above."""
    s = worker["autodiff_z3"]
    np.testing.assert_allclose(s["z3"], s["ref"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("z", [1, 3])
def test_llama_losses_and_params_match_single_device(worker, z):
    """Llama 3 (NKV < NH, untied lm_head) through the same ZeRO stages: the same tolerances as GPT-2's,
    and at -z 1..3 its optimizer state is split (the (V, C) embedding 8 ways along V)."""
    run = worker["llama"]
    s = run["stages"][str(z)]
    np.testing.assert_allclose(s["losses"], run["ref_losses"], atol=1e-5, rtol=0)
    assert run["max_param_update"] > 1e-3
    assert max(s["param_diff"].values()) < 2e-5, s["param_diff"]
    assert np.median(list(s["param_diff"].values())) < 1e-6, s["param_diff"]
    assert s["mu"]["wte"] == [[256, 64], [32, 64] if z >= 1 else [256, 64], N]
    assert s["params"]["wte"] == [[256, 64], [32, 64] if z == 3 else [256, 64], N]


@pytest.mark.parametrize("z", [0, 1, 2, 3])
def test_bf16_param_rounding_sharded_matches_single_device(worker, z):
    """-w 0's stochastic rounding in the AdamW update, with params, moments and gradients sharded as
    -z 0..3 shard them on 8 devices (the moments split 8 ways from -z 1 on, the params at -z 3): every
    bf16 param bit equals the one-device update's after 3 steps. (Rounding to nearest differs from it
    in a third of the elements: the comparison tells roundings apart.)"""
    r = worker["rounding"]
    assert r["nearest_differs"] > 10_000
    assert r["stages"][str(z)]["differing"] == 0
    assert r["stages"][str(z)]["mu_shard"] == ([256 // N, 64] if z >= 1 else [256, 64])


@pytest.mark.slow
@pytest.mark.parametrize("z", [1, 2])
def test_bf16_master_weights_sharded_match_single_device(worker, z):
    """A bf16 run with fp32 master weights (-w 1) at -z 1/2 on 8 devices, llm.c's ZeRO-1 layout: the
    fp32 master weights and the reduced gradients are split 8 ways, like m and v. Each device's bf16
    gradients are summed over the devices in bf16 (llm.c's reduce-scatter), where one device rounds
    the batch's fp32-accumulated gradient to bf16 once: against an fp32 step both are bf16-accurate,
    measured max error / max value <= 0.0089 per tensor for both (bf16's relative step is 2^-8 =
    0.0039), bound 0.015; a device's rows or gradients left out would be off by ~1/8. The losses of
    5 steps agree with the one-device bf16 run's to 5.4e-5 measured, bound 5e-4. (That the gathered
    copy is bf16 shows in the GPU compile, test_gpu_compile_paths: XLA:CPU converts bf16 collectives
    to f32 around the collective.)"""
    run = worker["master_weights"]
    s = run["stages"][str(z)]
    fracs = {k: _fraction(v) for k, v in s["params"].items()}
    assert set(fracs.values()) == {1 / N}, fracs
    assert s["grad_shards"] == {k: shard for k, (_, shard, _) in s["params"].items()}
    assert max(run["grad_error_one_device"].values()) < 0.015
    assert max(s["grad_error_fp32"].values()) < 0.015, s["grad_error_fp32"]
    assert all(math.isfinite(v) for v in run["ref_losses"])
    np.testing.assert_allclose(s["losses"], run["ref_losses"], atol=5e-4, rtol=0)


def test_zero3_gathers_one_layer_at_a_time(worker):
    """With L divisible by the device count the per-layer tensors are still split inside a layer,
    never along the stacked L axis: the scan gathers one (3C, C) qkvw layer per step, never the stack."""
    g = worker["z3_layer_gathers"]
    assert g["qkvw_spec"] == str(parallel.P(None, "data")), g
    assert g["one_layer"] and not g["full_stack"], g


@pytest.mark.parametrize("z", [1, 3])
def test_pallas_kernels_under_zero_match_xla(worker, z):
    """--kernels pallas with -z 1 and -z 3 on 8 devices (kernels per device inside shard_map; at -z 3
    the params stay split and each layer's shards are all_gathered as the scan reaches it, the
    gradients reduce-scattered by the gather's transpose) against the unsharded xla step: same
    losses and final params, to the tolerances of the xla stages above."""
    s = worker[f"pallas_z{z}"]
    np.testing.assert_allclose(s["losses"], worker["ref_losses"], atol=1e-5, rtol=0)
    assert s["max_param_diff"] < 2e-5
    if z == 3:
        assert {_fraction(v) for v in s["params"].values()} == {1 / N}
        assert s["collectives"]["all-gather"] > 0 and s["collectives"]["reduce-scatter"] > 0


def _same_tensors_at_step_1(stage: str, name: str, field: str) -> slice:
    """The layers whose step-1 tensor `name`.`field` is the unsharded run's (see below)."""
    if field == "w":
        return slice(None)
    return slice(0, 1) if (field, name) == ("x", "qkv") else slice(0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["z3", "pallas_z1"])
def test_fp8_metas_sharded_match_single_device(worker, stage):
    """--fp8 delayed on 8 devices against the unsharded FP8 run, 5 steps of 2 micro-batches.

    At both stages (-z 3 with XLA's ops, -z 1 with Pallas kernels) each device differentiates the
    mean loss of its own rows inside shard_map, so the output gradients it quantizes are D=8 times
    the unsharded run's: their amaxes, combined by pmax, are ~8x and their scales ~1/8. Per device, step 1 (fresh metas: each tensor cast at its own current scale, see
    nn/fp8.py) scales by the device's own amax, as Transformer Engine does without an amax group, so
    past the first FP8 cast the tensors differ slightly; what sees the same tensors agrees to 1e-6
    there too (every weight, the first qkv's input). After step 1, FP8 turns float32 noise into
    whole e4m3/e5m2 steps (a value on a rounding boundary flips), so the runs drift apart slowly:
    measured up to 4.2e-5 in the loss and 1e-2 in an amax by step 5, bounded at 2e-4 and 5e-2; a
    wrong combine is off by 8x."""
    fp8 = worker["fp8"]
    ref, s = fp8["ref"], fp8[stage]
    assert all(math.isfinite(v) for v in ref["losses"])
    np.testing.assert_allclose(s["losses"], ref["losses"], rtol=2e-4)
    assert set(s["metas"]) == {"qkv", "fc", "fcproj"}
    for name, metas in ref["metas"].items():
        for field, (scale, history) in metas.items():
            factor = N if field == "dout" else 1
            want = np.asarray(history) * factor
            got_scale, got_history = (np.asarray(v) for v in s["metas"][name][field])
            assert np.all(want > 0), (name, field)           # every step observed something
            what = f"{stage} {name}.{field}"
            same = _same_tensors_at_step_1(stage, name, field)
            np.testing.assert_allclose(got_history[same, -1], want[same, -1], rtol=1e-6, err_msg=what)   # step 1
            np.testing.assert_allclose(got_history, want, rtol=5e-2, err_msg=what)
            np.testing.assert_allclose(got_scale, np.asarray(scale) / factor, rtol=5e-2, err_msg=what)


def _fraction(entry):
    full, shard, ndev = entry
    assert ndev == N
    return math.prod(shard) / math.prod(full)


@pytest.mark.parametrize("z", [0, 1, 2, 3])
def test_per_device_memory(worker, z):
    s = worker["stages"][str(z)]
    # tiny config: every leaf has a dimension divisible by 8, so every sharded leaf is exactly 1/8
    for tree in ("mu", "nu"):
        fracs = {k: _fraction(v) for k, v in s[tree].items()}
        assert set(fracs.values()) == ({1.0} if z == 0 else {1 / N}), (tree, fracs)
    pfracs = {k: _fraction(v) for k, v in s["params"].items()}
    assert set(pfracs.values()) == ({1 / N} if z == 3 else {1.0}), pfracs
    # the donated outputs keep the input shardings
    for k, (full, shard, _) in s["params"].items():
        assert s["params_after"][k] == shard
    for k, (full, shard, _) in s["mu"].items():
        assert s["mu_after"][k] == shard
    # compiled per-device buffer sizes shrink with the stage
    mem = {int(k): v["memory"]["argument"] for k, v in worker["stages"].items()}
    assert mem[0] > mem[1] == mem[2] > mem[3]


def test_collectives(worker):
    st = {int(k): v for k, v in worker["stages"].items()}
    c = {z: s["collectives"] for z, s in st.items()}
    # z0: replicated everything: gradients all-reduced, nothing gathered or scattered
    assert c[0]["all-reduce"] > 0 and c[0]["all-gather"] == 0 and c[0]["reduce-scatter"] == 0
    # z1/z2: gradients reduce-scattered into the m/v shards, updated params all-gathered
    assert c[1]["reduce-scatter"] > 0 and c[2]["reduce-scatter"] > 0
    assert c[1]["all-gather"] > 0 and c[2]["all-gather"] > 0
    # the micro-step loop (A=2): at z1 each device sums its own whole gradients and they are reduced
    # once after it (llm.c's ZeRO-1); at z2 every micro-step's gradient is reduce-scattered into a
    # sum that holds wte's (Vp/8, C) shard; z3 (XLA's partitioner) carries the shard too
    assert not st[0]["while_carries_wte_grad_shard"] and not st[1]["while_carries_wte_grad_shard"]
    assert st[2]["while_carries_wte_grad_shard"] and st[3]["while_carries_wte_grad_shard"]
    assert c[1]["reduce-scatter"] == c[2]["reduce-scatter"]    # one per tensor, outside or inside the loop


# ------------------------------------------------------------------ the train command on 4 fake devices

def _train_losses(extra_env: dict, argv: list[str], tmp: str) -> list[float]:
    import re
    env = dict(os.environ, JAX_PLATFORMS="cpu", LLMC_JAX_CACHE=os.path.join(tmp, "cache"), **extra_env)
    r = subprocess.run([sys.executable, "-m", "llmc_jax.train"] + argv, env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [float(m.group(1)) for m in (re.match(r"^step\s+\d+/\d+ \| loss (\S+)", line)
                                        for line in r.stdout.splitlines()) if m]


@pytest.mark.slow
def test_train_command_on_4_devices_matches_one_device(tmp_path):
    """-b is per device: 4 devices x B=1 read the rows one device with B=4 reads (llm.c's rank
    layout), so with -z 1 and -z 3 the loss curve is the single-device one."""
    fixture = os.path.join(HERE, "data", "llmc_tiny")
    common = ["-e", f"{fixture}/model.bin", "-i", f"{fixture}/train.bin", "-j", f"{fixture}/val.bin",
              "-t", "64", "-d", "256", "-x", "4", "-v", "0", "-s", "0", "-c", "0.1", "--dtype", "float32",
              "--shuffle", "0"]
    one = _train_losses({}, common + ["-b", "4"], str(tmp_path))
    four = {"XLA_FLAGS": device_flags(4)}
    for z in ("1", "3"):
        got = _train_losses(four, common + ["-b", "1", "-z", z], str(tmp_path))
        np.testing.assert_allclose(got, one, rtol=0, atol=1e-5, err_msg=f"-z {z}")
