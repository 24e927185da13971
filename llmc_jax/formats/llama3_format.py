"""llm.c's Llama 3 files (branch `llama3`, train_llama3.py's write_model / write_state): model and debug state.

Model .bin (magic 20240803): an int32 header of 256 slots, then a float32 header of 256 slots, then
the tensors, all fp32 (version 3) or all bf16 (version 5, round-to-nearest-even bits):

  int   0 magic 20240803, 1 version, 2 maxT (block_size), 3 V, 4 L, 5 NH, 6 NKV, 7 C, 8 multiple_of,
        9 use_scaled_rope (0/1), 10 major, 11 minor (of the Llama version), 12..255 zero
  float 0 ffn_dim_multiplier, 1 norm_eps, 2 rope_theta, 3..255 zero (llm.c's C checkpoint writer
        leaves them uninitialised, so they are not checked). Ours only: a RoPE scaling other than
        train_llama3.py's fixed Llama 3.1 constants (a Llama 3.2 checkpoint from Hugging Face has
        factor 32) is kept as 3 = SCALING_MARK, 4..7 = factor, low_freq_factor, high_freq_factor,
        original_maxT; files of the default scaling stay byte for byte what llm.c writes.

The tensors keep GPT-2's 16 slots by llm.c's three hacks: slot 1 (GPT-2's wpe) holds lm_head, every
bias slot is written as zeros (Llama has no biases), and fcw holds per layer [up (c_fc) rows; gate
(c_fc2) rows]. Per-layer tensors are stacked over L, as in GPT-2's file. In memory we keep only the
real tensors, LlamaConfig.param_shapes(): the bias slots are checked to be zero and dropped.

The floats are stored as float32; reading takes each as the shortest decimal that rounds to that
float32 (1.3 reads back as 1.3, not 1.2999999523...), which is the value train_llama3.py wrote for
any config with up to 7 significant digits. That matters because LlamaConfig.hidden truncates
ffn_dim_multiplier * int(8C/3) as train_llama3.py does in float64: with the float32 value itself a
product that lands on an integer (1.3 * 10) would truncate one lower than the writer's, and the file
size would not match. A config without ffn_dim_multiplier (None) is written as 1.0, which gives the
same hidden size (and is what llm.c's C reader needs); it reads back as 1.0. The branch always writes
lm_head, so a file reads as tied=False; a tied config is written with wte in slot 1, as llm.c exports
the tied Llama 3.2 models.

llm.c master's train_llama3.py writes a different, lossy file under the same magic (one int header,
ffn_dim_multiplier and norm_eps cast to int, lm_head last); it is refused with its own message.

Debug state (same magic, version 3): int header [magic, 3, B, T, steps], x and y (B*T int32 each),
logits (B*T*V float32), loss (1 float32), the gradients of all 16 slots in float32 (zero bias slots),
then the training history: `steps` losses and `steps` gradient norms (float32).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmc_jax.formats.llmc_format import (HEADER_BYTES, HEADER_INTS, LLMCFormatError, atomic_write,
                                          check_size, read_header, to_bf16_bits, debug_state_body)
from llmc_jax.models.llama_config import LlamaConfig
from llmc_jax.nn.rope import LLAMA31_SCALING

MAGIC = 20240803
MODEL_VERSIONS = {3: "fp32", 5: "bf16"}
DEBUG_STATE_VERSION = 3
MODEL_HEADER_BYTES = 2 * HEADER_BYTES        # int header + float header
SCALING_MARK = 1234.5                        # float slot 3: slots 4..7 hold a non-default RoPE scaling

# The 16 tensors of the file, in order: (llm.c's name, our name, or None for a zero bias slot and
# the weight whose leading dims it has).
FILE_SLOTS: tuple[tuple[str, str | None, str], ...] = (
    ("wte", "wte", ""), ("wlmhead", "lm_head", ""), ("ln1w", "ln1w", ""), ("ln1b", None, "ln1w"),
    ("qkvw", "qkvw", ""), ("qkvb", None, "qkvw"), ("attprojw", "attprojw", ""), ("attprojb", None, "attprojw"),
    ("ln2w", "ln2w", ""), ("ln2b", None, "ln2w"), ("fcw", "fcw", ""), ("fcb", None, "fcw"),
    ("fcprojw", "fcprojw", ""), ("fcprojb", None, "fcprojw"), ("lnfw", "lnfw", ""), ("lnfb", None, "lnfw"),
)
_NORMS = {"ln1w", "ln2w", "lnfw"}    # their bias has the weight's shape; a matrix's drops the input dim

_WHAT_MODEL = "an llm.c Llama 3 model checkpoint (train_llama3.py of the llama3 branch)"
_WHAT_STATE = "an llm.c Llama 3 debug state (train_llama3.py of the llama3 branch)"
_REEXPORT = "re-export it with the llama3 branch's train_llama3.py (--write_tensors 1)"


def file_shapes(config: LlamaConfig) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """(llm.c name, our name or None for a bias slot, shape) of the 16 file tensors, in file order."""
    weights = dataclasses.replace(config, tied=False).param_shapes()
    out = []
    for llmc_name, ours, weight in FILE_SLOTS:
        if ours is not None:
            out.append((llmc_name, ours, weights[ours]))
        else:
            shape = weights[weight]
            out.append((llmc_name, None, shape if weight in _NORMS else shape[:-1]))
    return out


def file_num_parameters(config: LlamaConfig) -> int:
    """Floats in the file's tensor section: the real parameters (untied) plus the zero bias slots."""
    return sum(math.prod(shape) for _, _, shape in file_shapes(config))


