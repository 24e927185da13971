"""llm.c's random init (`-e d12`, `gpt2:dN`, `gpt3:cN`), reproduced bit for bit in numpy.

llm.c's `gpt_build_from_descriptor` (train_gpt2.cu) seeds a Mersenne Twister with 42 exactly as
`torch.manual_seed(42)` does and fills the weights with a port of torch's CPU `normal_`
(llmc/rand.h). This module redoes that draw for draw:

* MT19937: 624-word `init_genrand` key (torch / llm.c `manual_seed`), raw 32-bit outputs taken from
  numpy's legacy `RandomState` (its `randint(0, 2**32, dtype=uint32)` returns the tempered words
  unchanged; the legacy stream is frozen by NEP 19).
* `normal_` for numel >= 16: all numel uniforms `(w & 0xFFFFFF) * 2**-24` are drawn first; every full
  block of 16 is Box-Muller'd pairwise (u1 from slot j, u2 from slot j+8, cos into j, sin into j+8);
  if numel % 16 != 0 the last 16 slots are overwritten from 16 *fresh* uniforms.
  Per pair, in float32: radius = sqrtf(-2 * logf((1 - u) + 1e-12f)), theta = (float)(2.0*M_PI*u2),
  out = radius * cos(theta) * std + mean (and sin for the second half).
* `normal_` for numel < 16: llm.c's float64-uniform path (two 64-bit words per uniform, one cos/sin
  pair per two outputs, no state kept between calls). Model init never takes it.
* Order (llm.c's, which is PyTorch's module order in train_gpt2.py): wte (only the first V rows,
  one normal_ call over V*C values), wpe, then layer by layer qkvw[l], attprojw[l], fcw[l],
  fcprojw[l]; std 0.02, residual projections 0.02f * (1.0f / sqrtf(2.0f * L)) computed in float32.
  LayerNorm weights 1, every bias and the padded wte rows 0.

logf and sincosf are taken from the C math library llm.c links against (gcc -O2+ merges rand.h's
cosf(theta) / sinf(theta) pair into one sincosf call). glibc's are not correctly rounded: 0.7% of
the 2**24 possible logf inputs here and 1.3% of the cos/sin inputs differ by one ulp from the
correctly rounded value (identically with and without its FMA variants), so float64 numpy would not
give llm.c's bits. As a uniform takes only 2**24 values, BoxMullerTables tabulates radius, cos and
sin over all of them (192 MiB, ~1.5 s) through a two-loop C helper compiled on first use with `cc`;
without a compiler the tables come from libm one value at a time through ctypes (~30 s), and
without libm from float64 numpy (close, not bitwise; a warning says so). `init_params_llmc` builds
the tables once per call unless it is handed a BoxMullerTables.

Checked bit for bit against llm.c's rand.h + gpt_build_from_descriptor loop compiled with g++ -O3
(glibc 2.36, x86-64): full d6, d12 and d48 buffers, and normal_ calls of sizes < 16, 16..17 and
non-multiples of 16. PyTorch differs: its CPU normal_ uses an AVX2 kernel with its own float
log/sincos approximations on AVX2 machines, so `torch.manual_seed(42); t.normal_(0, 0.02)` differs
from llm.c in the last bits of ~36% of the values (max abs diff ~5e-8); with
ATEN_CPU_CAPABILITY=default torch takes the scalar kernel llm.c ported and matches
`BoxMullerTables(eps=0)` bitwise over d12's whole draw sequence, and llm.c's tables everywhere but
where the 1e-12f epsilon changes logf of a tiny u1 (315 of d12's 124M values). train_gpt2.py's
residual std float(0.02 / sqrt(2L)) is also one ulp above llm.c's float32 one for some L (6, 24, ...,
not 12 or 48). Torch's < 16 path differs too (float64 math, a sample cached in the generator).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings

import numpy as np

from llmc_jax.models.config import GPTConfig
from llmc_jax.paths import cache_root
from llmc_jax.formats.rand import MT19937

INIT_SEED = 42
_N24 = 1 << 24
_EPS = np.float32(1e-12)          # llm.c's EPSILONE (1e-12f), added to u1 before logf
_TWO_PI = 2.0 * math.pi           # 2.0 * M_PI, a double
_CHUNK_BLOCKS = 1 << 16           # 16-value blocks drawn per step (1 Mi words) to bound temporaries


# ------------------------------------------------------------------ Mersenne Twister (torch seeding)

class TorchMT19937(MT19937):
    """The MT19937 stream llm.c's init draws from; `words` is llm.c's randint32."""

    def __init__(self, seed: int = INIT_SEED):
        super().__init__(seed)

    def words(self, n: int) -> np.ndarray:
        return self.randint32(n)


# ------------------------------------------------------------------ the C math library's logf / sincosf

_HELPER_SRC = r"""
#define _GNU_SOURCE
#include <math.h>
void llmc_logf(const float *x, float *y, long n) { for (long i = 0; i < n; i++) y[i] = logf(x[i]); }
void llmc_sincosf(const float *x, float *s, float *c, long n) {
    for (long i = 0; i < n; i++) sincosf(x[i], &s[i], &c[i]);
}
"""

_helper = None          # ctypes library, False once building it failed
_libm = None            # ctypes libm, False when not found


def _build_helper():
    """Compile the two-loop C helper (plain -O2, no fast-math, no contraction) and load it."""
    global _helper
    if _helper is not None:
        return _helper or None
    cc = shlex.split(os.environ.get("CC", "")) or [p for p in (shutil.which(c) for c in ("cc", "gcc", "clang")) if p][:1]
    if not cc:
        _helper = False
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="llmc_init_") as d:
            src, so = os.path.join(d, "libm_tab.c"), os.path.join(d, "libm_tab.so")
            with open(src, "w") as f:
                f.write(_HELPER_SRC)
            subprocess.run(cc + ["-O2", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared",
                                 "-o", so, src, "-lm"], check=True, capture_output=True, timeout=120)
            lib = ctypes.CDLL(so)  # stays mapped after the file is removed
    except (OSError, subprocess.SubprocessError):
        _helper = False
        return None
    lib.llmc_logf.restype = None
    lib.llmc_logf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.llmc_sincosf.restype = None
    lib.llmc_sincosf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    _helper = lib
    return lib


def _load_libm():
    global _libm
    if _libm is None:
        name = ctypes.util.find_library("m")
        try:
            lib = ctypes.CDLL(name) if name else ctypes.CDLL(None)
            logf, sincosf = lib.logf, lib.sincosf
        except (OSError, AttributeError):
            _libm = False
            return None
        logf.restype, logf.argtypes = ctypes.c_float, [ctypes.c_float]
        sincosf.restype = None
        sincosf.argtypes = [ctypes.c_float, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
        _libm = lib
    return _libm or None


def _warn_slow(method: str, n: int) -> None:
    if method == "auto" and n > 1 << 20:
        warnings.warn("llmc_init: no C compiler found; tabulating libm through ctypes one value at a time "
                      "(about 30 s for llm.c's init tables)")


def libm_logf(x: np.ndarray, method: str = "auto") -> np.ndarray:
    """logf of a float32 array, as the C library computes it (see module docstring for `method`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    if method in ("auto", "compiled") and (lib := _build_helper()) is not None:
        lib.llmc_logf(x.ctypes.data, y.ctypes.data, x.size)
    elif method in ("auto", "ctypes") and (m := _load_libm()) is not None:
        _warn_slow(method, x.size)
        y[...] = np.fromiter(map(m.logf, x.ravel().tolist()), dtype=np.float32, count=x.size).reshape(x.shape)
    elif method in ("auto", "numpy"):
        if method == "auto":
            warnings.warn("llmc_init: no C math library reachable; logf from float64 numpy is not bitwise llm.c")
        y[...] = np.log(x.astype(np.float64)).astype(np.float32)
    else:
        raise RuntimeError(f"libm_logf: method {method!r} is not available here")
    return y


def libm_sincosf(x: np.ndarray, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(sinf, cosf) of a float32 array via the C library's sincosf (what gcc -O2+ turns llm.c's
    adjacent sinf(theta) / cosf(theta) calls into)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    s, c = np.empty_like(x), np.empty_like(x)
    if method in ("auto", "compiled") and (lib := _build_helper()) is not None:
        lib.llmc_sincosf(x.ctypes.data, s.ctypes.data, c.ctypes.data, x.size)
    elif method in ("auto", "ctypes") and (m := _load_libm()) is not None:
        _warn_slow(method, x.size)
        sv, cv = ctypes.c_float(), ctypes.c_float()
        ps, pc = ctypes.byref(sv), ctypes.byref(cv)
        sf, cf = s.reshape(-1), c.reshape(-1)
        for i, v in enumerate(x.reshape(-1).tolist()):
            m.sincosf(v, ps, pc)
            sf[i], cf[i] = sv.value, cv.value
    elif method in ("auto", "numpy"):
        if method == "auto":
            warnings.warn("llmc_init: no C math library reachable; sin/cos from float64 numpy are not bitwise llm.c")
        x64 = x.astype(np.float64)
        s[...], c[...] = np.sin(x64), np.cos(x64)
    else:
        raise RuntimeError(f"libm_sincosf: method {method!r} is not available here")
    return s, c


# ------------------------------------------------------------------ Box-Muller tables over the 2**24 uniforms

def uniform_f32(k: np.ndarray) -> np.ndarray:
    """llm.c's randfloat32 for 24-bit integers k: k * 2**-24 (exact in float32)."""
    return k.astype(np.float32) * np.float32(1.0 / _N24)


def radius_f32(u: np.ndarray, method: str = "auto", eps: float = 1e-12) -> np.ndarray:
    """sqrtf(-2 * logf((1 - u) + 1e-12f)) in float32, for normal_fill_16's u1 slot values u."""
    x = (np.float32(1.0) - u) + np.float32(eps)
    return np.sqrt(np.float32(-2.0) * libm_logf(x, method))


def theta_f32(u: np.ndarray) -> np.ndarray:
    """(float)(2.0 * M_PI * u): the product in float64, then rounded to float32."""
    return (_TWO_PI * u.astype(np.float64)).astype(np.float32)


class BoxMullerTables:
    """radius[k] and (cos, sin)[k] for every 24-bit uniform k; 192 MiB in all.

    eps=0 gives torch's scalar (non-AVX2) normal_fill_16 instead of llm.c's, which adds 1e-12f to u1.
    """

    def __init__(self, method: str = "auto", eps: float = 1e-12):
        u = uniform_f32(np.arange(_N24, dtype=np.uint32))
        self.radius = radius_f32(u, method, eps)
        s, c = libm_sincosf(theta_f32(u), method)
        cs = np.empty((_N24, 2), dtype=np.float32)   # cos, sin side by side: one gather fetches both
        cs[:, 0], cs[:, 1] = c, s
        self.cossin = cs.view(np.uint64).reshape(_N24)


# ------------------------------------------------------------------ normal_

def _box_muller_blocks(k: np.ndarray, out: np.ndarray, tables: BoxMullerTables, mean: np.float32,
                       std: np.float32) -> None:
    """k: (nb, 16) 24-bit uniforms; out: (nb, 16) float32, written as normal_fill_16 does."""
    k = k.reshape(-1, 2, 8)
    out = out.reshape(-1, 2, 8)
    r = np.take(tables.radius, k[:, 0, :])                                   # (nb, 8)
    cs = np.take(tables.cossin, k[:, 1, :]).view(np.float32).reshape(-1, 8, 2)
    np.multiply(r[:, None, :], cs.transpose(0, 2, 1), out=out)  # [:, 0] radius*cos, [:, 1] radius*sin
    np.multiply(out, std, out=out)
    np.add(out, mean, out=out)               # kept even for mean 0: turns -0.0 into +0.0 as C does


def _normal_small(out: np.ndarray, mean: np.float32, std: np.float32, rng: TorchMT19937) -> None:
    """llm.c's numel < 16 path (float64 uniforms, float math, a cached second sample per pair)."""
    n = out.size
    npairs = (n + 1) // 2
    w = rng.words(4 * npairs).astype(np.uint64).reshape(npairs, 2, 2)
    # randint64: the first 32-bit draw is the high word
    u = (((w[:, :, 0] << np.uint64(32)) | w[:, :, 1]) & np.uint64((1 << 53) - 1)).astype(np.float64)
    u = (u * (1.0 / (1 << 53))).astype(np.float32)          # (float) randfloat64
    u1, u2 = u[:, 0], u[:, 1]
    radius = np.sqrt(np.float32(-2.0) * libm_logf((np.float32(1.0) - u2) + _EPS))
    s, c = libm_sincosf(theta_f32(u1))
    first = radius * c * std + mean                              # float32 arithmetic
    second = ((radius * s).astype(np.float64) * np.float64(std) + np.float64(mean)).astype(np.float32)
    pairs = np.stack([first, second], axis=1).reshape(-1)
    out.reshape(-1)[:] = pairs[:n]


def normal_(out: np.ndarray, mean: float, std: float, rng: TorchMT19937,
            tables: BoxMullerTables | None = None) -> np.ndarray:
    """Fill the float32 array `out` in place exactly as llm.c's normal_(out, numel, mean, std, rng)."""
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("normal_: out must be a C-contiguous float32 array")
    flat = out.reshape(-1)
    n = flat.size
    mean, std = np.float32(mean), np.float32(std)
    if n == 0:
        return out
    if n < 16:
        _normal_small(flat, mean, std, rng)
        return out
    if tables is None:
        tables = BoxMullerTables()
    nb = n // 16
    body = flat[: nb * 16].reshape(nb, 16)
    mask = np.uint32(_N24 - 1)
    for b0 in range(0, nb, _CHUNK_BLOCKS):
        b1 = min(nb, b0 + _CHUNK_BLOCKS)
        k = rng.words((b1 - b0) * 16)
        np.bitwise_and(k, mask, out=k)
        _box_muller_blocks(k.reshape(-1, 16), body[b0:b1], tables, mean, std)
    if n % 16:
        rng.words(n % 16)                    # the first pass drew uniforms for these slots too
        k = rng.words(16)
        np.bitwise_and(k, mask, out=k)
        tail = np.empty((1, 16), dtype=np.float32)
        _box_muller_blocks(k.reshape(1, 16), tail, tables, mean, std)
        flat[n - 16:] = tail[0]
    return out


# ------------------------------------------------------------------ the model

def residual_std(L: int) -> np.float32:
    """llm.c's std for attprojw / fcprojw: 0.02f * (1.0f / sqrtf(2.0f * L)), all in float32."""
    return np.float32(0.02) * (np.float32(1.0) / np.sqrt(np.float32(2.0) * np.float32(L)))


def init_params_llmc(config: GPTConfig, seed: int = INIT_SEED,
                     tables: BoxMullerTables | None = None) -> dict[str, np.ndarray]:
    """llm.c's `-e dN` weights for `config`: float32 arrays keyed and shaped as config.param_shapes()."""
    shapes = config.param_shapes()
    params = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    for name in ("ln1w", "ln2w", "lnfw"):
        params[name].fill(1.0)
    if tables is None:
        tables = BoxMullerTables()
    rng = TorchMT19937(seed)
    std, rstd = np.float32(0.02), residual_std(config.L)
    normal_(params["wte"][: config.V], 0.0, std, rng, tables)   # rows V..Vp-1 stay zero
    normal_(params["wpe"], 0.0, std, rng, tables)
    for l in range(config.L):
        for name, s in (("qkvw", std), ("attprojw", rstd), ("fcw", std), ("fcprojw", rstd)):
            normal_(params[name][l], 0.0, s, rng, tables)
    return params


# Inits at least this large are kept in the cache (d12: 0.5 GB, ~5 s to draw, 0.4 s to read back).
INIT_CACHE_MIN_PARAMS, INIT_CACHE_MAX_PARAMS = 10_000_000, 500_000_000


def init_params(config: GPTConfig) -> dict[str, np.ndarray]:
    """llm.c's random init, bit for bit (`-e d12` here gives llm.c's `-e d12` weights):
    N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), layernorm weights 1, biases 0.

    Drawing it bit-exactly costs seconds for GPT-2 sizes, so mid-sized inits are kept as llm.c
    model files under the llmc_jax cache root and read back on the next start."""
    from llmc_jax.formats import llmc_format
    if not INIT_CACHE_MIN_PARAMS <= config.num_parameters <= INIT_CACHE_MAX_PARAMS:
        return init_params_llmc(config)
    c = config
    path = os.path.join(cache_root(), "init", f"llmc_L{c.L}_NH{c.NH}_C{c.C}_T{c.maxT}_V{c.V}_{c.Vp}.bin")
    if os.path.exists(path):
        try:
            cached_config, params = llmc_format.read_model(path)
            if cached_config == config:
                return params
        except llmc_format.LLMCFormatError:
            pass                                 # damaged: draw again and overwrite
    params = init_params_llmc(config)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        llmc_format.write_model(path, config, params)
    except OSError:
        pass                                     # no writable cache: just slower next time
    return params
