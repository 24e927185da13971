"""A built-in, offline text corpus so `python -m llmc_jax.train` runs on real text with no arguments.

The text is what every CPython install carries: the source of the standard library, one document
per .py file (code, docstrings and comments as written), over the stdlib's .py files sorted by
path (test directories and site-packages left out), about 12 MB with Python 3.11. Chosen by
measurement over the stdlib's docstrings and comments alone: in the same four CPU minutes the same
model reaches 1.8 nats per byte on the source and 2.5 on the docstrings, and its samples read as
Python. It is tokenized byte-level (V = 256, token = byte value), every document preceded by the
delimiter token 0 (llm.c's EOT-first convention; NUL bytes are removed from the text so 0 only ever
means end-of-text). Every VAL_EVERY-th file is the val split, so val holds every kind of module.

The shards are written once, in llm.c's format, into `<cache>/corpus-<version>/`, where `<cache>` is
the `cache_dir` argument, else `$LLMC_JAX_CACHE`, else `~/.cache/llmc_jax`. The directory is built
under a temporary name and renamed into place, so a killed build is redone, never half-used.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence

import numpy as np

from llmc_jax.formats.llmc_format import LLMCFormatError, read_shard_header, write_shard
from llmc_jax.paths import cache_root

CORPUS_FORMAT = 2  # bump when the text selection or the tokenization changes
VOCAB_SIZE = 256
EOT = 0
VAL_EVERY = 20     # files 0, 20, 40, ... (in path order) are the val split: 5% of the files
TRAIN_NAME = "stdlib_train_000001.bin"
VAL_NAME = "stdlib_val_000000.bin"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_STALE_TMP_SECONDS = 3600


class ByteTokenizer:
    """Byte-level tokenizer of the built-in corpus: token = UTF-8 byte value, 0 = end of text."""

    eot = EOT
    vocab_size = VOCAB_SIZE
    eot_text = "<|endoftext|>"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD); the EOT token reads as <|endoftext|>."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {VOCAB_SIZE})")
            if i == EOT:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(self.eot_text)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# ------------------------------------------------------------------ text extraction

def corpus_version() -> str:
    """Names the corpus: its format and the Python whose stdlib it comes from (the text depends on it)."""
    v = sys.version_info
    return f"{CORPUS_FORMAT}-py{v.major}.{v.minor}.{v.micro}"


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's .py files, sorted by path, without tests and installed packages."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return sorted(files)


def file_document(path: str) -> bytes:
    """One source file as one document: its bytes as written (NULs removed: 0 is the delimiter)."""
    with open(path, "rb") as f:
        return f.read().replace(b"\x00", b"")


def tokenize_documents(docs: Sequence[bytes], val_every: int = VAL_EVERY) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint16 token streams: each document = EOT then its bytes; documents 0, val_every,
    2 * val_every, ... are val, the rest train."""
    if not docs:
        raise RuntimeError("no documents to tokenize")
    encoded = [np.frombuffer(b"\x00" + d, dtype=np.uint8) for d in docs]
    val = [e for i, e in enumerate(encoded) if i % val_every == 0]
    train = [e for i, e in enumerate(encoded) if i % val_every != 0] or val
    return np.concatenate(train).astype(np.uint16), np.concatenate(val).astype(np.uint16)


def build_corpus(out_dir: str, files: Sequence[str] | None = None) -> tuple[str, str]:
    """Write the train and val shards of the corpus of `files` (default: all stdlib files) into out_dir."""
    files = stdlib_files() if files is None else list(files)
    print(f"building built-in corpus from {len(files)} stdlib files "
          f"({sysconfig.get_paths()['stdlib']}) ...", file=sys.stderr, flush=True)
    docs = [d for d in map(file_document, files) if d.strip()]
    if not docs:
        raise RuntimeError(f"found no source in {len(files)} standard library files; this Python install "
                           f"has no .py sources (give training data with -i/-j instead)")
    train, val = tokenize_documents(docs)
    os.makedirs(out_dir, exist_ok=True)
    train_path, val_path = os.path.join(out_dir, TRAIN_NAME), os.path.join(out_dir, VAL_NAME)
    write_shard(val_path, val)
    write_shard(train_path, train)
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(f"llmc_jax built-in corpus {corpus_version()}: the source of {len(docs)} Python standard library "
                f"files, one document each, byte-level tokens (V=256, 0 = end of text before every document); "
                f"every {VAL_EVERY}th file is val. {VAL_NAME}: {len(val)} tokens; {TRAIN_NAME}: {len(train)} "
                f"tokens.\n")
    return train_path, val_path


# ------------------------------------------------------------------ the cache

def _complete(d: str) -> bool:
    try:
        return all(read_shard_header(os.path.join(d, n)) > 0 for n in (TRAIN_NAME, VAL_NAME))
    except (LLMCFormatError, OSError):
        return False


def _remove_stale_tmp(root: str, name: str) -> None:
    """Remove half-built directories that killed builds left behind (older than an hour)."""
    try:
        entries = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for e in entries:
        p = os.path.join(root, e)
        if e.startswith(f".{name}.tmp-"):
            try:
                if now - os.path.getmtime(p) > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def builtin_corpus(cache_dir: str | None = None) -> tuple[str, str]:
    """(train_pattern, val_pattern) of the built-in corpus, building it on first use.

    cache_dir is the cache root (default $LLMC_JAX_CACHE, else ~/.cache/llmc_jax); the shards live in
    <cache_dir>/corpus-<version>/. The patterns are plain paths (a glob matching exactly one shard).
    """
    root = os.path.abspath(os.path.expanduser(cache_dir or cache_root()))
    name = f"corpus-{corpus_version()}"
    final = os.path.join(root, name)
    paths = (os.path.join(final, TRAIN_NAME), os.path.join(final, VAL_NAME))
    if _complete(final):
        return paths
    os.makedirs(root, exist_ok=True)
    _remove_stale_tmp(root, name)
    if os.path.exists(final):
        if _complete(final):  # another process finished it meanwhile
            return paths
        shutil.rmtree(final, ignore_errors=True)  # damaged after it was built: rebuild it
    tmp = os.path.join(root, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_corpus(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # lost a race only if the winner finished; otherwise a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ntok = sum(read_shard_header(p) for p in paths)
    print(f"built-in corpus -> {final} ({ntok} tokens: {read_shard_header(paths[0])} train, "
          f"{read_shard_header(paths[1])} val)", file=sys.stderr, flush=True)
    return paths
