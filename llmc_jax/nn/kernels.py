"""Which implementation each swappable op runs: a typed choice, resolved once, and the op set it names.

`Kernels` is resolved from the flags in one place (`Kernels.resolve`: the --kernels family, the
per-op overrides, the -r fallback for the fused MLP, the cuDNN requirements) and then travels as a
frozen, hashable value: a jit static argument, an lru_cache key, a row of the config table.
`op_set(kernels)` turns it into the functions the model families call. `ModelOptions` is the rest
of what changes a traced forward (compute dtype, recompute level, ZeRO-3 layer sharding).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.layout import Layout, with_layout_constraint

from llmc_jax.nn import ops
from llmc_jax.nn.gqa_attention import gqa_attention as _xla_gqa_attention
from llmc_jax.nn.layer_gather import LayerGather, gathered_block
from llmc_jax.nn.rmsnorm import residual_rmsnorm as _xla_residual_rmsnorm
from pallas_kernels.common import SAVED_ATTN_STATS, SAVED_NORM_STATS, SAVED_RESIDUAL

# The --kernels families, and the implementations each swappable op has.
FAMILIES = ("xla", "pallas")
OP_CHOICES = {"attention": ("xla", "pallas", "cudnn"), "layernorm": ("xla", "pallas"),
              "matmul_gelu": ("xla", "pallas")}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation name per swappable op (see OP_CHOICES). Each family takes what applies to
    it: `layernorm` names the normalization fused with the residual add (GPT-2's LayerNorm, Llama
    3's RMSNorm), `attention` both multi-head and grouped-query attention; Llama 3 has no fused
    matmul+GELU (SwiGLU), so `matmul_gelu` does not apply to it."""

    attention: str = "xla"
    layernorm: str = "xla"
    matmul_gelu: str = "xla"

    def __post_init__(self) -> None:
        for op, choices in OP_CHOICES.items():
            if getattr(self, op) not in choices:
                raise ValueError(f"unknown {op} implementation {getattr(self, op)!r}; "
                                 f"choose one of {', '.join(choices)}")

    @classmethod
    def resolve(cls, family: str = "xla", *, recompute: int = 0, platform: str | None = None,
                dtype: str | None = None, **overrides: str | None) -> Kernels:
        """The flags' choice made concrete: each op follows `family` unless overridden (None = follow).

        Under -r 1/2 the fused Pallas matmul+GELU would recompute its whole matmul in the backward
        (llm.c's recompute keeps the pre-activation), so the family choice falls back to the op
        library's matmul and GELU there; asking for it by name with -r 1/2 is an error. cuDNN
        attention needs a GPU and bfloat16: checked here when platform and dtype are given."""
        if family not in FAMILIES:
            raise ValueError(f"unknown kernels {family!r}; choose one of {', '.join(FAMILIES)}")
        for op in overrides:
            if op not in OP_CHOICES:
                raise ValueError(f"no per-op kernel choice for {op!r}; ops: {', '.join(OP_CHOICES)}")
        choice = {op: overrides.get(op) or family for op in OP_CHOICES}
        if recompute and choice["matmul_gelu"] == "pallas":
            if overrides.get("matmul_gelu") == "pallas":
                raise ValueError(f"--matmul-gelu pallas needs -r 0: under -r {recompute} the fused kernel would "
                                 "recompute its whole matmul in the backward (use -r 0, or --matmul-gelu xla)")
            choice["matmul_gelu"] = "xla"
        kernels = cls(**choice)
        if kernels.attention == "cudnn" and platform is not None and (platform != "gpu" or dtype != "bfloat16"):
            raise ValueError("--attention cudnn needs an NVIDIA GPU and --dtype bfloat16 (cuDNN's fused "
                             "attention); use --attention xla or pallas")
        return kernels

    def __str__(self) -> str:
        return self.describe()

    def describe(self, ops: tuple[str, ...] = tuple(OP_CHOICES)) -> str:
        """The family most of `ops` use, then those that differ: "pallas", "pallas (matmul_gelu=xla)".
        `ops`: the ones a model family has (its KERNEL_OPS), so Llama's line never names matmul_gelu."""
        choice = {op: impl for op, impl in dataclasses.asdict(self).items() if op in ops}
        names = list(choice.values())
        base = max(FAMILIES, key=names.count)
        others = [f"{op}={impl}" for op, impl in choice.items() if impl != base]
        return f"{base} ({', '.join(others)})" if others else base


XLA = Kernels()


def default_dtype(platform: str) -> str:
    """The compute dtype a command uses when none is given: float32 on a CPU, bfloat16 elsewhere."""
    return "float32" if platform == "cpu" else "bfloat16"


