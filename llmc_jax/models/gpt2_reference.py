"""The oracle: the same GPT-2 in plain jnp with no custom_vjp, so `jax.grad` of it is pure autodiff.

Same params dict, same numerics (fp32 statistics, fp32 accumulation) as model.py; only the
backward differs: here JAX derives it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmc_jax.nn import ops
from llmc_jax.models.config import GPTConfig
from llmc_jax.models.gpt2 import LAYER_PARAMS


def hidden_states(params, idx_BT, config: GPTConfig, *, dtype=jnp.float32):
    x = ops.encoder_reference(params["wte"], params["wpe"], idx_BT, jnp.zeros((), dtype))

    def block(x, lp):
        ln1 = ops.layernorm_reference(x, lp["ln1w"], lp["ln1b"])
        atty = ops.attention_reference(ops.matmul_reference(ln1, lp["qkvw"], lp["qkvb"]), config.NH)
        x = x + ops.matmul_reference(atty, lp["attprojw"], lp["attprojb"])
        ln2 = ops.layernorm_reference(x, lp["ln2w"], lp["ln2b"])
        h = ops.gelu_reference(ops.matmul_reference(ln2, lp["fcw"], lp["fcb"]))
        return x + ops.matmul_reference(h, lp["fcprojw"], lp["fcprojb"]), None

    x, _ = jax.lax.scan(block, x, {k: params[k] for k in LAYER_PARAMS})
    return ops.layernorm_reference(x, params["lnfw"], params["lnfb"])


def loss(params, idx_BT, targets_BT, config: GPTConfig, *, dtype=jnp.float32):
    h = hidden_states(params, idx_BT, config, dtype=dtype)
    return ops.classifier_reference(h, params["wte"], targets_BT, config.V)


def value_and_grad(config: GPTConfig, *, dtype=jnp.float32):
    """(params, idx, targets) -> (loss, grads) by JAX autodiff of the plain model."""
    return jax.value_and_grad(lambda p, x, y: loss(p, x, y, config, dtype=dtype))
