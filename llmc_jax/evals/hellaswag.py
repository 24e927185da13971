"""HellaSwag (and any 4-way multiple-choice eval) in llm.c's format and with llm.c's scoring.

The file (`hellaswag_val.bin`, written by llm.c's dev/data/hellaswag.py or scripts/prepare_hellaswag.py):
a 1024-byte header of 256 int32 (slot 0 magic 20240522, slot 1 version, slot 2 the number of
examples, slot 3 the longest example in bytes), then per example a stream of little-endian words:

    DELIM, <example bytes incl. these words>, <example index>, <label>, <num completions = 4>,
    <context length>, context tokens..., then 4 x (<completion length>, completion tokens...)

Version 1 is llm.c's: uint16 words, DELIM 65535 (so token ids < 65535: GPT-2's vocabulary). llm.c
(its llama3 branch included) has no eval file for a larger vocabulary, so version 2 is this
project's extension with the same layout in uint32 words (DELIM 2**32-1) for Llama 3's 128256
tokens; llm.c's EvalLoader refuses it ("Bad version"). Given the tokenizer's vocabulary size, the
writer picks the width from it and records it in header slot 4 (llm.c leaves it 0 and reads only
slots 0-3; scripts/prepare_hellaswag.py records it for byte and Llama 3 files and leaves GPT-2's
file llm.c's byte for byte), so the eval can refuse a file tokenized for another model: a recorded
size must equal the model's V, and an unrecorded uint16 file (llm.c's, GPT-2 tokens) cannot serve
a model whose V needs uint32 ids.

Scoring is llm.c's EvalLoader: floor(B/4) examples per (B, T) forward, each on 4 rows (the shared
context followed by one completion); the target of the last context token is the first completion
token, and a mask covers the completion's target positions. A completion's score is its mean token
loss over the mask ("completion style" acc_norm); the prediction is the argmin, ties and NaNs going
to the lower index exactly as llm.c's `loss < min_loss` scan. An example must satisfy llm.c's checks
(context and every completion non-empty, context + completion < T); one that does not is refused,
never truncated (llm.c aborts on it).

Everything up to the scoring is numpy only; JAX is imported when `score` is called.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from llmc_jax.formats.llmc_format import HEADER_BYTES, LLMCFormatError, atomic_write, _header, read_header

EVAL_MAGIC = 20240522
EVAL_VERSION = 1              # llm.c's: uint16 words
EVAL32_VERSION = 2            # this project's: uint32 words, for vocabularies over 65535 (Llama 3)
TOKEN_BYTES = {EVAL_VERSION: 2, EVAL32_VERSION: 4}
VOCAB_SLOT = 4                # header slot recording the tokenizer's vocabulary size (0: not recorded)
NUM_COMPLETIONS = 4
DELIMITER = 65535             # version 1's; version 2's is DELIMITER32
DELIMITER32 = 2**32 - 1
EXAMPLE_HEADER_WORDS = 6      # delimiter, bytes, index, label, num completions, context length
DEFAULT_PATH = os.path.join("data", "hellaswag", "hellaswag_val.bin")
LLMC_PATH = os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin")   # where llm.c keeps it
HOW_TO_MAKE = (f"make it with `python scripts/prepare_hellaswag.py -o {DEFAULT_PATH}` (downloads the "
               f"HellaSwag val JSONL, or give it with --jsonl; add --tokenizer llama3:PATH for a Llama 3 "
               f"model), or take hellaswag_val.bin from llm.c's starter pack ({LLMC_PATH}; GPT-2 tokens)")
# names of the vocabularies the eval's messages mention
VOCAB_NAMES = {50257: "GPT-2's", 128256: "Llama 3's", 256: "the byte tokenizer's"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice example: the tokens of the context and of each completion."""

    index: int
    label: int
    context: list[int]
    completions: list[list[int]]

    @property
    def num_tokens(self) -> int:
        """Longest row: context + the longest completion (llm.c needs T > this)."""
        return len(self.context) + max((len(c) for c in self.completions), default=0)


