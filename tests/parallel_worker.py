"""Run by tests/test_parallel.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set
before JAX starts): trains a tiny GPT-2, and a tiny Llama 3 (NKV < NH), for a few fp32 steps
unsharded and at -z 0..3 on an 8-device mesh, and prints one JSON object with the losses, param differences, per-device shard
shapes and collective counts of the compiled steps."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llmc_jax.formats import llmc_init  # noqa: E402
from llmc_jax.training import parallel, train_step  # noqa: E402
from llmc_jax.nn import ops  # noqa: E402
from llmc_jax.nn.kernels import Kernels  # noqa: E402
from llmc_jax.models.config import GPTConfig  # noqa: E402
from llmc_jax.models import llama  # noqa: E402
from llmc_jax.models.family import family_of  # noqa: E402
from llmc_jax.models.llama_config import LlamaConfig  # noqa: E402

# n_rep 2, an FFN hidden size that rounds up to multiple_of, an untied lm_head; V = 256 splits 8 ways
LLAMA_CONFIG = LlamaConfig(L=2, NH=4, NKV=2, C=64, maxT=64, V=256, multiple_of=32, ffn_dim_multiplier=1.0)

CONFIG = GPTConfig(L=2, NH=4, C=64, maxT=64, V=256, Vp=256)
STEPS, A, B, T = 5, 2, 8, 16
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def batches(V=CONFIG.V):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        tok = rng.integers(0, V, size=(A, B, T + 1)).astype(np.int32)
        out.append((tok[..., :-1], tok[..., 1:]))
    return out


def lr_at(step):
    return 1e-3 * (step + 1) / STEPS


def run(sc, params, zero_stage, mesh, n=8):
    """(losses, final params as numpy, info) for one configuration; zero_stage None: unsharded."""
    state = train_step.init_train_state(params, sc)
    layer_params = family_of(sc.model).LAYER_PARAMS
    info = {}
    if zero_stage is None:
        step_fn, eval_fn = train_step.make_train_step(sc), train_step.make_eval_step(sc)
        put = lambda x: x
    else:
        sh = parallel.make_shardings(state, mesh, zero_stage, layer_params, sc.dtype)
        state = parallel.shard_state(state, sh)
        step_fn, eval_fn = train_step.make_train_step(sc, sh), train_step.make_eval_step(sc, shardings=sh)
        put = lambda x: parallel.shard_batch(x, sh)
        x0, y0 = batches(sc.model.V)[0]
        compiled = step_fn.lower(state, put(x0), put(y0), lr_at(0), 0).compile()
        hlo = compiled.as_text()   # the jit call below reuses this executable
        info["collectives"] = {c: len(re.findall(rf" {c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
        # the loop-carried tensors: does the micro-step gradient accumulator hold wte's full
        # (Vp, C) gradient or its 1/n shard? (XLA:CPU writes a reduce-scatter as all-reduce +
        # dynamic-slice, so the shapes are what shows a sharded gradient)
        wte_shard = f"f32[{CONFIG.Vp // n},{CONFIG.C}]"
        info["while_carries_wte_grad_shard"] = any(
            wte_shard in line for line in hlo.splitlines() if " while(" in line)
        mem = compiled.memory_analysis()
        info["memory"] = {k: int(getattr(mem, k + "_size_in_bytes")) for k in ("argument", "output", "temp")}

        def shards(tree):
            return {k: [list(v.shape), list(v.addressable_shards[0].data.shape), len(v.addressable_shards)]
                    for k, v in tree.items()}
        info["mu"] = shards(state.opt_state.mu)
        info["nu"] = shards(state.opt_state.nu)
        info["params"] = shards(state.params)
    losses = []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches(sc.model.V)):
        state, m = step_fn(state, put(x), put(y), lr_at(step), step)
        losses.append(float(m.loss))
    info["seconds"] = round(time.perf_counter() - t0, 2)
    if zero_stage is not None:   # after training: the donated outputs keep the shardings
        info["params_after"] = {k: list(v.addressable_shards[0].data.shape) for k, v in state.params.items()}
        info["mu_after"] = {k: list(v.addressable_shards[0].data.shape) for k, v in state.opt_state.mu.items()}
    final = {k: np.asarray(v) for k, v in state.params.items()}
    x, y = batches(sc.model.V)[0]          # validation on the trained params: the first micro-batch's (B, T)
    info["eval_loss"] = float(eval_fn(state.params, put(x)[0], put(y)[0], state.fp8))
    if state.fp8 is not None:     # the FP8 metas after training: {matmul: {x|w|dout: [scales, histories]}}
        info["fp8"] = {name: {f: [np.asarray(meta.scale).tolist(), np.asarray(meta.amax_history)[:, :STEPS].tolist()]
                              for f, meta in zip(m._fields, m)} for name, m in state.fp8.items()}
    return losses, final, info


def z3_layer_gathers(n):
    """-z 3 with L == n (the stacked layer axis divides by the device count): which qkvw shapes the
    compiled step all-gathers, the whole (L, 3C, C) stack or one (3C, C) layer inside the scan."""
    cfg = GPTConfig(L=n, NH=4, C=64, maxT=64, V=256, Vp=256)
    sc = train_step.StepConfig(model=cfg)
    state = jax.eval_shape(lambda: train_step.init_train_state(
        {k: jax.numpy.zeros(s, jax.numpy.float32) for k, s in cfg.param_shapes().items()}, sc))
    sh = parallel.make_shardings(state, parallel.make_mesh(), 3, family_of(cfg).LAYER_PARAMS)
    x = jax.ShapeDtypeStruct((1, n, 16), np.int32)
    hlo = train_step.make_train_step(sc, sh).lower(state, x, x, 1e-3, 0).compile().as_text()
    gathered = re.findall(r"= f32\[([0-9,]+)\]\{[^}]*\} all-gather(?:-start)?\(", hlo)
    return {"qkvw_spec": str(sh.state.params["qkvw"].spec),
            "full_stack": f"{n},192,64" in gathered, "one_layer": bool({"192,64", "1,192,64"} & set(gathered))}


def llama_stages(mesh, n):
    """The Llama 3 family through the same sharded step: losses and final params at -z 1 and 3 against
    its unsharded run (-z 0 and 2 differ from them in nothing family-specific; GPT-2 runs all four)."""
    sc = train_step.StepConfig(model=LLAMA_CONFIG, weight_decay=0.1, grad_clip=1.0)
    params = llama.init_params(LLAMA_CONFIG)
    ref_losses, ref_params, _ = run(sc, params, None, None)
    out = {"ref_losses": ref_losses, "stages": {},
           "max_param_update": max(float(np.max(np.abs(ref_params[k] - params[k]))) for k in params)}
    for z in (1, 3):
        losses, final, info = run(sc, params, z, mesh, n)
        out["stages"][str(z)] = {"losses": losses, "params": info["params"], "mu": info["mu"],
                                 "param_diff": {k: float(np.max(np.abs(final[k] - ref_params[k]))) for k in final}}
    return out


def fp8_stages(params, mesh, n):
    """--fp8 delayed (qkv, fc, fcproj) unsharded, at -z 3 (XLA partitions the step; every amax is a
    global max) and with Pallas layernorm at -z 1 (each device runs its rows inside shard_map; the
    observed amaxes are combined with pmax): losses and the metas after STEPS steps."""
    sc = train_step.StepConfig(model=CONFIG, weight_decay=0.1, grad_clip=1.0, fp8="delayed")
    out = {}
    for name, stage, kernels in (("ref", None, "xla"), ("z3", 3, "xla"), ("pallas_z1", 1, "pallas")):
        sck = dataclasses.replace(sc, kernels=Kernels.resolve("xla", layernorm=kernels))
        losses, _, info = run(sck, params, stage, None if stage is None else mesh, n)
        out[name] = {"losses": losses, "metas": info["fp8"]}
    return out


def master_weight_stages(params, mesh, n):
    """A bf16 run with fp32 master weights (-w 1, llm.c's default) unsharded and at -z 1 and 2: the
    master weights are split 8 ways like AdamW's m and v, and each device's bf16 gradients are
    reduce-scattered in bf16 (llm.c's layout). Losses and final params after STEPS steps, and the
    first batch's mean gradients against the unsharded bf16 step's and an fp32 step's (max abs error
    over max abs value, per tensor)."""
    sc = train_step.StepConfig(model=CONFIG, dtype="bfloat16", weight_decay=0.1, grad_clip=1.0)
    ref_losses, ref_params, _ = run(sc, params, None, None)
    out = {"ref_losses": ref_losses, "stages": {},
           "max_param_update": max(float(np.max(np.abs(ref_params[k] - np.asarray(params[k])))) for k in params)}
    x, y = batches()[0]
    copy = ops.compute_copy(jax.tree.map(jax.numpy.asarray, params), sc.dtype)
    one_device = jax.jit(train_step.accumulate_gradients(sc))(copy, x, y)[1]
    fp32 = jax.jit(train_step.accumulate_gradients(dataclasses.replace(sc, dtype="float32")))(params, x, y)[1]
    rel = lambda g, ref: {k: float(np.max(np.abs(np.asarray(g[k]) - np.asarray(ref[k]))) / np.max(np.abs(ref[k])))
                          for k in ref}
    out["grad_error_one_device"] = rel(one_device, fp32)
    for z in (1, 2):
        losses, final, info = run(sc, params, z, mesh, n)
        state = train_step.init_train_state(params, sc)
        sh = parallel.make_shardings(state, mesh, z, family_of(CONFIG).LAYER_PARAMS, sc.dtype)
        grads = jax.jit(train_step.accumulate_gradients(sc, sh.grads, mesh, z))(copy, x, y)[1]
        out["stages"][str(z)] = {"losses": losses, "params": info["params"],
                                 "param_diff": {k: float(np.max(np.abs(final[k] - ref_params[k]))) for k in final},
                                 "grad_error": rel(grads, one_device), "grad_error_fp32": rel(grads, fp32),
                                 "grad_shards": {k: list(v.addressable_shards[0].data.shape) for k, v in grads.items()}}
    return out


def rounding_stages(mesh):
    """-w 0's AdamW update with stochastic rounding of the bf16 params (train_step.make_update, the
    step's own update) under each -z stage's shardings of params, moments and gradients, 3 steps,
    against the same update on one device: the number of params whose bits differ, per stage."""
    sc = train_step.StepConfig(model=CONFIG, dtype="bfloat16", weight_decay=0.1)
    params = {k: jax.numpy.asarray(v, jax.numpy.bfloat16) for k, v in llmc_init.init_params(CONFIG).items()}
    rng = np.random.default_rng(5)
    grads = [{k: rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    update = train_step.make_update(sc)

    def three_steps(fn, state):
        p, opt = state.params, state.opt_state
        for step, g in enumerate(grads):
            p, opt = fn(p, opt, g, np.float32(1e-3), step)
        return {k: np.asarray(v).view(np.uint16) for k, v in p.items()}

    state = train_step.init_train_state(params, sc)
    ref = three_steps(jax.jit(update), state)
    nearest = three_steps(jax.jit(train_step.make_update(dataclasses.replace(sc, param_rounding="nearest"))), state)
    out = {"nearest_differs": int(sum((nearest[k] != ref[k]).sum() for k in ref)), "stages": {}}
    for z in (0, 1, 2, 3):
        sh = parallel.make_shardings(state, mesh, z, family_of(CONFIG).LAYER_PARAMS)
        rep = sh.replicated
        fn = jax.jit(update, in_shardings=(sh.state.params, sh.state.opt_state, sh.grads, rep, rep),
                     out_shardings=(sh.state.params, sh.state.opt_state))
        got = three_steps(fn, parallel.shard_state(state, sh))
        out["stages"][str(z)] = {"differing": int(sum((got[k] != ref[k]).sum() for k in ref)),
                                 "mu_shard": list(parallel.shard_state(state, sh).opt_state.mu["wte"]
                                                  .addressable_shards[0].data.shape)}
    return out


def main():
    n = jax.device_count()
    sc = train_step.StepConfig(model=CONFIG, weight_decay=0.1, grad_clip=1.0)
    params = llmc_init.init_params(CONFIG)
    ref_losses, ref_params, ref_info = run(sc, params, None, None)
    # how far training moved the params: the scale the sharded runs' differences are judged against
    moved = max(float(np.max(np.abs(ref_params[k] - np.asarray(params[k])))) for k in params)
    out = {"max_param_update": moved, "num_devices": n, "jax": jax.__version__, "ref_losses": ref_losses,
           "ref_eval_loss": ref_info["eval_loss"], "ref_seconds": ref_info["seconds"],
           "stages": {}}
    mesh = parallel.make_mesh()
    for z in (0, 1, 2, 3):
        losses, final, info = run(sc, params, z, mesh, n)
        info["losses"] = losses
        info["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
        info["param_diff"] = {k: float(np.max(np.abs(final[k] - ref_params[k]))) for k in final}
        info["max_param_diff"] = max(info["param_diff"].values())
        out["stages"][str(z)] = info
    out["z3_layer_gathers"] = z3_layer_gathers(n)
    # --backward autodiff at -z 3: the reference model reads whole params (no per-layer gather)
    sc_ad = dataclasses.replace(sc, backward="autodiff")
    out["autodiff_z3"] = {name: run(sc_ad, params, z, None if z is None else mesh, n)[0] for name, z in (("ref", None), ("z3", 3))}
    out["llama"] = llama_stages(mesh, n)
    # Pallas kernels (interpret mode) under -z 1: run per device inside shard_map
    sc_pallas = train_step.StepConfig(model=CONFIG, weight_decay=0.1, grad_clip=1.0, kernels=Kernels.resolve("pallas"))
    for z in (1, 3):     # -z 3: each layer's shards all_gathered inside the scan, in shard_map
        losses, final, info = run(sc_pallas, params, z, mesh, n)
        out[f"pallas_z{z}"] = {"losses": losses, "collectives": info["collectives"], "params": info["params"],
                               "max_param_diff": max(float(np.max(np.abs(final[k] - ref_params[k]))) for k in final)}
    out["fp8"] = fp8_stages(params, mesh, n)
    out["rounding"] = rounding_stages(mesh)
    out["master_weights"] = master_weight_stages(params, mesh, n)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
