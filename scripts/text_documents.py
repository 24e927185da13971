"""Reading documents for scripts/prepare_text.py and the dataset scripts: text, JSON lines, JSON and
parquet inputs (optionally gzipped) as (document, input bytes) pairs, and cutting long documents
at points where both GPT-2's and Llama 3's pre-tokenizers split anyway."""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence

from prep_common import PrepareError

MAX_UNIT_CHARS = 1 << 18        # long documents are cut into pieces of about this many characters

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