# ----------------------------------------------------------------------------------------------
# file format

@dataclasses.dataclass(frozen=True)
class EvalFileInfo:
    """What an eval file's header says: examples, bytes per token word, the tokenizer's vocabulary."""

    num_examples: int
    token_bytes: int              # 2 (version 1, llm.c's) or 4 (version 2)
    vocab_size: int | None        # recorded by the writer; None in llm.c's files


def _read_info(path: str) -> tuple[EvalFileInfo, np.ndarray, int]:
    header, size = read_header(path, EVAL_MAGIC, tuple(TOKEN_BYTES), f"Re-generate it: {HOW_TO_MAKE}")
    n, vocab = int(header[2]), int(header[VOCAB_SLOT])
    if n < 0:
        raise LLMCFormatError(f"{path}: header says {n} examples (slot 2); the file is corrupt")
    if vocab < 0:
        raise LLMCFormatError(f"{path}: header slot {VOCAB_SLOT} (the vocabulary size) is {vocab}; the file is corrupt")
    return EvalFileInfo(n, TOKEN_BYTES[int(header[1])], vocab or None), header, size


def read_eval_info(path: str | os.PathLike) -> EvalFileInfo:
    """The header of an eval file, checked (magic, version, counts); LLMCFormatError if bad."""
    return _read_info(os.fspath(path))[0]


def read_eval_file(path: str | os.PathLike) -> list[Example]:
    """Every example of an llm.c multiple-choice eval file (uint16 or uint32 words), each field
    checked; LLMCFormatError if bad."""
    path = os.fspath(path)
    info, header, size = _read_info(path)
    n, longest, width = info.num_examples, int(header[3]), info.token_bytes
    delimiter = DELIMITER if width == 2 else DELIMITER32
    body = size - HEADER_BYTES
    if body % width:
        raise LLMCFormatError(f"{path}: the {body} bytes after the header are not a whole number of "
                              f"uint{8 * width} words; the file is truncated or corrupt (re-generate it)")
    words = np.fromfile(path, dtype=f"<u{width}", offset=HEADER_BYTES).astype(np.int64).tolist()
    examples: list[Example] = []
    pos = 0
    for i in range(n):
        where = f"{path}: example {i} (at byte {HEADER_BYTES + width * pos})"
        if pos + 3 > len(words):
            raise LLMCFormatError(f"{where}: the file ends after {len(examples)} of the {n} examples the "
                                  f"header promises; it is truncated (re-generate it)")
        delim, nbytes, index = words[pos:pos + 3]
        if delim != delimiter:
            raise LLMCFormatError(f"{where}: bad delimiter {delim}, expected {delimiter}; the previous "
                                  f"example's lengths are wrong or the file is corrupt")
        if index != i:
            raise LLMCFormatError(f"{where}: example index {index}, expected {i} (examples must be "
                                  f"numbered 0, 1, 2, ... in file order); the file is corrupt")
        if nbytes % width or nbytes < width * EXAMPLE_HEADER_WORDS:
            raise LLMCFormatError(f"{where}: example length {nbytes} bytes is impossible (it must be a "
                                  f"multiple of {width} and at least {width * EXAMPLE_HEADER_WORDS}); the file "
                                  f"is corrupt")
        if nbytes > longest:
            raise LLMCFormatError(f"{where}: example is {nbytes} bytes, longer than the header's longest "
                                  f"example ({longest} bytes, slot 3); the header is wrong or the file corrupt")
        end = pos + nbytes // width
        if end > len(words):
            raise LLMCFormatError(f"{where}: example needs {nbytes} bytes but the file ends "
                                  f"{width * (len(words) - pos)} bytes in; it is truncated (re-generate it)")
        label, ncomp = words[pos + 3:pos + 5]
        if ncomp != NUM_COMPLETIONS:
            raise LLMCFormatError(f"{where}: {ncomp} completions; llm.c's eval (and this one) expects exactly "
                                  f"{NUM_COMPLETIONS}")
        if not 0 <= label < ncomp:
            raise LLMCFormatError(f"{where}: label {label} is not in [0, {ncomp}); the file is corrupt")
        q = pos + 5
        fields: list[list[int]] = []
        for what in ["context"] + [f"completion {c}" for c in range(ncomp)]:
            if q >= end:
                raise LLMCFormatError(f"{where}: lengths do not add up: the example's {nbytes} bytes end "
                                      f"before its {what} length; the file is corrupt")
            m = words[q]
            if q + 1 + m > end:
                raise LLMCFormatError(f"{where}: lengths do not add up: {what} length {m} runs past the "
                                      f"example's {nbytes} bytes; the file is corrupt")
            fields.append(words[q + 1:q + 1 + m])
            q += 1 + m
        if q != end:
            raise LLMCFormatError(f"{where}: lengths do not add up: the context and completions take "
                                  f"{width * (q - pos)} bytes but the example says {nbytes}; the file is corrupt")
        examples.append(Example(index=i, label=label, context=fields[0], completions=fields[1:]))
        pos = end
    if pos != len(words):
        raise LLMCFormatError(f"{path}: {width * (len(words) - pos)} bytes after the last of the header's {n} "
                              f"examples; the header's example count is wrong or the file is corrupt")
    return examples


