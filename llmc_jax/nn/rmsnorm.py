"""RMSNorm (Llama 3) as `jax.custom_vjp` ops in the style of `ops.py`, plus the fused residual variant.

Forward, as train_llama3.py's RMSNorm (`self._norm(x.float()).type_as(x) * self.weight`):
    r = rsqrt(mean(x^2) + eps)            fp32, per row; the one residual saved besides x and w
    n = (x * r) cast to x.dtype           normalized in fp32, rounded to the activation dtype
    y = n * w                             PyTorch promotes bf16 * fp32 to fp32; the next matmul then
                                          rounds it to bf16. We take the fp32 product and round it
                                          once to x.dtype: the same values, in our dtype policy.
eps is a static Python float from the model file (`norm_eps`, 1e-5 for Llama 3; the PyTorch class
default 1e-6 is never the one used), so it has no default here: every caller must pass the file's.

Backward (llm.c's rmsnorm_backward), with g = w * dy and xhat = x * r, both fp32:
    d r / d x_k = -r^3 x_k / C, so d xhat_j / d x_k = r delta_jk - r^3 x_j x_k / C, hence
    dx_k = sum_j g_j (r delta_jk - r^3 x_j x_k / C) = r (g_k - xhat_k * mean_j(g_j xhat_j))
    dw   = sum over rows of dy * xhat     (fp32, cast to w's dtype)
The rounding of xhat to x.dtype is treated as the identity, as llm.c recomputes xhat in fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.common import SAVED_NORM_STATS, SAVED_RESIDUAL

F32 = jnp.float32


def _rstd(x32: jax.Array, eps: float) -> jax.Array:
    return lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def _normalize(x: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(y, rstd): the forward both ops share."""
    x32 = x.astype(F32)
    rstd = _rstd(x32, eps)
    n = (x32 * rstd).astype(x.dtype)                  # .type_as(x), before the weight
    return (n.astype(F32) * w.astype(F32)).astype(x.dtype), rstd


def _backward(x, w, rstd, dy):
    """(dx in fp32, dw in w's dtype) from the saved x, w and rstd."""
    xhat = x.astype(F32) * rstd
    dy32 = dy.astype(F32)
    g = dy32 * w.astype(F32)
    # dx = r * (g - xhat * mean(g * xhat))
    dx = rstd * (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    dw = jnp.sum(dy32 * xhat, axis=tuple(range(x.ndim - 1)))
    return dx, dw.astype(w.dtype)


# ----------------------------------------------------------------------------------------------
# rmsnorm: y = (x * rsqrt(mean(x^2) + eps)) * w over the last axis

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rmsnorm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; output in x's dtype, statistics in fp32, eps static."""
    return _normalize(x, w, eps)[0]


def _rmsnorm_fwd(x, w, eps):
    y, rstd = _normalize(x, w, eps)
    return y, (x, w, checkpoint_name(rstd, SAVED_NORM_STATS))


def _rmsnorm_bwd(eps, res, dy):
    x, w, rstd = res
    dx, dw = _backward(x, w, rstd, dy)
    return dx.astype(x.dtype), dw


rmsnorm.defvjp(_rmsnorm_fwd, _rmsnorm_bwd)


def rmsnorm_reference(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Plain jnp, differentiated by JAX: the semantics `rmsnorm` must match."""
    x32 = x.astype(F32)
    n = (x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return (n.astype(F32) * w.astype(F32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# residual + rmsnorm, fused (llm.c's fused_residual_rmsnorm_forward5): (h, rmsnorm(h)), h = x + r

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def residual_rmsnorm(x: jax.Array, r: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(x + r, rmsnorm(x + r)): the residual stream and the next layer's input from one op. The sum
    is rounded to the activation dtype and the norm is of that rounded sum, as llm.c's kernel."""
    return _residual_rmsnorm_fwd(x, r, w, eps)[0]


def _residual_rmsnorm_fwd(x, r, w, eps):
    if r.shape != x.shape or r.dtype != x.dtype:   # both get the one cotangent of x + r back
        raise ValueError(f"r must match x in shape and dtype: x is {x.dtype}{list(x.shape)}, "
                         f"r is {r.dtype}{list(r.shape)}")
    h = checkpoint_name(x + r, SAVED_RESIDUAL)
    y, rstd = _normalize(h, w, eps)
    return (h, y), (h, w, checkpoint_name(rstd, SAVED_NORM_STATS))


def _residual_rmsnorm_bwd(eps, res, cts):
    h, w, rstd = res
    dh, dy = cts
    dx, dw = _backward(h, w, rstd, dy)
    # the residual stream's own cotangent adds to the norm's: one rounding, as llm.c's dx +=
    dsum = (dx + dh.astype(F32)).astype(h.dtype)
    return dsum, dsum, dw


residual_rmsnorm.defvjp(_residual_rmsnorm_fwd, _residual_rmsnorm_bwd)


def residual_rmsnorm_reference(x: jax.Array, r: jax.Array, w: jax.Array,
                               eps: float) -> tuple[jax.Array, jax.Array]:
    h = x + r
    return h, rmsnorm_reference(h, w, eps)
