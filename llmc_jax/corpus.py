"""A built-in, offline text corpus so `python -m llmc_jax.train` runs on real text with no arguments.

The text is English prose that every CPython install carries: the docstrings of the standard
library's modules, classes and functions (`ast.get_docstring`, in source order) and the paragraphs of
full-line comments, over the stdlib's .py files sorted by path (test directories and site-packages
left out). About 2-3 MB of text. It is tokenized byte-level (V = 256, token = byte value), every
document preceded by the delimiter token 0 (llm.c's EOT-first convention; NUL bytes are removed from
the text so 0 only ever means end-of-text). The first ~5% of the documents are the val split.

The shards are written once, in llm.c's format, into `<cache>/corpus-<version>/`, where `<cache>` is
the `cache_dir` argument, else `$LLMC_JAX_CACHE`, else `~/.cache/llmc_jax`. The directory is built
under a temporary name and renamed into place, so a killed build is redone, never half-used.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from llmc_jax.llmc_format import LLMCFormatError, read_shard_header, write_shard

CORPUS_FORMAT = 1  # bump when the text selection or the tokenization changes
VOCAB_SIZE = 256
EOT = 0
VAL_FRACTION = 0.05
TRAIN_NAME = "stdlib_train_000001.bin"
VAL_NAME = "stdlib_val_000000.bin"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_STALE_TMP_SECONDS = 3600
_CODING = re.compile(r"#.*coding[:=]")  # PEP 263 source-encoding line, not prose


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


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.If, ast.Try, ast.With)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module and of every class/function in it, in source order."""
    def walk(node):
        if isinstance(node, (ast.Module, *_DEFS)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc
            children = node.body
        else:  # an if/try/with block that may define functions or classes
            children = list(node.body) + list(getattr(node, "orelse", [])) + list(getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                children += h.body
        for c in children:
            if isinstance(c, (*_DEFS, *_BLOCKS)):
                yield from walk(c)
    yield from walk(tree)


def _comment_paragraphs(source: str) -> Iterator[str]:
    """Runs of full-line comments joined into one line each, if they read as prose (mostly letters)."""
    par: list[str] = []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!") and not _CODING.match(s):
            par.append(s.lstrip("#").strip())
            continue
        text = " ".join(w for w in par if w)
        par = []
        if len(text) >= 40 and sum(c.isalpha() or c == " " for c in text) >= 0.8 * len(text):
            yield text


def file_documents(path: str) -> list[str]:
    """The documents of one source file: each docstring, then its comment paragraphs as one document."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = ast.parse(raw, filename=path)
    except (SyntaxError, ValueError):
        return []
    docs = list(_docstrings(tree))
    source = raw.decode("utf-8", errors="replace")
    comments = "\n".join(_comment_paragraphs(source))
    if comments:
        docs.append(comments)
    return [d.replace("\x00", "") for d in docs if d.strip()]


def tokenize_documents(docs: Sequence[str], val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint16 token streams: each document = EOT then its UTF-8 bytes; the first
    documents up to val_fraction of all tokens are val."""
    encoded = [np.frombuffer(b"\x00" + d.encode("utf-8"), dtype=np.uint8) for d in docs]
    if not encoded:
        raise RuntimeError("no documents to tokenize")
    total = sum(len(e) for e in encoded)
    cum, n_val = 0, 0
    while n_val < len(encoded) - 1 and cum < val_fraction * total:
        cum += len(encoded[n_val])
        n_val += 1
    val = np.concatenate(encoded[:n_val]).astype(np.uint16) if n_val else np.zeros(0, np.uint16)
    train = np.concatenate(encoded[n_val:]).astype(np.uint16)
    return train, val


def build_corpus(out_dir: str, files: Sequence[str] | None = None,
                 val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Write the train and val shards of the corpus of `files` (default: all stdlib files) into out_dir."""
    files = stdlib_files() if files is None else list(files)
    print(f"building built-in corpus from {len(files)} stdlib files "
          f"({sysconfig.get_paths()['stdlib']}) ...", file=sys.stderr, flush=True)
    docs: list[str] = []
    for path in files:
        docs += file_documents(path)
    if not docs:
        raise RuntimeError(f"found no docstrings in {len(files)} standard library files; this Python install "
                           f"has no .py sources (give training data with -i/-j instead)")
    train, val = tokenize_documents(docs, val_fraction)
    os.makedirs(out_dir, exist_ok=True)
    train_path, val_path = os.path.join(out_dir, TRAIN_NAME), os.path.join(out_dir, VAL_NAME)
    write_shard(val_path, val)
    write_shard(train_path, train)
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(f"llmc_jax built-in corpus {corpus_version()}: docstrings and comments of {len(files)} Python "
                f"standard library files, {len(docs)} documents, byte-level tokens (V=256, 0 = end of text "
                f"before every document). {VAL_NAME}: {len(val)} tokens; {TRAIN_NAME}: {len(train)} tokens.\n")
    return train_path, val_path


# ------------------------------------------------------------------ the cache

def default_cache_root() -> str:
    return os.environ.get("LLMC_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmc_jax")


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
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_root()))
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
