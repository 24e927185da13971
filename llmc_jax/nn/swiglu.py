"""SwiGLU (Llama 3's MLP activation) as a `jax.custom_vjp` op in the style of `ops.py`.

The MLP's two input projections run as one fused matmul whose (..., 2H) output holds
[up | gate] on its last axis, in llm.c's order:
    first half  up   = c_fc  (Meta w3, HF up_proj)
    second half gate = c_fc2 (Meta w1, HF gate_proj)
train_llama3.py computes `c_proj(c_fc(x) * silu(c_fc2(x)))`; swapping the halves gives a different
function (silu is not symmetric), so the order matters when weights are loaded.

Forward (llm.c's swiglu_forward): out = up * silu(gate) = up * gate * sigmoid(gate), in fp32 from
the activation-dtype inputs, rounded once to the input dtype. The op saves its input, the
pre-activation (llm.c keeps it as `fch`). Recompute: tag the fc matmul's output with
`checkpoint_name(..., "fch")` before calling `swiglu`, as kernels._xla_matmul_gelu does for GELU;
`-r 1` then keeps the fc output and recomputes only the swiglu (its output, H wide, is not saved).

Backward (llm.c's swiglu_backward), with s = sigmoid(gate) and s' = s (1 - s):
    d out / d up   = gate * s                                 -> dup   = dout * gate * s
    d out / d gate = up * (s + gate * s') = up * s * (1 + gate * (1 - s))
                                                              -> dgate = dout * up * s * (1 + gate (1 - s))
returned as one (..., 2H) cotangent [dup | dgate] in the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _halves(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(up, gate) in fp32 from the fused (..., 2H) fc output."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last axis [up | gate], got shape {list(h.shape)}")
    up, gate = jnp.split(h.astype(F32), 2, axis=-1)
    return up, gate


@jax.custom_vjp
def swiglu(h_BT2H: jax.Array) -> jax.Array:
    """up * silu(gate) of the fused [up | gate] fc output: (..., 2H) -> (..., H), in h's dtype."""
    up, gate = _halves(h_BT2H)
    return (up * gate * jax.nn.sigmoid(gate)).astype(h_BT2H.dtype)


def _swiglu_fwd(h):
    return swiglu(h), h


def _swiglu_bwd(h, dout):
    up, gate = _halves(h)
    s = jax.nn.sigmoid(gate)
    dout32 = dout.astype(F32)
    dup = dout32 * gate * s
    dgate = dout32 * up * s * (1.0 + gate * (1.0 - s))
    return (jnp.concatenate([dup, dgate], axis=-1).astype(h.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_reference(h_BT2H: jax.Array) -> jax.Array:
    """Plain jnp, differentiated by JAX: the semantics `swiglu` must match."""
    up, gate = jnp.split(h_BT2H.astype(F32), 2, axis=-1)
    return (up * jax.nn.silu(gate)).astype(h_BT2H.dtype)
