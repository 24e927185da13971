"""Llama 3, the second model family (llm.c's llama3 branch): pure functions over a params dict.

The same spine as GPT-2 (models/gpt2.py): one forward for training, evaluation, prefill and
decode, the layer loop a `lax.scan` over tensors stacked on L, every op a hand-derived custom_vjp.
What differs is the block: RMSNorm (eps from the file) fused with the residual add, one bias-free
qkv matmul split [q (NH heads) | k (NKV) | v (NKV)], RoPE on q and k (interleaved pairs, Llama 3.1
scaling), grouped-query attention that never replicates K/V, SwiGLU on the fused [up | gate] fc
output; no position table and a separate lm_head (tied as an option).

Kernels (ModelOptions.kernels, through op_set): `attention` picks the grouped-query attention of
training and prefill (xla, Pallas flash attention, or cuDNN), `layernorm` the fused residual +
RMSNorm (xla or Pallas); `matmul_gelu` does not apply (SwiGLU). Decoding one token from the KV
cache always runs the cache's own XLA attention.

FP8 (ModelOptions.fp8 with the per-layer metas): the layer matmuls it names (qkv, attproj, the fused
[up | gate] fc, fcproj) run through nn/fp8.fp8_matmul, exactly as in GPT-2's block.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llmc_jax.formats.llama3_format import read_debug_state, read_model, read_model_header, write_model  # noqa: F401  (the family's files)
from llmc_jax.models.llama_config import LlamaConfig
from llmc_jax.nn import fp8, ops
from llmc_jax.nn.kernels import ModelOptions, OpSet, loss_value_and_grad, op_set, rematerialize
from llmc_jax.nn.kv_cache import KVCache
from llmc_jax.nn.layer_gather import LayerGather
from llmc_jax.nn.rope import rope, rope_frequencies
from llmc_jax.nn.swiglu import swiglu

Params = dict[str, jax.Array]
LAYER_PARAMS = ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw")
KERNEL_OPS = ("attention", "layernorm")     # no fused matmul+GELU: SwiGLU
# llm.c's -r: 1 recomputes SwiGLU from the kept fc output, 2 also both RMSNorms (from the residual
# and rstd, kernels.ALWAYS_SAVED)
_SAVED = {1: ("n1", "qkv", "atty", "n2", "fch"), 2: ("qkv", "atty", "fch")}


@functools.lru_cache(maxsize=8)
def freqs(config: LlamaConfig) -> np.ndarray:
    """The RoPE table (maxT, HS/2, 2) [cos, sin], float32, computed once on the host."""
    return rope_frequencies(config.HS, config.maxT, config.rope_theta, config.use_scaled_rope, config.rope_scaling)


def split_qkv(qkv_BTQ: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused qkv output as q (B, T, NH, HS), k and v (B, T, NKV, HS)."""
    B, T, _ = qkv_BTQ.shape
    NH, NKV, HS = config.NH, config.NKV, config.HS
    q = qkv_BTQ[..., :NH * HS].reshape(B, T, NH, HS)
    k = qkv_BTQ[..., NH * HS:(NH + NKV) * HS].reshape(B, T, NKV, HS)
    v = qkv_BTQ[..., (NH + NKV) * HS:].reshape(B, T, NKV, HS)
    return q, k, v


def _attend(attention: Callable, q, k, v, cache: KVCache | None, layer, pos):
    """Causal grouped-query attention, through the cache when there is one (see kv_cache)."""
    if cache is None:
        return attention(q, k, v), None
    cache = cache.write(layer, k, v, pos)
    if q.shape[1] > 1:                 # a prompt from position 0: the training attention over itself
        return attention(q, k, v), cache
    return cache.attend(layer, q[:, 0], pos), cache


def make_block(config: LlamaConfig, opset: OpSet, recompute: int, pos,
               fp8_opts: fp8.Fp8Options | None = None, gather: LayerGather | None = None) -> Callable:
    """The transformer block as a scan body: ((x, delta), cache), (lp, layer, fp8 metas) -> same
    carry; delta is the previous block's branch output, added by this block's fused residual+RMSNorm.
    The metas (None: FP8 off) are this layer's slice of the stacked ones, as in GPT-2's block."""
    eps, table = config.norm_eps, jnp.asarray(freqs(config))
    residual_rmsnorm = opset.residual_rmsnorm

    def block(carry, xs):
        (x, delta), cache = carry
        lp, layer, lm = xs
        mm = fp8.layer_matmul(ops.matmul, fp8_opts, lm)
        x, n1 = residual_rmsnorm(x, delta, lp["ln1w"], eps)
        n1 = checkpoint_name(n1, "n1")
        qkv = checkpoint_name(mm("qkv", n1, lp["qkvw"], None), "qkv")
        q, k, v = split_qkv(qkv, config)
        q, k = rope(q, table, pos), rope(k, table, pos)
        atty, cache = _attend(opset.gqa_attention, q, k, v, cache, layer, pos)    # named "atty"
        x, n2 = residual_rmsnorm(x, mm("attproj", atty, lp["attprojw"], None), lp["ln2w"], eps)
        n2 = checkpoint_name(n2, "n2")
        fch = checkpoint_name(mm("fc", n2, lp["fcw"], None), "fch")
        return ((x, mm("fcproj", swiglu(fch), lp["fcprojw"], None)), cache), None
    return rematerialize(block, recompute, _SAVED, gather)