def _decimal(x: np.float32) -> float:
    """The shortest decimal that rounds to this float32, as a Python float (1.3f -> 1.3)."""
    return float(str(np.float32(x)))


def _split_checked(path: str | os.PathLike, flat: np.ndarray, config: LlamaConfig,
                   what: str) -> dict[str, np.ndarray]:
    """Views of the 16 slots of a flat buffer; every bias slot must be zero; returns ours only."""
    out, pos = {}, 0
    for slot, (llmc_name, ours, shape) in enumerate(file_shapes(config)):
        n = math.prod(shape)
        view = flat[pos:pos + n]
        pos += n
        if ours is not None:
            out[ours] = view.reshape(shape)
            continue
        bad = view != 0
        if bad.any():
            k = int(np.argmax(bad))
            raise LLMCFormatError(
                f"{os.fspath(path)}: {what} bias slot {slot} ({llmc_name}, shape {shape}) holds nonzero "
                f"values (first {float(view[k])!r} at flat index {k}); Llama 3 has no biases and llm.c's llama3 "
                f"export writes zeros there, so the file is corrupt or from another writer")
    return out


def _checked_arrays(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]], params: Mapping[str, Any],
                    what: str, config: LlamaConfig) -> dict[str, np.ndarray]:
    arrays = {}
    for name, shape in shapes.items():
        if name not in params:
            raise LLMCFormatError(f"{os.fspath(path)}: {what} lacks tensor {name!r}; need all of "
                                  f"{', '.join(shapes)}")
        a = np.asarray(params[name])
        if a.shape != shape:
            raise LLMCFormatError(f"{os.fspath(path)}: {what} tensor {name!r} has shape {a.shape}, expected "
                                  f"{shape} for {config.describe()}")
        arrays[name] = a
    return arrays


# ---------------------------------------------------------------- model .bin