def encode_example(example: Example, index: int, token_bytes: int = 2) -> np.ndarray:
    """One example's stream (llm.c's layout) of uint16 (token_bytes 2, llm.c's) or uint32 (4) words,
    stored under `index`; LLMCFormatError if unwritable."""
    delimiter = DELIMITER if token_bytes == 2 else DELIMITER32
    if len(example.completions) != NUM_COMPLETIONS:
        raise LLMCFormatError(f"example {index}: {len(example.completions)} completions; the eval file "
                              f"holds exactly {NUM_COMPLETIONS}")
    if not 0 <= example.label < NUM_COMPLETIONS:
        raise LLMCFormatError(f"example {index}: label {example.label} is not in [0, {NUM_COMPLETIONS})")
    stream = [delimiter, 0, index, example.label, NUM_COMPLETIONS]
    for what, toks in [("context", example.context)] + [(f"completion {c}", t)
                                                          for c, t in enumerate(example.completions)]:
        if len(toks) == 0:
            raise LLMCFormatError(f"example {index}: empty {what}; llm.c cannot score it")
        bad = [t for t in toks if not 0 <= int(t) < delimiter]
        if bad:
            raise LLMCFormatError(f"example {index}: {what} token {bad[0]} is outside [0, {delimiter}) "
                                  f"and cannot be stored" + ("; a vocabulary over 65535 tokens needs the uint32 "
                                                             "file (give its vocab_size)" if token_bytes == 2 else ""))
        stream.append(len(toks))
        stream.extend(int(t) for t in toks)
    nbytes = token_bytes * len(stream)
    limit = 2**16 if token_bytes == 2 else 2**31      # the word holding it; the header's int32 slot 3
    if nbytes >= limit:
        raise LLMCFormatError(f"example {index}: {nbytes} bytes; an example must be under {limit} bytes")
    stream[1] = nbytes
    return np.asarray(stream, dtype=f"<u{token_bytes}")


def token_bytes_for(vocab_size: int | None) -> int:
    """The eval file's word width for a vocabulary: 2 (llm.c's uint16 file) when its ids fit below the
    delimiter 65535 (or when unknown), else 4 (the uint32 file, version 2)."""
    return 4 if vocab_size is not None and vocab_size > DELIMITER else 2


