"""llm.c's distributed data loader over token shards, GPT-2's uint16 or Llama 3's uint32 (numpy only, no JAX).

Semantics follow llm.c's `llmc/dataloader.h` exactly:

* The shards are the sorted matches of a glob (or an explicit list of paths), all validated up front:
  header, length against the header's token count, one token width for all of them (llm.c fixes the
  width by the first shard; a glob mixing uint16 and uint32 shards is refused, as is a vocab_size
  the width cannot hold) and, given vocab_size, every token id (a numpy
  max over a memmap, once per shard per process; progress on stderr for many or large shards), so
  a bad shard late in a glob stops the run before step 0, not hours into it.
* A *sample* is one global batch of P*B*T tokens (P processes). A shard of n tokens holds
  floor((n-1)/(P*B*T)) samples; its tail is dropped. Rank r of sample k reads the B*T+1 tokens at
  token offset k*P*B*T + r*B*T: inputs are the first B*T, targets the same window shifted by one.
* Without shuffling the shards come in glob order and the samples in order. With shuffling, an
  MT19937 generator seeded like torch.manual_seed(seed + rank) (llm.c: 42 + rank) permutes the
  shard order at every epoch start (the permutation is applied to the previous epoch's order, as
  llm.c does) and the sample order of every shard when it is loaded, both with llm.c's Fisher-Yates
  (i from n-1 down to 1, j = randint32 % (i+1), swap). Each rank reads only its own slot of every
  sample, so every token slot is read exactly once per epoch even though ranks shuffle differently.
* After the last sample of the last shard the loader starts a new epoch (and reshuffles).

Shards are opened lazily as read-only memmaps, one at a time, so 100M-token shards never sit in RAM.
`state_dict()` / `load_state_dict()` capture the position (shard, sample, epoch), the shard order and
the generator, as plain JSON-able values, so a resumed loader continues exactly.
"""
from __future__ import annotations

import glob as _glob
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmc_jax.formats.llmc_format import HEADER_BYTES, SHARD_FORMATS, LLMCFormatError, read_shard, shard_info
from llmc_jax.formats.rand import MT19937, random_permutation

STATE_VERSION = 1
LLMC_SHUFFLE_SEED = 42  # llm.c seeds its shuffling generator with 42 + process_rank
PROGRESS_SHARDS = 8          # the token-id scan reports progress for more shards than this
PROGRESS_BYTES = 1 << 30     # ... or more bytes than this

# Shards whose token ids were found < vocab, by (real path, inode, size, mtime, vocab): a run builds
# one loader per device over the same glob, and each shard needs reading once, not once per loader.
_SCANNED: set[tuple[str, int, int, int, int]] = set()


