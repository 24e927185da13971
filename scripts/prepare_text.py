#!/usr/bin/env python3
"""Tokenize local text into llm.c token shards; also the shared code of the dataset scripts.

    python scripts/prepare_text.py FILES... -o DIR [--name NAME] [--tokenizer gpt2|byte|llama3[:PATH]]
        [--val-tokens N | --val-frac F] [--shard-size N] [--doc-split file|blank-line|line]
        [--jsonl-field text] [--workers N] [--force]

Inputs: .txt (or any other suffix: read as UTF-8 text), .jsonl (one JSON object per line, the
document is its `--jsonl-field`), .json (a list of such objects), .parquet (needs pyarrow); each
optionally .gz. A .txt file is one document (`--doc-split file`), or one per blank-line-separated
section (`blank-line`, llm.c's tinyshakespeare rule: a section keeps its trailing "\\n\\n"), or one
per line (`line`).

As llm.c's dev/data scripts do, every document is preceded by the EOT token (50256 for gpt2, 0 for
byte, whose tokenizer drops NUL characters from the text, 128000 = <|begin_of_text|> for llama3),
the documents are concatenated in input order, and the stream is cut into shards in llm.c's format
(1024-byte header; uint16 tokens for gpt2 and byte, magic 20240520 version 1; uint32 tokens for
llama3, llm.c's Llama 3 format, magic 20240801 version 7): the first `--val-tokens` tokens (or the
first `--val-frac` of all tokens; default 0.1) are the val split, the rest train, each split in
shards of at most `--shard-size` tokens, numbered on from the val shard: DIR/NAME_val_000000.bin,
DIR/NAME_train_000001.bin, ... Train with
`python -m llmc_jax.train -i "DIR/NAME_train_*.bin" -j "DIR/NAME_val_*.bin" ...`.

Llama 3's tokenizer is Meta's tokenizer.model (gated, never downloaded here): `--tokenizer
llama3:PATH`, or `--tokenizer llama3` with $LLMC_JAX_LLAMA3_TOKENIZER (or --tokenizer-path PATH).

Big inputs are tokenized by a process pool (`--workers`, default: all cores for inputs over
16 MiB); long documents are cut at points where both GPT-2's and Llama 3's pre-tokenizers split
anyway, so the tokens are those of the uncut text. DIR/NAME.prep.json records what was made from
what; a rerun with the same inputs and options skips the work (`--force` redoes it).

Library (imported by prepare_tinyshakespeare.py, prepare_tinystories.py, prepare_fineweb.py):
`Encoder` (parallel tokenization), `ShardWriter` (streaming shard writer), `iter_file_documents`,
`download` (resumable, verified), `Progress`, `run_prepare`.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

from llmc_jax.training import cli  # noqa: E402
from llmc_jax.formats import tokenizer as tokmod  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, one_line, run_command  # noqa: E402
from llmc_jax.formats.llmc_format import HEADER_INTS, SHARD_FORMATS, read_shard_header  # noqa: E402

DEFAULT_SHARD_SIZE = 10**8
DEFAULT_VAL_FRAC = 0.1
MAX_UNIT_CHARS = 1 << 18        # long documents are cut into pieces of about this many characters
BATCH_CHARS = 1 << 18           # characters per task sent to a worker
AUTO_POOL_BYTES = 16 << 20      # inputs at least this big get a process pool by default
MAX_SHARD_TOKENS = 2**31 - 1    # llm.c's limit (the header's token count is an int32)


# re-exported for the dataset scripts, which import this module as their library
from prep_common import (DownloadError, PrepareError, Progress, download, manual_hint,  # noqa: E402,F401
                         verify_file)


# ----------------------------------------------------------------------------- reading documents

DOC_SPLITS = ("file", "blank-line", "line")


def _open_text(path: str):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _kind(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    for ext in ("jsonl", "json", "parquet"):
        if base.endswith("." + ext):
            return ext
    return "txt"


def _field(obj, field: str, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise PrepareError(f"{where}: no field {field!r} (has {keys}); choose the text field with --jsonl-field")
    text = obj[field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: field {field!r} is {type(text).__name__}, not text")
    return text


def iter_file_documents(path: str, doc_split: str = "file", field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, input bytes it accounts for) for one input file, in file order."""
    kind = _kind(path)
    size = os.path.getsize(path)
    try:
        if kind == "parquet":
            yield from _iter_parquet(path, field, size)
        elif kind == "jsonl":
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg}); a .jsonl file holds "
                                               f"one JSON object per line") from None
                        yield _field(obj, field, f"{path}:{lineno}"), len(line)
        elif kind == "json":
            with _open_text(path) as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise PrepareError(f"{path}: a .json input must hold a list of documents (objects with a "
                                   f"{field!r} field); got {type(data).__name__}")
            per = size // max(len(data), 1)
            for i, obj in enumerate(data):
                yield _field(obj, field, f"{path}[{i}]"), per
        else:
            with _open_text(path) as f:
                text = f.read()
            if doc_split == "file":
                yield text, size
            elif doc_split == "blank-line":
                sections = text.split("\n\n")
                for i, s in enumerate(sections):
                    doc = s if i == len(sections) - 1 else s + "\n\n"
                    yield doc, len(doc)
            elif doc_split == "line":
                for line in text.splitlines():
                    yield line, len(line) + 1
            else:
                raise PrepareError(f"unknown --doc-split {doc_split!r}; choose one of {', '.join(DOC_SPLITS)}")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)") from None