class ModelOptions(NamedTuple):
    """What changes a model's traced forward, besides its config: hashable, a jit static argument.

    layer_sharding (ZeRO-3, inside shard_map): a layer_gather.LayerGather, each layer's shards
    all_gathered as the layer scan reaches them and their gradients reduce-scattered back.
    fp8: the forward's FP8 recipe; the per-layer metas are then an argument of forward/loss."""

    dtype: Any = jnp.float32
    kernels: Kernels = XLA
    recompute: int = 0
    layer_sharding: Any = None
    fp8: Any = None                   # fp8.Fp8Options: the layer matmuls in FP8 (needs the metas); None: off


def loss_value_and_grad(loss: Callable, opts: ModelOptions) -> Callable:
    """A family's value_and_grad from its loss(params, idx, targets, fp8_metas): (params, idx, targets)
    -> (loss, grads); under FP8 (opts.fp8) (params, fp8_metas, idx, targets) -> (loss, (grads, meta
    grads)), the metas differentiated too: their "gradients" are the amaxes each FP8 matmul observed
    (nn/fp8.py), stacked on L."""
    if opts.fp8 is not None:
        return jax.value_and_grad(lambda params, metas, idx_BT, targets_BT: loss(params, idx_BT, targets_BT, metas),
                                  argnums=(0, 1))
    return jax.value_and_grad(lambda params, idx_BT, targets_BT: loss(params, idx_BT, targets_BT, None))


RECOMPUTE = (0, 1, 2)


# What llm.c keeps at every -r: the residual stream each norm reads, the norms' statistics and
# attention's log-sum-exp. Without them the backward would run the attention forward and the
# attention projection's matmul again, which llm.c never does.
ALWAYS_SAVED = (SAVED_RESIDUAL, SAVED_NORM_STATS, SAVED_ATTN_STATS)


def _all_but_gathered(prim, *_, **__) -> bool:
    """-r 0 at ZeRO-3: save every residual but the all_gathered layer weights."""
    return prim.name != "all_gather"


def rematerialize(block: Callable, recompute: int, saved: dict[int, tuple[str, ...]],
                  gather: LayerGather | None = None) -> Callable:
    """llm.c's -r on a block: level 0 keeps everything; level 1/2 keep only the activations named
    (checkpoint_name) in saved[level] and ALWAYS_SAVED, and recompute the rest in the backward.

    gather (ZeRO-3): the block gathers its layer's shards first, inside the checkpoint, so that the
    backward gathers each layer again rather than keep every layer's whole weights; at -r 0 the
    checkpoint keeps everything else (Llama 3.1-8B -b 1 -t 2048 -z 3 -r 0 on 8 H100s: 36.99 ->
    25.92 GiB per GPU)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute}")
    block = gathered_block(block, gather)
    if recompute == 0:
        if gather is None:
            return block
        return jax.checkpoint(block, policy=_all_but_gathered)
    policy = jax.checkpoint_policies.save_only_these_names(*saved[recompute], *ALWAYS_SAVED)
    return jax.checkpoint(block, policy=policy)


class OpSet(NamedTuple):
    """The functions a model family's forward calls, with the implementations a Kernels names."""

    encoder: Callable
    layernorm: Callable
    residual_layernorm: Callable      # (x, r, w, b) -> (x + r, layernorm(x + r))
    matmul: Callable
    matmul_gelu: Callable             # (x, w, b) -> gelu(x @ w.T + b)
    attention: Callable               # (qkv_BT3C, NH) -> (B, T, C), causal; names its qkv "qkv", output "atty"
    classifier: Callable
    # Llama 3's
    residual_rmsnorm: Callable        # (x, r, w, eps) -> (x + r, rmsnorm(x + r)), eps a static float
    gqa_attention: Callable           # (q (B, T, NH, HS), k, v (B, T, NKV, HS)) -> (B, T, NH*HS), causal, "atty"


def _xla_residual_layernorm(x, r, w, b):
    s = checkpoint_name(ops.residual(x, r), SAVED_RESIDUAL)
    return s, ops.layernorm(s, w, b)


def _named_output(attention: Callable) -> Callable:
    """An XLA attention whose output is named "atty" for -r (its residuals are the inputs and the lse)."""
    return lambda *args: checkpoint_name(attention(*args), "atty")


def _xla_matmul_gelu(x, w, b):
    # the pre-activation is named so that -r 1/2 keep it and recompute only the GELU
    return ops.gelu(checkpoint_name(ops.matmul(x, w, b), "fch"))


def _xla_attention(qkv_BT3C, NH):
    """ops.attention with its qkv kept (named "qkv" for -r) as (B, 3C, T), the layout its dots read,
    and its output row-major, the layout the projection's weight gradient reads: the forward scan
    writes each layer's qkv and atty as the backward scan reads them. Before, XLA transposed whole
    stacks between the scans (qkv: 3.4 GiB at d12 -b 64, 7.0 at d48 -b 16; atty 2.3 at d48)."""
    qkv_B3CT = checkpoint_name(jnp.swapaxes(qkv_BT3C, 1, 2), "qkv")
    out = with_layout_constraint(ops.attention_B3CT(qkv_B3CT, NH), Layout(major_to_minor=(0, 1, 2)))
    return checkpoint_name(out, "atty")


