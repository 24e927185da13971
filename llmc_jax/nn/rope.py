"""Rotary position embedding (RoPE) for Llama 3, as llm.c's train_llama3.py computes it.

Two pieces. `rope_frequencies` builds the (maxT, HS/2, 2) [cos, sin] table once on the host, in
float32, step by step as PyTorch does (with the Llama 3.1 frequency scaling). `rope` rotates the
interleaved channel pairs (2i, 2i+1) = (real, imag) of q or k (Meta's layout, not HF's rotate-half)
by the angle of each position; it is a `jax.custom_vjp` whose backward is the transpose rotation,
so nothing but the table rows is saved.

Float32 rounding matched (PyTorch CPU semantics; a Python number meeting a float32 tensor is first
rounded to float32, and `a / tensor` is evaluated as `tensor.reciprocal() * a`):
  base:    e = fl(fl(2i) / HS); f = fl(1 / fl(theta ** e))
  3.1:     wavelen = fl(fl(1/f) * fl32(2*math.pi))          (2*math.pi is a double, rounded to float32)
           wavelen < 2048 -> f;  wavelen > 8192 -> f / 8 (exact)
           else smooth = fl(fl(fl(1/wavelen) * 8192 - 1) / 3), f = fl(fl(fl(1 - smooth) * f) / 8 + fl(smooth * f))
  table:   angle = fl(t * f) (torch.outer), cos/sin of the float32 angle.
`theta ** e`, cos and sin are evaluated in float64 and rounded once, i.e. correctly rounded float32;
PyTorch calls glibc powf/cosf/sinf per element (and SLEEF's 1-ulp powf on vectorised chunks of
>= 16 frequencies), which agree with this except, rarely, by one ulp.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32



class RopeScaling(NamedTuple):
    """Llama 3.1's frequency scaling constants (HF's rope_scaling {"rope_type": "llama3", ...}).

    train_llama3.py hard-codes Llama 3.1's (8, 1, 4, 8192); Llama 3.2 checkpoints use factor 32."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_maxT: int = 8192


LLAMA31_SCALING = RopeScaling()


def _f32(v) -> np.float32:
    return np.float32(v)


def _rdiv(a, x: np.ndarray) -> np.ndarray:
    """PyTorch's `a / tensor` (Tensor.__rtruediv__): reciprocal, then times a rounded to float32."""
    return (_f32(1) / x) * _f32(a)


def _scale_llama31(f: np.ndarray, sc: RopeScaling) -> np.ndarray:
    """apply_scaling: keep high frequencies, divide low ones by the factor, blend the band between."""
    low_freq_wavelen = sc.original_maxT / sc.low_freq_factor       # 8192: longer wavelengths are divided
    high_freq_wavelen = sc.original_maxT / sc.high_freq_factor     # 2048: shorter wavelengths are kept
    wavelen = _rdiv(2 * math.pi, f)
    smooth = (_rdiv(sc.original_maxT, wavelen) - _f32(sc.low_freq_factor)) / _f32(sc.high_freq_factor - sc.low_freq_factor)
    blended = (_f32(1) - smooth) * f / _f32(sc.factor) + smooth * f
    out = np.where(wavelen > _f32(low_freq_wavelen), f / _f32(sc.factor), blended)
    return np.where(wavelen < _f32(high_freq_wavelen), f, out).astype(np.float32)