def _iter_parquet(path: str, field: str, size: int) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no column {field!r} (has {pf.schema_arrow.names}); choose it with "
                           f"--jsonl-field")
    rows = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        texts = batch.column(0).to_pylist()
        per = size * len(texts) / rows / max(len(texts), 1)
        for t in texts:
            yield (t or ""), per


def iter_documents(paths: Sequence[str], doc_split: str = "file", field: str = "text") -> Iterator[tuple[str, int]]:
    for p in paths:
        yield from iter_file_documents(p, doc_split, field)


# ----------------------------------------------------------------------------- exact cutting

# Points where the pre-tokenizers of GPT-2 (tiktoken's r50k pattern) and Llama 3 (llama3_tokenizer.PATTERN)
# both always split, so that tokenizing the pieces separately gives exactly the tokens of the whole:
#   * before a space that sits between two non-space characters. No piece of either pattern holds a
#     space after a non-space character (GPT-2's pieces and Llama 3's letter/punctuation pieces take
#     at most one space or other non-letter, and only at their start; digits, contractions and the
#     whitespace-only pieces hold none), and neither pattern looks behind.
#   * before a newline between an ASCII letter or digit and a non-space character. GPT-2 would allow
#     this after any non-space, but Llama 3's punctuation piece ` ?[^\s\p{L}\p{N}]+[\r\n]*` swallows
#     the newlines after punctuation (".\n" is one piece), so the character before the newline must
#     be a letter or digit; ASCII ones are \p{L}/\p{N} in every regex engine.
# Every such point is one of the points GPT-2's earlier rule, (?<=\S)(?=[ \n]\S), allowed, so GPT-2's
# tokens are unchanged. Python's \s covers at least the characters the tokenizers' \s does, which
# keeps the \S tests on the safe side. Byte tokens are the same wherever the text is cut.
_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=[A-Za-z0-9])(?=\n\S)")


def split_exact(text: str, max_chars: int | None = None) -> list[str]:
    """Cut text into pieces of about max_chars (default MAX_UNIT_CHARS) at safe points (see _CUT);
    the pieces join to text."""
    max_chars = max_chars or MAX_UNIT_CHARS
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        m = _CUT.search(text, start + max_chars)
        if m is None:
            break
        cut = m.start()
        if cut <= start:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# ----------------------------------------------------------------------------- tokenizing

TOKENIZERS = "gpt2, byte or llama3[:PATH]"


def tokenizer_arg(spec: str) -> str:
    """argparse type of --tokenizer: gpt2, byte, llama3 or llama3:PATH (a bad name: exit 2, one line)."""
    if spec in ("gpt2", "byte", "llama3") or (spec.startswith("llama3:") and len(spec) > len("llama3:")):
        return spec
    raise argparse.ArgumentTypeError(f"invalid choice: {spec!r} (choose {TOKENIZERS})")


