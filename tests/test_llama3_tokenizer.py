"""Llama 3's tokenizer loader (llmc_jax.formats.llama3_tokenizer) on a small tiktoken-format BPE file
built here: byte-level BPE merges worked out by hand, Llama 3's pre-tokenization (digits in threes,
no space glued to a number), the 256 special ids after the base vocabulary, and one-line errors."""
import base64
import os

import pytest

from llmc_jax import sample
from llmc_jax.errors import UsageError
from llmc_jax.formats import llama3_tokenizer
from llmc_jax.formats.tokenizer import get_tokenizer

# single bytes at ranks 0..255, then merges each made of two lower-ranked tokens
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12", b"123", b"\n\n"]


def _write_bpe(path, tokens):
    lines = [base64.b64encode(t) + b" " + str(rank).encode() for rank, t in enumerate(tokens)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.fixture
def small_bpe(tmp_path):
    return _write_bpe(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + MERGES)


def test_encode_decode_and_special_ids(small_bpe):
    tok = get_tokenizer(f"llama3:{small_bpe}")
    text = "hello world's 12345\n\n"
    # hello=259, " world"=264, "'s" as two bytes, " " alone, "123"=266 then "45", "\n\n"=267
    assert tok.encode(text) == [259, 264, 39, 115, 32, 266, 52, 53, 267]
    assert tok.decode(tok.encode(text)) == text
    assert tok.eot == 268 and tok.vocab_size == 268 + 256        # <|begin_of_text|> right after the ranks
    assert tok.special["<|eot_id|>"] == 268 + 9 and tok.special["<|reserved_special_token_247|>"] == 268 + 255
    assert tok.encode("<|begin_of_text|>") == list(b"<|begin_of_text|>")   # text never becomes a special id
    assert tok.decode([tok.eot]) == "<|begin_of_text|>"


def test_path_from_the_environment(small_bpe, monkeypatch):
    monkeypatch.setenv(llama3_tokenizer.ENV_VAR, small_bpe)
    assert get_tokenizer("llama3").encode("hello") == [259]
    monkeypatch.delenv(llama3_tokenizer.ENV_VAR)
    with pytest.raises(llama3_tokenizer.Llama3TokenizerError, match="no Llama 3 tokenizer file given.*tokenizer.model"):
        get_tokenizer("llama3")


@pytest.mark.parametrize("tokens,match", [
    (None, r"no such file.*accepting Meta's license"),
    ([bytes([b]) for b in range(255)], r"1 single bytes have no token \(e\.g\. 255\)"),
    ("not base64 !", r"line 1 is not '<base64 token> <rank>'"),
    ("ranks", r"the ranks are not 0\.\.256"),
])
def test_bad_files_are_one_line(tmp_path, tokens, match):
    path = tmp_path / "t.model"
    if tokens == "not base64 !":
        path.write_text("not base64 !\n")
    elif tokens == "ranks":
        path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (b * 2) for b in range(256)) +
                         base64.b64encode(b"ab") + b" 1\n")
    elif tokens is not None:
        _write_bpe(path, tokens)
    with pytest.raises(llama3_tokenizer.Llama3TokenizerError, match=match):
        llama3_tokenizer.load(path)


def test_sample_names_a_missing_file_or_a_bad_name_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"cannot load the llama3:.*missing\.model: no such file"):
        sample.main(["-e", "llama3:tiny", "--tokenizer", f"llama3:{tmp_path}/missing.model", "-g", "2"])
    with pytest.raises(UsageError, match=r"--tokenizer: unknown tokenizer 'nope'; choose gpt2, byte or llama3"):
        sample.main(["-e", "llama3:tiny", "--tokenizer", "nope", "-g", "2"])


@pytest.mark.skipif(not os.environ.get(llama3_tokenizer.ENV_VAR), reason="Meta's tokenizer.model is gated: "
                    f"set ${llama3_tokenizer.ENV_VAR} to run this on the real file")
def test_the_real_file():
    tok = get_tokenizer("llama3")
    assert tok.vocab_size == 128256 and tok.eot == 128000
    assert tok.encode("Hello world") == [9906, 1917]