def _scan_key(path: str, vocab_size: int) -> tuple[str, int, int, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, vocab_size


def check_token_ids(paths: Sequence[str], num_tokens: Sequence[int], vocab_size: int,
                    progress: bool | None = None) -> None:
    """Every token id of every shard < vocab_size, else LLMCFormatError naming the shard, the id and
    its position. progress None: a stderr line for more than PROGRESS_SHARDS shards or PROGRESS_BYTES."""
    todo = [(p, n) for p, n in zip(paths, num_tokens) if _scan_key(p, vocab_size) not in _SCANNED]
    nbytes = sum(os.path.getsize(p) - HEADER_BYTES for p, _ in todo)
    show = progress if progress is not None else len(todo) > PROGRESS_SHARDS or nbytes > PROGRESS_BYTES
    def report(done: int) -> None:
        if show:
            print(f"\rchecking {len(todo)} shards ({nbytes / 1e9:.2f} GB) for token ids >= {vocab_size} "
                  f"... {done}/{len(todo)}", end="", file=sys.stderr, flush=True)
    try:
        for k, (path, _) in enumerate(todo):
            report(k)
            read_shard(path, vocab_size=vocab_size)
            _SCANNED.add(_scan_key(path, vocab_size))
        report(len(todo))
    finally:
        if show:
            print(file=sys.stderr, flush=True)     # an error line starts on a line of its own


# ------------------------------------------------------------------ the loader

def _expand(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(pattern, (str, os.PathLike)):
        pat = os.fspath(pattern)
        paths = sorted(_glob.glob(pat))
        if not paths:
            raise ValueError(
                f"no data shards match the pattern {pat!r}; check the path (-i/-j take a glob such as "
                f"'data/fineweb10B/fineweb_train_*.bin'; quote it so the shell does not expand it)")
        return paths
    paths = [os.fspath(p) for p in pattern]
    if not paths:
        raise ValueError("the list of data shards is empty; give at least one .bin shard")
    return paths


class DataLoader:
    """llm.c's distributed, shuffling, resumable data loader; `next_batch()` -> (x, y), int32 (B, T)."""

    def __init__(self, pattern: str | os.PathLike | Sequence[str | os.PathLike], B: int, T: int,
                 process_rank: int = 0, num_processes: int = 1, shuffle: bool = True, seed: int = LLMC_SHUFFLE_SEED,
                 vocab_size: int | None = None):
        B, T, P, rank = int(B), int(T), int(num_processes), int(process_rank)
        if B <= 0 or T <= 0:
            raise ValueError(f"batch size B={B} and sequence length T={T} must both be positive")
        if P <= 0 or not 0 <= rank < P:
            raise ValueError(f"process rank {rank} is out of range for {P} processes (need 0 <= rank < num_processes)")
        if vocab_size is not None and not 0 < int(vocab_size):
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        self.pattern = pattern if isinstance(pattern, str) else None
        self.B, self.T = B, T
        self.process_rank, self.num_processes = rank, P
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.shard_paths = _expand(pattern)
        self.global_batch_tokens = P * B * T

        # Validate every shard now: headers and sizes (as llm.c does), then the token ids.
        need = self.global_batch_tokens + 1
        infos = [shard_info(path) for path in self.shard_paths]
        ntoks = [n for n, _ in infos]
        self.token_bytes = infos[0][1]     # llm.c: the first shard fixes the token width
        for path, (_, width) in zip(self.shard_paths, infos):
            if width != self.token_bytes:
                raise LLMCFormatError(
                    f"{path}: shard holds {SHARD_FORMATS[width][3]} tokens but the first shard "
                    f"{self.shard_paths[0]} holds {SHARD_FORMATS[self.token_bytes][3]}; one data set must "
                    f"use one token width (re-tokenize the shards into one format)")
        top = 1 << (8 * self.token_bytes)
        if vocab_size is not None and int(vocab_size) > top:
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {top}] for {SHARD_FORMATS[self.token_bytes][3]} shards "
                f"({self.shard_paths[0]}); a larger vocabulary needs uint32 shards (llm.c's LLaMA-3 format)")
        for path, ntok in zip(self.shard_paths, ntoks):
            if ntok < need:
                raise LLMCFormatError(
                    f"{path}: shard has {ntok} tokens, but one batch needs num_processes*B*T+1 = "
                    f"{P}*{B}*{T}+1 = {need}; use a smaller batch size (-b) or sequence length (-t), "
                    f"fewer processes, or a larger shard")
        if self.vocab_size is not None:
            check_token_ids(self.shard_paths, ntoks, self.vocab_size)
        self.shard_num_tokens = ntoks
        self.shard_num_samples_all = [(n - 1) // self.global_batch_tokens for n in ntoks]
        self.num_tokens = int(sum(ntoks))  # all tokens in all shards (llm.c's num_tokens)
        self.batches_per_epoch = int(sum(self.shard_num_samples_all))  # samples per epoch (steps per epoch)
        self.num_usable_tokens = self.batches_per_epoch * self.global_batch_tokens  # tokens read per epoch

        self._tokens: np.ndarray | None = None  # memmap of the current shard
        self._rng = MT19937(self.seed + rank) if self.shuffle else None
        self.shard_indices = list(range(len(self.shard_paths)))
        self.intra_shard_indices: list[int] | None = None
        self._rng_before_intra: dict[str, Any] | None = None
        self.epoch = -1
        self.reset()

    # -------------------------------------------------------------- llm.c's state machine

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def current_shard(self) -> str:
        """Path of the shard being read now."""
        return self.shard_paths[self.shard_indices[self.current_shard_idx]]

    def _load_shard(self) -> None:
        """Open shard number current_shard_idx (after the shard permutation); draw its sample order."""
        file_idx = self.shard_indices[self.current_shard_idx]
        path = self.shard_paths[file_idx]
        self._tokens = None  # drop the previous memmap first: one open shard at a time
        self._tokens = read_shard(path)   # token ids were checked in __init__
        if len(self._tokens) != self.shard_num_tokens[file_idx]:
            raise LLMCFormatError(f"{path}: shard changed on disk while training (had "
                                  f"{self.shard_num_tokens[file_idx]} tokens, now {len(self._tokens)})")
        self.shard_num_samples = self.shard_num_samples_all[file_idx]
        if self.shuffle:
            self._rng_before_intra = self._rng.get_state()
            self.intra_shard_indices = random_permutation(list(range(self.shard_num_samples)), self._rng)

    def reset(self) -> None:
        """Start a new epoch: back to the first shard (shuffled: permute the shard order again)."""
        self.current_shard_idx = 0
        self.current_sample_idx = 0
        self.epoch += 1
        if self.shuffle:
            random_permutation(self.shard_indices, self._rng)
        self._load_shard()

    def _advance(self) -> None:
        if self.current_shard_idx == self.num_shards - 1:
            self.reset()
            return
        self.current_shard_idx += 1
        self.current_sample_idx = 0
        self._load_shard()

    def next_window(self) -> np.ndarray:
        """The next B*T+1 contiguous tokens of this rank (the shards' uint16/uint32, a copy): x = w[:-1], y = w[1:]."""
        if self.current_sample_idx >= self.shard_num_samples:
            self._advance()
        k = self.current_sample_idx
        idx = self.intra_shard_indices[k] if self.shuffle else k
        start = idx * self.global_batch_tokens + self.process_rank * self.B * self.T
        window = np.array(self._tokens[start:start + self.B * self.T + 1])
        self.current_sample_idx += 1
        return window

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), each int32 (B, T); targets are the inputs shifted by one token."""
        w = self.next_window()
        if w.dtype.itemsize == 4 and int(w.max()) >= 2**31:   # only unchecked uint32 shards (no vocab_size)
            pos = int(np.argmax(w >= 2**31))
            raise LLMCFormatError(f"{self.current_shard}: token id {int(w[pos])} does not fit int32; the shard "
                                  f"is corrupt or not tokenized (give vocab_size to check every id up front)")
        w = w.astype(np.int32)
        return w[:-1].reshape(self.B, self.T), w[1:].reshape(self.B, self.T)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    # -------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as JSON-able python values.

        With shuffling, `rng` is the generator state from just before the current shard's sample order
        was drawn: loading re-draws that order, which also leaves the generator where it was.
        """
        return {
            "version": STATE_VERSION,
            "B": self.B, "T": self.T,
            "process_rank": self.process_rank, "num_processes": self.num_processes,
            "shuffle": self.shuffle, "seed": self.seed,
            "shard_num_tokens": list(self.shard_num_tokens),
            "epoch": self.epoch,
            "shard_idx": self.current_shard_idx,
            "sample_idx": self.current_sample_idx,
            "shard_indices": list(self.shard_indices) if self.shuffle else None,
            "rng": self._rng_before_intra if self.shuffle else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of a loader over the same shards and batch geometry."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state has version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for k in ("B", "T", "process_rank", "num_processes", "shuffle", "seed"):
            if k == "seed" and not self.shuffle:
                continue  # the seed only matters when shuffling
            if state[k] != mine[k]:
                raise ValueError(
                    f"data loader state was saved with {k}={state[k]!r} but this loader has {k}={mine[k]!r}; "
                    f"resume with the same -b/-t, process count/rank, shuffle and seed (or start afresh)")
        if list(state["shard_num_tokens"]) != self.shard_num_tokens:
            raise ValueError(
                f"data loader state was saved over {len(state['shard_num_tokens'])} shards with token counts "
                f"{_brief(state['shard_num_tokens'])}, but the pattern now gives {self.num_shards} shards with "
                f"{_brief(self.shard_num_tokens)}; resume with the same data shards")
        shard_idx, sample_idx = int(state["shard_idx"]), int(state["sample_idx"])
        if not 0 <= shard_idx < self.num_shards:
            raise ValueError(f"data loader state has shard index {shard_idx}, outside [0, {self.num_shards})")
        if self.shuffle:
            order = [int(i) for i in state["shard_indices"]]
            if sorted(order) != list(range(self.num_shards)):
                raise ValueError("data loader state has a shard order that is not a permutation of the shards")
            self.shard_indices = order
            self._rng.set_state(state["rng"])
        self.current_shard_idx = shard_idx
        self._load_shard()
        if not 0 <= sample_idx <= self.shard_num_samples:
            raise ValueError(f"data loader state has sample index {sample_idx}, outside [0, {self.shard_num_samples}]")
        self.current_sample_idx = sample_idx
        self.epoch = int(state["epoch"])

    def __repr__(self) -> str:
        return (f"DataLoader({self.num_shards} shards, {self.num_tokens} tokens, B={self.B}, T={self.T}, "
                f"rank {self.process_rank}/{self.num_processes}, shuffle={self.shuffle}, "
                f"{self.batches_per_epoch} batches/epoch)")


def _brief(xs: Sequence[int]) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= 6 else f"[{', '.join(map(str, xs[:3]))}, ..., {xs[-1]}]"