def resolve_tokenizer(spec: str, path: str | None = None) -> tuple[str, str | None]:
    """(name, path) for tokmod.get_tokenizer from a --tokenizer value and --tokenizer-path: llama3's
    file is named by llama3:PATH, else --tokenizer-path, else $LLMC_JAX_LLAMA3_TOKENIZER, and made
    absolute (process-pool workers load it again); gpt2's path is the BPE folder (or None)."""
    if spec == "llama3" or spec.startswith("llama3:"):
        from llmc_jax.formats import llama3_tokenizer
        file = spec[len("llama3:"):] or path or os.environ.get(llama3_tokenizer.ENV_VAR) or None
        return "llama3", os.path.abspath(os.path.expanduser(file)) if file else None
    return spec, path


def token_bytes_for(name: str, vocab_size: int) -> int:
    """Bytes per token in the shards: 4 (llm.c's Llama 3 format, uint32) for llama3 or any vocabulary
    over 65536, else 2 (GPT-2's format, uint16)."""
    return 4 if name == "llama3" or vocab_size > 65536 else 2


def load_tokenizer(spec: str, path: str | None = None):
    """The tokenizer a --tokenizer value names; PrepareError (one line: the file, and how to get it)
    when it cannot be loaded. Call it before any download, so a missing file fails at once."""
    name, path = resolve_tokenizer(spec, path)
    if name == "llama3":
        from llmc_jax.formats import llama3_tokenizer
        try:
            return llama3_tokenizer.load(path)
        except llama3_tokenizer.Llama3TokenizerError as e:
            raise PrepareError(str(e)) from None
    return tokmod.get_tokenizer(name, path)


def tokenizer_id(spec: str, path: str | None = None):
    """What a recipe records of the tokenizer: its name for gpt2 and byte (the files are pinned),
    the tokenizer file's path, size and mtime for llama3 (another file means other tokens)."""
    name, file = resolve_tokenizer(spec, path)
    if name != "llama3":
        return spec
    return {"llama3": _file_id(file) if file and os.path.isfile(file) else file}


_WORKER: dict = {}


def _init_worker(name: str, path: str | None, token_bytes: int = 2) -> None:
    tok = tokmod.get_tokenizer(name, path)
    _WORKER.update(tok=tok, strip_nul=(name == "byte"), token_bytes=token_bytes)


def _encode_batch(batch: list[tuple[str, bool]]) -> np.ndarray:
    """(In a worker) tokens of a batch of (text, starts a document) pieces."""
    return encode_pieces(_WORKER["tok"], batch, _WORKER["strip_nul"], _WORKER["token_bytes"])


def encode_pieces(tok, batch: list[tuple[str, bool]], strip_nul: bool = False, token_bytes: int = 2) -> np.ndarray:
    """Tokens of a batch of (text, starts a document) pieces, EOT in front of every document, as
    uint16 (token_bytes 2) or uint32 (4)."""
    eot = np.asarray([tok.eot], dtype=np.int64)
    parts = []
    for text, starts_doc in batch:
        if starts_doc:
            parts.append(eot)
        if strip_nul:
            text = text.replace("\x00", "")
        parts.append(np.asarray(tok.encode(text), dtype=np.int64))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    top = (1 << (8 * token_bytes)) - 1
    if arr.size and (arr.min() < 0 or arr.max() > top):
        raise PrepareError(f"a token id does not fit uint{8 * token_bytes}; llm.c's "
                           f"{'GPT-2' if token_bytes == 2 else 'Llama 3'} shards hold ids <= {top}")
    return arr.astype(SHARD_FORMATS[token_bytes][2])


def _batches(docs: Iterable[tuple[str, float] | str]) -> Iterator[tuple[list[tuple[str, bool]], float]]:
    batch: list[tuple[str, bool]] = []
    chars, nbytes = 0, 0.0
    for d in docs:
        text, size = (d, len(d)) if isinstance(d, str) else d
        for i, piece in enumerate(split_exact(text)):
            batch.append((piece, i == 0))
            chars += len(piece)
            if chars >= BATCH_CHARS:
                yield batch, nbytes
                batch, chars, nbytes = [], 0, 0.0
        nbytes += size
    if batch or nbytes:
        yield batch, nbytes


