"""The Llama 3 oracle: the same model in plain jnp with no custom_vjp, so `jax.grad` of it is pure
autodiff. Same params dict and numerics as llama.py; only the backward differs."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmc_jax.models.llama import LAYER_PARAMS, freqs, split_qkv
from llmc_jax.models.llama_config import LlamaConfig
from llmc_jax.nn import ops
from llmc_jax.nn.gqa_attention import gqa_attention_reference
from llmc_jax.nn.rmsnorm import rmsnorm_reference
from llmc_jax.nn.rope import rope_reference
from llmc_jax.nn.swiglu import swiglu_reference


def hidden_states(params, idx_BT, config: LlamaConfig, *, dtype=jnp.float32):
    eps, table = config.norm_eps, jnp.asarray(freqs(config))
    x = ops.token_embedding_reference(params["wte"], idx_BT, jnp.zeros((), dtype))

    def block(x, lp):
        q, k, v = split_qkv(ops.matmul_reference(rmsnorm_reference(x, lp["ln1w"], eps), lp["qkvw"], None), config)
        atty = gqa_attention_reference(rope_reference(q, table), rope_reference(k, table), v)
        x = x + ops.matmul_reference(atty, lp["attprojw"], None)
        h = swiglu_reference(ops.matmul_reference(rmsnorm_reference(x, lp["ln2w"], eps), lp["fcw"], None))
        return x + ops.matmul_reference(h, lp["fcprojw"], None), None

    x, _ = jax.lax.scan(block, x, {k: params[k] for k in LAYER_PARAMS})
    return rmsnorm_reference(x, params["lnfw"], eps)


def loss(params, idx_BT, targets_BT, config: LlamaConfig, *, dtype=jnp.float32):
    lm_head = params["lm_head"] if "lm_head" in params else params["wte"]
    return ops.classifier_reference(hidden_states(params, idx_BT, config, dtype=dtype), lm_head, targets_BT, config.V)


def value_and_grad(config: LlamaConfig, *, dtype=jnp.float32):
    """(params, idx, targets) -> (loss, grads) by JAX autodiff of the plain model."""
    return jax.value_and_grad(lambda p, x, y: loss(p, x, y, config, dtype=dtype))
