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
from llmc_jax.config import KERNELS, OP_CHOICES, PARAM_NAMES, GPTConfig

Params = dict[str, jax.Array]
LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
RECOMPUTE = (0, 1, 2)


def kernel_spec(kernels: str = "xla", **overrides: str | None) -> str:
    """One hashable string naming the op implementations, e.g. "pallas" or "xla,attention=cudnn":
    the --kernels family plus the per-op overrides that differ from it (None = follow the family)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    parts = [kernels]
    for op, impl in overrides.items():
        if op not in OP_CHOICES:
            raise ValueError(f"no per-op kernel choice for {op!r}; ops: {', '.join(OP_CHOICES)}")
        if impl is not None and impl != kernels:
            if impl not in OP_CHOICES[op]:
                raise ValueError(f"unknown {op} implementation {impl!r}; choose one of {', '.join(OP_CHOICES[op])}")
            parts.append(f"{op}={impl}")
    return ",".join(parts)


def parse_kernel_spec(spec: str) -> dict[str, str]:
    """{op: implementation} for every op in OP_CHOICES."""
    family, *overrides = spec.split(",")
    if family not in KERNELS:
        raise ValueError(f"unknown kernels {family!r}; choose one of {', '.join(KERNELS)}")
    choice = {op: family for op in OP_CHOICES}
    for item in overrides:
        op, _, impl = item.partition("=")
        if op not in OP_CHOICES or impl not in OP_CHOICES[op]:
            raise ValueError(f"bad kernel override {item!r} in {spec!r}")
        choice[op] = impl
    return choice


def uses_pallas(kernels: str) -> bool:
    """Whether any op of a kernel spec is a Pallas kernel (opaque to XLA's partitioner)."""
    return "pallas" in parse_kernel_spec(kernels).values()


def _xla_residual_layernorm(x, r, w, b):
    s = ops.residual(x, r)
    return s, ops.layernorm(s, w, b)


def _xla_matmul_gelu(x, w, b):
    return ops.gelu(checkpoint_name(ops.matmul(x, w, b), "fch"))


def _qkv_attention(attention_BTNH):
    """Adapt a (q, k, v) -> out attention on (B, T, NH, HS) to the model's packed (B, T, 3C) qkv."""
    def attention(qkv_BT3C, NH: int):
        B, T, C3 = qkv_BT3C.shape
        return attention_BTNH(*ops._split_heads(qkv_BT3C, NH)).reshape(B, T, C3 // 3)
    return attention


def _cudnn_attention(q, k, v):
    if jax.default_backend() != "gpu":
        raise ValueError("--attention cudnn needs an NVIDIA GPU (cuDNN); use --attention xla or pallas here")
    if q.dtype != jnp.bfloat16:
        raise ValueError("--attention cudnn needs bfloat16 activations (--dtype bfloat16); cuDNN's fused "
                         "attention does not take float32")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def op_set(kernels: str = "xla") -> types.SimpleNamespace:
    """The ops the model calls, from a kernel spec (see kernel_spec): the --kernels switch.

    Encoder, the plain matmuls (cuBLAS through XLA is already the fastest there), residual and
    classifier are the op library's; attention, layernorm (fused with the residual add before
    it) and the MLP's matmul + GELU can each be a Pallas kernel."""
    choice = parse_kernel_spec(kernels)
    ns = types.SimpleNamespace(encoder=ops.encoder, layernorm=ops.layernorm, matmul=ops.matmul,
                               attention=ops.attention, residual=ops.residual, classifier=ops.fused_classifier,
                               residual_layernorm=_xla_residual_layernorm, matmul_gelu=_xla_matmul_gelu)
    if choice["attention"] == "pallas":
        from pallas_kernels.flash_attention import flash_attention
        ns.attention = _qkv_attention(flash_attention)
    elif choice["attention"] == "cudnn":
        ns.attention = _qkv_attention(_cudnn_attention)
    if choice["layernorm"] == "pallas":
        from pallas_kernels import layernorm as pallas_ln
        ns.layernorm, ns.residual_layernorm = pallas_ln.layernorm, pallas_ln.residual_layernorm
    if choice["matmul_gelu"] == "pallas":
        from pallas_kernels.matmul_gelu import matmul_gelu
        ns.matmul_gelu = matmul_gelu
    return ns


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
    """One transformer block on the carry (x, delta): the residual stream and the previous block's
    last branch output, not yet added, so that add and this block's first layernorm are one fused op
    (llm.c's fused residual forward). With recompute > 0 it is rematerialized as llm.c's -r:
    1 recomputes GELU in the backward, 2 recomputes GELU and both layernorms."""
    # llm.c's GELU recompute keeps the pre-activation and drops the GELU output; the fused Pallas
    # matmul_gelu saves its pre-activation internally, so under -r 1/2 it would recompute the whole
    # fc matmul: there the MLP uses the op library's matmul and GELU instead.
    matmul_gelu = _xla_matmul_gelu if recompute else opset.matmul_gelu

    def block(carry, lp):
        x, delta = carry
        x, ln1 = opset.residual_layernorm(x, delta, lp["ln1w"], lp["ln1b"])
        ln1 = checkpoint_name(ln1, "ln1")
        qkv = checkpoint_name(opset.matmul(ln1, lp["qkvw"], lp["qkvb"]), "qkv")
        atty = checkpoint_name(opset.attention(qkv, NH), "atty")
        x, ln2 = opset.residual_layernorm(x, opset.matmul(atty, lp["attprojw"], lp["attprojb"]),
                                          lp["ln2w"], lp["ln2b"])
        ln2 = checkpoint_name(ln2, "ln2")
        return x, opset.matmul(matmul_gelu(ln2, lp["fcw"], lp["fcb"]), lp["fcprojw"], lp["fcprojb"])
    if recompute == 0:
        return block
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute}")
    saved = {1: ("ln1", "qkv", "atty", "ln2", "fch"), 2: ("qkv", "atty", "fch")}[recompute]
    return jax.checkpoint(block, policy=jax.checkpoint_policies.save_only_these_names(*saved))


def hidden_states(params: Params, idx_BT: jax.Array, config: GPTConfig, *, dtype=jnp.float32,
                  kernels: str = "xla", recompute: int = 0, layer_sharding=None) -> jax.Array:
    """Final-layernorm output (B, T, C) in the compute dtype.

    layer_sharding (ZeRO-3): where one layer's tensors must be inside the scan, e.g. replicated;
    the per-layer constraint makes XLA all-gather each layer's shards as the scan reaches it (and
    reduce its gradients there) instead of re-partitioning the activations to match the shards."""
    opset = op_set(kernels)
    T = idx_BT.shape[1]
    if T > config.maxT:
        raise ValueError(f"sequence length T={T} exceeds the model's maxT={config.maxT}")
    x = opset.encoder(params["wte"], params["wpe"], idx_BT, jnp.zeros((), dtype))
    block = _block(opset, config.NH, recompute)
    layer_params = {k: params[k] for k in LAYER_PARAMS}
    if layer_sharding is not None:
        inner = block
        block = lambda carry, lp: inner(carry, jax.lax.with_sharding_constraint(lp, layer_sharding))
    (x, delta), _ = jax.lax.scan(lambda carry, lp: (block(carry, lp), None), (x, jnp.zeros_like(x)),
                                 layer_params)
    return opset.residual_layernorm(x, delta, params["lnfw"], params["lnfb"])[1]


def loss(params: Params, idx_BT: jax.Array, targets_BT: jax.Array, config: GPTConfig, *,
         dtype=jnp.float32, kernels: str = "xla", recompute: int = 0, layer_sharding=None) -> jax.Array:
    """Mean cross-entropy over B*T tokens, softmax over the first V of the Vp logits."""
    h = hidden_states(params, idx_BT, config, dtype=dtype, kernels=kernels, recompute=recompute,
                      layer_sharding=layer_sharding)
    return op_set(kernels).classifier(h, params["wte"], targets_BT, config.V)


def logits(params: Params, idx_BT: jax.Array, config: GPTConfig, *, dtype=jnp.float32,
           kernels: str = "xla") -> jax.Array:
    """(B, T, Vp) logits; the padded columns come out of the zero wte rows."""
    h = hidden_states(params, idx_BT, config, dtype=dtype, kernels=kernels)
    return ops.logits(h, params["wte"])


def value_and_grad(config: GPTConfig, *, dtype=jnp.float32, kernels: str = "xla",
                   recompute: int = 0, layer_sharding=None) -> Callable:
    """(params, idx, targets) -> (loss, grads) through the hand-written backward."""
    def f(params, idx_BT, targets_BT):
        return loss(params, idx_BT, targets_BT, config, dtype=dtype, kernels=kernels, recompute=recompute,
                    layer_sharding=layer_sharding)
    return jax.value_and_grad(f)


def check_params(params: dict, config: GPTConfig) -> None:
    """Raise with the tensor's name if a params dict does not match the config."""
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise ValueError(f"params are missing tensors: {', '.join(missing)}")
    for name, shape in config.param_shapes().items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"param {name} has shape {tuple(params[name].shape)}, expected {shape}")