def write_eval_file(path: str | os.PathLike, examples: Sequence[Example], vocab_size: int | None = None,
                    token_bytes: int | None = None) -> None:
    """Write examples in llm.c's eval format, atomically. As llm.c's writer, each example is stored
    under its position in `examples` (llm.c's reader requires index == position).

    vocab_size: the tokenizer's, recorded in header slot 4 (None: not recorded, as in llm.c's files);
    it picks the width unless token_bytes is given: uint16 words (version 1, llm.c's) when the ids fit
    below 65535, else uint32 words (version 2)."""
    path = os.fspath(path)
    width = token_bytes or token_bytes_for(vocab_size)
    if width not in (2, 4):
        raise LLMCFormatError(f"{path}: token_bytes={width!r}; an eval file holds 2 (uint16) or 4 (uint32) "
                              f"bytes per word")
    if vocab_size is not None and not 0 < vocab_size <= (DELIMITER if width == 2 else 2**31 - 1):
        raise LLMCFormatError(f"{path}: vocab_size={vocab_size} does not fit uint{8 * width} words")
    if len(examples) >= (2**16 if width == 2 else 2**31):
        raise LLMCFormatError(f"{path}: {len(examples)} examples; the format numbers examples "
                              f"in uint{8 * width} words, so at most {2**16 - 1 if width == 2 else 2**31 - 1}")
    try:
        streams = [encode_example(ex, i, width) for i, ex in enumerate(examples)]
    except LLMCFormatError as e:
        raise LLMCFormatError(f"{path}: {e}") from None
    longest = max((width * s.size for s in streams), default=0)
    version = EVAL_VERSION if width == 2 else EVAL32_VERSION
    atomic_write(path, [_header(EVAL_MAGIC, version, len(examples), longest, vocab_size or 0), *streams])


# ----------------------------------------------------------------------------------------------
# packing (llm.c's EvalLoader)

@dataclasses.dataclass
class Batch:
    """One (B, T) forward's worth: floor(B/4) examples on 4 rows each; empty slots have label -1."""

    inputs: np.ndarray    # (B, T) int32
    targets: np.ndarray   # (B, T) int32
    mask: np.ndarray      # (B, T) bool, True at the completion's target positions
    labels: np.ndarray    # (B // 4,) int32, -1 where no example is packed
    num_examples: int


def examples_per_batch(B: int) -> int:
    """floor(B/4); B >= 4 is required (llm.c divides by it)."""
    if B < NUM_COMPLETIONS:
        raise ValueError(f"the HellaSwag eval needs a batch size B >= {NUM_COMPLETIONS} (each example takes "
                         f"{NUM_COMPLETIONS} rows); got B={B}")
    return B // NUM_COMPLETIONS


def required_seq_len(examples: Sequence[Example]) -> int:
    """The smallest T llm.c accepts for these examples: context + longest completion + 1."""
    return max((ex.num_tokens for ex in examples), default=0) + 1


def check_examples(examples: Sequence[Example], T: int, vocab_size: int | None = None) -> None:
    """llm.c's per-example checks (non-empty context and completions, context + completion < T,
    4 completions, label in range), plus token ids < vocab_size; LLMCFormatError naming the first offender."""
    for ex in examples:
        where = f"HellaSwag example {ex.index}"
        if len(ex.completions) != NUM_COMPLETIONS:
            raise LLMCFormatError(f"{where}: {len(ex.completions)} completions, expected {NUM_COMPLETIONS}")
        if not 0 <= ex.label < NUM_COMPLETIONS:
            raise LLMCFormatError(f"{where}: label {ex.label} is not in [0, {NUM_COMPLETIONS})")
        if len(ex.context) == 0 or any(len(c) == 0 for c in ex.completions):
            raise LLMCFormatError(f"{where}: empty context or completion; it cannot be scored")
        if ex.num_tokens >= T:
            too_long = sum(e.num_tokens >= T for e in examples)
            raise LLMCFormatError(
                f"{where}: context + completion is {ex.num_tokens} tokens, which does not fit T={T} (llm.c "
                f"needs context + completion < T and refuses the example); {too_long} of {len(examples)} "
                f"examples are too long: use T >= {required_seq_len(examples)}")
        if vocab_size is not None:
            for toks in [ex.context, *ex.completions]:
                big = [t for t in toks if t >= vocab_size]
                if big:
                    raise LLMCFormatError(
                        f"{where}: token id {big[0]} is outside the model's vocabulary (V={vocab_size}); the "
                        f"eval file was made with another tokenizer")


