"""FP8 matmuls with per-tensor scaling: e4m3 operands forward, e5m2 gradients backward.

The recipe is the one of llm.c's unmerged FP8 work (PR #760) and of Transformer Engine / Flax:
a tensor v is stored as q = cast(clip(v * s, -max, max)) with one float32 scale s per tensor, the
matmul runs on the fp8 operands with float32 accumulation, and the scales are divided out of the
product afterwards (the Flax "Direct" structure: an explicit fp8 `dot_general`, not dequantize-then-
f32-dot). Which dtype each operand has:

    forward   out = dot(x_q, w_q) / (s_x * s_w) + b   x_q, w_q: float8_e4m3fn   (max 448)
    backward  dx  = dot(d_q, w_q)   / (s_d * s_w)     d_q: float8_e5m2 (max 57344), w_q: e4m3
              dw  = dot(d_q^T, x_q) / (s_d * s_x)     d_q: e5m2, x_q: e4m3
              db  = sum(dout) in float32 (from the unquantized dout)

Every dot is a `lax.dot_general` on the fp8 arrays with preferred_element_type=float32; the
division is one multiply of the float32 result by (1/s_a) * (1/s_b) (llm.c's "descale").

`x` keeps its dtype at the boundary (bfloat16 or float32 in, the same out; dx in it too); `w` arrives
as the float32 master weight and dw leaves in float32. The residuals saved for the backward are the
fp8 operands x_q and w_q themselves (1 byte per element) and the scalars.

Where clipping happens: in `quantize`, before every cast to fp8 (x, w and dout). JAX's float ->
float8 conversion does not saturate: 465 -> e4m3fn is NaN, 1e5 -> e5m2 is inf, where CUDA's
`__NV_SATFINITE` conversion saturates. A value beyond the scaled range (an amax spike under delayed
scaling) therefore saturates to +-max here too, never NaN. Values below the smallest subnormal
round to zero (the cast rounds to nearest even, exactly as ml_dtypes does).

Scaling state (`Fp8Meta`): per quantized tensor a float32 scale and a float32 history of the last
H observed amaxes (max |v| of the unscaled tensor; index 0 is the newest). Two recipes:

  delayed (default): the op quantizes with meta.scale, fixed before the step; after the step
      `update_meta` rolls the step's observed amax into the history and sets the next scale to
      fp8_max / (max(history) * 2**margin). One step late, but the scale never depends on the
      tensor it casts. A meta that has observed nothing yet (a fresh run's first step) has no
      scale to give: that step quantizes with the tensor's current scale instead.
  current: the op computes each tensor's scale from its own amax of this step (the same formula
      over a one-entry history); exact range, one extra reduction before every cast. The metas'
      scales are not used (except as the fallback for an all-zero tensor), histories still update.

How the observed amaxes leave the op. A `jax.custom_vjp` cannot return state, and the amax of
dout exists only inside the backward. So the metas travel as a *differentiable argument* and the
backward returns, as their "gradient", the observation: the cotangent of each Fp8Meta is an
Fp8Meta with scale 0 and amax_history = [amax of this step, 0, ..., 0]. `observed_amax(g)` reads
it back; `update_meta(meta, observed_amax(g), ...)` then runs inside the jitted train step (Flax's
OVERWRITE_WITH_GRADIENT idea, except that the gradient carries the raw amax rather than the new
state, so it can be reduced like one). Rules that follow from JAX summing cotangents:
  - each Fp8Meta feeds exactly one fp8_matmul call per forward; a meta used twice (or closed over
    by a `lax.scan` body instead of scanned as a stacked xs) would get the *sum* of the amaxes;
  - gradients of the metas must be combined with max, not sum or mean: `combine_amax_grads` over
    gradient-accumulation micro-batches, `lax.pmax` across devices inside shard_map (under plain
    jit the amax reduction is already global); they never enter the optimizer, the grad norm or
    clipping;
  - the amaxes are independent of the incoming cotangent's scale for x and w; the dout amax is the
    amax of the cotangent actually received (a scaled loss scales it, as it scales dout).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from llmc_jax.nn import ops

F32 = jnp.float32
E4M3 = jnp.float8_e4m3fn          # forward operands: activations and weights
E5M2 = jnp.float8_e5m2            # backward: the output gradient
E4M3_MAX = float(jnp.finfo(E4M3).max)     # 448.0
E5M2_MAX = float(jnp.finfo(E5M2).max)     # 57344.0
FP8_MAX = {jnp.dtype(E4M3): E4M3_MAX, jnp.dtype(E5M2): E5M2_MAX}
F32_TINY = float(jnp.finfo(F32).tiny)     # smallest normal float32, 2**-126
DEFAULT_HISTORY = 32              # llm.c PR #760's MAX_ABSMAX_HISTORY
RECIPES = ("delayed", "current")

# The backward's two dots accumulate at HIGHEST: XLA:GPU then asks cuBLASLt for full (not "fast")
# FP8 accumulation, Transformer Engine's and Flax's choice for the gradient GEMMs. The forward dot
# follows the op library's MATMUL_PRECISION (default: fast accumulation on a GPU). On the CPU both
# are the same float32 matmul of the upcast values.
BACKWARD_PRECISION = lax.Precision.HIGHEST


class Fp8Meta(NamedTuple):
    """Scaling state of one quantized tensor (a pytree of arrays; leading axes allowed, e.g. (L,)).

    scale: float32 (...,), the multiplier applied before the cast (q = v * scale);
    amax_history: float32 (..., H), the last H observed amaxes, index 0 the newest."""

    scale: jax.Array
    amax_history: jax.Array


class MatmulMetas(NamedTuple):
    """The three tensors one fp8_matmul quantizes: its input x, its weight w (both e4m3) and the
    gradient of its output dout (e5m2)."""

    x: Fp8Meta
    w: Fp8Meta
    dout: Fp8Meta


# which fp8 format each MatmulMetas field quantizes to
MATMUL_DTYPES = MatmulMetas(x=E4M3, w=E4M3, dout=E5M2)

# the layer matmuls llm.c's PR #760 runs in FP8 (attention, attproj and the classifier stay bf16)
LAYER_MATMULS = ("qkv", "fc", "fcproj")
# every layer matmul of both families that can run in FP8 (--fp8-matmuls); Llama's fc is the fused
# [up | gate] projection before SwiGLU
ALL_LAYER_MATMULS = ("qkv", "attproj", "fc", "fcproj")


class Fp8Options(NamedTuple):
    """What a model forward needs to run its layer matmuls in FP8: hashable (a jit static, part of
    ModelOptions). The metas themselves are arrays and travel as an argument, not here."""

    recipe: str = "delayed"
    margin: float = 0.0
    matmuls: tuple[str, ...] = LAYER_MATMULS


def parse_matmuls(text: str) -> tuple[str, ...]:
    """`--fp8-matmuls qkv,fc,fcproj` -> ("qkv", "fc", "fcproj") in ALL_LAYER_MATMULS order; raises
    ValueError naming the unknown or missing entries."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_LAYER_MATMULS]
    if unknown or not names:
        raise ValueError(f"--fp8-matmuls {text!r}: expected a comma-separated subset of "
                         f"{','.join(ALL_LAYER_MATMULS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(n for n in ALL_LAYER_MATMULS if n in names)


def layer_matmul(matmul: Callable, options: "Fp8Options | None", layer_metas: dict | None) -> Callable:
    """mm(name, x, w, b) for one layer of a model: fp8_matmul with this layer's metas for the matmuls
    `options` names, `matmul` (the op library's) for the others and whenever FP8 is off. Every
    family's block makes its matmuls here, so this is where a forward given only half of FP8 fails."""
    if (layer_metas is None) != (options is None):
        raise ValueError("FP8 needs both ModelOptions.fp8 and the metas (fp8_metas), or neither")

    def mm(name: str, x, w, b):
        if layer_metas is None or name not in options.matmuls:
            return matmul(x, w, b)
        return fp8_matmul(x, w, b, layer_metas[name], recipe=options.recipe, margin=options.margin)
    return mm


def init_layer_metas(L: int, history_len: int = DEFAULT_HISTORY,
                     matmuls: tuple[str, ...] = LAYER_MATMULS) -> dict[str, MatmulMetas]:
    """{matmul name: MatmulMetas stacked on (L,)}: one meta per layer per matmul, so that each
    meta feeds exactly one fp8_matmul call when the layer scan takes them as xs."""
    return {name: init_matmul_metas(history_len, shape=(L,)) for name in matmuls}


def update_layer_metas(metas: dict, grads: dict, margin: float = 0.0) -> dict:
    """update_matmul_metas on every matmul's stacked metas (after the step, delayed scaling)."""
    return {name: update_matmul_metas(metas[name], grads[name], margin) for name in metas}


def init_meta(history_len: int = DEFAULT_HISTORY, scale: float = 1.0, shape: tuple[int, ...] = ()) -> Fp8Meta:
    """A fresh meta: `scale` (1.0: no scaling on the first delayed step) and an all-zero history.
    `shape` adds leading axes, e.g. (L,) for a meta per layer stacked for the layer scan."""
    if history_len < 1:
        raise ValueError(f"the amax history needs at least one entry, got {history_len}")
    return Fp8Meta(jnp.full(shape, scale, F32), jnp.zeros((*shape, history_len), F32))


def init_matmul_metas(history_len: int = DEFAULT_HISTORY, scale: float = 1.0,
                      shape: tuple[int, ...] = ()) -> MatmulMetas:
    return MatmulMetas(*(init_meta(history_len, scale, shape) for _ in MatmulMetas._fields))


def compute_scale(amax_history, fp8_max: float, margin: float = 0.0, prev_scale=1.0) -> jax.Array:
    """Delayed scaling: fp8_max / (max(history) * 2**margin), computed as (fp8_max / amax) * 2**-margin.

    The largest amax of the window maps to fp8_max / 2**margin. Never NaN, Inf or 0: when the
    history's max is 0 (nothing observed yet, or all-zero tensors), below float32's smallest normal
    (XLA:CPU flushes such subnormals to zero, other backends need not: treated as 0 everywhere),
    non-finite, or the formula leaves (0, inf) (a huge margin), the scale stays `prev_scale`, or 1.0
    if that is itself not finite and positive."""
    history = jnp.asarray(amax_history, F32)
    amax = jnp.max(history, axis=-1)
    prev = jnp.asarray(prev_scale, F32)
    prev = jnp.where(jnp.isfinite(prev) & (prev > 0), prev, jnp.float32(1.0))
    usable = jnp.isfinite(amax) & (amax >= F32_TINY)
    scale = (jnp.float32(fp8_max) / jnp.where(usable, amax, jnp.float32(1.0))) * jnp.float32(2.0 ** -margin)
    return jnp.where(usable & jnp.isfinite(scale) & (scale > 0), scale, prev)


def update_meta(meta: Fp8Meta, new_amax, fp8_max: float, margin: float = 0.0) -> Fp8Meta:
    """Roll the history one step, insert `new_amax` at index 0, recompute the scale (delayed scaling).

    A non-finite amax (the step overflowed somewhere upstream) is recorded as 0, "no observation",
    so it cannot block the window for H steps; so is a negative or float32-subnormal one (the
    latter so that the history is the same on backends that flush subnormals and those that do not)."""
    a = jnp.asarray(new_amax, F32)
    a = jnp.where(jnp.isfinite(a) & (a >= F32_TINY), a, jnp.float32(0.0))
    history = jnp.roll(meta.amax_history, 1, axis=-1).at[..., 0].set(a)
    return Fp8Meta(compute_scale(history, fp8_max, margin, meta.scale), history)


def observed_amax(meta_grad: Fp8Meta) -> jax.Array:
    """The amax an fp8_matmul observed, from the "gradient" of its Fp8Meta (see the module doc)."""
    return meta_grad.amax_history[..., 0]


def combine_amax_grads(a, b):
    """Two micro-batches' meta gradients -> one: the max, leaf by leaf (any pytree of metas)."""
    return jax.tree.map(jnp.maximum, a, b)


def update_matmul_metas(metas: MatmulMetas, grads: MatmulMetas, margin: float = 0.0) -> MatmulMetas:
    """update_meta on each of the three metas with the amax its gradient carries (e4m3's max for x
    and w, e5m2's for dout). Works on metas stacked on leading axes (e.g. per layer)."""
    return MatmulMetas(*(update_meta(m, observed_amax(g), FP8_MAX[jnp.dtype(dt)], margin)
                         for m, g, dt in zip(metas, grads, MATMUL_DTYPES)))


def amax(v) -> jax.Array:
    """max |v| in float32 (0 for an all-zero tensor)."""
    return jnp.max(jnp.abs(v.astype(F32)))


def quantize(v, scale, dtype) -> jax.Array:
    """clip(v * scale, -max, max) cast to `dtype` (e4m3fn or e5m2): saturating, never NaN on overflow.

    The product is taken in float32 (bf16 inputs are upcast exactly first); the cast rounds to
    nearest even."""
    m = FP8_MAX[jnp.dtype(dtype)]
    return jnp.clip(v.astype(F32) * jnp.asarray(scale, F32), -m, m).astype(dtype)


def dequantize(q, scale, dtype=F32) -> jax.Array:
    """q * (1 / scale) in float32 (then cast to `dtype`). Written with the reciprocal because XLA
    rewrites a division by a broadcast scalar into exactly that: this way the result is defined."""
    return (q.astype(F32) * (1.0 / jnp.asarray(scale, F32))).astype(dtype)


def _current_scale(a, fp8_max: float, margin: float, prev) -> jax.Array:
    """The `current` recipe: the scale from this step's own amax (a one-entry history)."""
    return compute_scale(a[None], fp8_max, margin, prev)


def _scale(recipe: str, meta: Fp8Meta, a, fp8_max: float, margin: float):
    """The scale a tensor with amax `a` is cast with. Delayed scaling takes the meta's, except while
    the meta has observed nothing (an all-zero history: a fresh run's first step), where a scale of 1
    would flush most of a small output gradient below e5m2's subnormals: then its own current scale."""
    if recipe == "delayed":
        observed = jnp.any(meta.amax_history > 0, axis=-1)
        return jnp.where(observed, meta.scale.astype(F32), _current_scale(a, fp8_max, margin, meta.scale))
    if recipe == "current":
        return _current_scale(a, fp8_max, margin, meta.scale)
    raise ValueError(f"unknown fp8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def _meta_grad(meta: Fp8Meta, a) -> Fp8Meta:
    """The cotangent of a meta: scale 0, history [a, 0, ...]: the observation update_meta rolls in."""
    hist = jnp.zeros(meta.amax_history.shape, F32).at[..., 0].set(a)
    return Fp8Meta(jnp.zeros(jnp.shape(meta.scale), F32), hist)


def _descale(sa, sb):
    """1 / (sa * sb) as the product of the reciprocals (llm.c's "descale"): one scalar multiply of
    the dot's output, the form cuBLASLt takes as alpha. sa * sb itself could overflow; this product
    underflows only if both operands' amaxes are below ~5e-17 (the output is then 0, still finite)."""
    return (1.0 / sa) * (1.0 / sb)


def _fp8_dot(a_q, b_q, contract, precision):
    return lax.dot_general(a_q, b_q, ((contract[0], contract[1]), ((), ())),
                           precision=precision, preferred_element_type=F32)


# ----------------------------------------------------------------------------------------------
# out = x @ w.T + b with x, w quantized to e4m3 and the output gradient to e5m2

def fp8_matmul(x_BTC, w_OC, b, metas: MatmulMetas, *, recipe: str = "delayed", margin: float = 0.0):
    """ops.matmul in FP8 (see the module doc): x (..., C) in bf16 or fp32, w (OC, C) the float32
    master weight, b (OC,) or None; the output (..., OC) in x's dtype. `metas` is differentiable:
    its gradient carries the amaxes of x, w and dout observed this step (`observed_amax`).
    recipe and margin are static; margin only matters to the `current` recipe here (delayed
    scaling applies it in update_meta)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return _fp8_matmul(recipe, float(margin), x_BTC, w_OC, b, metas)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_matmul(recipe, margin, x, w, b, metas):
    return _fp8_matmul_fwd(recipe, margin, x, w, b, metas)[0]


def _fp8_matmul_fwd(recipe, margin, x, w, b, metas):
    ax, aw = amax(x), amax(w)
    sx = _scale(recipe, metas.x, ax, E4M3_MAX, margin)
    sw = _scale(recipe, metas.w, aw, E4M3_MAX, margin)
    x_q, w_q = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
    acc = _fp8_dot(x_q, w_q, ((x.ndim - 1,), (1,)), ops.MATMUL_PRECISION)          # (..., OC) fp32
    out = acc * _descale(sx, sw)
    out = (out if b is None else out + b.astype(F32)).astype(x.dtype)
    # the tables of dtypes travel as empty arrays (as in ops); the metas are a few floats
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype), None if b is None else jnp.zeros((0,), b.dtype))
    return out, (_bits(x_q), _bits(w_q), sx, sw, ax, aw, metas, dtypes)


def _bits(q) -> jax.Array:
    """An e4m3 residual kept as its bytes. jax.checkpoint rounds every floating residual it saves
    with reduce_precision(finfo's exponent and mantissa bits), which has IEEE semantics: for
    e4m3fn (no infinities, max 448) that turns every value above 240 into inf, and the backward
    into NaN (any -r that saves x_q, with FP8 on). An integer residual is left alone."""
    return lax.bitcast_convert_type(q, jnp.uint8)


def _fp8_matmul_bwd(recipe, margin, res, dout):
    x_bits, w_bits, sx, sw, ax, aw, metas, (x_dt, w_dt, b_dt) = res
    x_q, w_q = lax.bitcast_convert_type(x_bits, E4M3), lax.bitcast_convert_type(w_bits, E4M3)
    OC, C = w_q.shape
    ad = amax(dout)
    sd = _scale(recipe, metas.dout, ad, E5M2_MAX, margin)
    d_q = quantize(dout, sd, E5M2)
    dx = _fp8_dot(d_q, w_q, ((dout.ndim - 1,), (0,)), BACKWARD_PRECISION) * _descale(sd, sw)
    dw = _fp8_dot(d_q.reshape(-1, OC), x_q.reshape(-1, C), ((0,), (0,)), BACKWARD_PRECISION) * _descale(sd, sx)
    db = None if b_dt is None else ops._sum_leading(dout).astype(b_dt.dtype)
    meta_grads = MatmulMetas(_meta_grad(metas.x, ax), _meta_grad(metas.w, aw), _meta_grad(metas.dout, ad))
    return dx.astype(x_dt.dtype), dw.astype(w_dt.dtype), db, meta_grads


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def _qdq(v, scale, dtype):
    """v quantized and dequantized; JAX differentiates it as the identity (straight through): the
    value is exactly the dequantized q (q + (v - v)), the gradient passes unrounded."""
    v32 = v.astype(F32)
    return lax.stop_gradient(dequantize(quantize(v32, scale, dtype), scale)) + (v32 - lax.stop_gradient(v32))


def fp8_matmul_reference(x_BTC, w_OC, b, metas: MatmulMetas, *, recipe: str = "delayed", margin: float = 0.0):
    """Plain jnp with the same quantization of x and w (same scales, same clip and cast), then a
    float32 einsum of the dequantized values. Its forward equals fp8_matmul's up to float32
    rounding; jax.vjp of it is the exact gradient of that forward with respect to the quantized
    operands (straight-through), i.e. fp8_matmul's backward without the e5m2 rounding of dout.
    The metas get no gradient here."""
    metas = lax.stop_gradient(metas)
    sx = lax.stop_gradient(_scale(recipe, metas.x, amax(x_BTC), E4M3_MAX, margin))
    sw = lax.stop_gradient(_scale(recipe, metas.w, amax(w_OC), E4M3_MAX, margin))
    y = jnp.einsum("...c,oc->...o", _qdq(x_BTC, sx, E4M3), _qdq(w_OC, sw, E4M3),
                   precision=lax.Precision.HIGHEST, preferred_element_type=F32)
    return (y if b is None else y + b.astype(F32)).astype(x_BTC.dtype)
