"""Hugging Face's safetensors files, read and written with numpy alone (no torch, no safetensors package).

Why our own: the format is small (an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}} plus optional "__metadata__", then the raw little-endian bytes),
Llama checkpoints are bfloat16, which numpy lacks and the safetensors package's numpy API refuses,
and reading a tensor at a time from a memory map keeps an 8B checkpoint's 16 GB off the heap.
The tests check both directions against the `safetensors` package itself.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from llmc_jax.formats.llmc_format import LLMCFormatError, atomic_write, to_bf16_bits

# safetensors dtype -> numpy dtype of the stored bytes (BF16 is read as uint16 bits)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
WRITE_DTYPES = ("F32", "BF16")
_MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header


def _bad(path: str, why: str) -> LLMCFormatError:
    return LLMCFormatError(f"{path}: not a valid safetensors file: {why}")


class SafetensorsFile:
    """One .safetensors file, its header parsed and checked; tensors come back as float32 arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(self.path, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise _bad(self.path, f"header length {n} exceeds the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _bad(self.path, f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise _bad(self.path, "header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e, size - self.data_start)

    def _check_entry(self, name: str, e: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _bad(self.path, f"tensor {name!r} has a malformed entry {e!r}") from None
        if dtype not in _DTYPES:
            raise _bad(self.path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= begin <= end <= data_bytes) or end - begin != nbytes:
            raise _bad(self.path, f"tensor {name!r} ({dtype} {list(shape)}) has offsets [{begin}, {end}) that do "
                                  f"not fit its {nbytes} bytes in the {data_bytes}-byte data section "
                                  "(truncated or corrupt)")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def raw(self, name: str) -> np.ndarray:
        """The stored values as they are (BF16 as uint16 bit patterns), a read-only memory map."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return np.zeros(shape, _DTYPES[dtype])
        return np.memmap(self.path, dtype=_DTYPES[dtype], mode="r", offset=self.data_start + begin, shape=shape)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 array (bfloat16 widened exactly)."""
        a = self.raw(name)
        if self.dtype(name) == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(a, dtype=np.float32)


def write_file(path: str | os.PathLike, tensors: Mapping[str, Any], dtype: str = "F32",
               metadata: Mapping[str, str] | None = None) -> None:
    """Write float tensors as one safetensors file in `dtype` (F32, or BF16 rounded to nearest even),
    atomically; names in the given order, 8-byte aligned data as the format recommends."""
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"safetensors dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    arrays, header, offset = [], {}, 0
    for name, t in tensors.items():
        a = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        a = to_bf16_bits(a) if dtype == "BF16" else a.astype("<f4")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    atomic_write(path, [np.frombuffer(len(text).to_bytes(8, "little"), np.uint8),
                        np.frombuffer(text, np.uint8), *arrays])
