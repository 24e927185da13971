"""The built-in corpus: deterministic, readable, cached, built atomically; the byte tokenizer."""
import os

import numpy as np
import pytest

from llmc_jax.formats import corpus
from llmc_jax.formats.corpus import ByteTokenizer, build_corpus, builtin_corpus, stdlib_files
from llmc_jax.formats.data import DataLoader
from llmc_jax.formats.llmc_format import read_shard


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full build (all stdlib files) shared by the tests of this module."""
    root = str(tmp_path_factory.mktemp("cache"))
    return root, builtin_corpus(root)


def _small_files():
    return stdlib_files()[:40]


def test_build_is_deterministic(tmp_path):
    files = _small_files()
    a = build_corpus(str(tmp_path / "a"), files)
    b = build_corpus(str(tmp_path / "b"), files)
    for pa, pb in zip(a, b):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()
    assert stdlib_files() == sorted(stdlib_files())


def test_full_corpus_is_readable_text(built):
    root, (train_pattern, val_pattern) = built
    assert train_pattern.startswith(os.path.join(root, "corpus-"))
    train, val = read_shard(train_pattern), read_shard(val_pattern)
    assert 5_000_000 < len(train) < 40_000_000
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15
    files = stdlib_files()
    # one document per non-empty file, every 20th file in val: the EOT count says so
    n_docs = sum(1 for f in files if corpus.file_document(f).strip())
    assert int((train == 0).sum()) + int((val == 0).sum()) == n_docs
    with open(files[0], "rb") as f:                  # file 0 is the first val document, verbatim
        first = f.read().replace(b"\x00", b"")
    assert bytes(val[1:1 + len(first)].astype(np.uint8)) == first
    for toks in (train, val):
        assert toks[0] == ByteTokenizer.eot and int(toks.max()) < 256
    text = ByteTokenizer().decode(val[:200000])
    assert text.startswith("<|endoftext|>")
    # Python source: its keywords and English in its docstrings and comments
    words = text.replace("<|endoftext|>", " ").split()
    assert sum(w in ("def", "return", "import", "self", "if") for w in words) > 0.02 * len(words)
    assert sum(w.lower() in ("the", "of", "and", "to", "is") for w in words) > 0.01 * len(words)
    printable = sum(c.isprintable() or c in "\n\t" for c in text)
    assert printable > 0.99 * len(text)
    # the loader serves it with the byte vocabulary
    x, y = DataLoader(train_pattern, 4, 64, vocab_size=256).next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 256


def test_cache_is_reused(built, monkeypatch, capsys):
    root, paths = built
    mtimes = [os.path.getmtime(p) for p in paths]
    monkeypatch.setattr(corpus, "build_corpus", lambda *a, **k: pytest.fail("rebuilt a cached corpus"))
    assert builtin_corpus(root) == paths
    monkeypatch.setenv("LLMC_JAX_CACHE", root)  # the env var names the cache root
    assert builtin_corpus() == paths
    assert [os.path.getmtime(p) for p in paths] == mtimes
    assert "building" not in capsys.readouterr().err


def test_killed_build_is_redone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "stdlib_files", _small_files)
    real_write = corpus.write_shard
    calls = []

    def dying_write(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two shards
        real_write(path, tokens)

    monkeypatch.setattr(corpus, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        builtin_corpus(str(tmp_path))
    assert [e for e in os.listdir(tmp_path) if not e.startswith(".")] == []  # nothing half-built in place
    monkeypatch.setattr(corpus, "write_shard", real_write)
    train, val = builtin_corpus(str(tmp_path))
    err = capsys.readouterr().err
    assert "building built-in corpus from 40 stdlib files" in err and "tokens" in err
    assert len(read_shard(train)) > 0 and len(read_shard(val)) > 0
    # a damaged finished corpus (truncated shard) is rebuilt, not used
    with open(train, "r+b") as f:
        f.truncate(2000)
    assert builtin_corpus(str(tmp_path)) == (train, val)
    assert len(read_shard(train)) > 0


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eot == 0
    s = "Hello, wörld — ∑ 🐍\n"
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s
    assert tok.decode(np.array([0, 72, 105, 0])) == "<|endoftext|>Hi<|endoftext|>"
    assert tok.decode([0xE2, 0x82, 72]) == "\ufffdH"  # a cut-off UTF-8 sequence is replaced
    with pytest.raises(ValueError, match="outside"):
        tok.decode([256])