class Encoder:
    """Tokenizes a stream of documents in order, in-process or with a spawn-started process pool.

    `tokenizer` is a --tokenizer value (gpt2, byte, llama3, llama3:PATH); `token_bytes` is the shard
    width it needs (2: uint16, 4: uint32), `recipe_id` what a recipe records of it."""

    def __init__(self, tokenizer: str = "gpt2", tokenizer_path: str | None = None, workers: int = 1):
        self.spec = tokenizer
        self.recipe_id = tokenizer_id(tokenizer, tokenizer_path)
        self.name, self.path = resolve_tokenizer(tokenizer, tokenizer_path)
        # load once here: a missing or corrupt tokenizer fails now, with its message, not in a worker
        tok = load_tokenizer(tokenizer, tokenizer_path)
        if self.name == "gpt2":
            self.path = tok.source if tok.source != "tiktoken" else tokenizer_path
        self.eot, self.vocab_size = tok.eot, tok.vocab_size
        self.token_bytes = token_bytes_for(self.name, self.vocab_size)
        self.tok = tok
        self.workers = max(1, int(workers))
        self._pool = None

    def encode_docs(self, docs: Iterable[tuple[str, float] | str]) -> Iterator[tuple[np.ndarray, float]]:
        """(tokens, input bytes consumed) per batch of documents, in document order."""
        if self.workers == 1:
            for batch, nbytes in _batches(docs):
                yield encode_pieces(self.tok, batch, self.name == "byte", self.token_bytes), nbytes
            return
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # safe even when the caller has threads (JAX)
            self._pool = ctx.Pool(self.workers, initializer=_init_worker,
                                  initargs=(self.name, self.path, self.token_bytes))
        sizes: list[float] = []

        def tasks():
            for batch, nbytes in _batches(docs):
                sizes.append(nbytes)
                yield batch

        for i, arr in enumerate(self._pool.imap(_encode_batch, tasks(), chunksize=1)):
            yield arr, sizes[i]
            sizes[i] = 0.0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._pool is not None:
            self._pool.terminate()
            self._pool = None
        self.close()


def auto_workers(total_bytes: float) -> int:
    return (os.cpu_count() or 1) if total_bytes >= AUTO_POOL_BYTES else 1


