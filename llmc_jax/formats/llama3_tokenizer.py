"""Llama 3's BPE from Meta's `tokenizer.model` (tiktoken's format: a base64 token and its rank per
line), with Llama 3's pre-tokenization pattern and the 256 special tokens from 128000.

The file is gated by Meta, so it is never downloaded: it comes from a path (`--tokenizer
llama3:PATH`) or the LLMC_JAX_LLAMA3_TOKENIZER environment variable. llm.c's llama3 data scripts put
<|begin_of_text|> (128000) before each document, so that is this tokenizer's `eot` (the token the
trainer, the sampler and the data scripts put at a document's start)."""
from __future__ import annotations

import os

from llmc_jax.formats.tokenizer import TiktokenTokenizer

ENV_VAR = "LLMC_JAX_LLAMA3_TOKENIZER"
NUM_BASE_TOKENS = 128000
NUM_SPECIAL_TOKENS = 256
# Llama 3.1's names as its Hugging Face tokenizer.json gives them (128255 = reserved_special_token_247);
# the ids that mean something (begin/end of text, the header ids, eom, eot) are Llama 3.0's as well
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{3 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(SPECIAL_TOKENS))]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HOW_TO_GET = ("Llama 3's tokenizer is Meta's tokenizer.model (tiktoken format), downloaded with the model "
              "after accepting Meta's license (huggingface.co/meta-llama/Llama-3.1-8B, original/tokenizer.model); "
              f"give its path as --tokenizer llama3:PATH or in ${ENV_VAR}")


class Llama3TokenizerError(RuntimeError):
    """The file is missing or not a Llama 3 tokenizer.model; the message says what to do."""


class Llama3Tokenizer(TiktokenTokenizer):
    """Llama 3's BPE with its 256 special tokens after the base ranks."""

    name = "llama3"

    def __init__(self, ranks: dict[bytes, int], source: str):
        import tiktoken
        n = len(ranks)
        self.special = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=f"llama3:{source}", pat_str=PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special)
        self.eot = self.special["<|begin_of_text|>"]
        self.vocab_size = n + NUM_SPECIAL_TOKENS
        self.source = source

    def __repr__(self) -> str:
        return f"Llama3Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def read_ranks(path: str) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken-format file: every line `<base64 token> <rank>`, the ranks
    0..n-1 each once, every single byte among the tokens (or BPE could not encode every text)."""
    import base64
    import binascii
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise Llama3TokenizerError(f"{path}: no such file. {HOW_TO_GET}") from None
    except IsADirectoryError:
        raise Llama3TokenizerError(f"{path}: not a regular file; expected Llama 3's tokenizer.model") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise Llama3TokenizerError(f"{path}: line {number} is not '<base64 token> <rank>'; "
                                       f"is this Llama 3's tokenizer.model (tiktoken format)?") from None
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise Llama3TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise Llama3TokenizerError(f"{path}: {len(missing)} single bytes have no token (e.g. {missing[0]}); "
                                   f"a BPE vocabulary must hold all 256")
    return ranks


def load(path: str | os.PathLike | None = None) -> Llama3Tokenizer:
    """The tokenizer from `path`, else from $LLMC_JAX_LLAMA3_TOKENIZER; Llama3TokenizerError when neither."""
    path = os.fspath(path) if path else os.environ.get(ENV_VAR)
    if not path:
        raise Llama3TokenizerError(f"no Llama 3 tokenizer file given. {HOW_TO_GET}")
    ranks = read_ranks(path)
    return Llama3Tokenizer(ranks, os.path.basename(path))
