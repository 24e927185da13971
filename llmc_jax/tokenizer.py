"""python -m llmc_jax.tokenizer [TEXT]: which GPT-2 tokenizer files load (and TEXT's token ids).

The command's name stays put whatever the package layout; the tokenizers live in llmc_jax.formats."""
from __future__ import annotations

from llmc_jax.errors import run_command
from llmc_jax.formats.tokenizer import main

if __name__ == "__main__":
    run_command(main)