# ----------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Cuts one token stream into llm.c shards, streaming each to disk (memory stays small).

    The first `val_tokens` tokens go to val shards (float("inf"): until end_val() is called), the rest
    to train shards; a shard holds at most `shard_size` tokens (None: unbounded). Names:
    NAME_{val,train}_NNNNNN.bin with one running index, or with single_files=True llm.c's
    NAME_val.bin / NAME_train.bin (one file per split). A shard is written to NAME.tmp and renamed
    when complete. token_bytes 2 writes GPT-2's format (uint16, magic 20240520 version 1), 4 llm.c's
    Llama 3 format (uint32, magic 20240801 version 7).
    """

    def __init__(self, out_dir: str, name: str, shard_size: int | None = DEFAULT_SHARD_SIZE,
                 val_tokens: float = 0, single_files: bool = False, verbose: bool = True,
                 token_bytes: int = 2):
        if shard_size is not None and shard_size <= 0:
            raise PrepareError(f"--shard-size must be positive, got {shard_size}")
        if token_bytes not in SHARD_FORMATS:
            raise PrepareError(f"token_bytes={token_bytes!r}; shards hold 2 (uint16) or 4 (uint32) bytes per token")
        self.token_bytes = token_bytes
        self.magic, self.version, self.dtype, _ = SHARD_FORMATS[token_bytes]
        self.out_dir, self.name = out_dir, name
        self.shard_size = min(shard_size or MAX_SHARD_TOKENS, MAX_SHARD_TOKENS)
        self.single_files = single_files
        self.verbose = verbose
        self.val_left = val_tokens
        self.split = "val" if val_tokens > 0 else "train"
        self.index = 0
        self.written: list[dict] = []  # {"path", "split", "tokens"}
        self._f = None
        self._count = 0
        os.makedirs(out_dir, exist_ok=True)

    def path_for(self, split: str, index: int) -> str:
        if self.single_files:
            return os.path.join(self.out_dir, f"{self.name}_{split}.bin")
        return os.path.join(self.out_dir, f"{self.name}_{split}_{index:06d}.bin")

    def _open(self) -> None:
        self._path = self.path_for(self.split, self.index)
        if self.single_files and any(w["path"] == self._path for w in self.written):
            raise PrepareError(f"{self._path}: the {self.split} split would need a second file; llm.c's "
                               f"single-file layout holds at most {MAX_SHARD_TOKENS} tokens per split")
        self._f = open(self._path + ".tmp", "wb")
        self._f.write(b"\0" * (4 * HEADER_INTS))
        self._count = 0

    def _finish(self) -> None:
        if self._f is None:
            return
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (self.magic, self.version, self._count)
        self._f.seek(0)
        self._f.write(header.tobytes())
        self._f.close()
        self._f = None
        os.replace(self._path + ".tmp", self._path)
        assert read_shard_header(self._path) == self._count
        self.written.append({"path": self._path, "split": self.split, "tokens": self._count})
        if self.verbose:
            nbytes = 4 * HEADER_INTS + self.token_bytes * self._count
            print(f"wrote {self._count:,} tokens to {self._path} ({nbytes:,} bytes)", file=sys.stderr)
        self.index += 1

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and tokens.dtype != np.dtype(self.dtype):    # the Encoder's arrays need no check
            lo, hi, top = int(tokens.min()), int(tokens.max()), (1 << (8 * self.token_bytes)) - 1
            if lo < 0 or hi > top:
                raise PrepareError(f"token id {lo if lo < 0 else hi} does not fit the uint{8 * self.token_bytes} "
                                   f"shards being written")
            tokens = tokens.astype(self.dtype)
        pos, n_total = 0, len(tokens)
        while pos < n_total:
            if self._f is None:
                self._open()
            room = self.shard_size - self._count
            if self.split == "val":
                room = min(room, self.val_left)
            n = int(min(room, n_total - pos))
            self._f.write(tokens[pos:pos + n].tobytes())
            self._count += n
            pos += n
            if self.split == "val":
                self.val_left -= n
            if self._count >= self.shard_size:
                self._finish()
            if self.split == "val" and self.val_left <= 0:
                self._finish()
                self.split = "train"

    def end_val(self) -> None:
        """Close the val split now (split by source, as TinyStories' shard 0); later tokens are train."""
        if self.split == "val":
            self._finish()
            self.split = "train"
            self.val_left = 0

    def close(self) -> list[dict]:
        self._finish()
        return self.written

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            try:
                os.remove(self._path + ".tmp")
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()


def remove_outputs(out_dir: str, name: str) -> None:
    """Delete shards (and leftovers) of an earlier run named `name`, so no stale shard joins a glob."""
    if not os.path.isdir(out_dir):
        return
    pat = re.compile(re.escape(name) + r"_(val|train)(_\d{6})?\.bin(\.tmp)?$")
    for f in os.listdir(out_dir):
        if pat.match(f) or f == f".{name}.tokens.tmp":
            os.remove(os.path.join(out_dir, f))


# ----------------------------------------------------------------------------- recipe records

def record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}.prep.json")


def is_done(out_dir: str, name: str, recipe: dict) -> bool:
    """True when a previous run with the same recipe completed and all its shards are intact."""
    try:
        with open(record_path(out_dir, name)) as f:
            rec = json.load(f)
        if rec.get("recipe") != json.loads(json.dumps(recipe)):
            return False
        return all(read_shard_header(os.path.join(out_dir, s["file"])) == s["tokens"] for s in rec["shards"])
    except Exception:
        return False