def _refuse_other_headers(path: str, h: np.ndarray) -> None:
    """Same magic, other layouts: llm.c master's lossy header, a debug state, PR #803's header."""
    if h[14] != 0 and h[10] == 0:
        # master: slot 10 = int(norm_eps) = 0, slots 12..15 = use_scaled_rope, max_gen_batch_size,
        # major (3), minor; the branch has its major version (3) in slot 10 and zeros from slot 12 on
        raise LLMCFormatError(
            f"{path}: this is llm.c master's lossy Llama 3 header (int header only: ffn_dim_multiplier and "
            f"norm_eps stored as ints {int(h[8])} and {int(h[10])}, major version in slot 14, lm_head written "
            f"last), which cannot be read faithfully; {_REEXPORT}")
    if h[5] == 0 and not h[5:].any():
        raise LLMCFormatError(
            f"{path}: int header slots 5..255 are all zero (n_head 0): this looks like a Llama 3 debug state "
            f"(same magic 20240803, B/T/steps in slots 2..4), not a model; give the model .bin")
    nonzero = np.flatnonzero(h[12:])
    if nonzero.size:
        k = 12 + int(nonzero[0])
        raise LLMCFormatError(
            f"{path}: int header slot {k} is {int(h[k])}, but the llama3 branch's train_llama3.py writes zeros "
            f"in slots 12..255 (PR #803's tied-embedding header moves major/minor to slots 11/12 and is another "
            f"format); the file is corrupt or from another writer; {_REEXPORT}")


def read_model_header(path: str | os.PathLike) -> tuple[LlamaConfig, int]:
    """Config and version (3 fp32, 5 bf16) of a Llama 3 model .bin, with its length checked, no weights."""
    header, size = read_header(path, MAGIC, MODEL_VERSIONS,
                                "Use 3 (fp32) or 5 (bf16), as written by the llama3 branch's train_llama3.py",
                                what=_WHAT_MODEL)
    path = os.fspath(path)
    _refuse_other_headers(path, header)
    if size < MODEL_HEADER_BYTES:
        raise LLMCFormatError(
            f"{path}: file is {size} bytes, shorter than the {MODEL_HEADER_BYTES}-byte Llama 3 header (256 int32 "
            f"then 256 float32); it is truncated (re-download or re-write it)")
    floats = np.fromfile(path, dtype="<f4", count=HEADER_INTS, offset=HEADER_BYTES)
    mult, eps, theta = (float(v) for v in floats[:3])
    if not all(math.isfinite(v) and v > 0 for v in (mult, eps, theta)):
        raise LLMCFormatError(
            f"{path}: float header has nonsense values (ffn_dim_multiplier={mult}, norm_eps={eps}, "
            f"rope_theta={theta}; each must be finite and > 0); the file is corrupt")
    version = int(header[1])
    maxT, V, L, NH, NKV, C, multiple_of, scaled, major, minor = (int(v) for v in header[2:12])
    try:
        if scaled not in (0, 1):
            raise ValueError(f"use_scaled_rope must be 0 or 1, got {scaled}")
        config = LlamaConfig(L=L, NH=NH, NKV=NKV, C=C, maxT=maxT, V=V, multiple_of=multiple_of,
                             ffn_dim_multiplier=_decimal(floats[0]), norm_eps=_decimal(floats[1]),
                             rope_theta=_decimal(floats[2]), use_scaled_rope=bool(scaled), tied=False,
                             major=major, minor=minor, **_read_scaling(floats))
    except ValueError as e:
        raise LLMCFormatError(f"{path}: model header has nonsense sizes (maxT={maxT}, V={V}, L={L}, NH={NH}, "
                              f"NKV={NKV}, C={C}, multiple_of={multiple_of}, use_scaled_rope={scaled}): {e}; "
                              f"the file is corrupt") from None
    n = file_num_parameters(config)
    check_size(path, size, MODEL_HEADER_BYTES + (4 if version == 3 else 2) * n,
                f"{n} {MODEL_VERSIONS[version]} values: {config.num_parameters} parameters and the zero bias slots")
    return config, version


def _read_scaling(floats: np.ndarray) -> dict:
    if floats[3] != SCALING_MARK:
        return {}
    factor, low, high, original = (_decimal(v) for v in floats[4:8])
    return dict(rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                rope_original_maxT=int(original))


