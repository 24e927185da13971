"""Read and write llm.c's binary files: model .bin, debug state, token shards (GPT-2 and Llama 3).

All three share one layout: a 1024-byte header of 256 little-endian int32 (slot 0 magic, slot 1
version), then a raw little-endian body. Token shards come in two widths, as llm.c's dataloader.h
reads them: GPT-2's (magic 20240520, version 1, uint16 tokens) and Llama 3's (magic 20240801,
version 7, uint32 tokens); the Llama 3 model and debug-state files are in llama3_format.
Everything here is numpy only, so the data loader and the conversion tools can use it without
importing JAX. Every bad input raises LLMCFormatError naming the file, what is wrong with it, and
what to do about it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from llmc_jax.models.config import PARAM_NAMES, GPTConfig

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS

MODEL_MAGIC = 20240326
DEBUG_STATE_MAGIC = 20240327
SHARD_MAGIC = 20240520
MODEL_VERSIONS = {3: "fp32", 5: "bf16"}
DEBUG_STATE_VERSION = 2
SHARD_VERSION = 1
SHARD32_MAGIC = 20240801     # llm.c's Llama 3 shards (dev/data/data_common.py, model_desc "llama-3")
SHARD32_VERSION = 7
# token width in bytes -> (magic, version, numpy dtype, format name)
SHARD_FORMATS: dict[int, tuple[int, int, str, str]] = {
    2: (SHARD_MAGIC, SHARD_VERSION, "<u2", "uint16 (GPT-2 format, magic 20240520)"),
    4: (SHARD32_MAGIC, SHARD32_VERSION, "<u4", "uint32 (LLaMA-3 format, magic 20240801)"),
}

# Every llm.c file type we know, so a file given in the wrong place gets a useful message.
_KNOWN_MAGICS: dict[int, tuple[str, str]] = {
    20240326: ("an llm.c model checkpoint", "give it as the model (-e)"),
    20240327: ("an llm.c debug state (reference activations/gradients)",
               "it is only read by the parity tests"),
    20240328: ("an llm.c tokenizer file", "it is only used by llm.c's C sampler; llmc-jax decodes with tiktoken"),
    20240520: ("a GPT-2 token data shard", "give it as training/validation data (-i/-j)"),
    20240801: ("a LLaMA-3 token data shard (uint32 tokens)", "give it as training/validation data (-i/-j)"),
    20240803: ("an llm.c Llama 3 model checkpoint or debug state (train_llama3.py)",
               "give it as the model (-e) of a Llama 3 run"),
    20240522: ("an llm.c multiple-choice eval file (HellaSwag)", "it is used by the HellaSwag eval (-h 1)"),
    20240527: ("an llm.c training state (optimizer state, state_*.bin)",
               "to resume give the output dir with -o and -y 1; the weights are in model_*.bin"),
}


class LLMCFormatError(ValueError):
    """A file (or array) that does not follow llm.c's format; the message says what to do."""


def _what(magic: int) -> str:
    return _KNOWN_MAGICS[magic][0]