def batch_examples(examples: Sequence[Example], B: int, T: int) -> Iterator[Batch]:
    """Pack examples llm.c's way into ceil(N / floor(B/4)) batches of (B, T) (a generator).

    Slot j holds an example on rows 4j..4j+3: row 4j+c = context then completion c (then zeros);
    targets[r, t] = inputs[r, t+1] over the completion (the last context token predicts the first
    completion token), mask True exactly there. Rows past 4*floor(B/4) and empty slots stay zero."""
    K = examples_per_batch(B)
    check_examples(examples, T)
    for start in range(0, len(examples), K):
        chunk = examples[start:start + K]
        inputs = np.zeros((B, T), np.int32)
        targets = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), bool)
        labels = np.full(K, -1, np.int32)
        for j, ex in enumerate(chunk):
            labels[j] = ex.label
            n = len(ex.context)
            for c, comp in enumerate(ex.completions):
                r, m = NUM_COMPLETIONS * j + c, len(comp)
                inputs[r, :n] = ex.context
                inputs[r, n:n + m] = comp
                targets[r, n - 1:n + m - 1] = comp
                mask[r, n - 1:n + m - 1] = True
        yield Batch(inputs, targets, mask, labels, len(chunk))


# ----------------------------------------------------------------------------------------------
# scoring

def predict(losses: np.ndarray) -> np.ndarray:
    """argmin over the last axis with llm.c's scan: index 0 first, then only a strictly smaller loss
    wins (ties go to the lower index; a NaN never wins, and a NaN at 0 is never beaten)."""
    losses = np.asarray(losses)
    best = np.zeros(losses.shape[:-1], np.int64)
    best_loss = losses[..., 0].copy()
    for c in range(1, losses.shape[-1]):
        better = losses[..., c] < best_loss
        best = np.where(better, c, best)
        best_loss = np.where(better, losses[..., c], best_loss)
    return best


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def forward_seq_len(examples: Sequence[Example], T: int, multiple: int = 64) -> int:
    """The sequence length the forward actually needs: the longest example rounded up to `multiple`,
    capped at T. Attention is causal, so the completion losses are those of the full-T forward."""
    return min(T, _round_up(required_seq_len(examples), multiple))


@functools.lru_cache(maxsize=8)
def _row_loss_fn(config, B: int, T: int, dtype_name: str, kernels):
    """jitted (params, inputs, targets, mask) -> (B,) mean masked token loss of each row; cached so
    repeated evals (one per val step in training) reuse one compilation."""
    import jax
    import jax.numpy as jnp

    from llmc_jax.models.family import family_of
    from llmc_jax.nn.kernels import XLA, ModelOptions

    opts = ModelOptions(dtype=jnp.dtype(dtype_name), kernels=kernels or XLA)   # None: the xla ops

    def fn(params, inputs, targets, mask):
        lg = family_of(config).logits(params, inputs, config, opts)
        z = lg[..., :config.V].astype(jnp.float32)           # the padded columns never count
        lse = jax.nn.logsumexp(z, axis=-1)
        tgt = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
        m = mask.astype(jnp.float32)
        return jnp.sum((lse - tgt) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)

    return jax.jit(fn)


