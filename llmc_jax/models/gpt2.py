"""GPT-2, the first model family: pure functions over a params dict of llm.c's 16 tensors.

One forward serves training, validation, HellaSwag, prefill and decode (`forward(..., cache=)`):
the block below is the only GPT-2 block. The layer loop is a `lax.scan` over the per-layer tensors
stacked on their leading L axis, so compile time stays flat in depth. Every op's backward is the
hand-derived one in ops.py; `jax.grad` of `loss` only strings those custom VJPs together.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llmc_jax.formats.llmc_format import read_debug_state, read_model, read_model_header, write_model  # noqa: F401  (the family's files)
from llmc_jax.formats.llmc_init import init_params  # noqa: F401  (llm.c's init, bit for bit)
from llmc_jax.models.config import PARAM_NAMES, GPTConfig
from llmc_jax.nn import fp8, kv_cache, ops
from llmc_jax.nn.kernels import ModelOptions, OpSet, loss_value_and_grad, op_set, rematerialize
from llmc_jax.nn.kv_cache import KVCache
from llmc_jax.nn.layer_gather import LayerGather

Params = dict[str, jax.Array]
LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
KERNEL_OPS = ("attention", "layernorm", "matmul_gelu")     # the Kernels choices this family uses
# what llm.c's -r keeps for the backward besides kernels.ALWAYS_SAVED; the rest of the block is recomputed
_SAVED = {1: ("ln1", "qkv", "atty", "ln2", "fch"), 2: ("qkv", "atty", "fch")}


def _matmuls(opset: OpSet, fp8_opts: fp8.Fp8Options | None, lm: dict | None) -> tuple[Callable, Callable]:
    """(mm(name, x, w, b), fc_gelu(x, w, b)) for one layer: the op library's matmuls, or fp8_matmul
    with this layer's metas `lm` for the matmuls fp8_opts names. In FP8 the MLP is matmul-then-GELU
    (no fused Pallas matmul_gelu: it has no FP8 path), the pre-activation still named "fch" for -r 1/2."""
    mm = fp8.layer_matmul(opset.matmul, fp8_opts, lm)

    def fc_gelu(x, w, b):
        if lm is None or "fc" not in fp8_opts.matmuls:
            return opset.matmul_gelu(x, w, b)
        return ops.gelu(checkpoint_name(mm("fc", x, w, b), "fch"))
    return mm, fc_gelu


def make_block(opset: OpSet, NH: int, recompute: int, pos, fp8_opts: fp8.Fp8Options | None = None,
               gather: LayerGather | None = None) -> Callable:
    """The transformer block as a scan body: ((x, delta), cache), (lp, layer, fp8 metas) -> same carry.

    The carry holds the residual stream x and the previous block's last branch output delta, not
    yet added, so that add and this block's first layernorm are one fused op (llm.c's fused
    residual forward). With recompute > 0 it is rematerialized as llm.c's -r: 1 recomputes GELU in
    the backward, 2 recomputes GELU and both layernorms. The fp8 metas (None: off) are this layer's
    slice of the stacked ones: scanned, not closed over, so each meta feeds one call (fp8.py).
    gather (ZeRO-3): the layer's shards are all_gathered first, inside the rematerialized block."""
    def block(carry, xs):
        (x, delta), cache = carry
        lp, layer, lm = xs
        mm, fc_gelu = _matmuls(opset, fp8_opts, lm)
        x, ln1 = opset.residual_layernorm(x, delta, lp["ln1w"], lp["ln1b"])
        ln1 = checkpoint_name(ln1, "ln1")
        qkv = mm("qkv", ln1, lp["qkvw"], lp["qkvb"])
        atty, cache = kv_cache.attention(opset.attention, qkv, NH, cache, layer, pos)   # names "qkv", "atty"
        x, ln2 = opset.residual_layernorm(x, mm("attproj", atty, lp["attprojw"], lp["attprojb"]),
                                          lp["ln2w"], lp["ln2b"])
        ln2 = checkpoint_name(ln2, "ln2")
        delta = mm("fcproj", fc_gelu(ln2, lp["fcw"], lp["fcb"]), lp["fcprojw"], lp["fcprojb"])
        return ((x, delta), cache), None
    return rematerialize(block, recompute, _SAVED, gather)