def rope_angular_frequencies(HS: int, theta: float, use_scaled_rope: bool,
                             scaling: RopeScaling = LLAMA31_SCALING) -> np.ndarray:
    """The HS/2 float32 angular frequencies of the channel pairs (scaled as Llama 3.1 when asked)."""
    exponent = np.arange(0, HS, 2)[: HS // 2].astype(np.float32) / _f32(HS)
    power = (np.float64(_f32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    f = _rdiv(1.0, power)
    return _scale_llama31(f, scaling) if use_scaled_rope else f


def rope_frequencies(HS: int, maxT: int, theta: float, use_scaled_rope: bool,
                     scaling: RopeScaling = LLAMA31_SCALING) -> np.ndarray:
    """The (maxT, HS/2, 2) float32 [cos, sin] table of train_llama3.py's precompute_freqs_cis."""
    f = rope_angular_frequencies(HS, theta, use_scaled_rope, scaling)
    angle = np.outer(np.arange(maxT, dtype=np.float32), f).astype(np.float64)   # float32 products, exact in f64
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the rotation

def _rotate_pairs(x_BTNH, cos_TH, sin_TH):
    """(xr, xi) -> (xr*c - xi*s, xr*s + xi*c) on interleaved pairs, in fp32, back in x's dtype."""
    x = x_BTNH.astype(F32).reshape(*x_BTNH.shape[:-1], -1, 2)
    xr, xi = x[..., 0], x[..., 1]
    c, s = cos_TH[:, None, :].astype(F32), sin_TH[:, None, :].astype(F32)   # broadcast over heads
    out = jnp.stack([xr * c - xi * s, xr * s + xi * c], axis=-1)
    return out.reshape(x_BTNH.shape).astype(x_BTNH.dtype)


@jax.custom_vjp
def _rope(x_BTNH, cs_TH2):
    return _rotate_pairs(x_BTNH, cs_TH2[..., 0], cs_TH2[..., 1])


def _rope_fwd(x_BTNH, cs_TH2):
    return _rope(x_BTNH, cs_TH2), cs_TH2           # a rotation is linear: only the table rows are saved


def _rope_bwd(cs_TH2, dout_BTNH):
    # the transpose of a rotation is the rotation by -angle: (dr, di) -> (dr*c + di*s, -dr*s + di*c).
    # The table gets no gradient (None = zero): it is a host-computed constant, never a parameter.
    return _rotate_pairs(dout_BTNH, cs_TH2[..., 0], -cs_TH2[..., 1]), None


_rope.defvjp(_rope_fwd, _rope_bwd)


def _table_rows(freqs_cis, pos, T: int):
    """Rows pos..pos+T-1 of the table. A traced pos past the end is clamped by dynamic_slice."""
    maxT = freqs_cis.shape[0]
    if T > maxT or (isinstance(pos, (int, np.integer)) and not 0 <= pos <= maxT - T):
        raise ValueError(f"RoPE rows {pos}..{pos}+{T} exceed the table's {maxT} positions")
    return lax.dynamic_slice_in_dim(jnp.asarray(freqs_cis), pos, T, axis=0)


def rope(x_BTNH: jax.Array, freqs_cis: jax.Array | np.ndarray, pos: int | jax.Array = 0) -> jax.Array:
    """Rotate q or k (B, T, N, HS) by positions pos..pos+T-1 of the (maxT, HS/2, 2) table.

    pos may be traced (KV-cache decoding); the output has x's dtype, the math is fp32."""
    if x_BTNH.ndim != 4 or freqs_cis.shape[1:] != (x_BTNH.shape[3] // 2, 2) or x_BTNH.shape[3] % 2:
        raise ValueError(f"rope: x {x_BTNH.shape} does not fit the table {freqs_cis.shape}")
    return _rope(x_BTNH, _table_rows(freqs_cis, pos, x_BTNH.shape[1]))


def rope_reference(x_BTNH: jax.Array, freqs_cis: jax.Array | np.ndarray, pos: int | jax.Array = 0) -> jax.Array:
    """Plain jnp, complex math as train_llama3.py's apply_rotary_emb; JAX differentiates it itself."""
    cs = lax.dynamic_slice_in_dim(jnp.asarray(freqs_cis, F32), pos, x_BTNH.shape[1], axis=0)
    rot = lax.complex(cs[..., 0], cs[..., 1])[:, None, :]                    # (T, 1, HS/2)
    x = x_BTNH.astype(F32).reshape(*x_BTNH.shape[:-1], -1, 2)
    y = lax.complex(x[..., 0], x[..., 1]) * rot
    return jnp.stack([y.real, y.imag], axis=-1).reshape(x_BTNH.shape).astype(x_BTNH.dtype)