def read_model(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a Llama 3 model .bin as float32 arrays keyed as LlamaConfig.param_shapes() (views into one
    buffer); every bias slot must hold zeros. The config is untied: the file always holds lm_head."""
    config, version = read_model_header(path)
    n = file_num_parameters(config)
    if version == 3:
        flat = np.fromfile(path, dtype="<f4", count=n, offset=MODEL_HEADER_BYTES).astype(np.float32, copy=False)
    else:
        raw = np.memmap(path, dtype="<u2", mode="r", offset=MODEL_HEADER_BYTES, shape=(n,))
        flat = raw.astype(np.uint32)
        del raw
        np.left_shift(flat, 16, out=flat)
        flat = flat.view(np.float32)
    return config, _split_checked(path, flat, config, "model")


def _model_headers(config: LlamaConfig, version: int) -> tuple[np.ndarray, np.ndarray]:
    ints = np.zeros(HEADER_INTS, dtype="<i4")
    ints[:12] = (MAGIC, version, config.maxT, config.V, config.L, config.NH, config.NKV, config.C,
                 config.multiple_of, int(config.use_scaled_rope), config.major, config.minor)
    floats = np.zeros(HEADER_INTS, dtype="<f4")
    mult = 1.0 if config.ffn_dim_multiplier is None else config.ffn_dim_multiplier
    floats[:3] = (mult, config.norm_eps, config.rope_theta)
    if config.rope_scaling != LLAMA31_SCALING:
        floats[3:8] = (SCALING_MARK, *config.rope_scaling)
    return ints, floats


def write_model(path: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], version: int = 3) -> None:
    """Write a Llama 3 model .bin in the llama3 branch's layout (3 fp32, 5 bf16 round-to-nearest-even)
    atomically; accepts jax arrays. Bias slots get zeros; a tied config writes wte into slot 1."""
    if version not in MODEL_VERSIONS:
        raise LLMCFormatError(f"{os.fspath(path)}: cannot write model version {version}; use 3 (fp32) or 5 (bf16)")
    arrays = _checked_arrays(path, config.param_shapes(), params, "model", config)
    if config.tied:
        arrays["lm_head"] = arrays["wte"]
    dtype = "<f4" if version == 3 else "<u2"
    convert = (lambda a: np.asarray(a, dtype="<f4")) if version == 3 else to_bf16_bits
    chunks: list[Any] = list(_model_headers(config, version))
    for _, ours, shape in file_shapes(config):
        chunks.append(np.zeros(shape, dtype=dtype) if ours is None else convert(arrays[ours]))
    atomic_write(path, chunks)


# ---------------------------------------------------------------- debug state

@dataclasses.dataclass
class LlamaDebugState:
    """train_llama3.py's reference batch: inputs, targets, logits, mean loss, float32 gradients keyed as
    LlamaConfig.param_shapes() (untied; fcw as [up; gate]), and the recorded training history."""

    x: np.ndarray            # (B, T) int32
    y: np.ndarray            # (B, T) int32
    logits: np.ndarray       # (B, T, V) float32
    loss: float
    grads: dict[str, np.ndarray]
    losses: np.ndarray       # (steps,) float32, the losses of the steps trained after writing
    grad_norms: np.ndarray   # (steps,) float32, their gradient norms


def read_debug_state(path: str | os.PathLike, config: LlamaConfig) -> LlamaDebugState:
    """Read a debug state written by the llama3 branch's train_llama3.py for the model `config`
    (config.tied is ignored: the file always holds the lm_head gradient)."""
    hint = ("llm.c master's write_state had no version (slot 1 held B); re-generate it with the llama3 branch's "
            "train_llama3.py (--write_tensors 1)")
    # version 5 too, so that a bf16 model given here gets the message below, not "unsupported version 5"
    header, size = read_header(path, MAGIC, (DEBUG_STATE_VERSION, 5), hint, what=_WHAT_STATE)
    path = os.fspath(path)
    if header[5:].any():
        k = 5 + int(np.flatnonzero(header[5:])[0])
        raise LLMCFormatError(f"{path}: int header slot {k} is {int(header[k])}, but a debug state has zeros from "
                              f"slot 5 on: this looks like a Llama 3 model .bin (same magic 20240803), not a "
                              f"debug state")
    if header[1] != DEBUG_STATE_VERSION:
        raise LLMCFormatError(f"{path}: unsupported version {int(header[1])} of {_WHAT_STATE}; supported: "
                              f"{DEBUG_STATE_VERSION}. {hint}")
    B, T, steps = (int(v) for v in header[2:5])
    if B <= 0 or T <= 0 or steps < 0:
        raise LLMCFormatError(f"{path}: debug state header has nonsense sizes B={B}, T={T}, steps={steps}; "
                              f"the file is corrupt")
    config = dataclasses.replace(config, tied=False)
    BT, V, N = B * T, config.V, file_num_parameters(config)
    check_size(path, size, HEADER_BYTES + 4 * (2 * BT + BT * V + 1 + N + 2 * steps),
                f"B={B}, T={T}, {steps} history steps from its header, V={V} and {N} file values from the model; "
                f"a debug state of another model, or a corrupt file")
    body = debug_state_body(path, BT, V)
    floats = body[2 * BT:].view("<f4")
    g0 = BT * V + 1
    grads = _split_checked(path, floats[g0:g0 + N], config, "debug state gradient")
    hist = floats[g0 + N:]
    return LlamaDebugState(x=body[:BT].reshape(B, T), y=body[BT:2 * BT].reshape(B, T),
                           logits=floats[:BT * V].reshape(B, T, V), loss=float(floats[BT * V]), grads=grads,
                           losses=hist[:steps], grad_norms=hist[steps:])


def write_debug_state(path: str | os.PathLike, config: LlamaConfig, x: Any, y: Any, logits: Any, loss: float,
                      grads: Mapping[str, Any], losses: Sequence[float] | np.ndarray = (),
                      grad_norms: Sequence[float] | np.ndarray = ()) -> None:
    """Write a debug state in the llama3 branch's layout (zero bias-slot gradients, history appended).
    grads are keyed as the untied config's param_shapes() (an lm_head gradient is always needed)."""
    x, y, logits = np.asarray(x), np.asarray(y), np.asarray(logits)
    if x.ndim != 2 or y.shape != x.shape:
        raise LLMCFormatError(f"{os.fspath(path)}: x and y must both be (B, T); got {x.shape} and {y.shape}")
    B, T = x.shape
    if logits.shape != (B, T, config.V):
        raise LLMCFormatError(f"{os.fspath(path)}: logits have shape {logits.shape}, expected {(B, T, config.V)}")
    losses, grad_norms = np.asarray(losses, dtype="<f4"), np.asarray(grad_norms, dtype="<f4")
    if losses.ndim != 1 or grad_norms.shape != losses.shape:
        raise LLMCFormatError(f"{os.fspath(path)}: losses and grad_norms must be 1-D of one length; got shapes "
                              f"{losses.shape} and {grad_norms.shape}")
    untied = dataclasses.replace(config, tied=False)
    arrays = _checked_arrays(path, untied.param_shapes(), grads, "grads", untied)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:5] = (MAGIC, DEBUG_STATE_VERSION, B, T, losses.size)
    chunks: list[Any] = [header, x.astype("<i4"), y.astype("<i4"), np.asarray(logits, dtype="<f4"),
                         np.asarray([float(loss)], dtype="<f4")]
    for _, ours, shape in file_shapes(untied):
        chunks.append(np.zeros(shape, dtype="<f4") if ours is None else np.asarray(arrays[ours], dtype="<f4"))
    atomic_write(path, [*chunks, losses, grad_norms])