def write_record(out_dir: str, name: str, recipe: dict, shards: list[dict]) -> dict:
    rec = {"recipe": recipe,
           "shards": [{"file": os.path.basename(s["path"]), "split": s["split"], "tokens": s["tokens"]}
                      for s in shards],
           "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
           "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train")}
    tmp = record_path(out_dir, name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, record_path(out_dir, name))
    return rec


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": int(st.st_mtime)}


# ----------------------------------------------------------------------------- the pipeline

def tokenize_into(writer: ShardWriter, encoder: Encoder, docs: Iterable, progress: Progress | None = None) -> int:
    """Tokenize docs ((text, input bytes) or text) and feed them to writer; returns the token count."""
    n = 0
    for arr, nbytes in encoder.encode_docs(docs):
        writer.write(arr)
        n += len(arr)
        if progress is not None:
            progress.update(nbytes, tokens=len(arr))
    return n


def run_prepare(docs: Iterable, out_dir: str, name: str, *, tokenizer: str = "gpt2",
                tokenizer_path: str | None = None, val_tokens: float | None = None,
                val_frac: float | None = None, shard_size: int | None = DEFAULT_SHARD_SIZE,
                single_files: bool = False, workers: int = 1, total_bytes: float | None = None,
                desc: str = "tokenizing", verbose: bool = True, encoder: Encoder | None = None) -> list[dict]:
    """Tokenize docs into shards of out_dir: val first (val_tokens, or val_frac of the whole), then train.

    With val_frac the stream is first written to a temporary file (its length must be known).
    Stale shards named `name` are removed first. Returns ShardWriter.written.
    """
    if val_tokens is not None and val_frac is not None:
        raise PrepareError("give --val-tokens or --val-frac, not both")
    if val_frac is None and val_tokens is None:
        val_frac = DEFAULT_VAL_FRAC
    if val_frac is not None and not 0 <= val_frac < 1:
        raise PrepareError(f"--val-frac must be in [0, 1), got {val_frac}")
    if val_tokens is not None and val_tokens < 0:
        raise PrepareError(f"--val-tokens must be >= 0, got {val_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    remove_outputs(out_dir, name)
    own_encoder = encoder is None
    encoder = encoder or Encoder(tokenizer, tokenizer_path, workers)
    try:
        with Progress(desc, total_bytes, enabled=verbose) as prog:
            width, dtype = encoder.token_bytes, SHARD_FORMATS[encoder.token_bytes][2]
            if val_frac is None:
                with ShardWriter(out_dir, name, shard_size, val_tokens, single_files, verbose, width) as w:
                    tokenize_into(w, encoder, docs, prog)
                return w.written
            tmp = os.path.join(out_dir, f".{name}.tokens.tmp")
            try:
                with open(tmp, "wb") as f:
                    for arr, nbytes in encoder.encode_docs(docs):
                        f.write(arr.astype(dtype).tobytes())
                        prog.update(nbytes, tokens=len(arr))
                total = os.path.getsize(tmp) // width
                n_val = int(round(val_frac * total))
                with ShardWriter(out_dir, name, shard_size, n_val, single_files, verbose, width) as w:
                    if total:
                        stream = np.memmap(tmp, dtype=dtype, mode="r")
                        for i in range(0, total, 1 << 24):
                            w.write(stream[i:i + (1 << 24)])
                        del stream
                return w.written
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    finally:
        if own_encoder:
            encoder.close()


def summarize(shards: list[dict]) -> str:
    val = sum(s["tokens"] for s in shards if s["split"] == "val")
    train = sum(s["tokens"] for s in shards if s["split"] == "train")
    nv = sum(s["split"] == "val" for s in shards)
    return f"{val:,} val tokens in {nv} shard(s), {train:,} train tokens in {len(shards) - nv} shard(s)"


# ----------------------------------------------------------------------------- command line

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=tokenizer_arg, default="gpt2", metavar="{gpt2,byte,llama3[:PATH]}",
                   help="gpt2 (GPT-2 BPE, V=50257, eot 50256; uint16 shards), byte (UTF-8 bytes, V=256, eot 0; "
                        "uint16) or llama3:PATH (Meta's Llama 3 tokenizer.model, V=128256, <|begin_of_text|> "
                        "128000 before each document; uint32 shards, llm.c's Llama 3 format; plain llama3 reads "
                        "$LLMC_JAX_LLAMA3_TOKENIZER)")
    p.add_argument("--tokenizer-path", default=None,
                   help="gpt2: folder with the GPT-2 BPE files (default: $LLMC_JAX_TOKENIZER, "
                        "~/.cache/llmc_jax/tokenizer, or tiktoken's download); llama3: the tokenizer.model file")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: all cores for big inputs, else 1)")
    p.add_argument("--force", action="store_true", help="redo the work even if a complete earlier result exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


# The numeric flags of the prepare scripts (each script has some of them).
BOUNDS = {"workers": cli.POSITIVE, "shard_size": cli.POSITIVE, "val_tokens": cli.NONNEG,
          "val_frac": cli.Bound("in [0, 1)", lambda v: 0 <= v < 1)}


def parse_checked(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then range-check the numeric flags: a bad value is one line and exit 2, before any work."""
    args = p.parse_args(argv)
    cli.check_bounds(p, args, BOUNDS)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python scripts/prepare_text.py",
                       description="Tokenize local .txt/.jsonl/.json/.parquet files into llm.c token shards.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  python scripts/prepare_text.py book.txt -o data/book --tokenizer gpt2\n"
                              "  python -m llmc_jax.train -i 'data/book/*_train_*.bin' -j 'data/book/*_val_*.bin'\n"
                              "  python scripts/prepare_text.py book.txt -o data/book_llama3 "
                              "--tokenizer llama3:/path/to/tokenizer.model")
    p.add_argument("files", nargs="+", help="input files (.txt, .jsonl, .json, .parquet; optionally .gz)")
    p.add_argument("-o", "--output-dir", required=True, help="directory for the shards")
    p.add_argument("--name", default=None, help="shard name prefix (default: the output directory's name)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-tokens", type=int, default=None, help="the first N tokens are the val split")
    val.add_argument("--val-frac", type=float, default=None,
                     help=f"the first fraction F of all tokens is the val split (default {DEFAULT_VAL_FRAC})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"tokens per shard (default {DEFAULT_SHARD_SIZE:,})")
    p.add_argument("--doc-split", choices=DOC_SPLITS, default="file",
                   help="how .txt files split into documents: the whole file, blank-line-separated sections, "
                        "or lines (default: file)")
    p.add_argument("--jsonl-field", default="text", help="the text field of .jsonl/.json/.parquet records (default: text)")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = parse_checked(p, argv)
    try:
        for f in args.files:          # an input named on the command line: a usage error (exit 2)
            if not os.path.isfile(f):
                raise UsageError(f"{f}: {'a directory, not a file' if os.path.isdir(f) else 'no such file'}")
        out_dir = args.output_dir
        name = args.name or os.path.basename(os.path.normpath(os.path.abspath(out_dir))) or "data"
        recipe = {"files": [_file_id(f) for f in args.files],
                  "tokenizer": tokenizer_id(args.tokenizer, args.tokenizer_path),
                  "val_tokens": args.val_tokens, "val_frac": args.val_frac, "shard_size": args.shard_size,
                  "doc_split": args.doc_split, "field": args.jsonl_field}
        if not args.force and is_done(out_dir, name, recipe):
            print(f"{out_dir}: already prepared from these inputs ({record_path(out_dir, name)}); "
                  f"--force redoes it", file=sys.stderr)
            return 0
        total = sum(os.path.getsize(f) for f in args.files)
        workers = args.workers if args.workers is not None else auto_workers(total)
        shards = run_prepare(iter_documents(args.files, args.doc_split, args.jsonl_field), out_dir, name,
                             tokenizer=args.tokenizer, tokenizer_path=args.tokenizer_path,
                             val_tokens=args.val_tokens, val_frac=args.val_frac, shard_size=args.shard_size,
                             workers=workers, total_bytes=total, verbose=not args.quiet)
        write_record(out_dir, name, recipe, shards)
        print(f"{out_dir}: {summarize(shards)}", file=sys.stderr)
        return 0
    except (PrepareError, tokmod.TokenizerNotFoundError, tokmod.TokenizerHashError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_command(main)