def forward(params: Params, idx_BT: jax.Array, config: LlamaConfig, opts: ModelOptions = ModelOptions(), *,
            cache: KVCache | None = None, pos=0, fp8_metas: dict | None = None) -> tuple[jax.Array, KVCache | None]:
    """(final-RMSNorm output (B, T, C) in the compute dtype, the cache or None); as gpt2.forward,
    fp8_metas too."""
    params = ops.compute_copy(params, opts.dtype)
    T = idx_BT.shape[1]
    if cache is None and T > config.maxT:
        raise ValueError(f"sequence length T={T} exceeds the model's maxT={config.maxT}")
    if cache is not None and T > 1 and not (isinstance(pos, int) and pos == 0):
        raise ValueError("a prompt of several tokens is written into the cache from position 0 only")
    x = ops.token_embedding(params["wte"], idx_BT, jnp.zeros((), opts.dtype))
    opset = op_set(opts.kernels)
    block = make_block(config, opset, opts.recompute, pos, opts.fp8, opts.layer_sharding)
    xs = ({k: params[k] for k in LAYER_PARAMS}, jnp.arange(config.L), fp8_metas)
    ((x, delta), cache), _ = jax.lax.scan(block, ((x, jnp.zeros_like(x)), cache), xs)
    return opset.residual_rmsnorm(x, delta, params["lnfw"], config.norm_eps)[1], cache


def _lm_head(params: Params) -> jax.Array:
    return params["lm_head"] if "lm_head" in params else params["wte"]      # tied: no lm_head tensor


def head(params: Params, h_BTC: jax.Array) -> jax.Array:
    """(B, T, V) logits of the lm_head (V = Vp: no padded columns)."""
    return ops.logits(h_BTC, _lm_head(params))


def logits(params: Params, idx_BT: jax.Array, config: LlamaConfig, opts: ModelOptions = ModelOptions()) -> jax.Array:
    return head(params, forward(params, idx_BT, config, opts)[0])


def loss(params: Params, idx_BT: jax.Array, targets_BT: jax.Array, config: LlamaConfig,
         opts: ModelOptions = ModelOptions(), fp8_metas: dict | None = None) -> jax.Array:
    """Mean cross-entropy over B*T tokens through the fused classifier."""
    h = forward(params, idx_BT, config, opts, fp8_metas=fp8_metas)[0]
    return ops.fused_classifier(h, _lm_head(params), targets_BT, config.V)


def value_and_grad(config: LlamaConfig, opts: ModelOptions = ModelOptions()) -> Callable:
    """(params, idx, targets) -> (loss, grads) through the hand-written backward (with the FP8 metas
    under opts.fp8: nn.kernels.loss_value_and_grad)."""
    return loss_value_and_grad(lambda params, idx_BT, targets_BT, metas:
                               loss(params, idx_BT, targets_BT, config, opts, metas), opts)


def empty_cache(config: LlamaConfig, B: int, S: int, dtype) -> KVCache:
    return KVCache.empty(config.L, B, S, config.NKV, config.HS, dtype)


def check_params(params: dict, config: LlamaConfig) -> None:
    """Raise with the tensor's name if a params dict does not match the config."""
    for name, shape in config.param_shapes().items():
        if name not in params:
            raise ValueError(f"params are missing tensor {name}")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"param {name} has shape {tuple(params[name].shape)}, expected {shape}")


def init_params(config: LlamaConfig, seed: int = 42) -> dict[str, np.ndarray]:
    """A from-scratch init (llm.c has none for Llama): Hugging Face's LlamaPreTrainedModel._init_weights,
    N(0, 0.02) for the embedding and every linear weight (initializer_range 0.02), RMSNorm weights 1;
    drawn with numpy's PCG64 from `seed`, tensor by tensor in param_shapes() order."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in config.param_shapes().items():
        if name in ("ln1w", "ln2w", "lnfw"):
            params[name] = np.ones(shape, np.float32)
        else:
            params[name] = rng.normal(0.0, 0.02, shape).astype(np.float32)
    return params


def config_record(config: LlamaConfig) -> dict:
    """The config as the checkpoint manifest records it (JSON)."""
    return dataclasses.asdict(config)