def read_header(path: str | os.PathLike, magic: int, versions: Iterable[int],
                 version_hint: str = "", *, what: str | None = None,
                 also: Mapping[int, tuple[Iterable[int], str]] | None = None) -> tuple[np.ndarray, int]:
    """Check existence, length, magic and version of any llm.c file; return (header, file size).

    what overrides the file kind named in messages; also accepts more magics, {magic: (versions, hint)}."""
    path = os.fspath(path)
    accepted = {magic: (tuple(versions), version_hint), **{m: (tuple(v), h) for m, (v, h) in (also or {}).items()}}
    if what is None:
        what = " or ".join(_what(m) for m in accepted)
    if not os.path.exists(path):
        raise LLMCFormatError(f"{path}: file not found; expected {what} here (check the path)")
    if not os.path.isfile(path):
        raise LLMCFormatError(f"{path}: not a regular file; expected {what}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise LLMCFormatError(
            f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header; it is "
            f"truncated or not an llm.c file (re-download or re-generate it)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS).astype(np.int64)
    got = int(header[0])
    if got not in accepted:
        if len(accepted) == 1:
            wanted, expected = f"{what} (magic {magic})", f"{magic} ({what})"
        else:
            wanted = " or ".join(f"{_what(m)} (magic {m})" for m in accepted)
            expected = " or ".join(f"{m} ({_what(m)})" for m in accepted)
        if got in _KNOWN_MAGICS:
            got_what, todo = _KNOWN_MAGICS[got]
            raise LLMCFormatError(f"{path}: wrong magic {got}: this is {got_what}, not {wanted}; {todo}")
        raise LLMCFormatError(f"{path}: bad magic number {got}, expected {expected}; "
                              f"the file is corrupt or not an llm.c file")
    versions, version_hint = accepted[got]
    if int(header[1]) not in versions:
        got_what = what if len(accepted) == 1 else _what(got)
        raise LLMCFormatError(
            f"{path}: unsupported version {int(header[1])} of {got_what}; supported: "
            f"{', '.join(map(str, versions))}. {version_hint}".rstrip())
    return header, size


def check_size(path: str | os.PathLike, actual: int, expected: int, what: str) -> None:
    """The header fixes the file length exactly; say whether bytes are missing or extra."""
    if actual == expected:
        return
    if actual < expected:
        raise LLMCFormatError(
            f"{os.fspath(path)}: file size mismatch: header ({what}) implies {expected} bytes but the "
            f"file has {actual} (truncated by {expected - actual} bytes; re-download or re-write it)")
    raise LLMCFormatError(
        f"{os.fspath(path)}: file size mismatch: header ({what}) implies {expected} bytes but the file "
        f"has {actual} ({actual - expected} trailing bytes; the header and contents disagree, the "
        f"file is corrupt)")


def atomic_write(path: str | os.PathLike, chunks: Iterable[Any]) -> None:
    """Write to path.tmp, fsync, then rename, so a crash never leaves a half-written file at path."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _header(magic: int, version: int, *values: int) -> np.ndarray:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = magic, version
    h[2:2 + len(values)] = values
    return h


def _split(flat: np.ndarray, config: GPTConfig) -> dict[str, np.ndarray]:
    """Views (no copies) of one flat buffer as the 16 tensors, in llm.c's order."""
    out, pos = {}, 0
    for name, shape in config.param_shapes().items():
        n = int(np.prod(shape))
        out[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    return out


def _checked_params(path: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any],
                    what: str) -> list[np.ndarray]:
    arrays = []
    for name, shape in config.param_shapes().items():
        if name not in params:
            raise LLMCFormatError(f"{os.fspath(path)}: {what} lacks tensor {name!r}; need all of "
                                  f"{', '.join(PARAM_NAMES)}")
        a = np.asarray(params[name])
        if a.shape != shape:
            raise LLMCFormatError(f"{os.fspath(path)}: {what} tensor {name!r} has shape {a.shape}, "
                                  f"expected {shape} for {config}")
        arrays.append(a)
    return arrays


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns with round-to-nearest-even (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4")
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out = rounded.astype("<u2")
    out[np.isnan(a)] = 0x7FC0
    return out


def read_model_header(path: str | os.PathLike) -> tuple[GPTConfig, int]:
    """Config and version (3 fp32, 5 bf16) of a model .bin, with its length checked, without the weights."""
    header, size = read_header(path, MODEL_MAGIC, MODEL_VERSIONS,
                                "Use 3 (fp32) or 5 (bf16), as written by llm.c's train_gpt2.py/.cu")
    version = int(header[1])
    maxT, V, L, NH, C, Vp = (int(v) for v in header[2:8])
    try:
        config = GPTConfig(L=L, NH=NH, C=C, maxT=maxT, V=V, Vp=Vp)
    except ValueError as e:
        raise LLMCFormatError(f"{os.fspath(path)}: model header has nonsense sizes (maxT={maxT}, V={V}, "
                              f"L={L}, NH={NH}, C={C}, Vp={Vp}): {e}; the file is corrupt") from None
    nbytes = 4 if version == 3 else 2
    check_size(path, size, HEADER_BYTES + nbytes * config.num_parameters,
                f"{config.num_parameters} {MODEL_VERSIONS[version]} parameters")
    return config, version


def read_model(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Load an llm.c model .bin as float32 arrays (views into one buffer: a single read, no extra copy)."""
    config, version = read_model_header(path)
    n = config.num_parameters
    if version == 3:
        flat = np.fromfile(path, dtype="<f4", count=n, offset=HEADER_BYTES).astype(np.float32, copy=False)
    else:
        raw = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
        flat = raw.astype(np.uint32)
        del raw
        np.left_shift(flat, 16, out=flat)
        flat = flat.view(np.float32)
    return config, _split(flat, config)


def write_model(path: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any],
                version: int = 3) -> None:
    """Write an llm.c model .bin (3 fp32, 5 bf16 round-to-nearest-even) atomically; accepts jax arrays."""
    if version not in MODEL_VERSIONS:
        raise LLMCFormatError(f"{os.fspath(path)}: cannot write model version {version}; use 3 (fp32) or 5 (bf16)")
    arrays = _checked_params(path, config, params, "model")
    header = _header(MODEL_MAGIC, version, config.maxT, config.V, config.L, config.NH, config.C, config.Vp)
    convert = (lambda a: np.asarray(a, dtype="<f4")) if version == 3 else to_bf16_bits
    atomic_write(path, [header, *(convert(a) for a in arrays)])


@dataclasses.dataclass
class DebugState:
    """llm.c's reference batch: inputs, targets, PyTorch's logits (unpadded V), mean loss, grads."""

    x: np.ndarray
    y: np.ndarray
    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]


def debug_state_body(path: str | os.PathLike, BT: int, V: int) -> np.ndarray:
    """A debug state's body after the header as int32 (x, y, then the float32 words), its x and y
    token ids checked against the vocabulary (GPT-2's and Llama 3's debug states share this)."""
    body = np.fromfile(path, dtype="<i4", offset=HEADER_BYTES)
    bad = (body[:2 * BT] < 0) | (body[:2 * BT] >= V)
    if bad.any():
        pos = int(np.argmax(bad))
        raise LLMCFormatError(f"{os.fspath(path)}: debug state {'xy'[pos // BT]} holds token id {int(body[pos])} "
                              f"at position {pos % BT}, outside the model's vocabulary [0, {V}); a debug state "
                              f"of another model, or a corrupt file")
    return body


def read_debug_state(path: str | os.PathLike, config: GPTConfig) -> DebugState:
    """Read a debug state written by train_gpt2.py for the model `config` (grads in padded layout)."""
    header, size = read_header(path, DEBUG_STATE_MAGIC, (DEBUG_STATE_VERSION,),
                                "Version 1 predates vocab padding; re-generate it with train_gpt2.py")
    B, T = int(header[2]), int(header[3])
    if B <= 0 or T <= 0:
        raise LLMCFormatError(f"{os.fspath(path)}: debug state header has nonsense sizes B={B}, T={T}; "
                              f"the file is corrupt")
    BT, V, N = B * T, config.V, config.num_parameters
    check_size(path, size, HEADER_BYTES + 4 * (2 * BT + BT * V + 1 + N),
                f"B={B}, T={T} from its header, V={V} and {N} parameters from the model; a debug state of "
                f"another model, or a corrupt file")
    body = debug_state_body(path, BT, V)
    floats = body[2 * BT:].view("<f4")
    return DebugState(x=body[:BT].reshape(B, T), y=body[BT:2 * BT].reshape(B, T),
                      logits=floats[:BT * V].reshape(B, T, V), loss=float(floats[BT * V]),
                      grads=_split(floats[BT * V + 1:], config))


def write_debug_state(path: str | os.PathLike, config: GPTConfig, x: Any, y: Any, logits: Any,
                      loss: float, grads: Mapping[str, Any]) -> None:
    """Write a debug state in llm.c's layout; logits (B,T,Vp) or (B,T,V), only the first V are kept."""
    x, y, logits = np.asarray(x), np.asarray(y), np.asarray(logits)
    if x.ndim != 2 or y.shape != x.shape:
        raise LLMCFormatError(f"{os.fspath(path)}: x and y must both be (B, T); got {x.shape} and {y.shape}")
    B, T = x.shape
    if logits.shape not in ((B, T, config.V), (B, T, config.Vp)):
        raise LLMCFormatError(f"{os.fspath(path)}: logits have shape {logits.shape}, expected "
                              f"{(B, T, config.V)} or {(B, T, config.Vp)}")
    arrays = _checked_params(path, config, grads, "grads")
    atomic_write(path, [_header(DEBUG_STATE_MAGIC, DEBUG_STATE_VERSION, B, T),
                         x.astype("<i4"), y.astype("<i4"),
                         np.asarray(logits[..., :config.V], dtype="<f4"),
                         np.asarray([float(loss)], dtype="<f4"),
                         *(np.asarray(g, dtype="<f4") for g in arrays)])


def shard_info(path: str | os.PathLike) -> tuple[int, int]:
    """(token count, bytes per token) of a token shard: 2 for GPT-2's uint16 shards (magic 20240520,
    version 1), 4 for Llama 3's uint32 ones (magic 20240801, version 7); the length is checked."""
    header, size = read_header(path, SHARD_MAGIC, (SHARD_VERSION,),
                                "Re-generate it with llm.c's dev/data scripts (GPT-2 shards are version 1)",
                                also={SHARD32_MAGIC: ((SHARD32_VERSION,), "Re-generate it with llm.c's dev/data "
                                                      "scripts (-m llama-3; LLaMA-3 shards are version 7)")})
    width = 2 if int(header[0]) == SHARD_MAGIC else 4
    ntok = int(header[2])
    if ntok < 0:
        raise LLMCFormatError(f"{os.fspath(path)}: shard header has a negative token count {ntok}; "
                              f"the file is corrupt")
    check_size(path, size, HEADER_BYTES + width * ntok, f"{ntok} {'uint16' if width == 2 else 'uint32'} tokens")
    return ntok, width


def read_shard_header(path: str | os.PathLike) -> int:
    """Token count of a data shard (uint16 GPT-2 or uint32 Llama 3), checked against the file length."""
    return shard_info(path)[0]


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Tokens of a shard as a read-only memmap, uint16 (GPT-2 shards) or uint32 (Llama 3 shards);
    optionally check every id < vocab_size."""
    ntok, width = shard_info(path)
    dtype = SHARD_FORMATS[width][2]
    if ntok == 0:  # mmap cannot map zero bytes
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))
    if vocab_size is not None and ntok and int(tokens.max()) >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise LLMCFormatError(
            f"{os.fspath(path)}: token id {int(tokens[pos])} at position {pos} is outside the vocabulary "
            f"(vocab size {vocab_size}); the shard was made with another tokenizer or is corrupt")
    return tokens


def write_shard(path: str | os.PathLike, tokens: Any, token_bytes: int = 2) -> None:
    """Write a data shard atomically: token_bytes=2 GPT-2's format (uint16, magic 20240520 v1),
    token_bytes=4 Llama 3's (uint32, magic 20240801 v7); refuses ids that do not fit the width."""
    if token_bytes not in SHARD_FORMATS:
        raise LLMCFormatError(f"{os.fspath(path)}: token_bytes={token_bytes!r}; use 2 (uint16, GPT-2 shards) "
                              f"or 4 (uint32, LLaMA-3 shards)")
    magic, version, dtype, _ = SHARD_FORMATS[token_bytes]
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
        raise LLMCFormatError(f"{os.fspath(path)}: tokens must be a 1-D integer array, got "
                              f"{tokens.dtype} of shape {tokens.shape}")
    if tokens.size >= 2**31:
        raise LLMCFormatError(f"{os.fspath(path)}: {tokens.size} tokens do not fit one shard (< 2**31); split them")
    if tokens.size:
        top = 2 ** (8 * token_bytes) - 1
        bad = (tokens < 0) | (tokens > top)
        if bad.any():
            pos = int(np.argmax(bad))
            hint = "; ids of a vocabulary over 65536 need uint32 shards (token_bytes=4)" if token_bytes == 2 else ""
            raise LLMCFormatError(f"{os.fspath(path)}: token id {int(tokens[pos])} at position {pos} is "
                                  f"outside [0, {top}] and cannot be stored as "
                                  f"{'uint16' if token_bytes == 2 else 'uint32'}{hint}")
    atomic_write(path, [_header(magic, version, tokens.size), tokens.astype(dtype)])


def check_seq_len(config: GPTConfig, T: int, path: str | os.PathLike = "<model>") -> None:
    """Refuse a sequence length the model has no position embeddings for (T > maxT)."""
    if T <= 0:
        raise LLMCFormatError(f"{os.fspath(path)}: sequence length T={T} must be positive")
    if T > config.maxT:
        raise LLMCFormatError(
            f"{os.fspath(path)}: sequence length T={T} exceeds the model's maxT={config.maxT} (a model "
            f"whose T exceeds maxT has no position embeddings for the later positions); use -t {config.maxT} "
            f"or less")
