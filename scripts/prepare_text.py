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
`Encoder` (parallel tokenization), `run_prepare`, and re-exported from their own modules
`ShardWriter` (shard_files.py), `iter_file_documents` (text_documents.py), `download` (resumable,
verified) and `Progress` (prep_common.py).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

from llmc_jax.training import cli  # noqa: E402
from llmc_jax.formats import tokenizer as tokmod  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, one_line, run_command  # noqa: E402
from llmc_jax.formats.llmc_format import SHARD_FORMATS  # noqa: E402

DEFAULT_VAL_FRAC = 0.1
BATCH_CHARS = 1 << 18           # characters per task sent to a worker
AUTO_POOL_BYTES = 16 << 20      # inputs at least this big get a process pool by default


# re-exported for the dataset scripts, which import this module as their library
from prep_common import (DownloadError, PrepareError, Progress, download, manual_hint,  # noqa: E402,F401
                         verify_file)
from shard_files import (DEFAULT_SHARD_SIZE, ShardWriter, _file_id, is_done,  # noqa: E402,F401
                         record_path, remove_outputs, write_record)
from text_documents import (DOC_SPLITS, _field, iter_documents, iter_file_documents,  # noqa: E402,F401
                            split_exact)


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