def _qkv_attention(attention_BTNH: Callable) -> Callable:
    """Adapt a (q, k, v) -> out attention on (B, T, NH, HS) to the packed (B, T, 3C) qkv (named "qkv")."""
    merged = _merged_heads(attention_BTNH)
    return lambda qkv_BT3C, NH: merged(*ops.split_heads(checkpoint_name(qkv_BT3C, "qkv"), NH))


def _merged_heads(attention_BTNH: Callable) -> Callable:
    """Adapt a (q, k, v) -> (B, T, NH, HS) attention (a custom_vjp: cuDNN's, Pallas flash) to the
    (B, T, NH*HS) output the projection reads, saving that output once.

    The kernel's own vjp keeps its output in (B, T, NH, HS) while the projection's matmul keeps the
    merged (B, T, NH*HS) one: two copies of llm.c's atty per layer. Here the residuals are q, k, v,
    the merged output (named "atty") and the kernel's other residuals (its log-sum-exp, named
    SAVED_ATTN_STATS), so the projection's residual is the same array and -r 1/2 keep the stats
    rather than run the attention forward again in the backward."""
    def merged(out_BTNH):
        B, T, NH, HS = out_BTNH.shape
        return out_BTNH.reshape(B, T, NH * HS)

    def kernel_vjp(q, k, v):
        """(out, vjp's residual leaves, treedef, the leaves that are q, k, v or out)."""
        out, vjp = jax.vjp(attention_BTNH, q, k, v)
        leaves, treedef = jax.tree_util.tree_flatten(vjp)
        return out, leaves, treedef, [next((i for i, x in enumerate((q, k, v, out)) if leaf is x), None)
                                      for leaf in leaves]

    @jax.custom_vjp
    def attention(q_BTNH, k_BTKH, v_BTKH):
        return merged(attention_BTNH(q_BTNH, k_BTKH, v_BTKH))

    def attention_fwd(q, k, v):
        out, leaves, _, roles = kernel_vjp(q, k, v)
        atty = checkpoint_name(merged(out), "atty")
        stats = [checkpoint_name(x, SAVED_ATTN_STATS) for x, role in zip(leaves, roles) if role is None]
        return atty, (q, k, v, atty, stats)

    def attention_bwd(res, datty):
        q, k, v, atty, stats = res
        # traced again for the vjp's structure; the forward it traces is dead code in the backward
        out, leaves, treedef, roles = kernel_vjp(q, k, v)
        known, stats = (q, k, v, atty.reshape(out.shape)), iter(stats)
        vjp = jax.tree_util.tree_unflatten(treedef, [next(stats) if role is None else known[role] for role in roles])
        return vjp(datty.reshape(out.shape))

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def _cudnn_attention(q, k, v):
    """cuDNN's fused attention; k and v may have fewer (NKV) heads than q: cuDNN groups them itself."""
    from pallas_kernels.common import target_backend
    if target_backend() != "gpu" or q.dtype != jnp.bfloat16:
        raise ValueError("--attention cudnn needs an NVIDIA GPU and bfloat16 activations (--dtype bfloat16)")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def op_set(kernels: Kernels = XLA) -> OpSet:
    """The op library's functions, with attention (multi-head and grouped-query), the residual +
    layernorm / RMSNorm and the MLP's matmul+GELU swapped for the kernels `kernels` names. The plain
    matmuls stay XLA's (cuBLAS is the fastest)."""
    attention, layernorm, residual_layernorm = _xla_attention, ops.layernorm, _xla_residual_layernorm
    gqa_attention = _named_output(_xla_gqa_attention)
    residual_rmsnorm, matmul_gelu = _xla_residual_rmsnorm, _xla_matmul_gelu
    if kernels.attention == "pallas":
        from pallas_kernels.flash_attention import flash_attention
        attention, gqa_attention = _qkv_attention(flash_attention), _merged_heads(flash_attention)
    elif kernels.attention == "cudnn":
        attention, gqa_attention = _qkv_attention(_cudnn_attention), _merged_heads(_cudnn_attention)
    if kernels.layernorm == "pallas":
        from pallas_kernels import layernorm as pallas_ln, rmsnorm as pallas_rms
        layernorm, residual_layernorm = pallas_ln.layernorm, pallas_ln.residual_layernorm
        residual_rmsnorm = pallas_rms.residual_rmsnorm
    if kernels.matmul_gelu == "pallas":
        from pallas_kernels.matmul_gelu import matmul_gelu
    return OpSet(encoder=ops.encoder, layernorm=layernorm, residual_layernorm=residual_layernorm,
                 matmul=ops.matmul, matmul_gelu=matmul_gelu, attention=attention,
                 classifier=ops.fused_classifier, residual_rmsnorm=residual_rmsnorm,
                 gqa_attention=gqa_attention)
