"""GPT-2 as pure functions over a params dict of llm.c's 16 tensors, built from the op library.

The layer loop is a `lax.scan` over the per-layer tensors stacked on their leading L axis, so
compile time stays flat in depth. Every op's backward is the hand-derived one in ops.py;
`jax.grad` of `loss` only strings those custom VJPs together.
"""
from __future__ import annotations

import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llmc_jax import ops
from llmc_jax.config import PARAM_NAMES, GPTConfig

Params = dict[str, jax.Array]
LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
KERNELS = ("xla", "pallas")
RECOMPUTE = (0, 1, 2)


def op_set(kernels: str = "xla") -> types.SimpleNamespace:
    """The ops the model calls, by kernel family (the `--kernels` switch)."""
    if kernels == "xla":
        return types.SimpleNamespace(encoder=ops.encoder, layernorm=ops.layernorm, matmul=ops.matmul,
                                     attention=ops.attention, gelu=ops.gelu, residual=ops.residual,
                                     classifier=ops.fused_classifier)
    if kernels == "pallas":
        raise NotImplementedError("--kernels pallas is not available yet (Pallas kernels are issue 4); "
                                  "use --kernels xla")
    raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")


# Inits at least this large are kept in the cache (d12: 0.5 GB, ~5 s to draw, 0.4 s to read back).
INIT_CACHE_MIN_PARAMS, INIT_CACHE_MAX_PARAMS = 10_000_000, 500_000_000


def init_params(config: GPTConfig) -> dict[str, np.ndarray]:
    """llm.c's random init, bit for bit (`-e d12` here gives llm.c's `-e d12` weights):
    N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), layernorm weights 1, biases 0.

    Drawing it bit-exactly costs seconds for GPT-2 sizes, so mid-sized inits are kept as llm.c
    model files under the llmc_jax cache root and read back on the next start."""
    import os
    from llmc_jax import llmc_format, llmc_init
    from llmc_jax.corpus import default_cache_root
    if not INIT_CACHE_MIN_PARAMS <= config.num_parameters <= INIT_CACHE_MAX_PARAMS:
        return llmc_init.init_params_llmc(config)
    c = config
    path = os.path.join(default_cache_root(), "init", f"llmc_L{c.L}_NH{c.NH}_C{c.C}_T{c.maxT}_V{c.V}_{c.Vp}.bin")
    if os.path.exists(path):
        try:
            cached_config, params = llmc_format.read_model(path)
            if cached_config == config:
                return params
        except llmc_format.LLMCFormatError:
            pass                                 # damaged: draw again and overwrite
    params = llmc_init.init_params_llmc(config)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        llmc_format.write_model(path, config, params)
    except OSError:
        pass                                     # no writable cache: just slower next time
    return params


def _block(opset, NH: int, recompute: int):
    """One transformer block; with recompute > 0 it is rematerialized as llm.c's -r:
    1 recomputes GELU in the backward, 2 recomputes GELU and both layernorms."""
    def block(x, lp):
        ln1 = checkpoint_name(opset.layernorm(x, lp["ln1w"], lp["ln1b"]), "ln1")
        qkv = checkpoint_name(opset.matmul(ln1, lp["qkvw"], lp["qkvb"]), "qkv")
        atty = checkpoint_name(opset.attention(qkv, NH), "atty")
        x = opset.residual(x, opset.matmul(atty, lp["attprojw"], lp["attprojb"]))
        ln2 = checkpoint_name(opset.layernorm(x, lp["ln2w"], lp["ln2b"]), "ln2")
        fch = checkpoint_name(opset.matmul(ln2, lp["fcw"], lp["fcb"]), "fch")
        return opset.residual(x, opset.matmul(opset.gelu(fch), lp["fcprojw"], lp["fcprojb"]))
    if recompute == 0:
        return block
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute}")
    saved = {1: ("ln1", "qkv", "atty", "ln2", "fch"), 2: ("qkv", "atty", "fch")}[recompute]
    return jax.checkpoint(block, policy=jax.checkpoint_policies.save_only_these_names(*saved))


def hidden_states(params: Params, idx_BT: jax.Array, config: GPTConfig, *, dtype=jnp.float32,
                  kernels: str = "xla", recompute: int = 0) -> jax.Array:
    """Final-layernorm output (B, T, C) in the compute dtype."""
    opset = op_set(kernels)
    T = idx_BT.shape[1]
    if T > config.maxT:
        raise ValueError(f"sequence length T={T} exceeds the model's maxT={config.maxT}")
    x = opset.encoder(params["wte"], params["wpe"], idx_BT, jnp.zeros((), dtype))
    block = _block(opset, config.NH, recompute)
    layer_params = {k: params[k] for k in LAYER_PARAMS}
    x, _ = jax.lax.scan(lambda x, lp: (block(x, lp), None), x, layer_params)
    return opset.layernorm(x, params["lnfw"], params["lnfb"])


def loss(params: Params, idx_BT: jax.Array, targets_BT: jax.Array, config: GPTConfig, *,
         dtype=jnp.float32, kernels: str = "xla", recompute: int = 0) -> jax.Array:
    """Mean cross-entropy over B*T tokens, softmax over the first V of the Vp logits."""
    h = hidden_states(params, idx_BT, config, dtype=dtype, kernels=kernels, recompute=recompute)
    return op_set(kernels).classifier(h, params["wte"], targets_BT, config.V)


def logits(params: Params, idx_BT: jax.Array, config: GPTConfig, *, dtype=jnp.float32,
           kernels: str = "xla") -> jax.Array:
    """(B, T, Vp) logits; the padded columns come out of the zero wte rows."""
    h = hidden_states(params, idx_BT, config, dtype=dtype, kernels=kernels)
    return ops.logits(h, params["wte"])


def value_and_grad(config: GPTConfig, *, dtype=jnp.float32, kernels: str = "xla",
                   recompute: int = 0) -> Callable:
    """(params, idx, targets) -> (loss, grads) through the hand-written backward."""
    def f(params, idx_BT, targets_BT):
        return loss(params, idx_BT, targets_BT, config, dtype=dtype, kernels=kernels, recompute=recompute)
    return jax.value_and_grad(f)


def check_params(params: dict, config: GPTConfig) -> None:
    """Raise with the tensor's name if a params dict does not match the config."""
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise ValueError(f"params are missing tensors: {', '.join(missing)}")
    for name, shape in config.param_shapes().items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"param {name} has shape {tuple(params[name].shape)}, expected {shape}")