def forward(params: Params, idx_BT: jax.Array, config: GPTConfig, opts: ModelOptions = ModelOptions(), *,
            cache: KVCache | None = None, pos=0, fp8_metas: dict | None = None) -> tuple[jax.Array, KVCache | None]:
    """(final-layernorm output (B, T, C) in the compute dtype, the cache or None).

    fp8_metas ({matmul: MatmulMetas stacked on L}, with opts.fp8 set): the FP8 layer matmuls' state.

    cache None: training and evaluation. With a cache: T > 1 tokens are a prompt at positions
    0..T-1 (pos must be 0), one token is decoded at position `pos` (may be traced); see kv_cache."""
    opset = op_set(opts.kernels)
    params = ops.compute_copy(params, opts.dtype)
    T = idx_BT.shape[1]
    if cache is None and T > config.maxT:
        raise ValueError(f"sequence length T={T} exceeds the model's maxT={config.maxT}")
    if cache is not None and T > 1 and not (isinstance(pos, int) and pos == 0):
        raise ValueError("a prompt of several tokens is written into the cache from position 0 only")
    wpe = params["wpe"]
    if not (isinstance(pos, int) and pos == 0):     # decode: the position's row of the table
        wpe = jax.lax.dynamic_slice_in_dim(wpe, pos, T)
    x = opset.encoder(params["wte"], wpe, idx_BT, jnp.zeros((), opts.dtype))
    block = make_block(opset, config.NH, opts.recompute, pos, opts.fp8, opts.layer_sharding)
    xs = ({k: params[k] for k in LAYER_PARAMS}, jnp.arange(config.L), fp8_metas)
    ((x, delta), cache), _ = jax.lax.scan(block, ((x, jnp.zeros_like(x)), cache), xs)
    return opset.residual_layernorm(x, delta, params["lnfw"], params["lnfb"])[1], cache


def head(params: Params, h_BTC: jax.Array) -> jax.Array:
    """(B, T, Vp) logits of the tied classifier; the padded columns come out of the zero wte rows."""
    return ops.logits(h_BTC, params["wte"])


def logits(params: Params, idx_BT: jax.Array, config: GPTConfig, opts: ModelOptions = ModelOptions()) -> jax.Array:
    return head(params, forward(params, idx_BT, config, opts)[0])


def loss(params: Params, idx_BT: jax.Array, targets_BT: jax.Array, config: GPTConfig,
         opts: ModelOptions = ModelOptions(), fp8_metas: dict | None = None) -> jax.Array:
    """Mean cross-entropy over B*T tokens, softmax over the first V of the Vp logits."""
    h = forward(params, idx_BT, config, opts, fp8_metas=fp8_metas)[0]
    return op_set(opts.kernels).classifier(h, params["wte"], targets_BT, config.V)


def value_and_grad(config: GPTConfig, opts: ModelOptions = ModelOptions()) -> Callable:
    """(params, idx, targets) -> (loss, grads) through the hand-written backward (with the FP8 metas
    under opts.fp8: nn.kernels.loss_value_and_grad)."""
    return loss_value_and_grad(lambda params, idx_BT, targets_BT, metas:
                               loss(params, idx_BT, targets_BT, config, opts, metas), opts)


def empty_cache(config: GPTConfig, B: int, S: int, dtype) -> KVCache:
    return KVCache.empty(config.L, B, S, config.NH, config.HS, dtype)


def check_params(params: dict, config: GPTConfig) -> None:
    """Raise with the tensor's name if a params dict does not match the config."""
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise ValueError(f"params are missing tensors: {', '.join(missing)}")
    for name, shape in config.param_shapes().items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"param {name} has shape {tuple(params[name].shape)}, expected {shape}")


def config_record(config: GPTConfig) -> dict:
    """The config as the checkpoint manifest records it (JSON)."""
    return dataclasses.asdict(config)