def completion_losses(params: Any, config, examples: Sequence[Example], *, B: int, T: int,
                      dtype: Any = "float32", kernels: Any = None, trim: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(N, 4) float32: mean token loss of each completion given its context (llm.c's per-row score).

    B >= 4 rows per forward (floor(B/4) examples), T the sequence length llm.c would use (<= maxT;
    every example must have context + completion < T). With trim (default) the forward runs at
    forward_seq_len(examples, T) instead of T: the same losses, far less work. One jitted forward
    serves every batch (the last one padded with empty slots). progress(done, total) after each batch."""
    import jax
    import jax.numpy as jnp

    if T > config.maxT:
        raise ValueError(f"sequence length T={T} exceeds the model's maxT={config.maxT}")
    K = examples_per_batch(B)
    check_examples(examples, T, config.V)
    Tf = forward_seq_len(examples, T) if trim else T
    fn = _row_loss_fn(config, B, Tf, jnp.dtype(dtype).name, kernels)
    params = jax.tree.map(jnp.asarray, params)      # move numpy params to the device once
    num_batches = -(-len(examples) // K)
    out = np.zeros((len(examples), NUM_COMPLETIONS), np.float32)
    pending: list[tuple[int, int, Any]] = []

    def collect():
        start, n, dev = pending.pop(0)
        rows = np.asarray(dev)[:NUM_COMPLETIONS * n]
        out[start:start + n] = rows.reshape(n, NUM_COMPLETIONS)
        if progress is not None:
            progress(start // K + 1, num_batches)

    for i, batch in enumerate(batch_examples(examples, B, Tf)):
        pending.append((i * K, batch.num_examples, fn(params, batch.inputs, batch.targets, batch.mask)))
        if len(pending) > 2:     # keep the device busy while the host packs the next batch
            collect()
    while pending:
        collect()
    return out


def score(params: Any, config, examples: Sequence[Example], *, B: int, T: int, dtype: Any = "float32",
          kernels: Any = None, trim: bool = True,
          progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """(num_correct, num_total) of llm.c's HellaSwag eval (completion-style acc_norm).

    params: the model's params (numpy or jax, fp32 or bf16); config: its GPTConfig; dtype: the
    compute dtype ("float32"/"bfloat16"); see completion_losses for B, T, trim, progress."""
    if not examples:
        return 0, 0
    losses = completion_losses(params, config, examples, B=B, T=T, dtype=dtype, kernels=kernels,
                               trim=trim, progress=progress)
    labels = np.asarray([ex.label for ex in examples])
    return int(np.sum(predict(losses) == labels)), len(examples)


def _whose(v: int) -> str:
    return f" ({VOCAB_NAMES[v]})" if v in VOCAB_NAMES else ""


def check_vocab(path: str | os.PathLike, info: EvalFileInfo, vocab_size: int) -> None:
    """The eval file's tokenization must be the model's (V = vocab_size): LLMCFormatError, one line,
    when the recorded vocabulary differs, or when an unrecorded uint16 file (llm.c's, GPT-2 tokens)
    meets a model whose vocabulary needs uint32 ids (Llama 3's)."""
    path = os.fspath(path)
    remake = ("remake it with the model's tokenizer: python scripts/prepare_hellaswag.py --tokenizer "
              "gpt2|byte|llama3:PATH -o FILE")
    if info.vocab_size is not None and info.vocab_size != vocab_size:
        raise LLMCFormatError(f"{path}: the eval file was tokenized for a vocabulary of {info.vocab_size} "
                              f"tokens{_whose(info.vocab_size)}, but the model has V={vocab_size}"
                              f"{_whose(vocab_size)}; {remake}")
    if info.vocab_size is None and info.token_bytes == 2 and vocab_size > DELIMITER:
        raise LLMCFormatError(f"{path}: an llm.c uint16 eval file (GPT-2 tokens, no vocabulary recorded), but the "
                              f"model has V={vocab_size}{_whose(vocab_size)}; {remake}")


def load(path: str | os.PathLike, B: int, T: int, vocab_size: int | None = None) -> list[Example]:
    """Read an eval file and check up front that llm.c could score it at (B, T) (for `-h 1`) and, given
    the model's vocab_size, that it was tokenized for that vocabulary (check_vocab): FileNotFoundError
    saying how to make the file when it is missing, LLMCFormatError/ValueError else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: HellaSwag eval file not found; {HOW_TO_MAKE}")
    examples_per_batch(B)
    if vocab_size is not None:
        check_vocab(path, read_eval_info(path), vocab_size)
    examples = read_eval_file(path)
    if not examples:
        raise LLMCFormatError(f"{path}: the eval file holds no examples")
    try:
        check_examples(examples, T, vocab_size)
    except LLMCFormatError as e:
        raise LLMCFormatError(f"{path}: {e}") from None
    return examples
